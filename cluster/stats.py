"""Cumulative timing histograms kept inside actors and read by the metrics exporter.

Actors keep counts per fixed bucket (never raw samples), so reading them is cheap and a scrape
shows everything since start, as Prometheus histograms expect."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# seconds: from sub-millisecond CPU steps of tiny models to multi-second prefills
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = STEP_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))  # last: over the top
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def snapshot(self) -> dict[str, object]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}
