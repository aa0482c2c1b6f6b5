"""gpt-oss in one process, built from the same functions the cluster's actors call.

It is both the engine for small models (`--engine local`) and the reference the cluster must
reproduce exactly. The forward pass runs on a flat batch of tokens from several sequences, each at
its own positions (prefill chunks and decode tokens mixed).
"""

from __future__ import annotations

from typing import Callable, Generator

import torch
import torch.nn.functional as F

from model_shards.attention import attention_block, kernel_attention
from model_shards.capabilities import triton_kernels
from model_shards.batch import StepLayout
from model_shards.kv_cache import KVCache, StepKV
from model_shards.moe import moe_block
from model_shards.norm import rms_norm
from model_shards.rope import Rope
from model_shards.weights import GlobalWeights, ModelWeights


def embed(token_ids: torch.Tensor, w: GlobalWeights) -> torch.Tensor:
    """[T] -> [T, H]; no scaling by sqrt(H)."""
    return F.embedding(token_ids, w.embedding)


def unembed(hidden: torch.Tensor, w: GlobalWeights, eps: float) -> torch.Tensor:
    """[S, H] -> [S, V] logits in the model dtype (final norm, then the untied unembedding). Sampling
    converts to fp32 only what needs it: a greedy row without log-probs takes the argmax as it is
    (the conversion is exact, so the choice is the same)."""
    return w.unembedding(rms_norm(hidden, w.final_norm, eps))


# (layer, t [T, H] normed hidden states) -> MoE output [T, H]. The local model computes it in
# process; an attention replica sends t to the router and waits for the answer.
MoeFn = Callable[[int, torch.Tensor], torch.Tensor]


class GptOssModel:
    """`weights.routers` and `weights.experts` may be empty when the MoE runs elsewhere."""

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        self.config = weights.config
        self.dtype = weights.globals.embedding.dtype
        self.device = weights.globals.embedding.device
        self.rope = Rope(self.config, self.device)
        self.kernels = triton_kernels(self.device)  # the fused Triton kernels (kernels/fused.py) run here

    def new_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        return KVCache(self.config, num_blocks, block_size, dtype=self.dtype, device=self.device)

    def local_moe(self, layer: int, t: torch.Tensor) -> torch.Tensor:
        return moe_block(t, self.weights.routers[layer], self.weights.experts[layer], self.config)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, layout: StepLayout, kv: KVCache,
                moe: MoeFn | None = None) -> torch.Tensor:
        """token_ids [T] -> logits [R, V] fp32 for the last token of each sampled chunk (plan_step)."""
        return drive(self.layers(token_ids, layout, kv), moe or self.local_moe)

    def layers(self, token_ids: torch.Tensor, layout: StepLayout, kv: KVCache) -> Layers:
        """`forward` as a generator, for callers that interleave several batches (a replica's
        micro-batches): yields (layer, t [T, H]) where the MoE block's input is ready, takes its output
        [T, H] back, and returns the logits (in the model dtype: `unembed`)."""
        return self.layers_from(token_ids, layout.positions, layout.last_token, kv, kv.view(layout))

    @torch.inference_mode()
    def layers_from(self, token_ids: torch.Tensor, positions: torch.Tensor, last_token: torch.Tensor, kv: KVCache,
                    kv_view: StepKV) -> Layers:
        """`layers` from the step's device tensors (token_ids, positions [T], last_token [R]) and its
        cache view: what a static decode step (decode_graph.py) runs from its buffers."""
        cfg, w = self.config, self.weights
        cos, sin = self.rope.cos_sin(positions, self.dtype)  # [T, d/2]
        x = embed(token_ids, w.globals)  # [T, H]
        if self.kernels:
            return (yield from self._kernel_layers(x, cos, sin, last_token, kv, kv_view))
        for layer in range(cfg.num_hidden_layers):
            attn = w.attention[layer]
            x = attention_block(x, attn, cfg, layer, cos, sin, kv, kv_view)
            x = x + (yield layer, rms_norm(x, attn.mlp_norm, cfg.rms_norm_eps))
        return unembed(x[last_token], w.globals, cfg.rms_norm_eps)

    def _kernel_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, last_token: torch.Tensor,
                       kv: KVCache, kv_view: StepKV) -> Layers:
        """layers_from where the Triton kernels run: each residual add joins the next norm in one
        kernel (add_rms_norm), the attention is kernel_attention. The same math, fewer launches."""
        from model_shards.kernels.fused import add_rms_norm

        cfg, w, eps = self.config, self.weights, self.config.rms_norm_eps
        delta: torch.Tensor | None = None  # the last block's output, not yet added to x
        for layer in range(cfg.num_hidden_layers):
            attn = w.attention[layer]
            x, normed = add_rms_norm(x, delta, attn.attn_norm, eps)
            x, t = add_rms_norm(x, kernel_attention(normed, attn, cfg, layer, cos, sin, kv, kv_view), attn.mlp_norm, eps)
            delta = yield layer, t
        return unembed(x[last_token] + delta[last_token], w.globals, eps)


Layers = Generator[tuple[int, torch.Tensor], torch.Tensor, torch.Tensor]  # GptOssModel.layers


@torch.inference_mode()
def drive(layers: Layers, moe: MoeFn) -> torch.Tensor:
    """Runs a layer generator with the MoE computed by `moe` -> its logits [R, V] in fp32."""
    request = next(layers)
    while True:
        try:
            request = layers.send(moe(*request))
        except StopIteration as done:
            return done.value.to(torch.float32)
