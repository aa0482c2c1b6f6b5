"""scripts/gpu-check.sh, run the way CI can: `--cpu` takes the same steps with the tiny preset."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu() -> None:
    run = subprocess.run(["bash", "scripts/gpu-check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "== tests marked gpu" in run.stdout and "== decode check" in run.stdout
    report = json.loads(run.stdout.strip().splitlines()[-1])
    rows = {(r["experts"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("dense", 1), ("dense", 16), ("mxfp4", 1), ("mxfp4", 16)}
    assert report["copy_gb_per_s"] > 0
    for (experts, _), r in rows.items():
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["read_gb_per_s"] > 0
        assert r["kernels_per_layer"] > 20 and r["graphs"] is False  # no CUDA here
        if experts == "dense":
            assert r["host_syncs_per_step"] <= 2


@pytest.mark.kernels
@pytest.mark.gpu
def test_the_kernel_rows_run_in_the_interpreter() -> None:
    """kernel_check's harness on the tiny preset under TRITON_INTERPRET=1 (set by conftest.py): every
    kernel once; the GB/s mean nothing here, only that each row is measured."""
    import os

    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1")
    from cluster.bench.kernel_check import kernel_rows
    from model_shards.config import preset

    rows = kernel_rows(preset("tiny"), torch.float32, torch.device("cpu"), [1], context=64, reps=1)
    assert {r.kernel for r in rows} == {"paged_decode", "grouped_mxfp4", "grouped_dense", "route_topk", "add_rms_norm"}
    assert all(r.us > 0 and r.gb_per_s > 0 for r in rows)
