"""The mixture-of-experts block: routing, the clamped SwiGLU experts, and the combine.

Split in three so that the cluster can place them on different actors: `route` (router), `run_experts`
(an expert shard, for the assignments that fall in its range [a, b)), and `combine` (router again).
The single-process model calls the same three in a row.

Assignments are the T*K (token, k) pairs in token-major order. Each expert output is weighted by its
gate and returned per assignment in fp32; `combine` sums the K of a token in k order. The sum order
therefore does not depend on how experts are split over shards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_shards.config import GptOssConfig
from model_shards.weights import ExpertWeights, RouterWeights


def route(t: torch.Tensor, w: RouterWeights, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [T, H] -> experts [T, K] (long), gates [T, K] (t's dtype).

    Top-k of the raw logits FIRST, then softmax over those k (not softmax over all experts)."""
    logits = F.linear(t, w.weight, w.bias)  # [T, E]
    top_values, top_experts = torch.topk(logits, k, dim=-1, sorted=True)  # [T, K]
    return top_experts, torch.softmax(top_values, dim=-1)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """[N, 2I] -> [N, I]. Columns interleave gate (even) and up (odd). The gate is clamped only
    from above; up is clamped on both sides and shifted by +1."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def run_experts(x: torch.Tensor, token_index: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                w: ExpertWeights, cfg: GptOssConfig) -> torch.Tensor:
    """Weighted expert outputs for N assignments that all fall in w's range.

    x [T', H] rows, token_index [N] (row of x per assignment), expert_ids [N] (global ids),
    gates [N] -> [N, H] fp32 = gate * (down(swiglu(gate_up(x_row) + b1)) + b2)."""
    n = expert_ids.shape[0]
    out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    if int(expert_ids.min()) < w.first or int(expert_ids.max()) >= w.stop:
        raise ValueError(f"assignment outside experts [{w.first}, {w.stop})")
    order = torch.argsort(expert_ids, stable=True)  # group assignments by expert
    experts, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
    offset = 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        sel = order[offset:offset + count]  # [n_e]
        offset += count
        local = expert - w.first
        rows = x[token_index[sel]]  # [n_e, H]
        h = F.linear(rows, w.gate_up.matrix(local, x.dtype), w.gate_up_bias[local])  # [n_e, 2I]
        act = swiglu(h.to(torch.float32), cfg.swiglu_limit, cfg.swiglu_alpha).to(x.dtype)  # [n_e, I]
        y = F.linear(act, w.down.matrix(local, x.dtype), w.down_bias[local])  # [n_e, H]
        out[sel] = y.to(torch.float32) * gates[sel].to(torch.float32)[:, None]
    return out


def combine(weighted: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T*K, H] fp32 per assignment (token-major) -> [T, H] in `dtype`, summed over k in order."""
    return weighted.view(-1, k, weighted.shape[-1]).sum(dim=1).to(dtype)


def moe_block(t: torch.Tensor, router: RouterWeights, experts: ExpertWeights, cfg: GptOssConfig,
              counts: torch.Tensor | None = None) -> torch.Tensor:
    """t [T, H] (already normed) -> MoE output [T, H], with every expert in one place. `counts`
    [E], when given, is incremented by the tokens routed to each expert."""
    k = cfg.experts_per_token
    expert_ids, gates = route(t, router, k)  # [T, K]
    if counts is not None:
        counts += torch.bincount(expert_ids.flatten().cpu(), minlength=counts.shape[0])
    token_index = torch.arange(t.shape[0], device=t.device).repeat_interleave(k)  # [T*K]
    weighted = run_experts(t, token_index, expert_ids.flatten(), gates.flatten(), experts, cfg)
    return combine(weighted, k, t.dtype)
