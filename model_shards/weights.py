"""Model weights as plain dataclasses of tensors, and loaders for any slice of them.

The split follows the actors that will hold them: attention (with both norms, since the attention
replica also computes the MoE block's pre-norm), routers, expert stacks [a, b) per layer, and the
globals (embedding, final norm, unembedding). Norm weights and sinks stay float32 in every dtype:
RMSNorm multiplies its weight in fp32 and the sink logits join an fp32 softmax.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
import torch.nn.functional as F

from model_shards import linear, mxfp4
from model_shards.checkpoint import Checkpoint, CheckpointError
from model_shards.config import GptOssConfig
from model_shards.layout import expert_names, global_name, layer_names
from model_shards.linear import Linear

log = logging.getLogger(__name__)


@dataclass
class AttentionWeights:
    attn_norm: torch.Tensor  # [H] fp32
    qkv: Linear  # [q + 2kv, H] + [q + 2kv]; rows: Q heads, then K heads, then V heads
    sinks: torch.Tensor  # [nq] fp32, one logit per query head
    out: Linear  # [H, q] + [H]
    mlp_norm: torch.Tensor  # [H] fp32, the MoE block's pre-norm


RouterWeights = Linear  # [E, H] + [E]

# Tokens up to which the batched experts run gate_up through the whole prepacked stack (DenseStack.
# stack_whole): each token through all n experts costs n / K times the FLOPs it needs, which the
# weights' read hides up to here: the whole stack ran faster than the per-expert path from 8 to 64
# tokens (docs/measurements.md).
STACKED_MAX_TOKENS = 64
# Rows up to which the MoE (the local engine's, or an expert shard's part) runs down and the sum
# over each token's experts as one matmul through the experts side by side (moe.fused_rows): faster than
# the per-expert matmuls up to here, with the lead shrinking as tokens grow and gone by 48
# (docs/measurements.md).
FUSED_MAX_TOKENS = 32
# Expert stacks above this size are not stacked (their memory would count three times: the weights,
# the per-expert prepacked copies, the stacked copy); 256 MiB keeps it to small models such as the
# small preset (32 MiB per gate_up stack; gpt-oss-20b's are 1 GiB).
STACKED_MAX_BYTES = 256 << 20


@dataclass
class DenseStack:
    """n expert matrices held as floats."""

    weight: torch.Tensor  # [n, out, in]
    packed: list[torch.Tensor | None] = field(default_factory=list, repr=False, compare=False)
    # the n matrices as one prepacked weight, or None: stacked by rows, [n * out, in] (stack_rows), or
    # side by side, [out, n * in] (stack_columns)
    stacked: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def matrix(self, i: int, dtype: torch.dtype) -> torch.Tensor:  # [out, in]
        return self.weight[i].to(dtype)

    def apply(self, i: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [N, out] through expert i."""
        if self.packed and x.dtype == self.weight.dtype:
            return linear.apply(x, self.weight[i], bias, self.packed[i])
        return F.linear(x, self.matrix(i, x.dtype), bias)

    def prepare(self) -> None:
        self.packed = [linear.prepack(w) for w in self.weight]

    def stack_rows(self) -> None:
        """Also prepack the n matrices as one [n * out, in] weight (where prepacking applies and the
        stack is at most STACKED_MAX_BYTES): every row through every expert in one call, which reads
        the stack at full speed (moe.py: batched_experts, fused_rows). It costs the stack's memory
        once more."""
        if self._stackable():
            self.stacked = linear.prepack(self.weight.reshape(-1, self.weight.shape[-1]))

    def stack_columns(self) -> None:
        """Also prepack the n matrices side by side as one [out, n * in] weight: rows holding each
        expert's input in that expert's columns (zeros elsewhere) get the sum of the experts' outputs
        in one call (moe.py: fused_rows). Same conditions and cost as stack_rows."""
        if self._stackable():
            n, out, cols = self.weight.shape
            self.stacked = linear.prepack(self.weight.permute(1, 0, 2).reshape(out, n * cols))

    def _stackable(self) -> bool:
        return linear.can_prepack(self.weight[0]) and self.weight.numel() * self.weight.element_size() <= STACKED_MAX_BYTES

    def logical_numel(self) -> int:
        return self.weight.numel()


