"""The autoscaling policy: signals the engine measures in, a resize decision out. Pure (no Ray, no
clock of its own: every reading carries its time), so it is tested without a cluster.

Attention replicas follow the sequences and their KV: requests waiting for room, or KV usage above
`kv_high`, ask for one more; KV usage that would stay under `kv_low` with one replica fewer (and
nothing waiting) allows one fewer. Expert shards follow the routed tokens' compute: when the replicas
spend more than `shard_high` of a step waiting on shard compute, one more; when that share would stay
under `shard_low` with one shard fewer, and the shards are not badly imbalanced (a rebalance, not
fewer shards, is the answer then), one fewer.

Like Ray Serve's `upscale_delay_s` / `downscale_delay_s`, a want must hold without a break for its
delay before it acts, and every resize starts both clocks over (a cool-down: the new plane's signals
must settle first). The gap between the high and low thresholds is the hysteresis: a count that was
just raised does not immediately look removable.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLICAS, SHARDS = "attention_replicas", "expert_shards"


@dataclass(frozen=True)
class AutoscalePolicy:
    min_replicas: int
    max_replicas: int
    min_shards: int
    max_shards: int
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    kv_high: float = 0.8  # mean KV usage of the replicas above which one more is wanted
    kv_low: float = 0.3  # below this even with one replica fewer: one fewer
    shard_high: float = 0.5  # share of step time spent in shard compute above which one more shard is wanted
    shard_low: float = 0.15
    imbalance_high: float = 1.5  # busiest shard over the mean: above it, no shard is removed

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"attention replica bounds must satisfy 1 <= min <= max, not {self.min_replicas} and "
                             f"{self.max_replicas}")
        if not 1 <= self.min_shards <= self.max_shards:
            raise ValueError(f"expert shard bounds must satisfy 1 <= min <= max, not {self.min_shards} and "
                             f"{self.max_shards}")


@dataclass(frozen=True)
class Signals:
    """One reading, taken by the engine between steps."""

    now: float  # monotonic seconds
    replicas: int
    shards: int
    kv_usage: float  # mean over the replicas, 0..1 (held blocks, including reservations)
    waiting: int  # requests that no replica has room for
    shard_share: float | None = None  # recent steps: shard compute / step time (None: no recent steps)
    imbalance: float | None = None  # recent routed load of the busiest shard over the mean (None: unknown)


@dataclass(frozen=True)
class Decision:
    replicas: int
    shards: int
    reason: str  # "autoscale: <signal>", for the log and the metrics' label


class Autoscaler:
    def __init__(self, policy: AutoscalePolicy) -> None:
        self.policy = policy
        self._wants: dict[str, tuple[int, float]] = {}  # dimension -> (direction, since when)

    def resized(self) -> None:
        """A resize happened (by this policy or by hand): every want starts over."""
        self._wants.clear()

    def observe(self, s: Signals) -> Decision | None:
        p = self.policy
        replica_want, replica_why = self._replica_want(s)
        shard_want, shard_why = self._shard_want(s)
        replicas = self._held(REPLICAS, replica_want, s.now)
        shards = self._held(SHARDS, shard_want, s.now)
        # bounds win over signals (a count outside them after a manual resize comes back inside)
        target_r = min(max(s.replicas + replicas, p.min_replicas), p.max_replicas)
        target_s = min(max(s.shards + shards, p.min_shards), p.max_shards)
        if (target_r, target_s) == (s.replicas, s.shards):
            return None
        why = [w for w, moved in ((replica_why, target_r != s.replicas), (shard_why, target_s != s.shards)) if moved]
        return Decision(target_r, target_s, "autoscale: " + (" and ".join(w for w in why if w) or "bounds"))

    def _replica_want(self, s: Signals) -> tuple[int, str]:
        p = self.policy
        if s.waiting > 0 and s.replicas < p.max_replicas:
            return 1, "requests waiting"
        if s.kv_usage > p.kv_high and s.replicas < p.max_replicas:
            return 1, "KV usage high"
        if s.replicas > p.min_replicas and s.waiting == 0 and s.kv_usage * s.replicas / (s.replicas - 1) < p.kv_low:
            return -1, "KV usage low"
        return 0, ""

    def _shard_want(self, s: Signals) -> tuple[int, str]:
        p = self.policy
        if s.shard_share is None:
            return 0, ""
        if s.shard_share > p.shard_high and s.shards < p.max_shards:
            return 1, "shard compute high"
        balanced = s.imbalance is None or s.imbalance <= p.imbalance_high
        if s.shards > p.min_shards and balanced and s.shard_share * s.shards / (s.shards - 1) < p.shard_low:
            return -1, "shard compute low"
        return 0, ""

    def _held(self, dimension: str, want: int, now: float) -> int:
        """The want once it has held for its delay, else 0."""
        if want == 0:
            self._wants.pop(dimension, None)
            return 0
        direction, since = self._wants.get(dimension, (0, now))
        if direction != want:
            self._wants[dimension] = (want, now)
            since = now
        delay = self.policy.upscale_delay_s if want > 0 else self.policy.downscale_delay_s
        return want if now - since >= delay else 0
