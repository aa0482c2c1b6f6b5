"""The configuration schema of the engine, and what each actor role is told when it starts.

Three option groups (frozen dataclasses of `option` fields, options.py) hold every default, bound and
help text: `ModelConfig` (what to load), `EngineConfig` (scheduling and KV), `ClusterConfig` (actors,
resources, data plane, failures). The CLI's flags and the RayService application args are generated
from them (deploy/cli/flags.py, deploy/app.py) and the server adds its own group (deploy/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cluster.balancing.eplb import ExpertPlacement, slot_counts
from cluster.dataplane.names import REPLICA_ROLE, ROUTER_ROLE, SHARD_ROLE
from cluster.options import check_options, option
from model_shards.capabilities import AUTO, parse_dtype, triton_kernels
from model_shards.checkpoint import Checkpoint
from model_shards.config import GptOssConfig
from model_shards.hub import resolve_model

Resources = dict[str, float]


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = option(None, "checkpoint directory or Hugging Face hub id such as openai/gpt-oss-20b "
                                     "(serve without one: a small random-weight model)")
    layout: Literal["hf", "original"] | None = option(None, "checkpoint layout (default: detected from the files)")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "weights and activations; auto: bfloat16 on CUDA and on CPUs that compute it natively, float32 on "
                "other CPUs (docs/cpu.md)")
    expert_weights: Literal["auto", "dequantize", "mxfp4"] = option(
        "auto", "MXFP4 experts: dequantize at load, or keep them packed (4x less memory; decoded in registers by the "
                "Triton kernels, else on use); auto: packed where the Triton kernels run (CUDA with triton), "
                "dequantized elsewhere")
    expert_cache_mb: int = option(0, "with --expert-weights mxfp4: MiB of decoded experts each process that holds "
                                     "experts keeps, most recently used first (hot experts then skip decoding)", ge=0)
    device: str = option("cpu", "torch device of the local engine, e.g. cuda (cluster actors take GPUs through "
                                "the gpus_per_* fractions)")
    vocab_dir: str | None = option(None, "directory holding o200k_base.tiktoken, for machines without network")

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def keep_mxfp4(self) -> bool | None:
        """None: decided by each process's device (ModelSource.keeps_mxfp4)."""
        return None if self.expert_weights == "auto" else self.expert_weights == "mxfp4"

    def source(self) -> ModelSource:
        """What actors open; the dtype must be resolved first (EngineArgs.resolved)."""
        if not self.model:
            raise ValueError("no model given (--model)")
        if self.dtype == AUTO:
            raise ValueError("dtype auto is resolved where the engine is built (EngineArgs.resolved)")
        return ModelSource(self.model, self.dtype, self.layout, self.expert_cache_mb << 20, self.keep_mxfp4, self.device)


