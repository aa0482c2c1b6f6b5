from __future__ import annotations

from pathlib import Path

import torch

from model_shards.batch import SeqChunk, plan_step
from model_shards.loader import load_local_model
from model_shards.model import GptOssModel


def greedy(model: GptOssModel, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    kv = model.new_cache(num_blocks=16)
    kv.place(0, len(prompt) + steps)
    tokens, logprobs, feed, start = [], [], prompt, 0
    for _ in range(steps):
        logits = model.forward(torch.tensor(feed), plan_step([SeqChunk(0, start, len(feed))]), kv)[0]
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(torch.log_softmax(logits, -1)[token].item())
        start, feed = start + len(feed), [token]
    return tokens, logprobs


def test_random_model_does_not_collapse(tiny_hf: Path) -> None:
    model = load_local_model(str(tiny_hf), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    outs = [greedy(model, torch.randint(0, 199_998, (20,), generator=gen).tolist(), 24) for _ in range(4)]
    for tokens, _ in outs:
        assert len(set(tokens)) >= 12, tokens  # not one token over and over
    assert len({tuple(t) for t, _ in outs}) == 4  # the prompt matters
    assert all(-8.0 < lp < 0.0 for _, lps in outs for lp in lps)  # peaked but not degenerate
