"""Expert stacks made of chosen experts, in slot order: what an expert shard holds once load balancing
places any expert anywhere (cluster/balancing/eplb.py). Slot i of a layer's stack is the i-th expert of its
slot list (ExpertWeights.first is 0: ids index the stack), read from the checkpoint with the ranged
reads of weights.py, one read per run of consecutive experts, or taken from a stack already held."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from model_shards.checkpoint import Checkpoint
from model_shards.weights import DenseStack, ExpertStack, ExpertWeights, Mxfp4Stack, load_experts


def runs(experts: Sequence[int]) -> list[tuple[int, int]]:
    """Ids in the given order -> [a, b) runs of consecutive ids, in that order."""
    out: list[tuple[int, int]] = []
    for e in experts:
        if out and out[-1][1] == e:
            out[-1] = (out[-1][0], e + 1)
        else:
            out.append((e, e + 1))
    return out


def read_slots(ckpt: Checkpoint, dtype: torch.dtype, layer: int, experts: Sequence[int],
               keep_mxfp4: bool = False) -> ExpertWeights:
    """Experts `experts` of one layer, stacked in that order; only their rows are read."""
    parts = [load_experts(ckpt, dtype, run, range(layer, layer + 1), keep_mxfp4)[0] for run in runs(experts)]
    return gather([(w, i) for w in parts for i in range(w.count)])


def gather(picks: Sequence[tuple[ExpertWeights, int]]) -> ExpertWeights:
    """Slot s of the result is expert picks[s][1] of stack picks[s][0] (a copy: the sources can go)."""
    def stack(get: Callable[[ExpertWeights], torch.Tensor]) -> torch.Tensor:
        return torch.stack([get(w)[i] for w, i in picks])

    return ExpertWeights(0, _gather_stack([(w.gate_up, i) for w, i in picks]), stack(lambda w: w.gate_up_bias),
                         _gather_stack([(w.down, i) for w, i in picks]), stack(lambda w: w.down_bias))


def _gather_stack(picks: list[tuple[ExpertStack, int]]) -> ExpertStack:
    first = picks[0][0]
    if isinstance(first, DenseStack):
        return DenseStack(torch.stack([_dense(s).weight[i] for s, i in picks]))
    return Mxfp4Stack(torch.stack([_packed(s).blocks[i] for s, i in picks]),
                      torch.stack([_packed(s).scales[i] for s, i in picks]))


def _dense(s: ExpertStack) -> DenseStack:
    if not isinstance(s, DenseStack):
        raise TypeError("cannot mix dense and packed MXFP4 experts in one stack")
    return s


def _packed(s: ExpertStack) -> Mxfp4Stack:
    if not isinstance(s, Mxfp4Stack):
        raise TypeError("cannot mix dense and packed MXFP4 experts in one stack")
    return s


def restack(held: ExpertWeights, held_ids: Sequence[int], new_ids: Sequence[int],
            read: Callable[[list[int]], ExpertWeights]) -> tuple[ExpertWeights, int]:
    """The stack for `new_ids`, keeping what `held` (ids `held_ids`) already has and reading the rest
    through `read(ids) -> ExpertWeights`. -> (stack, how many experts were read)."""
    position = {e: i for i, e in enumerate(held_ids)}
    missing = [e for e in new_ids if e not in position]
    fresh = read(missing) if missing else None
    fresh_position = {e: i for i, e in enumerate(missing)}
    picks = [(held, position[e]) if e in position else (_some(fresh), fresh_position[e]) for e in new_ids]
    return gather(picks), len(missing)


def _some(w: ExpertWeights | None) -> ExpertWeights:
    assert w is not None
    return w
