"""Batched generation with the single-process model: all requests start together, prompts are
prefilled (in chunks of at most `max_step_tokens` tokens per step when set), then every unfinished
sequence decodes one token per step. Continuous batching with requests arriving over time is the
cluster engine's job; this loop is the simple, exact path behind `gptoss generate --engine local`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_shards.batch import SeqChunk, plan_step
from model_shards.config import GptOssConfig
from model_shards.model import GptOssModel
from model_shards.sampling import SamplingParams, new_seed, sample


class InvalidRequest(ValueError):
    """A request the model cannot serve (bad token ids, too long, empty)."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended the sequence
    logprobs: list[float]  # log-prob of each generated id under the unmodified distribution
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)


def validate_request(prompt_ids: list[int], params: SamplingParams, cfg: GptOssConfig,
                     max_model_len: int | None = None) -> None:
    limit = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
    if bad:
        raise InvalidRequest(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    if len(prompt_ids) + params.max_tokens > limit:
        raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the context length of {limit}")


@dataclass
class _Seq:
    request: Request
    seed: int
    cached: int = 0  # tokens already in the KV cache
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None

    def next_chunk(self, budget: int) -> list[int]:
        prompt = self.request.prompt_ids
        if self.cached < len(prompt):
            return prompt[self.cached:self.cached + budget]
        return [self.out[-1]]


def generate(model: GptOssModel, requests: list[Request], max_step_tokens: int | None = None,
             block_size: int = 16) -> list[Completion]:
    cfg = model.config
    for r in requests:
        validate_request(r.prompt_ids, r.params, cfg)
    seqs = [_Seq(r, r.params.seed if r.params.seed is not None else new_seed()) for r in requests]
    kv = model.new_cache(
        num_blocks=max(1, sum(-(-(len(r.prompt_ids) + r.params.max_tokens) // block_size) for r in requests)),
        max_seqs=len(requests), block_size=block_size)
    for i, r in enumerate(requests):
        kv.reserve(i, len(r.prompt_ids) + r.params.max_tokens)

    while True:
        live = [i for i, s in enumerate(seqs) if s.finish is None]
        if not live:
            break
        budget = max_step_tokens or sum(len(r.prompt_ids) for r in requests)
        chunks, ids, sampled = [], [], []
        for i in live:
            piece = seqs[i].next_chunk(max(1, budget))
            if chunks and len(piece) > budget:
                continue  # over this step's budget: wait for the next step
            budget -= len(piece)
            chunks.append(SeqChunk(i, seqs[i].cached, len(piece)))
            ids.extend(piece)
            seqs[i].cached += len(piece)
            if seqs[i].cached >= len(seqs[i].request.prompt_ids):
                sampled.append(len(chunks) - 1)  # the chunk ends the prompt, or is a decode token
        logits = model.forward(torch.tensor(ids, device=model.device), plan_step(chunks, model.device), kv)
        if not sampled:
            continue
        rows = [seqs[chunks[j].seq_id] for j in sampled]
        tokens, logprobs = sample(logits[sampled], [s.request.params for s in rows], [s.seed for s in rows],
                                  [len(s.out) for s in rows])
        for s, token, lp in zip(rows, tokens, logprobs):
            s.out.append(token)
            s.logprobs.append(lp)
            if token in s.request.params.stop_token_ids:
                s.finish = "stop"
            elif len(s.out) >= s.request.params.max_tokens:
                s.finish = "length"
    return [Completion(s.request.prompt_ids, s.out, s.logprobs, s.finish or "length") for s in seqs]
