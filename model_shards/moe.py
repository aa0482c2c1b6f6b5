"""The mixture-of-experts block: routing, the clamped SwiGLU experts, and the combine.

Split in three so that the cluster can place them on different actors: `route` (router), `run_experts`
(an expert shard, for the assignments that fall in its range [a, b)), and `combine` (router again).
The single-process model calls the same three in a row.

Assignments are the T*K (token, k) pairs in token-major order. Each expert output is weighted by its
gate and returned per assignment in fp32; `combine` sums the K of a token in k order. The sum order
therefore does not depend on how experts are split over shards.

How run_experts computes, by device and step: on CUDA (bf16), two grouped matmuls over every expert
(`grouped_experts`); on a CPU that prepacks bf16, the whole stack in batched matmuls when most experts
have rows (`batched_experts`), else one prepacked matmul per expert; float32 always one matmul per
expert (the exactness reference). For few tokens over most experts (bf16 on such a CPU only) the
gate-weighted sum of each token's outputs may instead come from two matmuls (`fused_rows`): the local
engine's `moe_block` through `fused_experts`, an expert shard for its part of each token's K.
"""

from __future__ import annotations

import torch

from model_shards import linear
from model_shards.capabilities import triton_kernels
from model_shards.config import GptOssConfig
from model_shards.weights import (FUSED_MAX_TOKENS, STACKED_MAX_TOKENS, DenseStack, ExpertWeights, Mxfp4Stack,
                                  RouterWeights)


ROW_BLOCK = 1024  # assignments per block of the expert computation (see row_blocks)
BATCHED_MAX_ROWS = 8  # rows per expert in use up to which batched_experts runs (batches_well)


