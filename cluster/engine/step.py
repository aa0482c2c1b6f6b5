"""What an attention replica does with one `ReplicaStep`: update its block tables as the engine says,
run the step's chunks through the model (the MoE computed by whatever the caller does), sample where
asked.

Shared by the local executor (MoE in process) and the attention-replica actor (MoE through the
router, in micro-batches), so both engines take exactly the same path around the model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from cluster.dataplane.messages import ChunkPlan, ReplicaStep, Sampled
from model_shards.batch import SeqChunk, plan_step, to_device
from model_shards.decode_graph import StaticDecoder
from model_shards.kv_cache import KVCache
from model_shards.logits import Histories
from model_shards.model import GptOssModel, Layers, MoeFn
from model_shards.sampling import sample

SendFn = Callable[[int, int, torch.Tensor], None]  # (layer, micro-batch, t [T, H]): the MoE input leaves
RecvFn = Callable[[int, int], torch.Tensor]  # (layer, micro-batch) -> the MoE output [T, H]


def micro_batches(chunks: list[ChunkPlan], m: int) -> list[list[ChunkPlan]]:
    """Contiguous groups of `chunks`, at most m and none empty, cut where the running token count
    crosses each i/m of the total: a prefill chunk is never split, so a long one may make its group
    the big one."""
    m = max(1, min(m, len(chunks)))
    total = sum(len(c.token_ids) for c in chunks)
    groups: list[list[ChunkPlan]] = [[]]
    seen = 0
    for i, chunk in enumerate(chunks):
        left = len(chunks) - i  # chunks not yet placed, this one included
        wanted = m - len(groups)  # groups still to open after the current one
        if groups[-1] and (seen * m >= total * len(groups) or left <= wanted):
            groups.append([])
        groups[-1].append(chunk)
        seen += len(chunk.token_ids)
    return groups


def prepare(kv: KVCache, step: ReplicaStep, histories: Histories) -> None:
    """Forget what the engine released, take the chunks' block updates and penalty histories."""
    for seq_id in step.release:
        kv.forget(seq_id)
        histories.forget(seq_id)
    for chunk in step.chunks:
        kv.update(chunk.seq_id, chunk.blocks)
        if chunk.history is not None:
            histories.start(chunk.seq_id, *chunk.history)


def group_layers(model: GptOssModel, kv: KVCache, chunks: list[ChunkPlan]) -> Layers:
    """The model's layer generator over `chunks`; it returns the logits of their sampling rows."""
    layout = plan_step([SeqChunk(c.seq_id, c.start, len(c.token_ids)) for c in chunks], model.device,
                       [i for i, c in enumerate(chunks) if c.sample])
    ids, = to_device([torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)], model.device)
    return model.layers(ids, layout, kv)


def interleave(groups: list[Layers], send: SendFn, recv: RecvFn) -> list[torch.Tensor]:
    """Drive the groups' layer generators in ping-pong: each sends its MoE input as soon as it has
    one and waits for its answer only after the other groups have sent theirs, so one group's
    attention runs while another's MoE is away. Sends go out in (layer, group) order, the order the
    router takes them in. -> each group's logits."""
    layers = [next(g) for g in groups]
    for m, (layer, t) in enumerate(layers):
        send(layer, m, t)
    logits: list[torch.Tensor | None] = [None] * len(groups)
    while any(out is None for out in logits):
        for m, g in enumerate(groups):
            if logits[m] is not None:
                continue
            layer = layers[m][0]
            try:
                layers[m] = g.send(recv(layer, m))
            except StopIteration as done:
                logits[m] = done.value
                continue
            send(layers[m][0], m, layers[m][1])
    return [out for out in logits if out is not None]


def sample_chunks(logits: torch.Tensor, step: ReplicaStep, histories: Histories) -> list[Sampled]:
    """logits [R, V] of the step's sampling chunks, in chunk order -> their tokens."""
    chunks = [c for c in step.chunks if c.sample]
    if not chunks:
        return []
    choices = sample(logits, [c.params for c in chunks], [c.seed for c in chunks], [c.index for c in chunks],
                     consume=True, histories=[histories.get(c.seq_id) for c in chunks],
                     masks=[c.mask for c in chunks])
    return [Sampled(c.seq_id, x.token, x.logprob, x.top) for c, x in zip(chunks, choices)]


def run_replica_step(model: GptOssModel, kv: KVCache, step: ReplicaStep, moe: MoeFn | None = None,
                     histories: Histories | None = None, decoder: StaticDecoder | None = None) -> list[Sampled]:
    """The whole step as one batch, the MoE by `moe(layer, t)` in the caller's process (the local
    executor). `histories`: the replica's penalty histories (kept beside its KV cache, forgotten with it).
    `decoder`: runs decode-only steps from its static buffers (and CUDA graphs)."""
    compute = moe or model.local_moe
    histories = histories if histories is not None else Histories()
    inputs: dict[int, torch.Tensor] = {}

    def send(layer: int, m: int, t: torch.Tensor) -> None:
        inputs[m] = t

    def recv(layer: int, m: int) -> torch.Tensor:
        return compute(layer, inputs.pop(m))

    prepare(kv, step, histories)
    seqs = [SeqChunk(c.seq_id, c.start, len(c.token_ids)) for c in step.chunks]
    if decoder is not None and all(c.sample for c in step.chunks) and decoder.accepts(seqs):
        logits = decoder.run(kv, seqs, [c.token_ids[0] for c in step.chunks])
        return sample_chunks(logits, step, histories)
    return run_prepared(model, kv, dataclasses.replace(step, micro_batches=1), send, recv, histories)


def run_micro_batched(model: GptOssModel, kv: KVCache, step: ReplicaStep, send: SendFn, recv: RecvFn,
                      histories: Histories) -> list[Sampled]:
    """The step in `step.micro_batches` groups whose MoE input leaves by `send` and whose output comes
    back by `recv` (the attention replica: through the router and the shards)."""
    prepare(kv, step, histories)
    return run_prepared(model, kv, step, send, recv, histories)


def run_prepared(model: GptOssModel, kv: KVCache, step: ReplicaStep, send: SendFn, recv: RecvFn,
                 histories: Histories) -> list[Sampled]:
    """run_micro_batched once the step's tables and histories are taken (prepare)."""
    if not step.chunks:
        return []
    groups = [group_layers(model, kv, g) for g in micro_batches(step.chunks, step.micro_batches)]
    return sample_chunks(torch.cat(interleave(groups, send, recv)), step, histories)
