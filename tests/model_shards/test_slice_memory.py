"""An expert shard that loads experts [a, b) reads about (b - a)/E of the expert bytes.

The checkpoint (over 200 MB, MXFP4 experts, real HF layout) is written once; each load runs in a
fresh process, after the file's pages are dropped from the page cache, and reports its peak RSS
growth and the bytes it read from disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_shards.config import preset
from model_shards.random_checkpoint import write_checkpoint
from model_shards.weights import ExpertWeights, Mxfp4Stack, empty_model

PROBE = r"""
import json, os, sys
from pathlib import Path
import torch
from model_shards.checkpoint import Checkpoint
from model_shards.weights import load_experts

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def read_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes"):
            return int(line.split()[1])

root, a, b = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for path in root.glob("*.safetensors"):  # make the OS read from disk, not from the page cache
    fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS mark from here
rss0, io0 = status("VmRSS"), read_bytes()
with Checkpoint(root) as ckpt:
    experts = load_experts(ckpt, torch.bfloat16, experts=(a, b), keep_mxfp4=True)
    requested = ckpt.bytes_read
print(json.dumps({"peak_growth": status("VmHWM") - rss0, "disk_read": read_bytes() - io0, "requested": requested}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    cfg = preset("small").replace(intermediate_size=1024)
    weights = empty_model(cfg, device="cpu", dtype=torch.bfloat16)  # uninitialised: contents do not matter here
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(weights.experts):
        e, h, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        weights.experts[i] = ExpertWeights(
            0, Mxfp4Stack(torch.randint(0, 256, (e, 2 * inter, h // 32, 16), dtype=torch.uint8, generator=gen),
                          torch.randint(120, 130, (e, 2 * inter, h // 32), dtype=torch.uint8, generator=gen)),
            layer.gate_up_bias, Mxfp4Stack(torch.randint(0, 256, (e, h, inter // 32, 16), dtype=torch.uint8, generator=gen),
                                           torch.randint(120, 130, (e, h, inter // 32), dtype=torch.uint8, generator=gen)),
            layer.down_bias)
    root = write_checkpoint(weights, tmp_path_factory.mktemp("big"), "hf", as_mxfp4=True)
    total = sum(p.stat().st_size for p in root.glob("*.safetensors"))
    assert total >= 200e6, total
    return root, cfg.num_experts


def _probe(root: Path, a: int, b: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(root), str(a), str(b)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_a_quarter_of_the_experts_reads_a_quarter(big_checkpoint: tuple[Path, int]) -> None:
    root, experts = big_checkpoint
    quarter = _probe(root, 8, 8 + experts // 4)
    everything = _probe(root, 0, experts)
    print("quarter:", quarter, "all:", everything)
    assert quarter["requested"] == pytest.approx(everything["requested"] / 4, rel=1e-6)
    assert everything["requested"] > 150e6  # the expert bytes of the file
    ratio = quarter["peak_growth"] / everything["peak_growth"]
    assert 0.15 < ratio < 0.4, ratio
    assert quarter["peak_growth"] < 0.4 * everything["requested"]
    if everything["disk_read"] > 0.5 * everything["requested"]:  # where the kernel accounts reads per process
        disk_ratio = quarter["disk_read"] / everything["disk_read"]
        assert 0.15 < disk_ratio < 0.4, disk_ratio