@dataclass
class Mxfp4Stack:
    """n expert matrices kept packed in MXFP4 (4.25 bits per weight), decoded on use: only the
    experts a step routes to, and up to `cache_bytes` of decoded experts are kept (least recently
    used dropped first) so that hot experts are not decoded on every step."""

    blocks: torch.Tensor  # [n, out, in/32, 16] uint8
    scales: torch.Tensor  # [n, out, in/32] uint8
    cache_bytes: int = 0
    _decoded: OrderedDict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=OrderedDict, repr=False,
                                                                        compare=False)

    def matrix(self, i: int, dtype: torch.dtype) -> torch.Tensor:  # [out, in]
        key = (i, dtype)
        hit = self._decoded.get(key)
        if hit is not None:
            self._decoded.move_to_end(key)
            return hit
        w = mxfp4.dequantize(self.blocks[i], self.scales[i], dtype)
        size = w.numel() * w.element_size()
        if size <= self.cache_bytes:
            while self._decoded and size + sum(t.numel() * t.element_size() for t in self._decoded.values()) \
                    > self.cache_bytes:
                self._decoded.popitem(last=False)
            self._decoded[key] = w
        return w

    def apply(self, i: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix(i, x.dtype), bias)

    def prepare(self) -> None:
        """Decoded matrices are made on use (and cached)."""

    def logical_numel(self) -> int:
        return self.blocks.numel() * 2


ExpertStack = Union[DenseStack, Mxfp4Stack]


@dataclass
class ExpertWeights:
    """Experts [first, first + n) of one layer."""

    first: int
    gate_up: ExpertStack  # [n, 2I, H]; rows interleave gate (even) and up (odd)
    gate_up_bias: torch.Tensor  # [n, 2I]
    down: ExpertStack  # [n, H, I]
    down_bias: torch.Tensor  # [n, H]

    @property
    def count(self) -> int:
        return self.gate_up_bias.shape[0]

    @property
    def stop(self) -> int:
        return self.first + self.count


@dataclass
class GlobalWeights:
    embedding: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H] fp32
    unembedding: Linear  # [V, H], no bias


@dataclass
class ModelWeights:
    config: GptOssConfig
    globals: GlobalWeights
    attention: list[AttentionWeights]
    routers: list[RouterWeights]
    experts: list[ExpertWeights]

    def num_parameters(self) -> int:
        return sum(t.numel() if isinstance(t, torch.Tensor) else t.logical_numel() for t in _leaves(self))


def prepare(obj: object) -> None:
    """Make the runtime forms of every linear weight and expert stack in `obj` (prepacked GEMM
    weights where the device has them: linear.py; expert stacks also stacked whole, by rows for
    gate_up and side by side for down, for moe.batched_experts and moe.fused_rows). Call after moving
    the weights to their device."""
    for part in _parts(obj):
        if isinstance(part, (Linear, DenseStack, Mxfp4Stack)):
            part.prepare()
        if isinstance(part, ExpertWeights) and isinstance(part.gate_up, DenseStack):
            part.gate_up.stack_rows()
            if isinstance(part.down, DenseStack):
                part.down.stack_columns()


def _parts(obj: object, whole: tuple[type, ...] = ()) -> Iterator[object]:
    """`obj` and everything in it, each part before its contents (lists and weight dataclasses; not
    the contents of `whole` types)."""
    yield obj
    if isinstance(obj, whole):
        return
    if isinstance(obj, list):
        for item in obj:
            yield from _parts(item, whole)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, GptOssConfig):
        for f in dataclasses.fields(obj):
            yield from _parts(getattr(obj, f.name), whole)


# A prepacked weight of one shape: (weight, bias, packed, most rows a call gives it).
_Kernel = tuple[torch.Tensor, Union[torch.Tensor, None], torch.Tensor, int]


def warm_up(obj: object, max_rows: int, max_sampled: int) -> int:
    """Call every prepacked weight shape in `obj` once at each bucket row count it can see (the
    unembedding up to `max_sampled` rows, the rest up to `max_rows`), so that serving does not pay
    oneDNN's kernel build (one per new row count: linear.py) on its first steps. -> kernels
    called. Nothing to do where nothing is prepacked (float32, CUDA)."""
    kernels: dict[tuple, _Kernel] = {}
    for part in _parts(obj):  # a GlobalWeights comes before its unembedding: that one gets max_sampled
        for weight, bias, packed, limit in _kernels_of(part, max_rows, max_sampled):
            kernels.setdefault((tuple(weight.shape), bias is not None, weight.dtype), (weight, bias, packed, limit))
    calls = 0
    with torch.inference_mode():
        for weight, bias, packed, limit in kernels.values():
            for rows in sorted({linear.bucket_rows(n) for n in range(1, limit + 1)}):
                linear.apply(weight.new_zeros(rows, weight.shape[1]), weight, bias, packed)
                calls += 1
    return calls


