"""`gptoss bench plot`: the load curve of saved `bench serve` results, ours and vLLM's on the same axes.

Each file is one series (a sweep saved by `gptoss bench serve --save-result`, or `vllm bench serve
--save-result --append-result` run once per rate): its points are its request rates, placed at their
output throughput, against TTFT p99 on the left and TPOT p50 on the right; each point is labelled
with its rate. The legend names a series by its record's label where one was given (`--label`), else
by the file's name. The title says the model, the date(s) and the machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.bench.results import load_records

BACKEND_LABELS = {None, "", "openai", "openai-chat", "openai-responses", "vllm"}  # labels nobody chose


@dataclass(frozen=True)
class Point:
    rate: float  # requests/s; inf: all at once
    output_throughput: float  # tokens/s
    ttft_p99_ms: float
    tpot_p50_ms: float


@dataclass(frozen=True)
class Series:
    name: str
    points: list[Point]
    models: frozenset[str]
    dates: frozenset[str]
    machines: frozenset[str]


def _rate(record: dict[str, Any]) -> float:
    rate = record.get("request_rate", "inf")
    return math.inf if rate in ("inf", None) else float(rate)


def read_series(path: str | Path) -> Series:
    records = load_records(path)
    if not records:
        raise ValueError(f"{path} holds no benchmark result")
    points = []
    for r in records:
        missing = [k for k in ("output_throughput", "p99_ttft_ms", "median_tpot_ms") if k not in r]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)}: save it with p99 among the percentiles "
                             "(gptoss: --percentiles; vLLM: --metric-percentiles, 99 by default)")
        points.append(Point(_rate(r), float(r["output_throughput"]), float(r["p99_ttft_ms"]),
                            float(r["median_tpot_ms"])))
    label = records[0].get("label")
    name = label if label not in BACKEND_LABELS else Path(path).stem
    return Series(name, sorted(points, key=lambda p: p.rate),
                  frozenset(Path(str(r.get("model_id", "?"))).name for r in records),
                  frozenset(str(r.get("date", ""))[:8] for r in records if r.get("date")),
                  frozenset(str(r["machine"]) for r in records if r.get("machine")))


def _day(stamp: str) -> str:
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}" if len(stamp) == 8 and stamp.isdigit() else stamp


def title_of(series: list[Series], machine: str | None = None) -> str:
    models = sorted(set().union(*(s.models for s in series)))
    dates = sorted({_day(d) for s in series for d in s.dates})
    machines = [machine] if machine else sorted(set().union(*(s.machines for s in series)))
    return " | ".join(part for part in (", ".join(models), ", ".join(dates), ", ".join(machines)) if part)


def plot_load_curve(paths: list[str | Path], out: str | Path, title: str | None = None,
                    machine: str | None = None) -> Path:
    """Write the PNG; return its path."""
    # The object-oriented API with the Agg canvas: no display and no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [read_series(p) for p in paths]
    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for s in series:
        xs = [p.output_throughput for p in s.points]
        for ax, ys in ((left, [p.ttft_p99_ms for p in s.points]), (right, [p.tpot_p50_ms for p in s.points])):
            line, = ax.plot(xs, ys, marker="o", label=s.name)
            for p, x, y in zip(s.points, xs, ys):
                ax.annotate("inf" if math.isinf(p.rate) else f"{p.rate:g}/s", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=line.get_color())
    for ax, what in ((left, "TTFT p99 (ms)"), (right, "TPOT p50 (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    values = [p.ttft_p99_ms for s in series for p in s.points if p.ttft_p99_ms > 0]
    if values and max(values) > 30 * min(values):  # queueing at the highest rates dwarfs the rest
        left.set_yscale("log")
    fig.suptitle(title or f"Load curve (points: request rate): {title_of(series, machine)}", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
