"""Token masks as the engine sends them: [ceil(V / 32)] int32 bit words, bit t set when token t is
allowed (llguidance's format). Built by grammar.py; applied to a row of logits where sampling runs,
which needs neither the grammar library nor the tokenizer."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from model_shards.syncs import host_numpy


def bits_of(tokens: Sequence[int], vocab_size: int) -> torch.Tensor:
    """[ceil(V / 32)] int32 words with exactly `tokens` set."""
    flags = np.zeros(-(-vocab_size // 32) * 32, dtype=np.uint8)
    flags[list(tokens)] = 1
    return torch.from_numpy(np.packbits(flags, bitorder="little").view(np.int32).copy())


def allowed(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[W] int32 bit words (host memory: the engine's message) -> [V] bool, unpacked on the host (one
    pass over 25 KB)."""
    flags = np.unpackbits(host_numpy(words.cpu()).view(np.uint8), bitorder="little")[:vocab_size]
    return torch.from_numpy(flags.view(np.bool_))


def apply_mask(row: torch.Tensor, words: torch.Tensor) -> None:
    """row [V] logits in place: tokens the mask leaves out get -inf."""
    row.masked_fill_(~allowed(words, row.shape[-1]).to(row.device, non_blocking=True), float("-inf"))
