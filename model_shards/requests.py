"""What a generation request must satisfy, and what it returns. The engines that run requests
(local or cluster) live in cluster/; the rules about the model's limits live here, once, with the
messages clients see (the HTTP layer only renames `param` to its own field names)."""

from __future__ import annotations

from dataclasses import dataclass

from model_shards.config import GptOssConfig
from model_shards.sampling import SamplingParams


class InvalidRequest(ValueError):
    """A request the model cannot serve (bad token ids, too long, empty). `param` names the request
    field at fault ("prompt" or "max_tokens" here), `code` is a stable machine-readable reason."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended the sequence
    logprobs: list[float | None]  # log-prob of each generated id under the unmodified distribution (if asked)
    finish_reason: str  # "stop" (a stop token), "length" (max_tokens) or "abort"
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the prefix cache
    replica: int | None = None  # the attention replica that ran it


def validate_request(prompt_ids: list[int], params: SamplingParams, cfg: GptOssConfig,
                     max_model_len: int | None = None) -> None:
    limit = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not isinstance(prompt_ids, list) or not prompt_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
    if bad:
        raise InvalidRequest(f"token ids {bad[:5]} are out of vocabulary: they lie outside the vocabulary "
                             f"[0, {cfg.vocab_size})", "prompt", "invalid_token_id")
    n, m = len(prompt_ids), params.max_tokens
    if n >= limit:
        raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, your request has "
                             f"{n} input tokens. Please reduce the length of the input.", "prompt",
                             "context_length_exceeded")
    if n + m > limit:
        raise InvalidRequest(f"'max_tokens' is too large: {m}. The prompt ({n} tokens) plus max_tokens exceeds the "
                             f"context length of {limit} tokens ({m} > {limit} - {n}).", "max_tokens",
                             "context_length_exceeded")
