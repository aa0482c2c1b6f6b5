"""The gpt-oss tokenizer: tiktoken's `o200k_harmony`, plus openai-harmony's encoding for chat.

Both libraries download `o200k_base.tiktoken` on first use. On machines without network,
`use_vocab_dir` points both at a local copy of that file (openai-harmony reads
TIKTOKEN_ENCODINGS_BASE; tiktoken reads its cache directory, keyed by the sha1 of the download URL).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

if TYPE_CHECKING:  # imported where the chat encoding is first needed: a bare GPU machine has no openai-harmony
    from openai_harmony import HarmonyEncoding

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

ENDOFTEXT = 199999
RETURN = 200002  # end of a final answer
END = 200007  # end of a message; NOT a stop token in chat (the model continues with <|start|>)
CALL = 200012  # end of a tool call

CHAT_STOP_TOKENS = (RETURN, CALL)  # harmony's stop_tokens_for_assistant_actions()
TEXT_STOP_TOKENS = (ENDOFTEXT, RETURN, CALL)  # raw completions also end at <|endoftext|>


def use_vocab_dir(directory: str | Path, cache_dir: str | Path | None = None) -> None:
    """Make tiktoken and openai-harmony load the vocabulary from `directory` (which holds
    o200k_base.tiktoken) instead of downloading it. Call before the first encode."""
    directory = Path(directory).resolve()
    source = directory / VOCAB_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    cache = Path(cache_dir or os.environ.get("TIKTOKEN_CACHE_DIR") or Path.home() / ".cache" / "gptoss" / "tiktoken")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / hashlib.sha1(VOCAB_URL.encode()).hexdigest()
    if not target.exists():
        shutil.copyfile(source, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(directory)


class TokenizerUnavailable(RuntimeError):
    """The vocabulary file could not be loaded (typically: no network and no local copy)."""


_HINT = ("the o200k_base vocabulary could not be loaded ({}); without network, pass --vocab-dir DIR "
         "(a directory holding o200k_base.tiktoken) or set TIKTOKEN_ENCODINGS_BASE and TIKTOKEN_CACHE_DIR")


@functools.cache
def tokenizer() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding("o200k_harmony")
    except Exception as exc:  # tiktoken raises whatever its HTTP download raised
        raise TokenizerUnavailable(_HINT.format(exc)) from exc


@functools.cache
def harmony() -> HarmonyEncoding:
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # openai-harmony raises its own HarmonyError or an OS error
        raise TokenizerUnavailable(_HINT.format(exc)) from exc


def encode(text: str) -> list[int]:
    """Raw prompt text -> ids. Special-token strings such as <|start|> are honoured, so a
    hand-written harmony prompt encodes as the model expects."""
    return tokenizer().encode(text, allowed_special="all")


def decode(token_ids: list[int]) -> str:
    return tokenizer().decode(token_ids)


@functools.cache
def special_ids() -> frozenset[int]:
    """Every special token of o200k_harmony (<|start|>, <|channel|>, <|message|>, the reserved ones...)."""
    enc = tokenizer()
    return frozenset(enc.encode_single_token(name) for name in enc.special_tokens_set)


def decode_text(token_ids: list[int]) -> str:
    """The text of `token_ids` without special tokens: what a reader may be shown as content."""
    specials = special_ids()
    return decode([t for t in token_ids if t not in specials])
