"""The random part of sampling, for all the sampled rows of a step at once, on their device.

Each row's draw uses one uniform number fixed by (seed, n), the sequence's seed and the index of the
token it chooses, computed on the host from a counter-based hash (SplitMix64): no generator state,
the same on every device, whatever else shares the batch. The token is the one where the row's
cumulative distribution first exceeds u * total (inverse CDF), found in two levels (sums of column
blocks, then the prefix sums of one block) so that nothing sequential runs over the whole vocabulary.
`torch.multinomial` with a seeded generator per row took 3.5 ms per row of 201088 (2-core VM),
most of a step at 32 sampled rows. Nothing here waits for the device: rows with no distribution left
(nothing finite, or all zero) are reported in a mask.
"""

from __future__ import annotations

from typing import Sequence

import torch

MASK64 = (1 << 64) - 1
DRAW_BLOCK = 1024  # columns per block of the two-level inverse CDF
TOP_P_HEAD = 1024  # top-p looks for its set among this many most likely tokens first


def splitmix64(x: int) -> int:
    """A 64-bit integer -> a well-mixed 64-bit integer (Steele, Lea and Flood's SplitMix64 finalizer)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """The draw of a sequence's step-th token: a float in (0, 1) with 53 random bits."""
    bits = splitmix64(splitmix64(seed & MASK64) ^ (step & MASK64)) >> 11
    return (bits + 0.5) / (1 << 53)


def keep_top_k(x: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """x [R, V] logits, top_k per row (0, or >= V: no limit) -> x with all but each row's k largest at
    -inf."""
    v = x.shape[-1]
    limits = [k if 0 < k < v else 0 for k in top_k]
    most = max(limits, default=0)
    if most == 0:
        return x
    values = torch.topk(x, most, dim=-1).values  # [R, most] descending
    k = torch.tensor(limits, dtype=torch.long, device=x.device)
    kth = values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [R, 1]
    kth = kth.masked_fill((k == 0)[:, None], float("-inf"))
    return x.masked_fill(x < kth, float("-inf"))


def keep_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs [R, V], min_p [R] -> without the tokens less than min_p times as likely as the row's most
    likely one (not renormalized: the draw divides by the total)."""
    return probs * (probs >= (min_p[:, None] * probs.amax(dim=-1, keepdim=True)))


def keep_top_p(probs: torch.Tensor, top_p: Sequence[float], head: int = TOP_P_HEAD) -> torch.Tensor:
    """probs [R, V] (not necessarily normalized), top_p per row -> each row's smallest top set reaching
    mass top_p of its total; the most likely token always stays. Rows with top_p >= 1 pass through.

    The set is looked for among each row's `head` most likely tokens first (a top-k, 12 ms for
    [32, 201088] on the 2-core VM, where sorting whole rows takes 200 ms); only rows whose head does
    not reach top_p are sorted whole (that check is a host sync)."""
    if all(p >= 1.0 for p in top_p):
        return probs
    p = torch.tensor(list(top_p), dtype=probs.dtype, device=probs.device)
    target = p[:, None] * probs.sum(dim=-1, keepdim=True)  # [R, 1]
    values, order = torch.topk(probs, min(head, probs.shape[-1]), dim=-1)  # [R, head] descending
    reach = torch.cumsum(values, dim=-1)
    if not bool((reach[:, -1:] >= target).all()):
        values, order = torch.sort(probs, dim=-1, descending=True)  # [R, V]
        reach = torch.cumsum(values, dim=-1)
    keep = (reach - values) < target  # the mass before a token is short of the target
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter_(1, order, values * keep)  # back in vocabulary order
    return torch.where((p < 1.0)[:, None], kept, probs)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = DRAW_BLOCK) -> torch.Tensor:
    """probs [R, V] >= 0 (any total), u [R] float64 in (0, 1) -> [R] long: the first token whose
    cumulative probability exceeds u * total. Tokens of probability 0 are never chosen."""
    r, v = probs.shape
    n = v // block
    sums = probs[:, :n * block].reshape(r, n, block).sum(dim=-1)  # [R, n]
    if n * block < v:
        sums = torch.cat((sums, probs[:, n * block:].sum(dim=-1, keepdim=True)), dim=1)
    ends = torch.cumsum(sums.to(torch.float64), dim=-1)  # [R, blocks] mass up to each block's end
    target = u[:, None] * ends[:, -1:]  # [R, 1]
    chosen = torch.searchsorted(ends, target, right=True).clamp_(max=ends.shape[1] - 1)  # [R, 1]
    before = torch.where(chosen > 0, ends.gather(1, (chosen - 1).clamp(min=0)), torch.zeros_like(target))
    cols = chosen * block + torch.arange(block, device=probs.device)  # [R, block]
    inside = probs.gather(1, cols.clamp(max=v - 1)) * (cols < v)  # columns past V count as 0
    within = torch.cumsum(inside.to(torch.float64), dim=-1)  # [R, block]
    # the block sums and this cumsum round differently: keep the target inside the block's mass
    left = (target - before).clamp_(min=0.0)
    left = torch.minimum(left, torch.nextafter(within[:, -1:], torch.zeros_like(left)))
    index = torch.searchsorted(within, left, right=True).clamp_(max=block - 1)  # [R, 1]
    return (chosen * block + index).squeeze(1).clamp_(max=v - 1)


def draw(x: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
         min_p: Sequence[float], seeds: Sequence[int], steps: Sequence[int],
         floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, V] fp32 logits of the sampled rows (already biased, penalized and masked) -> tokens [R]
    and ok [R] (False where no distribution is left: the caller keeps another choice). Top-k, then
    temperature, softmax (terms below `floor` clamped), min-p, then top-p."""
    dev = x.device
    scale = torch.tensor([1.0 / t for t in temperature], dtype=x.dtype, device=dev)[:, None]  # [R, 1]
    x = keep_top_k(x, top_k)
    shifted = (x - x.amax(dim=-1, keepdim=True)).mul_(scale)  # [R, V] <= 0: the logits over temperature, shifted
    # softmax without its normalization. Terms below `floor` (masked ones: -inf) get exactly 0: their mass
    # is below fp32's resolution anyway, and exp() of such arguments, -inf included, takes a slow path
    # (10 ms for [32, 201088] after a top-k, against 1 ms). A row whose maximum is not finite has no
    # distribution (nan everywhere): all 0.
    low = ~(shifted >= floor)  # [R, V] (nan included)
    probs = shifted.clamp_(min=floor).exp_().masked_fill_(low, 0.0)
    if any(m > 0.0 for m in min_p):
        probs = keep_min_p(probs, torch.tensor(list(min_p), dtype=x.dtype, device=dev))
    probs = keep_top_p(probs, top_p)
    ok = probs.sum(dim=-1) > 0  # [R]
    u = torch.tensor([uniform(s, n) for s, n in zip(seeds, steps)], dtype=torch.float64, device=dev)
    return inverse_cdf(probs, u), ok
