"""What an attention replica does with one `ReplicaStep`: update its block tables as the engine says,
run the step's chunks through the model (the MoE computed by whatever `moe` does), sample where asked.

Shared by the local executor (MoE in process) and the attention-replica actor (MoE through the
router), so both engines take exactly the same path around the model.
"""

from __future__ import annotations

import torch

from cluster.messages import ReplicaStep, Sampled
from model_shards.batch import SeqChunk, plan_step
from model_shards.kv_cache import KVCache
from model_shards.logits import Histories
from model_shards.model import GptOssModel, MoeFn
from model_shards.sampling import sample


def run_replica_step(model: GptOssModel, kv: KVCache, step: ReplicaStep, moe: MoeFn | None = None,
                     histories: Histories | None = None) -> list[Sampled]:
    """`histories`: the replica's penalty histories (kept beside its KV cache, forgotten with it)."""
    histories = histories if histories is not None else Histories()
    for seq_id in step.release:
        kv.forget(seq_id)
        histories.forget(seq_id)
    if not step.chunks:
        return []
    for chunk in step.chunks:
        kv.update(chunk.seq_id, chunk.blocks)
        if chunk.history is not None:
            histories.start(chunk.seq_id, *chunk.history)
    layout = plan_step([SeqChunk(c.seq_id, c.start, len(c.token_ids)) for c in step.chunks], model.device)
    ids = torch.tensor([t for c in step.chunks for t in c.token_ids], dtype=torch.long, device=model.device)
    rows = [i for i, c in enumerate(step.chunks) if c.sample]
    logits = model.forward(ids, layout, kv, moe, rows)  # [R, V]
    if not rows:
        return []
    chunks = [step.chunks[i] for i in rows]
    choices = sample(logits, [c.params for c in chunks], [c.seed for c in chunks], [c.index for c in chunks],
                     consume=True, histories=[histories.get(c.seq_id) for c in chunks],
                     masks=[c.mask for c in chunks])
    return [Sampled(c.seq_id, x.token, x.logprob, x.top) for c, x in zip(chunks, choices)]
