"""A linear layer's weights, and the fastest way this machine has to apply them.

On a CPU with oneDNN, a bf16 weight reordered once into oneDNN's blocked layout ("prepacked") runs
about twice as fast as `F.linear` for the few rows of a decode step, and nearly as much for the
unembedding (docs/measurements.md): F.linear reorders the weight on every call. `prepare()` makes
that copy once; elsewhere (float32, CUDA, a CPU without oneDNN's bf16 path, or GPTOSS_CPU_FALLBACK
set: capabilities.py) nothing changes. The prepacked path computes the same bf16 products with fp32
accumulation, in another order: results agree within bf16 rounding.

oneDNN builds (JIT-compiles) a kernel for every new row count, which costs far more than a small
layer's call (docs/measurements.md), and keeps up to 1024 of them. Serving sees a different row
count on nearly every step (the tokens of a step, the rows routed to each expert), so rows are
padded with zeros up to a few bucket sizes (`bucket_rows`): a row's result does not depend on how many
rows share the call (checked bitwise in tests/model_shards/test_linear.py), and with the buckets a large
prefill takes about a third less time (docs/measurements.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model_shards.capabilities import cpu_features


def can_prepack(weight: torch.Tensor) -> bool:
    """A bf16 CPU weight on a CPU where oneDNN's bf16 path runs (and the fallback is not forced)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and cpu_features().fast_bf16)


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] -> the same weight in oneDNN's layout, or None where that does not apply."""
    if not can_prepack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def bucket_rows(n: int) -> int:
    """Rows a prepacked call computes for n: n itself up to 16 (decode batches, few and recurring),
    above that the next multiple of max(16, the largest power of two <= n / 16): at most 16 rows or
    1/16 more, and 16 sizes per doubling (about 110 up to 8192 rows)."""
    if n <= 16:
        return n
    step = max(16, 1 << ((n // 16).bit_length() - 1))
    return -(-n // step) * step


def apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] -> [N, out] = x W^T + b, through the prepacked weight when there is one."""
    if packed is not None and x.dtype == weight.dtype and x.dim() == 2 and x.shape[0] > 0:
        return apply_packed(x, packed, bias)
    return F.linear(x, weight, bias)


def apply_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] bf16 (N > 0) -> [N, out] through a prepacked weight, rows padded to their bucket."""
    n = x.shape[0]
    rows = bucket_rows(n)
    if rows == n:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    padded = x.new_zeros(rows, x.shape[1])
    padded[:n] = x
    return torch.ops.mkldnn._linear_pointwise(padded, packed, bias, "none", [], "")[:n]


@dataclass
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None  # [out]
    packed: torch.Tensor | None = field(default=None, repr=False, compare=False)  # see prepack()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return apply(x, self.weight, self.bias, self.packed)

    def prepare(self) -> None:
        """Make the prepacked copy (it costs the weight's memory once more)."""
        self.packed = prepack(self.weight)
