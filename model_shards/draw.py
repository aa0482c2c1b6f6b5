"""The random part of sampling, for all the sampled rows of a step at once, on their device.

Each row draws by an exponential race: the token maximizing p / E, with E ~ Exp(1) per token, is a
draw from p (vLLM's samplers do the same). The race is robust where an inverse CDF is not: a resumed
request recomputes its logits by prefill, which differs from decode in the last bits, and an
inverse CDF over 201088 tokens accumulates that into a different token (seen in the engine's resume
test); the race changes its winner only on a near tie.

The noise is a counter-based hash of (seed, n, vocabulary position), n the index of the token the
sequence chooses, computed with int32 tensor ops (`uniforms`): no generator, so the draws are the same
whatever else shares the batch and on every device (torch's CPU and CUDA generators give different
streams for one seed: a request resumed on another device, or compared with the CPU, would change).
int32 products wrap and right shifts of negative values sign-extend, on the CPU and on CUDA alike.
Nothing here waits for the device: rows with no distribution left (nothing finite, or all zero) are
reported in a mask.
"""

from __future__ import annotations

from typing import Sequence

import torch


MASK64 = (1 << 64) - 1
ARGMAX_BLOCK = 1024  # columns per block of argmax_rows
TOP_P_HEAD = 1024  # top-p looks for its set among this many most likely tokens first
NOISE_BLOCK = 1 << 20  # elements per block of the CPU's noise (uniforms): its int32 scratch stays in cache


def argmax_rows(logits: torch.Tensor, block: int = ARGMAX_BLOCK) -> torch.Tensor:
    """[S, V] -> [S] long: each row's first index of its maximum, like max(dim=-1).indices, in two
    passes: the maximum of each block of columns (amax, which vectorizes for bf16 on CPU where max with
    indices does not), then the index within the first block that holds the row's maximum: about twice
    as fast on bf16 rows of the whole vocabulary, on one thread or two (docs/measurements.md)."""
    s, v = logits.shape
    n = v // block
    block_max = logits[:, :n * block].view(s, n, block).amax(dim=-1)  # [S, n]
    if n * block < v:  # the last, partial block
        block_max = torch.cat((block_max, logits[:, n * block:].amax(dim=-1, keepdim=True)), dim=1)
    first = block_max.max(dim=-1).indices  # [S]: the first block with the row's maximum
    cols = (first[:, None] * block + torch.arange(block, device=logits.device)).clamp_(max=v - 1)  # [S, block]
    return first * block + logits.gather(1, cols).max(dim=-1).indices  # repeats of column V-1 come last


def splitmix64(x: int) -> int:
    """A 64-bit integer -> a well-mixed 64-bit integer (Steele, Lea and Flood's SplitMix64 finalizer)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int) -> int:
    """The key of a sequence's step-th draw (63 bits)."""
    return splitmix64(splitmix64(seed & MASK64) ^ (step & MASK64)) >> 1


