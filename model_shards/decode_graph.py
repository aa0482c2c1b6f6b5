"""Decode steps from static buffers, captured as CUDA graphs.

A decode step launches a few hundred small kernels (syncs.py counts them); replaying them as one CUDA
graph removes the host's launch cost, which otherwise dominates a small batch's step on a GPU. A
graph replays fixed tensors with fixed shapes, so a decode-only step runs here from buffers made
once per (batch bucket, key bucket): the step's inputs (token ids, positions, the KV rows to write
and to read and which of them are keys) are built on the host, copied once, and written into the
buffers; padding rows write and read the cache's scratch rows only (kv_cache.decode_host). On CUDA
each bucket's forward pass is captured once and replayed; elsewhere (and with --enforce-eager) the
same buffers run eagerly, which is how the CPU tests it against the ordinary step. Prefill and
mixed steps stay eager (model.layers).

Graphs need a step that never reads the device on the host: bf16 dense experts (grouped matmuls) and
any experts on the Triton kernels (kernels/). Without triton, MXFP4 experts (decoded per expert) and
float32 on CUDA loop over experts on the host, so those models run their static buffers eagerly; a
bucket whose capture fails anyway runs eagerly from then on, with one warning.

A bucket's buffers are views of one byte buffer on the device, filled from one host staging buffer
(pinned on CUDA) by one copy per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from model_shards.batch import SeqChunk
from model_shards.flash import aligned
from model_shards.kv_cache import KVCache, PagedDecode, StepKV
from model_shards.model import GptOssModel, drive
from model_shards.moe import uses_grouped_mm
from model_shards.syncs import host_work

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_KEYS = 128  # the smallest key bucket; above it, powers of two


def batch_bucket(n: int) -> int | None:
    """The static batch size that holds n decode rows (None: more than the largest bucket)."""
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def key_bucket(n: int) -> int:
    """The static number of full-attention keys that holds n (a multiple of flash.ALIGN)."""
    return max(MIN_KEYS, 1 << (n - 1).bit_length())


def capturable(model: GptOssModel) -> bool:
    """Whether the model's decode step reads nothing back on the host (moe.uses_grouped_mm's experts)."""
    probe = torch.empty(0, dtype=model.dtype, device=model.device)
    return bool(model.weights.experts) and all(uses_grouped_mm(probe, e) for e in model.weights.experts)


@dataclass
class DecodeBuffers:
    """One bucket's inputs on the device: B rows, L full-attention keys, W sliding keys. Every tensor
    but every_row is a view of `flat`."""

    token_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    real: torch.Tensor  # [B] long: 1 for a sequence's row, 0 for padding (what the routed-token counts add)
    rows: list[torch.Tensor]  # kv_cache.decode_host's: write rows [B] x2, full rows/seen [B, L], sliding [B, W], paged
    every_row: torch.Tensor  # [B] 0..B-1: each row is a decode token and is sampled
    flat: torch.Tensor  # [bytes] uint8 on the device
    staging: torch.Tensor  # [bytes] uint8 on the host (pinned on CUDA): the next step's inputs
    offsets: list[int]  # byte offset of each input in both

    @staticmethod
    def like(host: list[torch.Tensor], device: torch.device) -> DecodeBuffers:
        """Buffers for inputs shaped as `host` (token_ids, positions, real, then the rows)."""
        offsets, size = [], 0
        for t in host:
            offsets.append(size)
            size += -(-t.numel() * t.element_size() // 8) * 8  # each view starts 8-byte aligned
        flat = torch.zeros(size, dtype=torch.uint8, device=device)
        staging = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        views = [_view(flat, o, t) for o, t in zip(offsets, host)]
        return DecodeBuffers(views[0], views[1], views[2], views[3:], torch.arange(host[0].shape[0], device=device),
                             flat, staging, offsets)

    def load(self, host: list[torch.Tensor]) -> None:
        """Host tensors in the order token_ids, positions, real, then the rows -> the buffers: written
        into the staging buffer, then one copy to the device (the buffers' addresses never change).
        The staging buffer is rewritten only after the previous step's tokens were read back, which
        waited for its copy."""
        with host_work():
            for offset, t in zip(self.offsets, host):
                _view(self.staging, offset, t).copy_(t)
        self.flat.copy_(self.staging, non_blocking=True)


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of `flat` from `offset` as a tensor of like's dtype and shape."""
    n = like.numel() * like.element_size()
    return flat[offset:offset + n].view(like.dtype).view(like.shape)


# (layer, t [B, H], real [B] 0/1) -> MoE output [B, H]: the MoE of a static batch, told which rows are
# padding (they are computed like the others, but not counted as routed tokens)
StaticMoeFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class StaticDecoder:
    """Runs decode-only steps of `model` (MoE by `moe`) from static buffers, with CUDA graphs when
    `graphs` and the device is CUDA. Bound to one KV cache: its tensors are what the graphs read."""

    def __init__(self, model: GptOssModel, moe: StaticMoeFn, graphs: bool, exact: bool = False) -> None:
        """`exact`: buffers of each step's own batch size and aligned key count instead of the buckets
        (no padding rows: what the CPU tests compare bitwise with the eager step)."""
        self.model, self.moe = model, moe
        self.graphs = graphs and model.device.type == "cuda" and capturable(model)
        self.exact = exact
        self.kv: KVCache | None = None
        self._buffers: dict[tuple[int, int], DecodeBuffers] = {}
        self._replays: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self._pool = None  # one memory pool shared by every captured graph (they never run at once)

    def reset(self) -> None:
        """Forget every bucket (the cache they were bound to is gone)."""
        self.kv, self._buffers, self._replays = None, {}, {}

    def accepts(self, chunks: list[SeqChunk]) -> bool:
        return bool(chunks) and all(c.length == 1 for c in chunks) and batch_bucket(len(chunks)) is not None

    @torch.inference_mode()
    def run(self, kv: KVCache, chunks: list[SeqChunk], token_ids: list[int]) -> torch.Tensor:
        """G one-token chunks and their tokens -> logits [G, V] fp32 (of every chunk, in order)."""
        if kv is not self.kv:
            self.reset()
            self.kv = kv
        b = len(chunks) if self.exact else batch_bucket(len(chunks))
        assert b is not None, "run() needs accepts()"
        longest = max(c.start + 1 for c in chunks)
        key = (b, aligned(longest) if self.exact else key_bucket(longest))
        with host_work():
            host = kv.decode_host(tuple(chunks), *key)
            pad = b - len(chunks)
            ids = torch.tensor(list(token_ids) + [0] * pad, dtype=torch.long)
            positions = torch.tensor([c.start for c in chunks] + [0] * pad, dtype=torch.long)
            real = torch.tensor([1] * len(chunks) + [0] * pad, dtype=torch.long)
        inputs = [ids, positions, real, *host]
        buffers = self._buffers.get(key) or self._new_buffers(key, inputs)
        buffers.load(inputs)
        replay = self._replays.get(key)
        if replay is None:
            replay = self._prepare(key, buffers)
        return replay()[:len(chunks)]

    def _new_buffers(self, key: tuple[int, int], host: list[torch.Tensor]) -> DecodeBuffers:
        buffers = DecodeBuffers.like(host, self.model.device)
        self._buffers[key] = buffers
        return buffers

    def _forward(self, buffers: DecodeBuffers) -> torch.Tensor:
        """The step from the buffers -> logits [B, V] fp32 (everything device-side: capturable)."""
        kv = self.kv
        assert kv is not None
        full_write, slide_write, full_rows, full_seen, slide_rows, slide_seen, *paged = buffers.rows
        gathered = not kv.paged  # the paged kernel reads tables, not rows and biases
        view = StepKV(full_write_rows=full_write, slide_write_rows=slide_write, decode_tokens=buffers.every_row,
                      decode_full_rows=full_rows, decode_full_bias=kv.bias(full_seen) if gathered else None,
                      decode_slide_rows=slide_rows, decode_slide_bias=kv.bias(slide_seen) if gathered else None,
                      chunks=[], decode_paged=PagedDecode(*paged) if kv.paged else None)
        layers = self.model.layers_from(buffers.token_ids, buffers.positions, buffers.every_row, kv, view)
        return drive(layers, lambda layer, t: self.moe(layer, t, buffers.real))

    def _prepare(self, key: tuple[int, int], buffers: DecodeBuffers) -> Callable[[], torch.Tensor]:
        """The bucket's way to run: eagerly from its buffers, or its captured graph's replay."""
        def eager() -> torch.Tensor:
            return self._forward(buffers)

        replay: Callable[[], torch.Tensor] = eager
        if self.graphs:
            try:
                replay = self._capture(buffers)
            except Exception as exc:  # an op that cannot be captured: this bucket stays eager
                log.warning("decode batch %d x %d keys runs without a CUDA graph: %s", *key, exc)
        self._replays[key] = replay
        return replay

    def _capture(self, buffers: DecodeBuffers) -> Callable[[], torch.Tensor]:
        # Warm up on a side stream first (lazy initialisations must not happen inside the capture), as
        # torch.cuda.graphs documents; the buffers hold the current step's inputs, so the warm-up's
        # cache writes are the step's own (rewritten identically by the replay).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(buffers)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
