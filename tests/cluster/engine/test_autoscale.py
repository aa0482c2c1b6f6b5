"""The autoscaling policy without a cluster: signals in, decisions out, with delays, hysteresis and
bounds."""

from __future__ import annotations

import pytest

from cluster.engine.autoscale import AutoscalePolicy, Autoscaler, Decision, Signals

POLICY = AutoscalePolicy(min_replicas=1, max_replicas=3, min_shards=2, max_shards=3, upscale_delay_s=2.0,
                         downscale_delay_s=10.0)


def reading(now: float, replicas: int = 1, shards: int = 2, kv: float = 0.5, waiting: int = 0,
            share: float | None = 0.3, imbalance: float | None = 1.0) -> Signals:
    return Signals(now, replicas, shards, kv, waiting, share, imbalance)


def test_a_want_acts_only_once_it_has_held_for_its_delay() -> None:
    a = Autoscaler(POLICY)
    assert a.observe(reading(0.0, waiting=3)) is None
    assert a.observe(reading(1.9, kv=0.9)) is None  # still wanting more (another signal): the clock runs on
    assert a.observe(reading(2.0, waiting=1)) == Decision(2, 2, "autoscale: requests waiting")


def test_a_break_in_the_want_starts_its_clock_over() -> None:
    a = Autoscaler(POLICY)
    a.observe(reading(0.0, waiting=3))
    assert a.observe(reading(1.0)) is None  # the burst paused
    assert a.observe(reading(2.5, waiting=3)) is None
    assert a.observe(reading(4.5, waiting=3)) is not None


def test_scaling_down_waits_longer_and_leaves_room_for_hysteresis() -> None:
    a = Autoscaler(POLICY)
    # 2 replicas at 20%: one would be at 40%, above kv_low: keep both
    assert a.observe(reading(0.0, replicas=2, kv=0.2)) is None
    assert a.observe(reading(100.0, replicas=2, kv=0.2)) is None
    assert a.observe(reading(101.0, replicas=2, kv=0.1)) is None
    assert a.observe(reading(110.9, replicas=2, kv=0.1)) is None
    assert a.observe(reading(111.0, replicas=2, kv=0.1)) == Decision(1, 2, "autoscale: KV usage low")


def test_a_resize_starts_every_clock_over() -> None:
    a = Autoscaler(POLICY)
    a.observe(reading(0.0, waiting=3))
    a.resized()
    assert a.observe(reading(2.0, waiting=3)) is None
    assert a.observe(reading(4.0, waiting=3)) is not None


def test_shards_follow_their_compute_share_unless_imbalanced() -> None:
    a = Autoscaler(POLICY)
    a.observe(reading(0.0, share=0.7))
    assert a.observe(reading(2.0, share=0.7)) == Decision(1, 3, "autoscale: shard compute high")
    b = Autoscaler(POLICY)
    b.observe(reading(0.0, shards=3, share=0.05, imbalance=2.0))
    assert b.observe(reading(20.0, shards=3, share=0.05, imbalance=2.0)) is None  # rebalance first
    b.observe(reading(21.0, shards=3, share=0.05))
    assert b.observe(reading(31.0, shards=3, share=0.05)) == Decision(1, 2, "autoscale: shard compute low")
    assert Autoscaler(POLICY).observe(reading(0.0, share=None)) is None  # no steps: no shard signal


def test_bounds_hold_against_signals_and_bring_counts_back_inside() -> None:
    a = Autoscaler(POLICY)
    a.observe(reading(0.0, replicas=3, waiting=9))
    assert a.observe(reading(50.0, replicas=3, waiting=9)) is None  # at the maximum
    assert a.observe(reading(0.0, replicas=5)) == Decision(3, 2, "autoscale: bounds")
    with pytest.raises(ValueError, match="min <= max"):
        AutoscalePolicy(min_replicas=2, max_replicas=1, min_shards=1, max_shards=1)
