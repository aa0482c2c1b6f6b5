"""Typed telemetry's derived numbers: the expert shards' load imbalance."""

from __future__ import annotations

import pytest

from cluster.telemetry import shard_imbalance


def test_shard_imbalance_per_layer_and_over_the_pass() -> None:
    per_layer, overall = shard_imbalance([[30, 10], [20, 20], [0, 0]])
    assert per_layer == [1.5, 1.0, 1.0]  # busiest over mean; a layer with nothing routed is even
    assert overall == pytest.approx((30 + 20) / (20 + 20))  # what the slowest shards cost against an even split
    assert shard_imbalance([[40, 0, 0, 0]]) == ([4.0], 4.0)  # one shard of four takes everything
    assert shard_imbalance([]) == ([], 1.0)
