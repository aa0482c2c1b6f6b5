"""Choosing the next token: greedy, temperature, top-p, seeded.

Sampling is counter-based (draw.py): the random draw for a sequence's n-th generated token depends
only on (seed, n). A request therefore gives the same tokens whatever else shares its batch, and a
request resumed after a failure continues exactly as it would have. Every row of a step is chosen
on the logits' device, and the choices reach the host in one copy. Log-probs are those of the unmodified
distribution (before temperature and top-p), as the OpenAI API reports them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from model_shards.token_mask import apply_mask
from model_shards.draw import argmax_rows, draw
from model_shards.logits import History, add_bias, forbid, penalize

GREEDY_BELOW = 1e-5  # temperatures under this mean argmax
EXP_FLOOR = -87.0  # exp(-87) is about fp32's smallest normal number
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: the engine draws one when the request is created
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0  # also report this many most likely tokens per position (0..20)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before choosing
    logprobs: bool = True  # compute each chosen token's log-prob (a full pass over the vocabulary per row)
    presence_penalty: float = 0.0  # [-2, 2] (logits.py says how each one applies)
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # [0.01, 2]; 1: none (logits are divided by it: smaller overflow fp32)
    top_k: int = 0  # choose among the k most likely tokens only (0: all)
    min_p: float = 0.0  # [0, 1]: drop tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # no stop token before this many generated tokens
    # structured output: an llguidance grammar's text (grammar.py); the engine keeps its state and
    # sends each step's token mask, so the replicas never see the grammar itself
    grammar: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0.01 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [0.01, 2], got {self.repetition_penalty!r}")
        if self.top_k < 0 or not 0.0 <= self.min_p <= 1.0 or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("top_k must be >= 0, min_p in [0, 1] and min_tokens in [0, max_tokens]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the sequence's history (logits.Histories)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processed(self) -> bool:
        """Whether the logits change before the choice (then a copy of the row is processed)."""
        return bool(self.logit_bias or self.penalized or self.min_tokens)


def new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


@dataclass
class Choice:
    token: int
    logprob: float | None  # under the unmodified distribution; None when the params did not ask
    top: list[tuple[int, float]]  # the most likely tokens and their log-probs, when asked for


def log_normalizer(logits: torch.Tensor, top: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """[R, V] -> [R] logsumexp (`top`: the rows' maxima, when known). Terms more than EXP_FLOOR below
    the row's max are clamped there first: their share of the sum is below fp32's resolution, and
    exp() of such arguments takes a slow path, more than ten times slower over rows of the whole
    vocabulary (docs/measurements.md). `inplace` overwrites `logits` (it saves a copy of the whole [R, V])."""
    top = logits.amax(dim=-1) if top is None else top  # [R]
    shifted = logits.sub_(top[:, None]) if inplace else logits - top[:, None]
    return top + shifted.clamp_(min=EXP_FLOOR).exp_().sum(dim=-1).log()


def _record(tokens: list[int], histories: Sequence[History | None] | None) -> list[int]:
    """Adds each row's chosen token to its penalty history (when it has one); -> tokens."""
    for history, token in zip(histories or [], tokens):
        if history is not None:
            history.add(token)
    return tokens


@torch.inference_mode()
def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
           steps: Sequence[int], consume: bool = False,
           histories: Sequence[History | None] | None = None,
           masks: Sequence[torch.Tensor | None] | None = None) -> list[Choice]:
    """logits [S, V] (any float dtype; converted to fp32 only when a row needs more than the argmax)
    -> one choice per row; row i uses params[i], and the draw is fixed by (seeds[i], steps[i]). Greedy
    rows need no per-row work; the results reach the host in one copy (two with top_logprobs).
    `consume`: `logits` may be overwritten (saves a copy of it).
    `histories[i]`: what row i's penalties need (logits.py); each chosen token is added to it.
    `masks[i]`: row i's structured-output mask ([W] int32 bit words, grammar.py), which already
    keeps stop tokens out before min_tokens."""
    masks = masks if masks is not None else [None] * len(params)
    if all(p.greedy and not (p.processed or p.logprobs or p.top_logprobs) for p in params) and \
            all(m is None for m in masks):  # argmax only: no fp32 copy of the [S, V] logits
        return [Choice(token, None, []) for token in _record(argmax_rows(logits).tolist(), histories)]
    logits = logits.to(torch.float32)
    biased = logits
    if any(p.processed for p in params) or any(m is not None for m in masks):
        biased = logits.clone()
        for row, p in enumerate(params):
            add_bias(biased[row], p.logit_bias)  # bias, then penalties (vLLM's order), then the grammar
            history = histories[row] if histories is not None else None
            if history is not None and p.penalized:
                penalize(biased[row], history, p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
            mask = masks[row]
            if mask is not None:
                apply_mask(biased[row], mask)
            elif steps[row] < p.min_tokens:
                forbid(biased[row], p.stop_token_ids)
    tokens = argmax_rows(biased)  # [S] greedy choices
    best = biased.gather(1, tokens[:, None]).squeeze(1)  # [S] their logits: the rows' maxima
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        picked = [params[row] for row in drawn]
        at = torch.tensor(drawn, dtype=torch.long, device=biased.device)
        every = len(drawn) == len(params)
        rows, top = (biased, best) if every else (biased.index_select(0, at), best.index_select(0, at))
        got, ok = draw(rows, top, [p.temperature for p in picked], [p.top_k for p in picked],
                       [p.top_p for p in picked], [p.min_p for p in picked], [seeds[row] for row in drawn],
                       [steps[row] for row in drawn], EXP_FLOOR)
        # a row with no distribution left (nothing finite) keeps its greedy choice rather than failing
        # the step of every sequence in the batch
        tokens.index_copy_(0, at, torch.where(ok, got, tokens.index_select(0, at)))
    if not any(p.logprobs or p.top_logprobs for p in params):  # nothing to normalize: the choices are all
        return [Choice(token, None, []) for token in _record(tokens.tolist(), histories)]
    chosen = logits.gather(1, tokens[:, None]).squeeze(1)  # [S] raw logits of the choices
    most = max(p.top_logprobs for p in params)
    top_values, top_ids = torch.topk(logits, most, dim=-1) if most else (None, None)  # [S, most]
    normalizer = log_normalizer(logits, None if biased is not logits else best, inplace=consume)  # [S] unmodified
    host = torch.stack((tokens.to(torch.float64), (chosen - normalizer).to(torch.float64))).tolist()
    _record([int(t) for t in host[0]], histories)
    top_id_rows, top_value_rows = [], []
    if top_values is not None and top_ids is not None:
        top_value_rows, top_id_rows = (top_values - normalizer[:, None]).tolist(), top_ids.tolist()
    out = []
    for row, p in enumerate(params):
        top = list(zip(top_id_rows[row][:p.top_logprobs], top_value_rows[row][:p.top_logprobs])) if p.top_logprobs \
            else []
        out.append(Choice(int(host[0][row]), host[1][row] if p.logprobs or p.top_logprobs else None, top))
    return out