def route(t: torch.Tensor, w: RouterWeights, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [T, H] -> experts [T, K] (long), gates [T, K] (t's dtype).

    Top-k of the raw logits FIRST, then softmax over those k (not softmax over all experts)."""
    logits = w(t)  # [T, E]
    top_values, top_experts = torch.topk(logits, k, dim=-1, sorted=True)  # [T, K]
    return top_experts, torch.softmax(top_values, dim=-1)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """[N, 2I] any float dtype -> [N, I] fp32. Columns interleave gate (even) and up (odd). The gate
    is clamped only from above; up is clamped on both sides and shifted by +1.

    Each half is converted to fp32 once and the rest works in place: the same products in the same
    order as gate * sigmoid(alpha * gate) * (up + 1) on an fp32 copy (bit-identical), at one pass
    over memory per op instead of a fresh tensor each, which saves about a quarter of its time on a
    prefill's rows (docs/measurements.md). The input is never written."""
    gate = gate_up[..., 0::2].to(torch.float32, copy=True).clamp_(max=limit)
    up = gate_up[..., 1::2].to(torch.float32, copy=True).clamp_(min=-limit, max=limit).add_(1)
    return torch.sigmoid(gate * alpha).mul_(gate).mul_(up)


def run_experts(x: torch.Tensor, token_index: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                w: ExpertWeights, cfg: GptOssConfig) -> torch.Tensor:
    """Weighted expert outputs for N assignments that all fall in w's range.

    x [T', H] rows, token_index [N] (row of x per assignment), expert_ids [N] (global ids),
    gates [N] -> [N, H] fp32 = gate * (down(swiglu(gate_up(x_row) + b1)) + b2)."""
    n = expert_ids.shape[0]
    out = torch.empty(n, x.shape[1], dtype=torch.float32, device=x.device)  # every row is written below
    if n == 0:
        return out
    if uses_grouped_mm(x, w, n) or (n <= ROW_BLOCK and groups_on_cpu(x, w)):
        return grouped_experts(x, token_index, expert_ids, gates, w, cfg)
    order = torch.argsort(expert_ids, stable=True)  # [N] assignments grouped by expert
    experts, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
    spans = list(zip(experts.tolist(), counts.tolist()))  # a host sync: the CPU's prepacked paths and prefill
    if spans[0][0] < w.first or spans[-1][0] >= w.stop:
        raise ValueError(f"assignment outside experts [{w.first}, {w.stop})")
    for block, segments in row_blocks(spans, ROW_BLOCK):
        sel = order[block]  # [n] this block's assignments, in expert order
        if batches_well(w, len(segments), block.stop - block.start):
            y = batched_experts(x, token_index[sel], segments, w, cfg)
        else:
            rows = x.index_select(0, token_index[sel])  # [n, H]: each expert's rows are one contiguous slice
            sizes = [n for _, n in segments]
            h = torch.cat([w.gate_up.apply(e - w.first, part, w.gate_up_bias[e - w.first])
                           for (e, _), part in zip(segments, rows.split(sizes))])  # [n, 2I]
            act = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha).to(x.dtype)  # [n, I]
            y = torch.cat([w.down.apply(e - w.first, part, w.down_bias[e - w.first])
                           for (e, _), part in zip(segments, act.split(sizes))])  # [n, H]
        out[sel] = y * gates[sel].to(torch.float32)[:, None]  # promoted to fp32 in the product: no copy of y first
    return out


def is_prepacked(w: ExpertWeights) -> bool:
    """Whether the experts' matrices have oneDNN copies (a bf16 CPU that prepacks: linear.py)."""
    return isinstance(w.gate_up, DenseStack) and any(p is not None for p in w.gate_up.packed)


def uses_grouped_mm(x: torch.Tensor, w: ExpertWeights, rows: int | None = None) -> bool:
    """Where the experts run grouped whatever the step: the Triton kernels (`kernel_experts`), and on
    CUDA bf16 dense experts as two grouped matmuls (`torch._grouped_mm`): no loop over experts and no
    host sync. On CPU the prepacked paths take about a fifth less time, from one row per expert to a
    prefill's hundreds (docs/measurements.md); without them a decode-sized step's experts run grouped
    too (run_experts), at the per-expert loop's speed and without its host sync. `rows`: the step's
    assignments, when known (dense experts take the kernels for decode-sized steps only)."""
    if rows is not None and kernel_experts(x, w, rows):
        return True
    if isinstance(w.gate_up, Mxfp4Stack) and isinstance(w.down, Mxfp4Stack) and triton_kernels(x.device):
        return True
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack)
            and w.gate_up.weight.dtype == torch.bfloat16 and w.down.weight.dtype == torch.bfloat16)


def kernel_experts(x: torch.Tensor, w: ExpertWeights, rows: int) -> bool:
    """Whether the Triton grouped kernels (kernels/mxfp4_moe.py) compute w's experts for x: where the
    kernels run (capabilities.triton_kernels), always for MXFP4 stacks (the weights stay packed), for
    dense ones only up to decode-sized steps (`rows` assignments, sorted in one program), where one
    launch per matmul with the gather and the scatter inside beats torch's grouped matmul and its
    copies; larger dense steps keep `torch._grouped_mm` on CUDA."""
    if not triton_kernels(x.device):
        return False
    if isinstance(w.gate_up, Mxfp4Stack) and isinstance(w.down, Mxfp4Stack):
        return True
    from model_shards.kernels.fused import sorts_here

    dense = (isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack) and not is_prepacked(w)
             and w.gate_up.weight.dtype == x.dtype)
    return dense and sorts_here(rows, w.count + 1)


def groups_on_cpu(x: torch.Tensor, w: ExpertWeights) -> bool:
    """Dense experts on a CPU that does not prepack them: grouped matmuls run there at the per-expert
    loop's speed (docs/measurements.md) and need no host sync."""
    return (x.device.type == "cpu" and isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack)
            and not is_prepacked(w) and x.dtype == w.gate_up.weight.dtype)