def _kernels_of(part: object, rows: int, sampled: int) -> list[_Kernel]:
    if isinstance(part, GlobalWeights):
        return _kernels_of(part.unembedding, sampled, sampled)  # only the rows that sample
    if isinstance(part, Linear) and part.packed is not None:
        return [(part.weight, part.bias, part.packed, rows)]
    if isinstance(part, ExpertWeights):
        kernels = [(stack.weight[0], bias[0], stack.packed[0], rows)
                   for stack, bias in ((part.gate_up, part.gate_up_bias), (part.down, part.down_bias))
                   if isinstance(stack, DenseStack) and stack.packed and stack.packed[0] is not None]
        stack = part.gate_up
        if isinstance(stack, DenseStack) and stack.stacked is not None:
            kernels.append((stack.weight.reshape(-1, stack.weight.shape[-1]), part.gate_up_bias.reshape(-1),
                            stack.stacked, min(rows, STACKED_MAX_TOKENS)))
        stack = part.down
        if isinstance(stack, DenseStack) and stack.stacked is not None:
            n, out, cols = stack.weight.shape
            kernels.append((stack.weight.new_zeros(1).expand(out, n * cols), None, stack.stacked, min(rows, FUSED_MAX_TOKENS)))
        return kernels
    return []


def _leaves(obj: object) -> Iterator[torch.Tensor | DenseStack | Mxfp4Stack]:
    """The parameters: every tensor, expert stack, and linear's weight and bias (not prepacked copies)."""
    for part in _parts(obj, whole=(Linear, DenseStack, Mxfp4Stack)):
        if isinstance(part, (DenseStack, Mxfp4Stack, torch.Tensor)):
            yield part
        elif isinstance(part, Linear):
            yield part.weight
            if part.bias is not None:
                yield part.bias


def move_to(obj: object, device: torch.device | str) -> None:
    """Move every tensor of a weights dataclass (nested) to `device`, in place."""
    if isinstance(obj, list):
        for item in obj:
            move_to(item, device)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, GptOssConfig):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:  # not a prepacked copy
                setattr(obj, f.name, value.to(device))
            else:
                move_to(value, device)


# -- loading ------------------------------------------------------------------------------------

def _expect(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} for this config")
    return tensor


def _read_concat(ckpt: Checkpoint, names: tuple[str, ...]) -> torch.Tensor:
    parts = [ckpt.read(n) for n in names]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _layer_range(cfg: GptOssConfig, layers: range | None) -> range:
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    if layers.step != 1 or not 0 <= layers.start < layers.stop <= cfg.num_hidden_layers:
        raise CheckpointError(f"layers [{layers.start}, {layers.stop}) outside [0, {cfg.num_hidden_layers})")
    return layers


def load_globals(ckpt: Checkpoint, dtype: torch.dtype) -> GlobalWeights:
    cfg = ckpt.config
    vh = (cfg.vocab_size, cfg.hidden_size)

    def read(what: str, shape: tuple[int, ...]) -> torch.Tensor:
        name = global_name(ckpt.layout, what)
        return _expect(ckpt.read(name), shape, name)

    return GlobalWeights(
        embedding=read("embedding", vh).to(dtype),
        final_norm=read("final_norm", (cfg.hidden_size,)).float(),
        unembedding=Linear(read("unembedding", vh).to(dtype)),
    )


