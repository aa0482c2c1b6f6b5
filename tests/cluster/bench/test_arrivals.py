"""The open-loop schedule: the asked mean rate, the dispersion the burstiness gives, the same every run."""

from __future__ import annotations

import math
import statistics

import pytest

from cluster.bench.arrivals import arrival_offsets


@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (10.0, 0.25), (2.0, 4.0)])
def test_mean_rate_and_dispersion_match_the_asked_ones(rate: float, burstiness: float) -> None:
    n = 4000
    offsets = arrival_offsets(n, rate, burstiness, seed=7)
    gaps = [b - a for a, b in zip([0.0] + offsets, offsets)]
    assert len(offsets) == n and offsets == sorted(offsets)
    assert n / offsets[-1] == pytest.approx(rate, rel=1e-9)  # vLLM scales the schedule to end at n / rate
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=1e-9)
    # Gamma gaps of shape k: coefficient of variation 1 / sqrt(k) (1 for Poisson arrivals).
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_seeded_the_same_schedule_every_run() -> None:
    assert arrival_offsets(50, 3.0, 0.5, seed=1) == arrival_offsets(50, 3.0, 0.5, seed=1)
    assert arrival_offsets(50, 3.0, 0.5, seed=1) != arrival_offsets(50, 3.0, 0.5, seed=2)


def test_infinite_rate_sends_everything_at_once_and_infinite_burstiness_evenly() -> None:
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(4, 2.0, math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
