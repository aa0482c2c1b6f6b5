"""From arguments to a running engine: the one place that picks the executor."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.engine import Engine, EngineConfig
from cluster.executor import Executor, LocalExecutor

ENGINES = ("local", "cluster")


@dataclass(frozen=True)
class EngineArgs:
    model: str
    engine: str = "local"  # local: this process; cluster: Ray actors
    dtype: str = "bfloat16"
    layout: str | None = None
    device: str = "cpu"  # local engine only; cluster actors take GPUs through the gpus_per_* fractions
    kv_cache_tokens: int = 65536  # KV positions per attention replica (full-attention layers)
    block_size: int = 16
    max_num_seqs: int = 64  # per attention replica
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int = 1024
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.kv_cache_tokens < self.block_size or self.max_num_seqs < 1:
            raise ValueError("kv_cache_tokens must hold at least one block and max_num_seqs must be positive")

    @property
    def source(self) -> ModelSource:
        return ModelSource(self.model, self.dtype, self.layout)

    @property
    def kv(self) -> KVSpec:
        return KVSpec(-(-self.kv_cache_tokens // self.block_size), self.block_size, self.max_num_seqs)


def build_executor(args: EngineArgs) -> Executor:
    if args.engine == "local":
        return LocalExecutor(args.source, args.kv, args.cluster.keep_mxfp4, args.device)
    from cluster.cluster_executor import ClusterExecutor  # imports ray: only when asked for

    return ClusterExecutor(args.source, args.cluster, args.kv)


def build_engine(args: EngineArgs) -> Engine:
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, max_waiting=args.max_waiting)
    return Engine(build_executor(args), config)