def masked_experts(x: torch.Tensor, token_index: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor,
                   w: ExpertWeights, cfg: GptOssConfig) -> torch.Tensor:
    """run_experts' contract for N assignments of which only those with slots >= 0 are w's (an
    expert shard under the device's dispatch): slots [N] positions in w's stack or -1 -> [N, H] fp32,
    exactly 0 where -1. Grouped, nothing is read on the host; elsewhere the rows are picked on the host."""
    mine = slots >= 0  # [N]
    if uses_grouped_mm(x, w, slots.shape[0]) or (slots.shape[0] <= ROW_BLOCK and groups_on_cpu(x, w)):
        return grouped_experts(x, token_index, slots + w.first, gates, w, cfg, mine)
    keep = mine.nonzero().squeeze(1)  # a host read: the per-expert paths plan their rows on the host
    out = torch.zeros(slots.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out[keep] = run_experts(x, token_index[keep], slots[keep] + w.first, gates[keep], w, cfg)
    return out


def grouped_experts(x: torch.Tensor, token_index: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                    w: ExpertWeights, cfg: GptOssConfig, mine: torch.Tensor | None = None) -> torch.Tensor:
    """run_experts' contract (x [T', H], token_index/expert_ids/gates [N] -> [N, H] fp32 weighted
    outputs) in two grouped matmuls over the assignments sorted by expert: group e is the rows of
    expert e, empty groups included. Any device where torch has the op. Nothing is read back: the ids
    must fall in w's range (route() and the router's dispatch make them so); the CPU checks them as it
    counts, a GPU could only with a host sync. `mine` [N] bool: only these assignments are computed
    (the others sort into a last group no matmul reads) and the others' rows are 0."""
    if isinstance(w.gate_up, Mxfp4Stack) or kernel_experts(x, w, expert_ids.shape[0]):  # packed: only the kernel
        return kernel_grouped(x, token_index, expert_ids, gates, w, cfg, mine)
    local = expert_ids - w.first  # [N]
    if mine is not None:
        local = torch.where(mine, local, w.count)  # the rest: group E, past every matmul's groups
    try:
        counts = expert_counts(local, w.count + (mine is not None))[:w.count]  # [E]
    except (IndexError, RuntimeError) as exc:
        raise ValueError(f"assignment outside experts [{w.first}, {w.stop})") from exc
    order = torch.argsort(local, stable=True)  # [N] assignments grouped by expert
    experts = local[order].clamp(max=w.count - 1)  # [N] local expert of each sorted row (any, for the rest)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each group
    rows = x.index_select(0, token_index[order])  # [N, H]
    assert isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack)
    h = torch._grouped_mm(rows, w.gate_up.weight.transpose(1, 2), offs=ends)  # [N, 2I]
    h = h + w.gate_up_bias.index_select(0, experts)
    act = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha).to(x.dtype)  # [N, I]
    y = torch._grouped_mm(act, w.down.weight.transpose(1, 2), offs=ends) + w.down_bias.index_select(0, experts)
    out = torch.empty(local.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out[order] = y * gates[order].to(torch.float32)[:, None]
    if mine is not None:  # rows past the last group are whatever the matmul left there
        out = torch.where(mine[:, None], out, 0.0)
    return out


def kernel_grouped(x: torch.Tensor, token_index: torch.Tensor | None, expert_ids: torch.Tensor, gates: torch.Tensor,
                   w: ExpertWeights, cfg: GptOssConfig, mine: torch.Tensor | None = None,
                   token_div: int = 1) -> torch.Tensor:
    """grouped_experts through the Triton kernels: the assignments sorted on the device (one program
    for decode-sized steps), then two grouped matmuls that read each assignment's row of x in place
    (token_index, or assignment // token_div without it), put the SwiGLU in gate_up's epilogue and
    the gate in down's, and store each output at its assignment's row. -> [N, H] fp32. Ids outside
    w's range are not checked (a check would read the device)."""
    from model_shards.kernels.fused import sort_assignments, sorts_here
    from model_shards.kernels.mxfp4_moe import grouped_dense, grouped_mxfp4

    n = expert_ids.shape[0]
    local = expert_ids - w.first  # [N]
    groups = w.count + (mine is not None)
    if mine is not None:
        local = torch.where(mine, local, w.count)  # the rest: group E, which no matmul reads
    if sorts_here(n, groups):
        order, ends = sort_assignments(local, groups)
    else:
        order = torch.argsort(local, stable=True).to(torch.int32)
        ends = torch.cumsum(expert_counts(local, groups), 0, dtype=torch.int32)
    ends = ends[:w.count]
    out = (torch.zeros if mine is not None else torch.empty)(n, x.shape[1], dtype=torch.float32, device=x.device)
    where = dict(order=order, ends=ends)
    if isinstance(w.gate_up, Mxfp4Stack) and isinstance(w.down, Mxfp4Stack):
        act = grouped_mxfp4(x, w.gate_up.blocks, w.gate_up.scales, w.gate_up_bias, **where, gather=True,
                            token_index=token_index, token_div=token_div, out_dtype=x.dtype,
                            swiglu=(cfg.swiglu_limit, cfg.swiglu_alpha))  # [N, I] sorted
        return grouped_mxfp4(act, w.down.blocks, w.down.scales, w.down_bias, **where, row_scale=gates, scatter=True,
                             out=out)
    assert isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack)
    act = grouped_dense(x, w.gate_up.weight, w.gate_up_bias, **where, gather=True, token_index=token_index,
                        token_div=token_div, out_dtype=x.dtype, swiglu=(cfg.swiglu_limit, cfg.swiglu_alpha))
    return grouped_dense(act, w.down.weight, w.down_bias, **where, row_scale=gates, scatter=True, out=out)


