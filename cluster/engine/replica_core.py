"""One attention replica's state, the same in the local executor and in the attention-replica actor.

It holds the model's weights (attention and globals; every router and expert too when the MoE runs in
this process), the KV cache the engine's block tables point into, and the penalty histories of the
sequences in that cache. It loads them, warms up the prepacked kernels, and resets the per-sequence
state after a failure. Only what happens around the MoE differs between the two users (step.py).
"""

from __future__ import annotations

import logging
import time

import torch

from cluster.config import KVSpec, ModelSource
from model_shards.allocator import keep_freed_memory
from model_shards.kv_cache import KVCache
from model_shards.logits import Histories
from model_shards.model import GptOssModel
from model_shards.weights import (ModelWeights, budget_decoded, load_attention, load_globals, load_model, move_to,
                                  prepare, warm_up)

log = logging.getLogger(__name__)


class ReplicaCore:
    def __init__(self, source: ModelSource, kv: KVSpec, device: torch.device | str, with_experts: bool) -> None:
        """`with_experts`: also the routers and experts (the local engine); without them the MoE block
        of every layer is computed elsewhere (the cluster's router and expert shards)."""
        start = time.perf_counter()
        keep_freed_memory()
        dtype = source.torch_dtype
        with source.open() as ckpt:
            if with_experts:
                weights = load_model(ckpt, dtype, keep_mxfp4=source.keeps_mxfp4(device))
            else:
                weights = ModelWeights(ckpt.config, load_globals(ckpt, dtype), load_attention(ckpt, dtype), [], [])
            read, layout = ckpt.bytes_read, ckpt.layout
        if torch.device(device).type != "cpu":
            move_to(weights, device)
        prepare(weights)
        budget_decoded(weights.experts, source.expert_cache_bytes)
        loaded = time.perf_counter()
        # Serving would otherwise pay oneDNN's kernel build on its first steps (linear.py).
        kernels = warm_up(weights, kv.max_step_tokens, kv.max_seqs)
        log.info("loaded %s (%s layout, %.1f MB, %s) in %.1fs; ran %d prepacked kernels once in %.1fs", source.model,
                 layout, read / 1e6, source.dtype, loaded - start, kernels, time.perf_counter() - loaded)
        self.model = GptOssModel(weights)
        self.kv_spec = kv
        self.reset()

    def reset(self) -> None:
        """Forget every sequence: an empty KV cache and no penalty histories."""
        self.histories = Histories()  # penalty histories of the sequences in the cache
        self.cache = self.new_cache()

    def new_cache(self) -> KVCache:
        """An empty KV cache of this replica's size (full-attention and sliding-window pools)."""
        kv, cfg = self.kv_spec, self.model.config
        return KVCache(cfg, kv.num_blocks, kv.block_size, kv.sliding_blocks(cfg.sliding_window), self.model.dtype,
                       self.model.device)

    def usage(self) -> float:
        return self.cache.usage()
