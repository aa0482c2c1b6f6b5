"""A decode step asks the host for nothing but its sampled tokens: at most 2 host syncs per step
(syncs.py counts them on the CPU), whatever the batch size and the number of layers, through the same
counted step `gptoss bench` reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.bench.benchmark import bench_decode
from cluster.config import KVSpec, ModelSource
from cluster.engine.executor import LocalExecutor
from model_shards.capabilities import FALLBACK_ENV, cpu_features
from model_shards.syncs import count_dispatch

MAX_SYNCS = 2
KV = KVSpec(num_blocks=128, block_size=16, max_seqs=16)


@pytest.fixture
def fallback(monkeypatch: pytest.MonkeyPatch):
    """bf16 without the CPU's prepacked paths (what CUDA and most CPUs run): those oneDNN paths, on
    CPUs that have them, read each layer's expert counts on the host, where there is no device to wait for."""
    monkeypatch.setenv(FALLBACK_ENV, "1")
    cpu_features.cache_clear()
    yield
    monkeypatch.undo()
    cpu_features.cache_clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_local_decode_step_syncs_at_most_twice(tiny_hf: Path, dtype: str, fallback: None) -> None:
    executor = LocalExecutor(ModelSource(str(tiny_hf), dtype), KV, threads=1)
    rows = bench_decode(executor, "local", [1, 16], input_len=20, steps=1, warmup=1)
    for row in rows:
        assert row.host_syncs_per_step is not None and row.ops_per_layer is not None
        assert row.host_syncs_per_step <= MAX_SYNCS, (row.batch_size, row.syncs_by_process)
        assert row.ops_per_layer > 20  # the count sees the layers' ops at all


def test_the_counter_sees_what_it_promises() -> None:
    """Each listed call counts once; views and arithmetic do not count as syncs."""
    x = torch.arange(12.0).view(3, 4)
    with count_dispatch() as c:
        y = (x * 2).t().reshape(-1)
        assert c.syncs == 0 and c.ops >= 1
        x.sum().item()
        x.tolist()
        bool(x[0, 1])
        torch.nonzero(x)
        torch.bincount(torch.tensor([1, 2]))
        torch.unique(y)
        x[x > 3]
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)  # sized: no read
    assert c.syncs == 8, c.sync_sites
    assert sum(n for site, n in c.sync_sites.items() if "test_host_syncs.py" in site) == 8
