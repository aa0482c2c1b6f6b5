"""The model's decode steps with attention through the paged kernel (what CUDA with triton runs)
against the gathered rows and the fused kernel (the CPU's path): the same logits within fp32
rounding, eager and from the static buffers (padding rows included), in float32 under the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.kernels, pytest.mark.gpu]  # natively on a GPU, interpreted elsewhere

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from model_shards.batch import SeqChunk, plan_step  # noqa: E402
from model_shards.config import preset  # noqa: E402
from model_shards.decode_graph import StaticDecoder  # noqa: E402
from model_shards.model import GptOssModel  # noqa: E402
from model_shards.random_checkpoint import random_weights  # noqa: E402


def test_paged_decode_steps_match_the_gathered_ones() -> None:
    model = GptOssModel(random_weights(preset("tiny"), seed=3))
    kv = model.new_cache(64)
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 40, 150, 300]  # inside one block, past the sliding window, many blocks
    for s, n in enumerate(lengths):
        kv.place(s, 400)
        model.forward(torch.randint(0, 199_998, (n,), generator=gen), plan_step([SeqChunk(s, 0, n)]), kv)
    decoder = StaticDecoder(model, lambda layer, t, real: model.local_moe(layer, t), graphs=False)
    for seqs in ([0, 1, 2, 3], [3, 1, 2]):  # a bucket's size, then one padded to 4
        chunks = [SeqChunk(s, lengths[s], 1) for s in seqs]
        tokens = [11 + s for s in seqs]
        results = []
        for paged in (False, True):
            kv.paged = paged
            results.append(model.forward(torch.tensor(tokens), plan_step(chunks), kv))
            results.append(decoder.run(kv, chunks, tokens))
        for other in results[1:]:
            torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-4)
