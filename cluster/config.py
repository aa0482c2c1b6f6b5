"""Configuration of the cluster and of each actor role (frozen dataclasses, passed to actors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_shards.checkpoint import Checkpoint
from model_shards.config import GptOssConfig
from model_shards.hub import resolve_model
from model_shards.loader import parse_dtype


@dataclass(frozen=True)
class ModelSource:
    """What every actor needs to open the checkpoint itself (each loads only its own slice)."""

    model: str  # directory or hub id; resolved on the actor's node
    dtype: str = "bfloat16"
    layout: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def open(self) -> Checkpoint:
        return Checkpoint(resolve_model(self.model), self.layout)

    def config(self) -> GptOssConfig:
        with self.open() as ckpt:
            return ckpt.config


@dataclass(frozen=True)
class KVSpec:
    num_blocks: int  # full-attention KV blocks per replica (the admission budget)
    block_size: int = 16
    max_seqs: int = 64  # sequences per replica (one sliding-window ring each)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class ReplicaSpec:
    source: ModelSource
    index: int
    kv: KVSpec
    use_gpu: bool = False


@dataclass(frozen=True)
class RouterSpec:
    source: ModelSource
    shard_bounds: tuple[tuple[int, int], ...]  # experts [a, b) of each shard, in shard order
    use_gpu: bool = False


@dataclass(frozen=True)
class ShardSpec:
    source: ModelSource
    index: int
    experts: tuple[int, int]
    keep_mxfp4: bool = False
    use_gpu: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    attention_replicas: int = 1
    expert_shards: int = 1
    expert_bounds: tuple[int, ...] | None = None  # explicit split points 0 < b1 < ... < E; default: even
    gpus_per_attention_replica: float = 0.0
    gpus_per_expert_shard: float = 0.0
    gpus_per_router: float = 0.0
    cpus_per_actor: float = 1.0
    # Custom Ray resources per role, to place roles on chosen nodes (e.g. a KubeRay worker group that
    # advertises {"gptoss_experts": 4} takes the expert shards that ask for {"gptoss_experts": 1}).
    attention_replica_resources: dict[str, float] = field(default_factory=dict)
    expert_shard_resources: dict[str, float] = field(default_factory=dict)
    router_resources: dict[str, float] = field(default_factory=dict)
    keep_mxfp4: bool = False
    transport: str = "auto"  # auto (shm on one node, else tcp) | shm | tcp
    ring_mb: int = 8  # per shared-memory channel; messages larger than this stream through it
    step_timeout_s: float = 60.0  # a step that takes longer means a hung actor
    recovery_timeout_s: float = 300.0  # restarting and reloading actors must finish within this
    max_restarts: int = 8
    placement_strategy: str = "PACK"
    ray_address: str | None = None  # None: start Ray in this process

    def __post_init__(self) -> None:
        if self.attention_replicas < 1 or self.expert_shards < 1:
            raise ValueError("need at least one attention replica and one expert shard")
        if self.transport not in ("auto", "shm", "tcp"):
            raise ValueError(f"transport must be auto, shm or tcp, not {self.transport!r}")
        if min(self.gpus_per_attention_replica, self.gpus_per_expert_shard, self.gpus_per_router) < 0:
            raise ValueError("GPU fractions must be >= 0")
        if self.step_timeout_s <= 0 or self.cpus_per_actor <= 0:
            raise ValueError("step_timeout_s and cpus_per_actor must be positive")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"not {self.placement_strategy!r}")


def expert_bounds(num_experts: int, shards: int, split: tuple[int, ...] | None = None) -> tuple[tuple[int, int], ...]:
    """[a, b) per shard: every expert exactly once. Even split (sizes differ by at most one)
    unless explicit split points are given."""
    if not 1 <= shards <= num_experts:
        raise ValueError(f"expert shards must be between 1 and the number of experts ({num_experts}), not {shards}")
    if split is None:
        points = [s * num_experts // shards for s in range(shards + 1)]
    else:
        points = [0, *split, num_experts]
        if len(points) != shards + 1 or any(a >= b for a, b in zip(points, points[1:])):
            raise ValueError(f"expert split points {split} must be {shards - 1} increasing values in (0, {num_experts})")
    return tuple(zip(points, points[1:]))
