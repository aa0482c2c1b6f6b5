from __future__ import annotations

from pathlib import Path

import torch

from model_shards.generate import Request, generate
from model_shards.loader import load_local_model
from model_shards.sampling import SamplingParams


def test_random_model_does_not_collapse(tiny_hf: Path) -> None:
    model = load_local_model(str(tiny_hf), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 199_998, (20,), generator=gen).tolist() for _ in range(4)]
    outs = generate(model, [Request(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in prompts])
    for out in outs:
        assert len(set(out.token_ids)) >= 12, out.token_ids  # not one token over and over
    assert len({tuple(o.token_ids) for o in outs}) == 4  # the prompt matters
    assert all(-8.0 < lp < 0.0 for o in outs for lp in o.logprobs)  # peaked but not degenerate
