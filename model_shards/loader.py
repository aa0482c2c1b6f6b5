"""One call from `--model` (a path or a hub id) to a ready single-process model."""

from __future__ import annotations

import logging
import time

import torch

from model_shards.allocator import keep_freed_memory
from model_shards.checkpoint import Checkpoint
from model_shards.hub import resolve_model
from model_shards.model import GptOssModel
from model_shards.weights import load_model, move_to, prepare

log = logging.getLogger(__name__)

def load_local_model(model: str, dtype: torch.dtype = torch.bfloat16, keep_mxfp4: bool = False,
                     device: str = "cpu", layout: str | None = None) -> GptOssModel:
    start = time.perf_counter()
    keep_freed_memory()
    with Checkpoint(resolve_model(model), layout) as ckpt:
        weights = load_model(ckpt, dtype, keep_mxfp4=keep_mxfp4)
        read = ckpt.bytes_read
    if device != "cpu":
        move_to(weights, device)
    prepare(weights)
    log.info("loaded %s (%s layout, %.1f MB) in %.1fs", model, ckpt.layout, read / 1e6, time.perf_counter() - start)
    return GptOssModel(weights)