def expert_counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids [N] in [0, n) -> [n] long: how many times each occurs. A scatter-add, where bincount would
    read the largest id back to size its output (a host sync on a GPU)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def likely_active(tokens: int, k: int, experts: int) -> float:
    """The expected number of distinct experts that `tokens` tokens with k experts each use, routed
    uniformly: what the fused path's choice goes by instead of the actual count (which the host would
    have to read back from the device)."""
    return experts * (1.0 - (1.0 - min(k, experts) / experts) ** tokens)


def batches_well(w: ExpertWeights, active: int, rows: int) -> bool:
    """Batched matmuls over every expert of the stack pay off when most of them have rows (each weight
    is read either way, in one call instead of one per expert) and those rows are few, on the bf16
    weights of a CPU that prepacks (float32 keeps the per-expert path, the exactness reference).
    Beyond BATCHED_MAX_ROWS rows per expert in use (prefill), one prepacked matmul per expert is faster
    than `baddbmm`, which reorders the weights on every call: the threshold keeps small prefills faster
    and larger ones no slower (docs/measurements.md)."""
    return (is_prepacked(w) and 4 * active >= 3 * w.count
            and rows <= BATCHED_MAX_ROWS * active)


def batched_experts(x: torch.Tensor, tokens: torch.Tensor, segments: list[tuple[int, int]], w: ExpertWeights,
                    cfg: GptOssConfig) -> torch.Tensor:
    """x [T', H], tokens [n] (row of x per assignment, grouped by expert as `segments` say) -> [n, H]
    expert outputs, every expert of the stack in batched matmuls over rows padded to the busiest
    expert's count: for a few rows per expert, about a third less time than one prepacked matmul per
    expert (docs/measurements.md). gate_up of a few tokens goes through the whole prepacked stack
    instead (every token through every expert, then each assignment's row picked): `baddbmm` reorders
    the weights for the CPU's matrix unit on every call, the prepacked stack does not."""
    assert isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack)
    sizes = torch.tensor([c for _, c in segments], device=x.device)
    firsts = torch.cumsum(sizes, 0) - sizes  # [segments] first row of each
    m = int(sizes.max())
    local = torch.tensor([e - w.first for e, _ in segments], device=x.device).repeat_interleave(sizes)  # [n]
    rank = torch.arange(tokens.shape[0], device=x.device) - firsts.repeat_interleave(sizes)  # [n] within its expert
    slots = local * m + rank  # [n] row of the padded [E * m, ...]
    stack = w.gate_up.weight  # [E, 2I, H]
    if w.gate_up.stacked is not None and x.shape[0] <= STACKED_MAX_TOKENS:
        every = linear.apply(x, stack.reshape(-1, stack.shape[-1]), w.gate_up_bias.reshape(-1), w.gate_up.stacked)
        h = every.view(-1, stack.shape[1]).index_select(0, tokens * w.count + local)  # [n, 2I] of [T' * E, 2I]
        act = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha).to(x.dtype)  # [n, I]
        padded = act.new_zeros(w.count * m, act.shape[1])
        padded[slots] = act
    else:
        padded = x.new_zeros(w.count * m, x.shape[1])
        padded[slots] = x.index_select(0, tokens)
        h = torch.baddbmm(w.gate_up_bias[:, None, :], padded.view(w.count, m, -1), stack.transpose(1, 2))
        padded = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha).to(x.dtype)  # [E, m, I]
    y = torch.baddbmm(w.down_bias[:, None, :], padded.view(w.count, m, -1), w.down.weight.transpose(1, 2))  # [E, m, H]
    return y.view(w.count * m, -1).index_select(0, slots)


