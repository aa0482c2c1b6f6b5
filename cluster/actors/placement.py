"""Where actors run: Ray itself (started in this process, or an existing cluster) and one
placement group with a bundle per actor, so that GPUs (or fractions of one) are reserved up front
and a restarted actor comes back in the same bundle."""

from __future__ import annotations

import logging
import math
import os

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

log = logging.getLogger(__name__)


def connect_ray(address: str | None, min_cpus: float) -> None:
    """Use the Ray this process is already connected to, join `address`, or start a local one
    with at least `min_cpus` logical CPUs (actors are mostly waiting on each other, so on a small
    machine there may be more actors than cores)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=True)


def bundle(cpus: float, gpus: float, extra: dict[str, float] | None = None) -> dict[str, float]:
    b = {"CPU": cpus, **(extra or {})}
    if gpus > 0:
        b["GPU"] = gpus
    return b


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        raise RuntimeError(f"cannot place {len(bundles)} actors needing {need} (strategy {strategy}); "
                           f"the cluster has {ray.cluster_resources()}")
    return pg


def release(pg: PlacementGroup) -> None:
    remove_placement_group(pg)
