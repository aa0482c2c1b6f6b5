"""Every message that crosses an actor boundary on the data plane, and the order they travel in.

One step, written down once (the roles in replica.py, router.py and shard.py follow it):

    engine  -> router      RouterStep      which replicas have tokens this step, in the order it reads them
    engine  -> replica r   ReplicaStep     per busy replica (also a replica with only KV to release)
    for layer in 0 .. L-1, for micro-batch m in 0 .. (replica r's count) - 1:
        replica r -> router       MoeRequest    normed hidden rows [T_r, H]
        router    -> shard s      ShardRequest  the distinct rows shard s needs, its assignments and gates,
                                                and how many of them belong to each replica
        router    -> replica r    MoeRoute      which shards will answer r, and where their rows go
        shard s   -> replica r    ShardResult   gate-weighted expert outputs of r's assignments
    replica r -> engine    StepResult      sampled tokens (a replica with no tokens answers at once)

Three hops in series per layer (replica -> router -> shard -> replica); the MoeRoute travels while the
shards compute. The router reads the replicas in RouterStep order; a replica reads the shards that
answer it in shard order and combines each token's K outputs in (token, k) order, so sums never
depend on timing and are the local engine's.

Micro-batches (ReplicaStep.micro_batches): a replica sends its groups' MoeRequests layer by layer,
group by group ((0, 0), (0, 1), (1, 0), ...), computing one group's attention while another's MoE is
away; the router takes the units (layer, m) in that same order, each gathering the m-th group of
every replica that has one, so every channel carries its messages in one agreed order. Tensors inside these dataclasses travel as raw bytes
after the header (codec.py); there is no stop message: a loop ends when its endpoint is stopped
(StreamClosed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.balancing.eplb import ExpertPlacement
from model_shards.kv_cache import BlockUpdate
from model_shards.sampling import SamplingParams


@dataclass
class ChunkPlan:
    """One sequence's part of a step on its replica."""

    seq_id: int
    start: int  # tokens of this sequence already in the replica's KV cache
    token_ids: list[int]  # the tokens to run now (prompt chunk, or the last sampled token)
    blocks: BlockUpdate  # what the replica's block tables gain (and lose) before the chunk runs
    sample: bool  # True when the chunk reaches the end of the known tokens: sample the next one
    params: SamplingParams  # temperature / top_p drive sampling on the replica
    seed: int  # resolved seed: sampling depends only on (seed, index), so retries reproduce it
    index: int  # how many tokens the sequence has generated so far (the sampling counter)
    # (prompt, output so far) with a penalized sequence's first chunk after each admission: the
    # replica's penalty history starts from it (logits.Histories), after a failure too
    history: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # a constrained sequence's sampling chunk: the tokens it may choose ([W] int32 bit words, grammar.py)
    mask: torch.Tensor | None = None


@dataclass
class ReplicaStep:
    step_id: int
    release: list[int]  # sequences whose block tables the replica forgets before this step (finished, aborted)
    chunks: list[ChunkPlan]  # may be empty: then the replica only releases and answers at once
    # the cluster's replicas split the chunks into this many groups (step.py: micro_batches) and
    # compute attention of one while the MoE of another is away; results never depend on it
    micro_batches: int = 1


@dataclass
class Sampled:
    seq_id: int
    token: int
    logprob: float | None  # None when the request did not ask for log-probs
    top: list[tuple[int, float]] = field(default_factory=list)  # top_logprobs alternatives, if asked


@dataclass
class StepResult:
    step_id: int
    replica: int
    sampled: list[Sampled]
    compute_s: float  # time the replica spent computing (not waiting on the MoE exchange)
    moe_wait_s: float  # time it spent sending MoE inputs and waiting for the answers, summed over layers
    kv_usage: float  # fraction of its KV blocks in use after the step
    shard_s: float = 0.0  # the slowest answering shard's compute, summed over layers and micro-batches


@dataclass
class RouterStep:
    step_id: int
    replicas: list[int]  # replicas with tokens this step, in the order the router reads them
    micro: list[int]  # how many micro-batches each of them splits its chunks into (same order)
    placement: ExpertPlacement | None = None  # a new expert placement, from this step on (the shards have it staged)


@dataclass
class MoeRequest:
    step_id: int
    layer: int
    micro: int  # which of the replica's micro-batches
    t: torch.Tensor  # [T_r, H] the replica's normed hidden states (the MoE block's input)


@dataclass
class ShardRequest:
    step_id: int
    layer: int
    micro: int
    x: torch.Tensor  # [R, H] the distinct token rows this shard needs
    token_index: torch.Tensor  # [N] row of x for each assignment
    expert_slots: torch.Tensor  # [N] the slot of the shard's expert stack serving each assignment
    gates: torch.Tensor  # [N] fp32 routing weight of each assignment (exact: the router computes it in the model dtype)
    replicas: torch.Tensor  # [P] int64: the replicas these assignments belong to, in RouterStep order
    counts: torch.Tensor  # [P] int64: how many of the N (which are token-major) belong to each
    placement: int = 0  # the expert placement version the slots refer to
    active: int = 0  # distinct slots among expert_slots (the router counts them on the host; 0: unknown)
    # the device's dispatch (router.py): x is every row of the unit, token_index/expert_slots/gates cover
    # all its T*K assignments (expert_slots -1 where another shard serves one), and the answer has a
    # row per assignment, zero where not this shard's
    dense: bool = False


@dataclass
class MoeRoute:
    step_id: int
    layer: int
    micro: int
    shards: torch.Tensor  # [S'] int64: the shards that will answer this replica, ascending
    counts: torch.Tensor  # [S'] int64: how many assignments each one answers
    slots: torch.Tensor  # [N_r] int64: t*K + k of each (replica-local token t), grouped by shard in that order
    dense: bool = False  # every shard answers every assignment (zero where not its own): the answers are summed


@dataclass
class ShardResult:
    step_id: int
    layer: int
    micro: int
    weighted: torch.Tensor  # [N_rs, H] fp32 gate * expert output of one replica's assignments, or with
    #   `summed` [R_rs, H]: per token of them (ascending), the sum of its assignments' (moe.fused_rows)
    compute_s: float  # the shard's compute for the whole layer (all replicas' rows)
    summed: bool = False


@dataclass
class ActorInfo:
    """One line of the topology (`gptoss generate --engine cluster --json`)."""

    role: str  # attention_replica | router | expert_shard
    index: int
    pid: int
    node: str
    device: str
    experts: list[int] | None = None  # [a, b) for expert shards
    threads: int | None = None  # the torch threads it computes with
    dtype: str | None = None  # what it computes in (--dtype auto resolved: float32 | bfloat16)
    cpu: str | None = None  # its CPU and what the fast paths get there (capabilities.CpuFeatures.summary)
