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
