"""`gptoss bench plot` draws the load curve of saved results, ours and vLLM's, into a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.bench.plot import read_series, title_of
from cluster.bench.results import LevelSpec, RequestResult, RunInfo, level_report, save_records, vllm_record
from deploy.cli.main import main


def saved(path: Path, label: str | None, scale: float) -> Path:
    """A sweep at 1, 2 and inf requests/s whose latencies grow with the rate."""
    info = RunInfo("/models/small", "/v1/completions", 4, "random", label=label, percentiles=(50.0, 99.0))
    records = []
    for rate in (1.0, 2.0, math.inf):
        slow = scale * (3.0 if math.isinf(rate) else rate)
        results = [RequestResult(True, 0.05 * slow, 0.5 * slow, [0.02 * slow] * 7, 8, 8) for _ in range(4)]
        records.append(vllm_record(info, level_report(LevelSpec(rate, 1.0, None), results, 2.0 / slow, (50.0, 99.0),
                                                      None), results))
    save_records(path, records)
    return path


def test_bench_plot_writes_a_png_from_two_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = saved(tmp_path / "gptoss.json", None, 1.0)
    theirs = tmp_path / "vllm.json"  # as vLLM writes one run: an indented object, no machine
    record = json.loads(saved(tmp_path / "x.json", "vllm-cpu", 1.5).read_text().splitlines()[0])
    del record["machine"]
    theirs.write_text(json.dumps(record, indent=2))
    out = tmp_path / "img" / "curve.png"
    assert main(["bench", "plot", str(ours), str(theirs), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < out.stat().st_size < 200_000
    assert "wrote" in capsys.readouterr().out
    series = [read_series(ours), read_series(theirs)]
    assert [s.name for s in series] == ["gptoss", "vllm-cpu"]  # the file's name unless a label was chosen
    assert [p.rate for p in series[0].points] == [1.0, 2.0, math.inf]
    title = title_of(series)
    assert "small" in title and "/models" not in title and " x " in title  # model, date, machine


def test_a_result_without_p99_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"output_throughput": 1.0, "median_tpot_ms": 2.0}))
    assert main(["bench", "plot", str(path), "-o", str(tmp_path / "c.png")]) == 2
    assert "p99_ttft_ms" in capsys.readouterr().err