def row_blocks(spans: list[tuple[int, int]], limit: int) -> list[tuple[slice, list[tuple[int, int]]]]:
    """(expert, rows) spans in order -> blocks of consecutive whole spans, up to `limit` rows each (a
    single larger span makes a block of its own). A prefill's [N, 2I] intermediates would not fit in
    cache; such blocks do. Spans are never split, so each expert's matmul sees the same rows as
    unblocked, and the results are bit-identical."""
    blocks, segments, start, filled = [], [], 0, 0
    for expert, count in spans:
        if segments and filled + count > limit:
            blocks.append((slice(start, start + filled), segments))
            start, filled, segments = start + filled, 0, []
        segments.append((expert, count))
        filled += count
    if segments:
        blocks.append((slice(start, start + filled), segments))
    return blocks


def combine(weighted: torch.Tensor, k: int, dtype: torch.dtype, summed: torch.Tensor | None = None) -> torch.Tensor:
    """[T*K, H] fp32 per assignment (token-major) -> [T, H] in `dtype`, summed over k in order.
    `summed` [T, H] fp32: gate-weighted sums that some assignments' outputs already arrived as
    (fused_rows; their rows of `weighted` are zero), added last."""
    total = weighted.view(-1, k, weighted.shape[-1]).sum(dim=1)
    return (total if summed is None else total + summed).to(dtype)


def fuses_well(w: ExpertWeights, tokens: int, active: int) -> bool:
    """fused_rows pays for few tokens over at least half of the experts of `w` (below that, the
    per-expert matmuls read less), in the local engine's decode steps and in an expert shard's part of
    them alike (docs/measurements.md)."""
    return (isinstance(w.down, DenseStack) and w.down.stacked is not None and isinstance(w.gate_up, DenseStack)
            and w.gate_up.stacked is not None and tokens <= FUSED_MAX_TOKENS and 2 * active >= w.count)


def fuses_here(w: ExpertWeights, rows: int, active: int) -> bool:
    """fuses_well for `rows` rows whose assignments use `active` of w's experts (the router counts
    them on the host, where it plans the dispatch)."""
    return fuses_well(w, rows, active)


