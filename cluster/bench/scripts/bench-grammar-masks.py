#!/usr/bin/env python3
"""Per-token mask cost of the structured-output libraries, at gpt-oss's full vocabulary.

The question model_shards/grammar.py answers with this: which library computes the mask of allowed
next tokens faster over o200k_harmony's 201,088 tokens, and how long does a schema take to compile.
For each case, a compact JSON document that the schema accepts is tokenized; then, token by token,
each library computes the mask and accepts the token (the work an engine does per sampled token).

Runs llguidance always and xgrammar when it is importable (it needs torch and transformers, so it is
not a dependency of the project: install it in a venv of its own to compare). Prints a table, then one
JSON line.

    python cluster/bench/scripts/bench-grammar-masks.py --vocab-dir DIR   # DIR holds o200k_base.tiktoken (offline)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "long-string": (
        {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"},
                                          "ok": {"type": "boolean"}},
         "required": ["title", "body", "ok"], "additionalProperties": False},
        {"title": "A report", "body": " ".join(f"word{i} and some ordinary prose" for i in range(60)), "ok": True},
    ),
    "structure": (
        {"type": "object", "properties": {
            "flag": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 100},
            "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 8}},
         "required": ["flag", "color", "count", "items"], "additionalProperties": False},
        {"flag": False, "color": "green", "count": 42, "items": [1, 2, 3, 4, 5, 6, 7, 8]},
    ),
}


def offline_vocab(directory: str) -> None:
    """Point tiktoken at a local o200k_base.tiktoken (its cache is keyed by the sha1 of the URL)."""
    cache = Path(tempfile.mkdtemp(prefix="tiktoken-"))
    shutil.copyfile(Path(directory) / "o200k_base.tiktoken", cache / hashlib.sha1(VOCAB_URL.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def llguidance_runner(encoding: Any) -> Callable[[dict[str, Any], list[int]], tuple[float, list[float]]]:
    import llguidance
    from llguidance.tiktoken import lltokenizer_from_encoding

    tok = lltokenizer_from_encoding(encoding, eos_token=200002)

    def run(schema: dict[str, Any], tokens: list[int]) -> tuple[float, list[float]]:
        grammar = json.dumps({"grammars": [{"json_schema": {**schema, "x-guidance": COMPACT}}]})
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, grammar)
        compile_s = time.perf_counter() - start
        assert not matcher.is_error(), matcher.get_error()
        per_token = []
        for token in tokens:
            start = time.perf_counter()
            matcher.compute_bitmask()
            per_token.append(time.perf_counter() - start)
            assert matcher.consume_token(token), "llguidance refused a token of a valid document"
        return compile_s, per_token

    return run


def xgrammar_runner(encoding: Any) -> Callable[[dict[str, Any], list[int]], tuple[float, list[float]]]:
    import xgrammar

    vocab = []
    for i in range(encoding.n_vocab):
        try:
            vocab.append(encoding.decode_single_token_bytes(i))
        except KeyError:  # a hole in the special-token range
            vocab.append(b"")
    info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=encoding.n_vocab,
                                  stop_token_ids=[200002])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    bitmask = xgrammar.allocate_token_bitmask(1, encoding.n_vocab)

    def run(schema: dict[str, Any], tokens: list[int]) -> tuple[float, list[float]]:
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        matcher = xgrammar.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - start
        per_token = []
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            per_token.append(time.perf_counter() - start)
            assert matcher.accept_token(token), "xgrammar refused a token of a valid document"
        return compile_s, per_token

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-dir", help="a directory holding o200k_base.tiktoken (without network)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (the best mean is kept)")
    args = parser.parse_args()
    if args.vocab_dir:
        offline_vocab(args.vocab_dir)
    import tiktoken

    encoding = tiktoken.get_encoding("o200k_harmony")
    runners = {"llguidance": llguidance_runner(encoding)}
    try:
        runners["xgrammar"] = xgrammar_runner(encoding)
    except ImportError:
        print("xgrammar is not installed: measuring llguidance only")
    rows = []
    for case, (schema, document) in CASES.items():
        tokens = encoding.encode(json.dumps(document, separators=(",", ":")))
        for name, run in runners.items():
            runs = [run(schema, tokens) for _ in range(args.repeats)]
            compile_s = min(c for c, _ in runs)
            means = [statistics.fmean(t) for _, t in runs]
            best = runs[means.index(min(means))][1]
            rows.append({"library": name, "case": case, "tokens": len(tokens),
                         "compile_ms": round(compile_s * 1e3, 3), "mask_mean_us": round(min(means) * 1e6, 1),
                         "mask_p50_us": round(statistics.median(best) * 1e6, 1),
                         "mask_max_us": round(max(best) * 1e6, 1)})
    print(f"{'library':<11} {'case':<12} {'tokens':>6} {'compile ms':>10} {'mask mean us':>12} "
          f"{'p50 us':>8} {'max us':>9}")
    for r in rows:
        print(f"{r['library']:<11} {r['case']:<12} {r['tokens']:>6} {r['compile_ms']:>10} {r['mask_mean_us']:>12} "
              f"{r['mask_p50_us']:>8} {r['mask_max_us']:>9}")
    print(json.dumps({"vocab_size": encoding.n_vocab, "rows": rows}))


if __name__ == "__main__":
    main()