def row_keys(seeds: Sequence[int], steps: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """-> [R, 2] int32: each row's key in two 31-bit halves (one copy to the device)."""
    keys = [row_seed(seed, step) for seed, step in zip(seeds, steps)]
    return torch.tensor([[k & 0x7FFFFFFF, (k >> 31) & 0x7FFFFFFF] for k in keys], dtype=torch.int32).to(device)


def _shift_xor(x: torch.Tensor, bits: int, tmp: torch.Tensor) -> None:
    """x ^= x >>> bits (a logical shift: the arithmetic one torch does on int32 would clear the sign)."""
    torch.bitwise_right_shift(x, bits, out=tmp).bitwise_and_((1 << (32 - bits)) - 1)
    x.bitwise_xor_(tmp)


def _mix32(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """x int32 in place: Wellons' two-multiply integer hash (multipliers below 2^31, so they are int32
    scalars). `tmp`: scratch of x's shape."""
    _shift_xor(x, 16, tmp)
    x.mul_(0x21F0AAAD)
    _shift_xor(x, 15, tmp)
    x.mul_(0x735A2D97)
    _shift_xor(x, 15, tmp)


def hash_bits(keys: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """keys [R, 2] int32 -> [R, count] int32: the 24 hash bits of vocabulary positions
    [first, first + count) of each row, in [0, 2^24)."""
    x = torch.arange(first, first + count, dtype=torch.int32, device=keys.device)[None, :] + keys[:, :1]  # [R, n]
    tmp = torch.empty_like(x)
    _mix32(x, tmp)
    x.bitwise_xor_(keys[:, 1:])
    _mix32(x, tmp)
    return torch.bitwise_right_shift(x, 8, out=tmp).bitwise_and_(0xFFFFFF)


def uniforms(keys: torch.Tensor, vocab: int, block: int | None = None) -> torch.Tensor:
    """keys [R, 2] -> [R, V] fp32 uniforms in (0, 1), (bits + 0.5) / 2^24 (exact in fp32, never 0).
    On CPU in column blocks whose scratch stays in cache (each position's value does not depend on
    the block: the same result in any blocking)."""
    block = block or (max(4096, NOISE_BLOCK // max(1, keys.shape[0])) if keys.device.type == "cpu" else vocab)
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    for a in range(0, vocab, block):
        n = min(block, vocab - a)
        out[:, a:a + n].copy_(hash_bits(keys, a, n)).add_(0.5).mul_(2.0 ** -24)
    return out


def race(probs: torch.Tensor, seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """probs [R, V] >= 0 (any total) -> [R] long: argmax of probs / E, E = -log(u) ~ Exp(1) per token, u
    the row's counter-based uniforms. Tokens of probability 0 never win (unless a row has nothing: the
    caller checks)."""
    noise = uniforms(row_keys(seeds, steps, probs.device), probs.shape[1])  # [R, V]
    return argmax_rows(probs / noise.log_().neg_())


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
    """probs [R, V] scaled so that each row's most likely token has 1 (as draw() makes them), min_p [R]
    -> without the tokens less than min_p times as likely as that one (not renormalized)."""
    return probs * (probs >= min_p[:, None])


def keep_top_p(probs: torch.Tensor, top_p: Sequence[float], head: int = TOP_P_HEAD) -> torch.Tensor:
    """probs [R, V] (not necessarily normalized), top_p per row -> each row's smallest top set reaching
    mass top_p of its total; the most likely token always stays. Rows with top_p >= 1 pass through.

    The set is looked for among each row's `head` most likely tokens first (a top-k, more than ten times
    faster than sorting whole rows of the vocabulary: docs/measurements.md); only rows whose head does
    not reach top_p are sorted whole (that check is a host sync)."""
    if all(p >= 1.0 for p in top_p):
        return probs
    p = torch.tensor(list(top_p), dtype=probs.dtype, device=probs.device)
    target = p[:, None] * probs.sum(dim=-1, keepdim=True)  # [R, 1]
    values, order = torch.topk(probs, min(head, probs.shape[-1]), dim=-1)  # [R, head] descending
    reach = torch.cumsum(values, dim=-1)
    if not bool(((reach[:, -1:] >= target) | (p >= 1.0)[:, None]).all()):  # rows passing through need no sort
        values, order = torch.sort(probs, dim=-1, descending=True)  # [R, V]
        reach = torch.cumsum(values, dim=-1)
    keep = (reach - values) < target  # the mass before a token is short of the target
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter_(1, order, values * keep)  # back in vocabulary order
    return torch.where((p < 1.0)[:, None], kept, probs)


def draw(x: torch.Tensor, top: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
         top_p: Sequence[float], min_p: Sequence[float], seeds: Sequence[int], steps: Sequence[int],
         floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, V] fp32 logits of the sampled rows (already biased, penalized and masked), top [R] their
    maxima (the caller has them from its greedy choice) -> tokens [R]
    and ok [R] (False where no distribution is left: the caller keeps another choice). Top-k, then
    temperature, softmax (terms more than `floor` below the maximum count as 0), min-p, then top-p."""
    dev = x.device
    scale = torch.tensor([1.0 / t for t in temperature], dtype=x.dtype, device=dev)[:, None]  # [R, 1]
    x = keep_top_k(x, top_k)
    shifted = (x - top[:, None]).mul_(scale)  # [R, V] <= 0: the logits over temperature, shifted
    # softmax without its normalization. Terms below `floor` (masked ones: -inf) get exactly 0: their mass
    # is below fp32's resolution anyway, and exp() of such arguments, -inf included, takes a slow path
    # (about ten times slower on rows that a top-k has mostly masked: docs/measurements.md). A row whose
    # maximum is not finite has no distribution (nan everywhere): all 0.
    low = ~(shifted >= floor)  # [R, V] (nan included)
    probs = shifted.clamp_(min=floor).exp_().masked_fill_(low, 0.0)
    if any(m > 0.0 for m in min_p):
        probs = keep_min_p(probs, torch.tensor(list(min_p), dtype=x.dtype, device=dev))
    probs = keep_top_p(probs, top_p)
    ok = probs.sum(dim=-1) > 0  # [R]
    return race(probs, seeds, steps), ok
