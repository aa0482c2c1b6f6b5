"""Every message that crosses an actor boundary on the data plane, and the order they travel in.

One step, written down once (the roles in replica.py, router.py and shard.py follow it):

    engine  -> router      RouterStep      which replicas have tokens this step, in the order it reads them
    engine  -> replica r   ReplicaStep     per busy replica (also a replica with only KV to release)
    for layer in 0 .. L-1:
        replica r -> router       MoeRequest    normed hidden rows [T_r, H]
        router    -> shard s      ShardRequest  the distinct rows shard s needs, its assignments and gates
        shard s   -> router       ShardResult   gate-weighted expert outputs per assignment
        router    -> replica r    MoeResult     the MoE block's output for replica r's rows
    replica r -> engine    StepResult      sampled tokens (a replica with no tokens answers at once)

The router reads the replicas in RouterStep order and the shards' results in shard order, so sums
never depend on timing. Tensors inside these dataclasses travel as raw bytes after the header
(codec.py); there is no stop message: a loop ends when its endpoint is stopped (StreamClosed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    moe_wait_s: float  # time it waited for MoE results, summed over layers
    kv_usage: float  # fraction of its KV blocks in use after the step


@dataclass
class RouterStep:
    step_id: int
    replicas: list[int]  # replicas with tokens this step, in the order the router reads them


@dataclass
class MoeRequest:
    step_id: int
    layer: int
    t: torch.Tensor  # [T_r, H] the replica's normed hidden states (the MoE block's input)


@dataclass
class MoeResult:
    step_id: int
    layer: int
    y: torch.Tensor  # [T_r, H] the MoE block's output for those rows, in the model dtype


@dataclass
class ShardRequest:
    step_id: int
    layer: int
    x: torch.Tensor  # [R, H] the distinct token rows this shard needs
    token_index: torch.Tensor  # [N] row of x for each assignment
    expert_ids: torch.Tensor  # [N] global expert id of each assignment (inside the shard's range)
    gates: torch.Tensor  # [N] fp32 routing weight of each assignment (exact: the router computes it in the model dtype)


@dataclass
class ShardResult:
    step_id: int
    layer: int
    weighted: torch.Tensor  # [N, H] fp32 gate * expert output per assignment
    compute_s: float


@dataclass
class ActorInfo:
    """One line of the topology (`gptoss generate --engine cluster --json`)."""

    role: str  # attention_replica | router | expert_shard
    index: int
    pid: int
    node: str
    device: str
    experts: list[int] | None = None  # [a, b) for expert shards