def load_attention(ckpt: Checkpoint, dtype: torch.dtype, layers: range | None = None) -> list[AttentionWeights]:
    cfg = ckpt.config
    h, qkv = cfg.hidden_size, cfg.q_dim + 2 * cfg.kv_dim
    out = []
    for i in _layer_range(cfg, layers):
        names = layer_names(ckpt.layout, i)

        def read(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            return _expect(_read_concat(ckpt, names[key]), shape, names[key][0])

        out.append(AttentionWeights(
            attn_norm=read("attn_norm", (h,)).float(),
            qkv=Linear(read("qkv_w", (qkv, h)).to(dtype), read("qkv_b", (qkv,)).to(dtype)),
            sinks=read("sinks", (cfg.num_attention_heads,)).float(),
            out=Linear(read("out_w", (h, cfg.q_dim)).to(dtype), read("out_b", (h,)).to(dtype)),
            mlp_norm=read("mlp_norm", (h,)).float(),
        ))
    return out


def load_routers(ckpt: Checkpoint, dtype: torch.dtype, layers: range | None = None) -> list[RouterWeights]:
    cfg = ckpt.config
    out = []
    for i in _layer_range(cfg, layers):
        names = layer_names(ckpt.layout, i)
        w = _expect(_read_concat(ckpt, names["router_w"]), (cfg.num_experts, cfg.hidden_size), names["router_w"][0])
        b = _expect(_read_concat(ckpt, names["router_b"]), (cfg.num_experts,), names["router_b"][0])
        out.append(RouterWeights(weight=w.to(dtype), bias=b.to(dtype)))
    return out


def _load_stack(ckpt: Checkpoint, layer: int, matrix: str, rows: tuple[int, int], out_dim: int, in_dim: int,
                dtype: torch.dtype, keep_mxfp4: bool) -> tuple[ExpertStack, torch.Tensor]:
    names = expert_names(ckpt.layout, layer, matrix)
    n = rows[1] - rows[0]
    bias = _expect(ckpt.read(names.bias, rows), (n, out_dim), names.bias).to(dtype)
    if ckpt.has(names.blocks):
        if in_dim % mxfp4.BLOCK:
            raise CheckpointError(f"{names.blocks}: input dimension {in_dim} is not a multiple of {mxfp4.BLOCK}")
        groups = in_dim // mxfp4.BLOCK
        blocks = _expect(ckpt.read(names.blocks, rows), (n, out_dim, groups, mxfp4.BYTES_PER_BLOCK), names.blocks)
        scales = _expect(ckpt.read(names.scales, rows), (n, out_dim, groups), names.scales)
        if keep_mxfp4:
            return Mxfp4Stack(blocks, scales), bias
        return DenseStack(mxfp4.dequantize(blocks, scales, dtype)), bias
    if ckpt.has(names.dense):
        weight = ckpt.read(names.dense, rows)
        if names.dense_is_in_out:  # transformers' float experts are [E, in, out] for x @ W
            weight = _expect(weight, (n, in_dim, out_dim), names.dense).transpose(1, 2)
        weight = _expect(weight, (n, out_dim, in_dim), names.dense)
        # A float checkpoint stays float even when MXFP4 was asked for: requantizing would change
        # the numbers the checkpoint defines.
        return DenseStack(weight.to(dtype).contiguous()), bias
    raise CheckpointError(f"layer {layer} has neither {names.blocks} nor {names.dense}")


def load_experts(ckpt: Checkpoint, dtype: torch.dtype, experts: tuple[int, int] | None = None,
                 layers: range | None = None, keep_mxfp4: bool = False) -> list[ExpertWeights]:
    """Experts [a, b) of each layer in `layers`, reading only their rows of the expert tensors."""
    cfg = ckpt.config
    a, b = experts if experts is not None else (0, cfg.num_experts)
    if not 0 <= a < b <= cfg.num_experts:
        raise CheckpointError(f"experts [{a}, {b}) outside [0, {cfg.num_experts})")
    h, inter = cfg.hidden_size, cfg.intermediate_size
    out = []
    for i in _layer_range(cfg, layers):
        gate_up, gate_up_bias = _load_stack(ckpt, i, "gate_up", (a, b), 2 * inter, h, dtype, keep_mxfp4)
        down, down_bias = _load_stack(ckpt, i, "down", (a, b), h, inter, dtype, keep_mxfp4)
        out.append(ExpertWeights(first=a, gate_up=gate_up, gate_up_bias=gate_up_bias, down=down, down_bias=down_bias))
        log.info("loaded experts [%d, %d) of layer %d/%d (%.1f MB read so far)",
                 a, b, i + 1, cfg.num_hidden_layers, ckpt.bytes_read / 1e6)
    return out


def budget_decoded(experts: list[ExpertWeights], total_bytes: int) -> None:
    """Share `total_bytes` of decoded-expert cache evenly over the packed MXFP4 stacks of `experts`
    (each layer's gate_up and down); dense stacks need none."""
    stacks = [s for w in experts for s in (w.gate_up, w.down) if isinstance(s, Mxfp4Stack)]
    for stack in stacks:
        stack.cache_bytes = total_bytes // len(stacks)


def load_model(ckpt: Checkpoint, dtype: torch.dtype, keep_mxfp4: bool = False) -> ModelWeights:
    """Every weight of the model, for the single-process engine."""
    return ModelWeights(
        config=ckpt.config,
        globals=load_globals(ckpt, dtype),
        attention=load_attention(ckpt, dtype),
        routers=load_routers(ckpt, dtype),
        experts=load_experts(ckpt, dtype, keep_mxfp4=keep_mxfp4),
    )


def empty_model(cfg: GptOssConfig, device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> ModelWeights:
    """A ModelWeights of the right shapes without data (on the meta device): counts parameters of
    the full-size models without allocating them."""
    def t(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=device, dtype=dtype)

    h, e, inter, v = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    layers = range(cfg.num_hidden_layers)
    return ModelWeights(
        config=cfg,
        globals=GlobalWeights(embedding=t(v, h), final_norm=t(h), unembedding=Linear(t(v, h))),
        attention=[AttentionWeights(t(h), Linear(t(qkv, h), t(qkv)), t(cfg.num_attention_heads),
                                    Linear(t(h, cfg.q_dim), t(h)), t(h)) for _ in layers],
        routers=[RouterWeights(t(e, h), t(e)) for _ in layers],
        experts=[ExpertWeights(0, DenseStack(t(e, 2 * inter, h)), t(e, 2 * inter), DenseStack(t(e, h, inter)), t(e, h))
                 for _ in layers],
    )
