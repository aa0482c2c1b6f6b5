"""Decode steps from static buffers (decode_graph.py: what CUDA captures as graphs) against the
ordinary eager step on the CPU: the same tokens and log-probs, through batch and key buckets,
padding rows, sequences joining and leaving, prefill and mixed steps in between (those stay eager).

With buffers of each step's own shapes (`static_decode="exact"`) a step's logits are bitwise the
eager step's (so are the tokens and log-probs sampled from them). With the buckets (what CUDA captures) tokens are identical and log-probs equal
within fp32 rounding: the CPU's fp32 matmuls round a row differently by the number of rows they are
called with (3 rows against a bucket's 4), and the attention kernel by the number of keys (a
bucket's 512 against 264); with a bucket-sized batch whose keys fit the smallest key bucket they
are bitwise equal again (tested)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from model_shards.decode_graph import StaticDecoder, batch_bucket, key_bucket
from model_shards.sampling import SamplingParams

KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in (3, 40, 130, 9, 200)]


PARAMS = [SamplingParams(max_tokens=24, temperature=0.0),
          SamplingParams(max_tokens=30, temperature=1.0, seed=3),
          SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=8),
          SamplingParams(max_tokens=20, temperature=0.0),
          SamplingParams(max_tokens=12, temperature=1.2, seed=1, top_k=20)]


def generate(tiny_hf: Path, static: bool | str) -> tuple[list, int]:
    executor = LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV, threads=1, static_decode=static)
    engine = Engine(executor)
    try:
        outs = engine.generate(prompts(), PARAMS, timeout=120)
    finally:
        engine.shutdown()
    runs = len(executor.decoder._replays) if executor.decoder is not None else 0
    return outs, runs


def test_static_decode_equals_eager(tiny_hf: Path) -> None:
    eager, _ = generate(tiny_hf, static=False)
    exact, shapes = generate(tiny_hf, static="exact")
    assert shapes >= 4  # several buffers were made and reused
    for a, b in zip(eager, exact):  # (two engine runs may batch differently: rounding; bitwise: below)
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    bucketed, buckets = generate(tiny_hf, static=True)
    assert buckets >= 2  # several (batch, keys) buckets were used
    for a, b in zip(eager, bucketed):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)  # padded batches: see the docstring


def test_a_step_from_the_buffers_gives_the_eager_logits(tiny_hf: Path) -> None:
    from model_shards.batch import SeqChunk, plan_step

    executor = LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV, threads=1, static_decode=True)
    model, kv, decoder = executor.model, executor.core.cache, executor.decoder
    assert decoder is not None
    gen = torch.Generator().manual_seed(0)
    lengths = [50, 60, 70, 80, 100, 190, 260, 330]  # the last ones past the sliding window and 128 keys
    for s, n in enumerate(lengths):
        kv.place(s, 400)
        ids = torch.randint(0, 199_998, (n,), generator=gen)
        model.forward(ids, plan_step([SeqChunk(s, 0, n)]), kv, executor._moe)
    exact = StaticDecoder(model, executor._moe, graphs=False, exact=True)
    for seqs in ([0, 1, 2, 3], [0, 1], [0], [0, 1, 2], [4, 5, 6, 7], [1, 6, 7]):
        chunks = [SeqChunk(s, lengths[s], 1) for s in seqs]
        tokens = [5 + s for s in seqs]
        eager = model.forward(torch.tensor(tokens), plan_step(chunks), kv, executor._moe)
        assert torch.equal(exact.run(kv, chunks, tokens), eager), seqs  # the same shapes: bitwise
        static = decoder.run(kv, chunks, tokens)
        if batch_bucket(len(seqs)) == len(seqs) and max(lengths[s] for s in seqs) < 128:
            assert torch.equal(eager, static), seqs
        assert torch.allclose(eager, static, atol=1e-4), seqs


def test_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 3, 16, 17, 256)] == [1, 4, 16, 24, 256]
    assert batch_bucket(257) is None
    assert [key_bucket(n) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]
