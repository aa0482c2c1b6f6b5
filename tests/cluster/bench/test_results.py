"""Goodput counts only the requests that met every SLO; a saved result has vLLM's field names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.bench.results import (LevelSpec, RequestResult, RunInfo, level_report, load_records, parse_goodput,
                                   save_records, vllm_record)

# vLLM's `bench serve --save-result` keys (vllm/benchmarks/serve.py) that scripts read.
VLLM_KEYS = {"date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
             "burstiness", "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
             "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
             "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors"}
VLLM_KEYS |= {f"{stat}_{m}_ms" for stat in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")}


def request(ttft: float, e2el: float, tokens: int, ok: bool = True) -> RequestResult:
    gap = (e2el - ttft) / max(tokens - 1, 1)
    return RequestResult(ok, ttft, e2el, [gap] * (tokens - 1), prompt_tokens=10, output_tokens=tokens, text="x",
                         error="" if ok else "HTTP 503: busy")


RESULTS = [
    request(0.10, 1.00, 10),  # TTFT 100 ms, TPOT 100 ms, E2EL 1000 ms: meets every SLO below
    request(0.30, 1.20, 10),  # TTFT 300 ms: misses the TTFT SLO only
    request(0.10, 2.80, 10),  # TPOT 300 ms and E2EL 2800 ms: misses two
    request(0.05, 0.05, 1),  # one token: TPOT 0, meets all
    request(0.0, 0.0, 0, ok=False),  # failed: never good
]


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    slos = parse_goodput(["ttft:200", "tpot:150", "e2el:2000"])
    assert slos == {"ttft": 200.0, "tpot": 150.0, "e2el": 2000.0}
    level = level_report(LevelSpec(2.0, 1.0, None), RESULTS, 2.0, (50.0, 99.0), slos)
    assert level.request_goodput == pytest.approx(2 / 2.0)  # the first and the one-token request
    assert level.request_throughput == pytest.approx(4 / 2.0) and level.failed == 1
    assert level.errors == {"HTTP 503: busy": 1}
    assert level_report(LevelSpec(2.0, 1.0, None), RESULTS, 2.0, (99.0,), None).request_goodput is None
    only_ttft = level_report(LevelSpec(2.0, 1.0, None), RESULTS, 2.0, (99.0,), parse_goodput(["ttft:200"]))
    assert only_ttft.request_goodput == pytest.approx(3 / 2.0)
    with pytest.raises(ValueError, match="NAME:MS"):
        parse_goodput(["latency:5"])


def test_metrics_follow_vllms_definitions() -> None:
    level = level_report(LevelSpec(math.inf, 1.0, 4), RESULTS, 2.0, (50.0, 90.0), None)
    assert level.request_rate == "inf" and level.concurrency == 4
    assert level.total_output_tokens == 31 and level.total_input_tokens == 40
    assert level.output_throughput == pytest.approx(31 / 2.0)
    assert level.total_token_throughput == pytest.approx(71 / 2.0)
    # TPOT over the three requests of more than one token: 100, 100 and 300 ms.
    assert level.tpot_ms["p50"] == pytest.approx(100.0) and level.tpot_ms["mean"] == pytest.approx(500 / 3)
    assert level.ttft_ms["p50"] == pytest.approx(100.0) and level.ttft_ms["p90"] == pytest.approx(240.0)  # linear


def test_the_saved_result_has_vllms_field_names(tmp_path: Path) -> None:
    slos = {"ttft": 200.0}
    info = RunInfo("/models/small", "/v1/completions", 5, "random", percentiles=(50.0, 99.0), slos=slos)
    levels = [level_report(LevelSpec(rate, 1.0, None), RESULTS, 2.0, (50.0, 99.0), slos) for rate in (1.0, math.inf)]
    path = tmp_path / "result.json"
    save_records(path, [vllm_record(info, lv, RESULTS) for lv in levels])
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # one JSON object per line, as vLLM's --append-result
    records = [json.loads(line) for line in lines]
    assert records == load_records(path)
    for record in records:
        assert VLLM_KEYS <= set(record), VLLM_KEYS - set(record)
        assert record["backend"] == "openai" and record["completed"] == 4 and record["failed"] == 1
        assert record["errors"] == ["", "", "", "", "HTTP 503: busy"] and record["failures"] == {"HTTP 503: busy": 1}
        assert record["median_ttft_ms"] == pytest.approx(100.0) and len(record["itls"]) == 5
        assert len(record["date"]) == len("20261203-071200")
    assert [r["request_rate"] for r in records] == [1.0, "inf"]  # vLLM writes an infinite rate as "inf"
    single = tmp_path / "one.json"
    save_records(single, [records[0]])
    assert json.loads(single.read_text()) == records[0]  # a single level is exactly vLLM's file
