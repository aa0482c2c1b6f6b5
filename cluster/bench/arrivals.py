"""When each request of an open-loop run is sent: seeded gamma-distributed gaps, as `vllm bench serve`.

The gaps between arrivals are drawn from a gamma distribution of shape `burstiness` and mean
1 / `rate`: shape 1 is a Poisson process (exponential gaps), below 1 the arrivals come in bursts, above
1 they come more evenly (the coefficient of variation of the gaps is 1 / sqrt(burstiness)). A rate of
infinity sends everything at once. The same seed gives the same schedule, so that two servers (or two
runs) see the same load.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from typing import AsyncIterator


def arrival_offsets(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start of the run at which each of `count` requests is sent.

    As vLLM: each request waits one gap after the one before (the first one gap after the start), and
    the whole schedule is then scaled to end at exactly count / rate, so that the achieved mean rate
    does not drift by a percent or two with the seed. Burstiness infinity gives even gaps."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("the request rate and the burstiness must be positive")
    if math.isinf(rate) or count == 0:
        return [0.0] * count
    if math.isinf(burstiness):
        gaps = [1.0 / rate] * count
    else:
        rng = random.Random(seed)
        # gammavariate(alpha, beta) has mean alpha * beta: beta = 1 / (rate * alpha) makes the mean gap 1 / rate.
        gaps = [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(count)]
    offsets = list(itertools.accumulate(gaps))
    scale = count / rate / offsets[-1]
    return [t * scale for t in offsets]


async def paced(offsets: list[float]) -> AsyncIterator[int]:
    """Yield each request's index at its offset from the moment iteration starts. A late loop (the
    client busy) sends what is due at once rather than shifting the rest of the schedule."""
    start = time.perf_counter()
    for i, offset in enumerate(offsets):
        delay = offset - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        yield i