def fused_rows(x: torch.Tensor, token_index: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor,
               w: ExpertWeights, cfg: GptOssConfig) -> torch.Tensor:
    """x [R, H], token_index [N] (row of x of each assignment), slots [N] (its expert's position in
    w's stack), gates [N] -> [R, H] fp32: each row's gate-weighted sum of its assignments' expert
    outputs (bias included), in two prepacked matmuls: gate_up of every row through every expert (the
    stack by rows), then each assignment's gate-weighted activation placed in its expert's columns of
    its row of [R, n * I], through the experts side by side, which sums a row's outputs in the matmul.

    The gate multiplies the activation (rounded to the model dtype) instead of the expert's output,
    and the outputs are summed in fp32 inside the matmul in its own order: bf16 rounding apart from
    combine(run_experts(...)), which keeps the fixed k order (float32 always takes that path: nothing
    is prepacked there). A (row, slot) pair appears at most once (a token picks an expert once)."""
    assert isinstance(w.gate_up, DenseStack) and isinstance(w.down, DenseStack)
    assert w.gate_up.stacked is not None and w.down.stacked is not None
    r, n, inter = x.shape[0], w.count, w.down.weight.shape[2]
    rows = token_index * n + slots  # [N] of [R * n]
    every = linear.apply_packed(x, w.gate_up.stacked, w.gate_up_bias.reshape(-1))  # [R, n * 2I]
    h = every.view(r * n, -1).index_select(0, rows)  # [N, 2I]
    act = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha).mul_(gates.reshape(-1, 1))  # [N, I] fp32
    wide = x.new_zeros(r * n, inter).index_copy_(0, rows, act.to(x.dtype))  # [R * n, I]
    y = linear.apply_packed(wide.view(r, n * inter), w.down.stacked, None)  # [R, H]
    weights = torch.zeros(r, n, dtype=torch.float32, device=x.device).index_put_((token_index, slots), gates.float())
    return torch.addmm(y.float(), weights, w.down_bias.float())  # [R, H] + sum gate * b2[slot]


def fused_experts(t: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w: ExpertWeights,
                  cfg: GptOssConfig) -> torch.Tensor:
    """t [T, H], expert_ids/gates [T, K] -> MoE output [T, H] in t's dtype, with every expert of the
    layer in `w`: fused_rows over the T*K assignments."""
    tokens, k = expert_ids.shape
    token_index = torch.arange(tokens, device=t.device).repeat_interleave(k)  # [T*K]
    return fused_rows(t, token_index, (expert_ids - w.first).flatten(), gates.flatten(), w, cfg).to(t.dtype)


def moe_block(t: torch.Tensor, router: RouterWeights, experts: ExpertWeights, cfg: GptOssConfig,
              counts: torch.Tensor | None = None, real: torch.Tensor | None = None) -> torch.Tensor:
    """t [T, H] (already normed) -> MoE output [T, H], with every expert in one place. `counts`
    [E] (long, on t's device), when given, is incremented by the tokens routed to each expert (only
    by the rows where `real` [T] is 1, when given: a static batch's padding rows are not tokens)."""
    k = cfg.experts_per_token
    if router.bias is not None and kernel_experts(t, experts, t.shape[0] * k):
        from model_shards.kernels.fused import route_topk

        expert_ids, gates = route_topk(t, router.weight, router.bias, k, counts, real)  # [T, K], counted
        weighted = kernel_grouped(t, None, expert_ids.flatten(), gates.flatten(), experts, cfg, token_div=k)
        return combine(weighted, k, t.dtype)
    expert_ids, gates = route(t, router, k)  # [T, K]
    if counts is not None:
        ids = expert_ids.flatten()
        weight = torch.ones_like(ids) if real is None else real[:, None].expand(-1, k).reshape(-1)
        counts.index_add_(0, ids, weight)
    if fuses_well(experts, t.shape[0], round(likely_active(t.shape[0], k, experts.count))):
        return fused_experts(t, expert_ids, gates, experts, cfg)
    token_index = torch.arange(t.shape[0], device=t.device).repeat_interleave(k)  # [T*K]
    weighted = run_experts(t, token_index, expert_ids.flatten(), gates.flatten(), experts, cfg)
    return combine(weighted, k, t.dtype)
