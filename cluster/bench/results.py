"""The numbers of one `gptoss bench serve` level, and its record in the field names of `vllm bench serve`.

Definitions follow vLLM's benchmark: TTFT = time to the first streamed chunk that carries output;
ITL = gaps between consecutive such chunks; E2EL = time to the end of the response; TPOT = (E2EL -
TTFT) / (output tokens - 1), over requests of two tokens or more; throughputs divide by the wall time of
the level; percentiles interpolate linearly (numpy's default, as vLLM); goodput counts the requests
that met every SLO given (a request of one token has TPOT 0 there, as in vLLM). A saved record has
vLLM's keys (date, request_rate, request_throughput, mean/median/std/pN of ttft_ms, tpot_ms, itl_ms,
e2el_ms, ttfts, itls, errors...), so scripts that read vLLM's results read ours, plus our own:
`failures` (failed requests by reason), `machine`, `dataset_name`, `goodput_slos_ms`.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0  # seconds
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0  # the dataset's count, else the server's usage
    output_tokens: int = 0  # the server's usage, else the chunks that carried output
    text: str = ""  # what was generated, for the record's generated_texts
    error: str = ""  # why it failed ("" when it did not)

    @property
    def tpot(self) -> float:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass(frozen=True)
class LevelSpec:
    """How one level of a sweep sends its requests."""

    request_rate: float  # requests/s; inf: all at once
    burstiness: float  # gamma shape of the gaps; 1: Poisson
    max_concurrency: int | None  # requests in flight at most; None: no cap

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        cap = f" conc {self.max_concurrency}" if self.max_concurrency is not None else ""
        return f"rate {rate}{cap}"


@dataclass
class LevelReport:
    concurrency: int | None  # the cap on requests in flight (None: open loop without one)
    request_rate: float | str  # requests/s, or "inf" (all at once), as vLLM writes it
    burstiness: float
    requests: int
    failed: int
    errors: dict[str, int]  # why requests failed: reason -> count
    duration_s: float
    request_throughput: float
    request_goodput: float | None  # requests/s that met every SLO; None without --goodput
    output_throughput: float  # generated tokens per second
    total_token_throughput: float  # prompt and generated tokens per second
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: dict[str, float]  # mean, std, p50 and each asked pN
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def summarize(values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """Milliseconds: mean, std, p50 (the median) and the asked percentiles; zeros for no values."""
    ms = np.asarray(values_s, dtype=float) * 1e3
    out = {"mean": float(ms.mean()) if ms.size else 0.0, "std": float(ms.std()) if ms.size else 0.0}
    for p in sorted({50.0, *percentiles}):
        out[percentile_key(p)] = float(np.percentile(ms, p)) if ms.size else 0.0
    return out


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds), as vLLM's --goodput."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME one of {', '.join(SLO_METRICS)}, not {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be above 0 ms")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.e2el}
    return result.ok and all(measured[name] * 1e3 <= limit for name, limit in slos.items())


def json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def level_report(spec: LevelSpec, results: list[RequestResult], duration: float, percentiles: tuple[float, ...],
                 slos: dict[str, float] | None) -> LevelReport:
    good = [r for r in results if r.ok]
    inputs, outputs = sum(r.prompt_tokens for r in good), sum(r.output_tokens for r in good)
    goodput = sum(meets_slos(r, slos) for r in results) / duration if slos else None
    errors = Counter(r.error for r in results if not r.ok)
    return LevelReport(
        spec.max_concurrency, json_rate(spec.request_rate), spec.burstiness, len(results), len(results) - len(good),
        dict(errors), duration, len(good) / duration, goodput, outputs / duration, (inputs + outputs) / duration,
        inputs, outputs, summarize([r.ttft for r in good], percentiles),
        summarize([r.tpot for r in good if r.output_tokens > 1], percentiles),
        summarize([x for r in good for x in r.itl], percentiles), summarize([r.e2el for r in good], percentiles))


def machine_name() -> str:
    """The CPU the client ran on, e.g. "2 x AMD EPYC": where our servers run beside it, theirs too."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: platform's answer stands
        pass
    return f"{os.cpu_count() or 1} x {model}"


@dataclass(frozen=True)
class RunInfo:
    """What a saved record says about the run besides its numbers."""

    model_id: str
    endpoint: str  # /v1/completions or /v1/chat/completions
    num_prompts: int
    dataset_name: str
    label: str | None = None
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    slos: dict[str, float] | None = None
    date: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d-%H%M%S"))


def vllm_record(info: RunInfo, level: LevelReport, results: list[RequestResult]) -> dict[str, Any]:
    """One level as `vllm bench serve --save-result` writes one run."""
    backend = "openai-chat" if info.endpoint.endswith("chat/completions") else "openai"
    record: dict[str, Any] = {
        "date": info.date, "endpoint_type": backend, "backend": backend, "label": info.label or backend,
        "model_id": info.model_id, "tokenizer_id": "o200k_harmony", "num_prompts": info.num_prompts,
        "request_rate": level.request_rate, "burstiness": level.burstiness, "max_concurrency": level.concurrency,
        "duration": level.duration_s, "completed": level.requests - level.failed, "failed": level.failed,
        "total_input_tokens": level.total_input_tokens, "total_output_tokens": level.total_output_tokens,
        "request_throughput": level.request_throughput, "request_goodput": level.request_goodput,
        "output_throughput": level.output_throughput, "total_token_throughput": level.total_token_throughput,
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens if r.ok else 0 for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results], "latencies": [r.e2el for r in results],
        "generated_texts": [r.text for r in results], "errors": [r.error for r in results],
    }
    for metric, summary in (("ttft", level.ttft_ms), ("tpot", level.tpot_ms), ("itl", level.itl_ms),
                            ("e2el", level.e2el_ms)):
        record[f"mean_{metric}_ms"] = summary["mean"]
        record[f"median_{metric}_ms"] = summary["p50"]
        record[f"std_{metric}_ms"] = summary["std"]
        for p in info.percentiles:
            record[f"{percentile_key(p)}_{metric}_ms"] = summary[percentile_key(p)]
    record.update({"bench": "gptoss-serve", "dataset_name": info.dataset_name, "machine": machine_name(),
                   "failures": level.errors, "goodput_slos_ms": info.slos})
    return record


def save_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per line: a single level is exactly vLLM's file, a sweep is what vLLM's
    --append-result writes for one run per rate."""
    Path(path).write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a saved file: ours or vLLM's (one object, an indented one, a list, or one per line)."""
    text = Path(path).read_text(encoding="utf-8").strip()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        return [whole]
    if isinstance(whole, list):
        return [r for r in whole if isinstance(r, dict)]
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if isinstance(r, dict)]
