"""What a generation request must satisfy, and what it returns. The engines that run requests
(local or cluster) live in cluster/; the rules about the model's limits live here."""

from __future__ import annotations

from dataclasses import dataclass

from model_shards.config import GptOssConfig
from model_shards.sampling import SamplingParams


class InvalidRequest(ValueError):
    """A request the model cannot serve (bad token ids, too long, empty)."""


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended the sequence
    logprobs: list[float]  # log-prob of each generated id under the unmodified distribution
    finish_reason: str  # "stop" (a stop token), "length" (max_tokens) or "abort"


def validate_request(prompt_ids: list[int], params: SamplingParams, cfg: GptOssConfig,
                     max_model_len: int | None = None) -> None:
    limit = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not isinstance(prompt_ids, list) or not prompt_ids:
        raise InvalidRequest("the prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
    if bad:
        raise InvalidRequest(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    if len(prompt_ids) + params.max_tokens > limit:
        raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the context length of {limit}")
