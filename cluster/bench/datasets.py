"""The prompts of `gptoss bench serve`, by `--dataset-name` (the names of `vllm bench serve`).

- `random`: `input_len` random token ids (or words, `prompt_type="text"`) after an optional shared
  prefix, asking for `output_len` tokens; with `range_ratio` r both lengths are drawn uniformly from
  [L * (1 - r), L * (1 + r)] per request, as vLLM's `--random-range-ratio`.
- `sharegpt`: a ShareGPT-format JSON file (a list of {"conversations": [{"from": "human", "value":
  ...}, {"from": "gpt", "value": ...}, ...]}): the first human turn is the prompt, the length of the
  reply that follows it (in tokens of our tokenizer) is the output length. Pairs shorter than 4 tokens
  either side, prompts over 1024 tokens and pairs over 2048 are left out, as vLLM does.
- `prefix-repetition`: `num_prefixes` distinct prefixes of `shared_prefix` tokens, each used by an
  equal share of the prompts, each prompt then `input_len` tokens of its own; shuffled, so that a
  prefix cache sees reuse interleaved with other prefixes.
- `text`: a text file, one prompt per line (blank lines skipped), used in order and cycled.

The same seed gives the same requests, so every level of a sweep and every server sees the same ones.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DATASETS = ("random", "sharegpt", "prefix-repetition", "text")
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
# vLLM's ShareGPT filter, so that the same file gives about the same sample.
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
HUMAN, REPLY = ("human", "user"), ("gpt", "chatgpt", "assistant", "bard", "bing")

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class SampleRequest:
    """One request of a run."""

    prompt: str | list[int]  # text, or token ids (the completions endpoint only)
    prompt_len: int | None  # tokens, where the dataset knows them; None: the server's usage says
    output_len: int  # max_tokens of the request


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "random"
    path: str | None = None  # sharegpt and text
    num_prompts: int = 64
    input_len: int = 128  # random; prefix-repetition: each prompt's own part after its prefix
    output_len: int = 64  # random, prefix-repetition and text
    range_ratio: float = 0.0  # random: spread of both lengths around input_len and output_len
    prompt_type: str = "tokens"  # tokens or text (words), for random and prefix-repetition
    shared_prefix: int = 0  # random: one prefix for all; prefix-repetition: the length of each prefix
    num_prefixes: int = 10  # prefix-repetition
    sharegpt_output_len: int | None = None  # replaces every reply's length
    seed: int = 0


def _tokens(rng: random.Random, n: int) -> list[int]:
    # Ordinary vocabulary ids: below 1000 are bytes and merges of punctuation, above 199,000 the specials.
    return [rng.randrange(1000, 199_000) for _ in range(n)]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _join(kind: str, prefix: list[int] | str, own: list[int] | str) -> list[int] | str:
    if kind == "tokens":
        assert isinstance(prefix, list) and isinstance(own, list)
        return prefix + own
    return f"{prefix} {own}" if prefix else str(own)


def _part(rng: random.Random, kind: str, n: int) -> list[int] | str:
    return _tokens(rng, n) if kind == "tokens" else _words(rng, n)


def _spread(rng: random.Random, length: int, ratio: float) -> int:
    if ratio == 0:
        return length
    return max(1, rng.randint(math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio))))


def random_requests(cfg: DatasetConfig) -> list[SampleRequest]:
    if not 0.0 <= cfg.range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    # Three streams, so that the prompts of a fixed-length run do not depend on the length draws.
    rng, lengths = random.Random(cfg.seed), random.Random(cfg.seed + 2)
    prefix = _part(random.Random(cfg.seed + 1), cfg.prompt_type, cfg.shared_prefix)
    out = []
    for _ in range(cfg.num_prompts):
        n_in = _spread(lengths, cfg.input_len, cfg.range_ratio)
        n_out = _spread(lengths, cfg.output_len, cfg.range_ratio)
        prompt = _join(cfg.prompt_type, prefix, _part(rng, cfg.prompt_type, n_in))
        out.append(SampleRequest(prompt, len(prompt) if cfg.prompt_type == "tokens" else None, n_out))
    return out


def prefix_repetition_requests(cfg: DatasetConfig) -> list[SampleRequest]:
    if cfg.shared_prefix < 1 or cfg.num_prefixes < 1:
        raise ValueError("prefix-repetition needs --shared-prefix (the prefix length) and --num-prefixes above 0")
    rng = random.Random(cfg.seed)
    prefixes = [_part(rng, cfg.prompt_type, cfg.shared_prefix) for _ in range(cfg.num_prefixes)]
    out = []
    for i in range(cfg.num_prompts):
        prompt = _join(cfg.prompt_type, prefixes[i % cfg.num_prefixes], _part(rng, cfg.prompt_type, cfg.input_len))
        out.append(SampleRequest(prompt, len(prompt) if cfg.prompt_type == "tokens" else None, cfg.output_len))
    rng.shuffle(out)
    return out


def _first_exchange(conversation: list[dict[str, str]]) -> tuple[str, str] | None:
    """The first human turn and the reply right after it."""
    for turn, reply in zip(conversation, conversation[1:]):
        if turn.get("from") in HUMAN and reply.get("from") in REPLY:
            return str(turn.get("value", "")), str(reply.get("value", ""))
    return None


def sharegpt_requests(cfg: DatasetConfig, count_tokens: CountTokens) -> list[SampleRequest]:
    entries = json.loads(Path(_need_path(cfg)).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{cfg.path} is not a ShareGPT file: its top level is not a list")
    random.Random(cfg.seed).shuffle(entries)
    out: list[SampleRequest] = []
    for entry in entries:
        exchange = _first_exchange(entry.get("conversations") or entry.get("conversation") or [])
        if exchange is None:
            continue
        prompt_len, reply_len = count_tokens(exchange[0]), count_tokens(exchange[1])
        output_len = cfg.sharegpt_output_len or reply_len
        if (prompt_len < SHAREGPT_MIN_LEN or (cfg.sharegpt_output_len is None and reply_len < SHAREGPT_MIN_LEN)
                or prompt_len > SHAREGPT_MAX_PROMPT or prompt_len + output_len > SHAREGPT_MAX_TOTAL):
            continue
        out.append(SampleRequest(exchange[0], prompt_len, output_len))
        if len(out) == cfg.num_prompts:
            break
    if not out:
        raise ValueError(f"{cfg.path} holds no usable conversation (a human turn and a reply, 4 tokens or more)")
    return [out[i % len(out)] for i in range(cfg.num_prompts)]  # a small file is reused, as vLLM oversamples


def text_requests(cfg: DatasetConfig, count_tokens: CountTokens | None) -> list[SampleRequest]:
    lines = [line.strip() for line in Path(_need_path(cfg)).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"{cfg.path} holds no prompt (one per line)")
    chosen = [prompts[i % len(prompts)] for i in range(cfg.num_prompts)]
    return [SampleRequest(p, count_tokens(p) if count_tokens else None, cfg.output_len) for p in chosen]


def _need_path(cfg: DatasetConfig) -> str:
    if not cfg.path:
        raise ValueError(f"--dataset-name {cfg.name} needs --dataset-path")
    return cfg.path


def load_requests(cfg: DatasetConfig, count_tokens: CountTokens | None = None) -> list[SampleRequest]:
    """The run's requests. `count_tokens` (our tokenizer) measures text: sharegpt needs it."""
    if cfg.name == "random":
        return random_requests(cfg)
    if cfg.name == "prefix-repetition":
        return prefix_repetition_requests(cfg)
    if cfg.name == "sharegpt":
        if count_tokens is None:
            raise ValueError("the sharegpt dataset needs the tokenizer to measure its prompts and replies")
        return sharegpt_requests(cfg, count_tokens)
    if cfg.name == "text":
        return text_requests(cfg, count_tokens)
    raise ValueError(f"unknown dataset {cfg.name!r}: one of {', '.join(DATASETS)}")
