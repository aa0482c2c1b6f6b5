"""What changes the logits before a token is chosen: logit bias, penalties and min_tokens (the top-k,
min-p and top-p filters are part of the draw: draw.py). Each works on one row of logits [V] and costs in proportion to the tokens it
touches (a penalized sequence's distinct tokens), never to the vocabulary times the batch.

Penalties follow OpenAI and vLLM: presence subtracts its value once from every token the output
already holds, frequency once per occurrence; repetition (vLLM's, as in Hugging Face) divides the
positive logits and multiplies the negative ones of every token of the prompt and the output.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch


class History:
    """What the penalties need of one sequence: its output's token counts, and the tokens of prompt
    and output together."""

    def __init__(self, prompt: Iterable[int], out: Iterable[int]) -> None:
        out = list(out)
        self.counts: Counter[int] = Counter(out)
        self.seen: set[int] = set(prompt) | set(out)

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self.seen.add(token)


class Histories:
    """Per sequence, kept by whoever samples it (an attention replica, the local executor). The engine
    sends a penalized sequence's prompt and output with its first chunk after every admission, so the
    history is rebuilt after a failure and covers prompt tokens taken from the prefix cache."""

    def __init__(self) -> None:
        self._by_seq: dict[int, History] = {}

    def start(self, seq_id: int, prompt: Sequence[int], out: Sequence[int]) -> None:
        self._by_seq[seq_id] = History(prompt, out)

    def get(self, seq_id: int) -> History | None:
        return self._by_seq.get(seq_id)

    def forget(self, seq_id: int) -> None:
        self._by_seq.pop(seq_id, None)


def penalize(row: torch.Tensor, history: History, presence: float, frequency: float, repetition: float) -> None:
    """row [V] in place."""
    if repetition != 1.0 and history.seen:
        index = torch.tensor(sorted(history.seen), device=row.device)
        values = row[index]
        row[index] = torch.where(values > 0, values / repetition, values * repetition)
    if (presence or frequency) and history.counts:
        index = torch.tensor(list(history.counts), device=row.device)
        counts = torch.tensor(list(history.counts.values()), dtype=row.dtype, device=row.device)
        row[index] -= frequency * counts + presence


def forbid(row: torch.Tensor, tokens: Sequence[int]) -> None:
    """row [V] in place: these tokens cannot be chosen (min_tokens keeps stop tokens out)."""
    if tokens:
        row[torch.tensor(list(tokens), device=row.device)] = float("-inf")


def add_bias(row: torch.Tensor, bias: Sequence[tuple[int, float]]) -> None:
    for token, value in bias:
        row[token] += value
