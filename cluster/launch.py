"""From configuration to a running engine: the one place that picks the executor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cluster.config import ClusterConfig, EngineConfig, ModelConfig
from cluster.engine.autoscale import AutoscalePolicy, Autoscaler
from cluster.engine.engine import Engine
from cluster.engine.executor import Executor, LocalExecutor
from cluster.options import OptionValue, flat_values, split_values
from model_shards.capabilities import AUTO, DtypeChoice, choose_dtype

ENGINE_GROUPS = (ModelConfig, EngineConfig, ClusterConfig)


@dataclass(frozen=True)
class EngineArgs:
    """Everything that builds an engine: what to load, how to schedule, how to distribute."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_options(cls, **values: OptionValue) -> EngineArgs:
        """Flat option names, as flags and application args spell them: EngineArgs.from_options(
        model=path, engine="local", dtype="float32")."""
        return cls(*split_values(values, *ENGINE_GROUPS))

    def options(self) -> dict[str, OptionValue]:
        return flat_values(self.model, self.engine, self.cluster)

    def compute_device(self) -> str:
        """Where the model computes: the local engine's device; for the cluster CUDA when its actors take
        GPUs, else the CPU (this process's CPU decides `--dtype auto`: give a dtype for actors elsewhere)."""
        if self.engine.engine == "local":
            return self.model.device
        return "cuda" if self.cluster.uses_gpus else "cpu"

    def dtype_choice(self) -> DtypeChoice:
        return choose_dtype(self.model.dtype, self.compute_device())

    def dtype_note(self) -> str | None:
        """What `--dtype auto` chose and why, in one line (None when a dtype was given)."""
        if self.model.dtype != AUTO:
            return None
        choice = self.dtype_choice()
        return f"dtype {choice.dtype} (auto: {choice.reason})"

    def resolved(self) -> EngineArgs:
        """The same arguments with `--dtype auto` replaced by the dtype it chooses here."""
        dtype = self.dtype_choice().dtype
        return self if dtype == self.model.dtype else dataclasses.replace(
            self, model=dataclasses.replace(self.model, dtype=dtype))


def build_executor(args: EngineArgs, ray_address: str | None = None) -> Executor:
    """`ray_address`: an existing Ray cluster for the cluster engine (None: the one this process is
    connected to, or a new one started in this process)."""
    args = args.resolved()
    source = args.model.source()
    if args.engine.engine == "local":
        return LocalExecutor(source, args.engine.kv, args.engine.threads, args.engine.enforce_eager)
    from cluster.actors.cluster_executor import ClusterExecutor  # imports ray: only when asked for

    return ClusterExecutor(source, args.cluster, args.engine.kv, ray_address)


def autoscaler(cluster: ClusterConfig) -> Autoscaler | None:
    """The autoscaling policy of `--autoscale` (autoscale.py); the maxima default to the start counts."""
    if not cluster.autoscale:
        return None
    return Autoscaler(AutoscalePolicy(cluster.min_attention_replicas,
                                      cluster.max_attention_replicas or cluster.attention_replicas,
                                      cluster.min_expert_shards, cluster.max_expert_shards or cluster.expert_shards,
                                      cluster.upscale_delay_s, cluster.downscale_delay_s))


def build_engine(args: EngineArgs, ray_address: str | None = None) -> Engine:
    args = args.resolved()
    if args.engine.engine == "local":  # built in the engine's thread, which then runs every step (engine.py)
        if args.cluster.autoscale:
            raise ValueError("--autoscale needs --engine cluster: the local engine runs in one process")
        return Engine(lambda: build_executor(args), args.engine)
    return Engine(build_executor(args, ray_address), args.engine, autoscaler(args.cluster))