@dataclass(frozen=True)
class EngineConfig:
    engine: Literal["local", "cluster"] = option("cluster", "local: the model in this process; cluster: Ray actors")
    kv_cache_tokens: int = option(65536, "KV positions per attention replica (full-attention layers)", ge=1)
    block_size: int = option(16, "tokens per KV block", ge=1)
    max_num_seqs: int = option(64, "running sequences per attention replica", ge=1)
    max_num_batched_tokens: int = option(2048, "tokens per step over all replicas; longer prefills are chunked", ge=1)
    long_prefill_token_threshold: int | None = option(
        None, "a prompt with more tokens left to prefill than this is long: short prompts are scheduled before it "
              "(default: a quarter of max_num_batched_tokens)", ge=1)
    max_num_partial_prefills: int = option(1, "long prompts whose prefill may progress in the same step", ge=1)
    max_model_len: int | None = option(None, "prompt + output limit (default: the model's context length)", ge=2)
    max_waiting: int = option(1024, "queued requests beyond which new ones are refused (HTTP 429)", ge=1)
    max_attempts: int = option(3, "executor failures a request may live through before it ends with an error",
                               ge=1)
    prefix_caching: bool = option(True, "reuse the KV of prompt prefixes that earlier requests computed")
    threads: int | None = option(None, "torch threads of the local engine (default: every core of the machine; "
                                       "cluster actors use --cpus-per-actor)", ge=1)
    enforce_eager: bool = option(False, "no CUDA graphs: the local engine on CUDA otherwise captures its decode "
                                        "step once per batch-size bucket and replays it")

    def __post_init__(self) -> None:
        check_options(self)
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one block "
                             f"({self.block_size} tokens)")

    @property
    def long_prefill(self) -> int:
        return self.long_prefill_token_threshold or max(1, self.max_num_batched_tokens // 4)

    @property
    def kv(self) -> KVSpec:
        return KVSpec(-(-self.kv_cache_tokens // self.block_size), self.block_size, self.max_num_seqs,
                      self.max_num_batched_tokens)


@dataclass(frozen=True)
class ClusterConfig:
    attention_replicas: int = option(1, "attention replicas (data parallel)", ge=1)
    expert_shards: int = option(1, "expert shards (any number from 1 to the model's experts)", ge=1)
    expert_split: tuple[int, ...] | None = option(None, "explicit shard boundaries, e.g. 10,20 for 3 shards "
                                                        "(default: an even split)")
    gpus_per_attention_replica: float = option(0.0, "GPUs per attention replica (fractions allowed)", ge=0)
    gpus_per_expert_shard: float = option(0.0, "GPUs per expert shard (fractions allowed)", ge=0)
    gpus_per_router: float = option(0.0, "GPUs of the router (fractions allowed)", ge=0)
    cpus_per_actor: float = option(1.0, "CPUs that Ray reserves per actor, also its torch threads unless a "
                                        "--threads-per-* option says otherwise", gt=0)
    # Torch threads may differ from the reservation: with one micro-batch an attention replica
    # computes only while its shards wait, so on a small node it may use every core (measured in
    # docs/performance.md).
    threads_per_attention_replica: int | None = option(None, "torch threads of each attention replica "
                                                             "(default: --cpus-per-actor)", ge=1)
    threads_per_expert_shard: int | None = option(None, "torch threads of each expert shard (default: "
                                                        "--cpus-per-actor)", ge=1)
    threads_per_router: int | None = option(None, "torch threads of the router (default: --cpus-per-actor)", ge=1)
    # Custom Ray resources per role, to place roles on chosen nodes (e.g. a KubeRay worker group that
    # advertises {"gptoss_experts": 4} takes the expert shards that ask for {"gptoss_experts": 1}).
    attention_replica_resources: Resources = option({}, "custom Ray resources each attention replica needs")
    expert_shard_resources: Resources = option({}, "custom Ray resources each expert shard needs")
    router_resources: Resources = option({}, "custom Ray resources the router needs")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", "how the placement group spreads the actors over nodes")
    transport: Literal["auto", "shm", "tcp", "gloo", "nccl"] = option(
        "auto", "data plane per pair of actors: auto takes NCCL between actors that each own whole GPUs, "
                "shared memory within a node, TCP between nodes; the others force one kind (gloo: "
                "torch.distributed on CPU; nccl: fail rather than fall back)")
    ring_mb: int = option(8, "MiB per shared-memory channel (larger messages stream through it)", ge=1)
    dispatch: Literal["auto", "host", "device"] = option(
        "auto", "how the router hands decode-sized steps to the shards: device sends every shard the step's "
                "rows and routing, which each selects on its device (no host read per layer: the GPU's way); "
                "host plans each shard's rows on the host (fewer bytes: the CPU's way); auto: device when the "
                "router has a GPU. Prefills always go the host's way (docs/gpu.md)")
    redundant_experts: int = option(0, "extra expert slots per layer, spread over the shards, each holding a copy of "
                                       "a hot expert once rebalancing has placed one (needs 2+ shards)", ge=0)
    eplb_interval: int = option(0, "steps between expert rebalances, computed from the recent routed counts "
                                   "(0: off; when set, `gptoss bench` also runs its prompts again after one)", ge=0)
    eplb_window: int = option(1000, "steps of routed counts a rebalance looks at", ge=1)
    micro_batches: int = option(1, "groups a replica splits each step's chunks into, computing attention of one "
                                   "while the MoE of another is away (results do not depend on it)", ge=1, le=8)
    step_timeout_s: float = option(60.0, "seconds before a step counts as hung", gt=0)
    recovery_timeout_s: float = option(300.0, "seconds that restarting and reloading actors may take", gt=0)
    max_restarts: int = option(8, "times Ray restarts each actor", ge=0)
    # Live resize and autoscaling (cluster/actors/resize.py, cluster/engine/autoscale.py; docs/scaling.md)
    resize_timeout_s: float = option(300.0, "seconds a resize may wait for its new actors' resources and weights; "
                                            "then it gives up and the old plane keeps serving", gt=0)
    autoscale: bool = option(False, "change the number of attention replicas and expert shards while serving, "
                                    "by KV usage, waiting requests and shard compute time, within the bounds below")
    min_attention_replicas: int = option(1, "with --autoscale: fewest attention replicas", ge=1)
    max_attention_replicas: int | None = option(None, "with --autoscale: most attention replicas (default: "
                                                      "--attention-replicas)", ge=1)
    min_expert_shards: int = option(1, "with --autoscale: fewest expert shards", ge=1)
    max_expert_shards: int | None = option(None, "with --autoscale: most expert shards (default: --expert-shards)",
                                           ge=1)
    upscale_delay_s: float = option(30.0, "with --autoscale: seconds a signal must ask for more actors before "
                                          "they are added (Ray Serve's upscale_delay_s)", ge=0)
    downscale_delay_s: float = option(600.0, "with --autoscale: seconds a signal must allow fewer actors before "
                                             "some are removed (Ray Serve's downscale_delay_s)", ge=0)

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def uses_gpus(self) -> bool:
        return max(self.gpus_per_attention_replica, self.gpus_per_expert_shard, self.gpus_per_router) > 0

    def threads(self, role: str) -> int:
        """Torch threads of an actor of `role` (names.py)."""
        chosen = {REPLICA_ROLE: self.threads_per_attention_replica, ROUTER_ROLE: self.threads_per_router,
                  SHARD_ROLE: self.threads_per_expert_shard}[role]
        return chosen or max(1, int(self.cpus_per_actor))

    def expert_layout(self, num_experts: int) -> tuple[tuple[tuple[int, int], ...], list[int]]:
        """-> ([a, b) per shard, slots per shard) for a model with `num_experts` experts; raises
        ValueError for a layout that cannot work (checked before anything starts)."""
        bounds = expert_bounds(num_experts, self.expert_shards, self.expert_split)
        return bounds, slot_counts(bounds, self.redundant_experts, num_experts)


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


# -- what actors are told ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """What every actor needs to open the checkpoint itself (each loads only its own slice)."""

    model: str  # directory or hub id; resolved on the actor's node
    dtype: str = "bfloat16"
    layout: str | None = None
    expert_cache_bytes: int = 0  # decoded MXFP4 experts kept per process (weights.budget_decoded)
    keep_mxfp4: bool | None = False  # MXFP4 experts stay packed (--expert-weights mxfp4); None: by device (auto)
    device: str = "cpu"  # the local engine's torch device (cluster actors take theirs from their GPUs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def keeps_mxfp4(self, device: torch.device | str) -> bool:
        """Whether a process computing on `device` keeps MXFP4 experts packed: as asked, or (auto)
        where the Triton kernels decode them in registers."""
        return triton_kernels(device) if self.keep_mxfp4 is None else self.keep_mxfp4

    def open(self) -> Checkpoint:
        return Checkpoint(resolve_model(self.model), self.layout)

    def config(self) -> GptOssConfig:
        with self.open() as ckpt:
            return ckpt.config


@dataclass(frozen=True)
class KVSpec:
    num_blocks: int  # full-attention KV blocks per replica (the admission budget)
    block_size: int = 16
    max_seqs: int = 64  # sequences per replica
    max_step_tokens: int = 2048  # tokens of one step (over every replica): bounds the sliding blocks in use

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def sliding_blocks(self, window: int) -> int:
        """Blocks of the sliding-window pool: enough for every sequence's window and one step's chunks
        at once (so they need no reservation), twice over, so that the windows of finished prefixes stay
        cached a while. Per sequence a step holds the blocks of [start - window + 1, start + n)."""
        per_seq = -(-(window - 1) // self.block_size) + 3
        return 2 * (self.max_seqs * per_seq + -(-self.max_step_tokens // self.block_size))


def actor_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ReplicaSpec:
    source: ModelSource
    index: int
    kv: KVSpec
    use_gpu: bool = False


@dataclass(frozen=True)
class RouterSpec:
    source: ModelSource
    placement: ExpertPlacement  # where each layer's experts are at start (eplb.py)
    window: int = 1000  # steps of per-expert counts kept for rebalancing
    use_gpu: bool = False
    max_rows: int = KVSpec.max_step_tokens  # tokens one request can carry (the engine's step budget): kernels warmed up to it
    device_dispatch_rows: int = 0  # units of at most this many rows are dispatched on the device (0: never)


@dataclass(frozen=True)
class ShardSpec:
    source: ModelSource
    index: int
    experts: tuple[int, int]  # its home range [a, b): what the topology shows
    slots: tuple[tuple[int, ...], ...]  # [L][S] the experts it loads at start (the range and its redundant copies)
    use_gpu: bool = False
    max_rows: int = KVSpec.max_step_tokens  # rows one expert can get in a request (the engine's step budget): kernels warmed up to it
