"""`gptoss bench serve`: load on any OpenAI-compatible server, measured from the client.

Each request streams /v1/completions with a prompt of `input_len` random token ids (vLLM accepts
these too; `--prompt-type text` sends random words instead) and asks for `output_len` tokens with
`ignore_eos` and `return_token_ids`. With `--shared-prefix N` every prompt starts with the same N
tokens (a system prompt, say), which a prefix cache can reuse. At each concurrency, `num_prompts`
requests run with at most that many in flight. Definitions follow vLLM's benchmark: TTFT = time to
the first streamed chunk with text or token ids (a server started without a tokenizer streams only
ids); ITL = gaps between consecutive such chunks; E2EL = time to the end of the response; TPOT =
(E2EL - TTFT) / (tokens - 1); output throughput = generated tokens / wall time of the run. Failed
requests are counted by reason (HTTP status and the server's message), and the table says why.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from collections import Counter
from typing import TypedDict

import httpx

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    failed: int
    errors: dict[str, int]  # why requests failed: reason -> count
    duration_s: float
    request_throughput: float
    output_throughput: float  # generated tokens per second
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1e3

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered) * 1e3}


async def one_request(client: httpx.AsyncClient, url: str, body: CompletionBody) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") or c.get("token_ids") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2el = time.perf_counter() - start
    result.ok = last is not None
    if not result.ok:
        result.error = "the stream carried neither text nor token ids"
    return result


class CompletionBody(TypedDict):
    model: str
    prompt: list[int] | str
    max_tokens: int
    temperature: float
    stream: bool
    stream_options: dict[str, bool]
    ignore_eos: bool
    return_token_ids: bool


def _prompt(rng: random.Random, kind: str, length: int, prefix: list[int] | str) -> list[int] | str:
    if kind == "tokens":
        assert isinstance(prefix, list)
        return prefix + [rng.randrange(1000, 199_000) for _ in range(length)]
    return f"{prefix} " * bool(prefix) + " ".join(rng.choice(WORDS) for _ in range(length))


async def run_level(base_url: str, model: str, concurrency: int, num_prompts: int, input_len: int, output_len: int,
                    prompt_type: str, api_key: str | None, seed: int, shared_prefix: int = 0,
                    temperature: float = 0.0) -> LevelReport:
    rng = random.Random(seed)
    prefix = _prompt(random.Random(seed + 1), prompt_type, shared_prefix, [] if prompt_type == "tokens" else "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/completions"

    async def guarded(client: httpx.AsyncClient, body: CompletionBody) -> RequestResult:
        async with limit:
            return await one_request(client, url, body)

    bodies = [CompletionBody(model=model, prompt=_prompt(rng, prompt_type, input_len, prefix), max_tokens=output_len,
                             temperature=temperature, stream=True, stream_options={"include_usage": True}, ignore_eos=True,
                             return_token_ids=True)
              for _ in range(num_prompts)]
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(client, b) for b in bodies))
        duration = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens or len(r.itl) + 1 for r in good)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    errors = Counter(r.error for r in results if not r.ok)
    return LevelReport(concurrency, len(results), len(results) - len(good), dict(errors), duration, len(good) / duration,
                       tokens / duration, percentiles([r.ttft for r in good]), percentiles(tpot),
                       percentiles([x for r in good for x in r.itl]), percentiles([r.e2el for r in good]))


class ServerUnreachable(ConnectionError):
    """The server under test did not answer /v1/models."""


async def first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/models"
    try:
        async with httpx.AsyncClient(headers=headers, timeout=30.0) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"cannot reach {url}: {type(exc).__name__}: {exc or 'no answer'}") from None
    if response.status_code != 200:
        raise ServerUnreachable(f"{url} answered HTTP {response.status_code}: {response.text[:200]}")
    return str(response.json()["data"][0]["id"])


@dataclass
class ServeReport:
    """What the JSON line says besides the levels: the run's settings."""

    url: str
    model: str
    num_prompts: int
    input_len: int
    output_len: int
    prompt_type: str
    shared_prefix: int
    temperature: float
    bench: str = "serve"


def report(levels: list[LevelReport], extra: ServeReport) -> str:
    header = (f"{'conc':>5} {'reqs':>5} {'fail':>5} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p90':>8} {'p99':>8} "
              f"{'ITL p50':>8} {'p90':>7} {'p99':>7} {'E2EL p50':>9} {'p90':>8} {'p99':>8}  (ms)")
    lines = [header, "-" * len(header)]
    for lv in levels:
        lines.append(f"{lv.concurrency:>5} {lv.requests:>5} {lv.failed:>5} {lv.request_throughput:>7.2f} "
                     f"{lv.output_throughput:>8.1f} {lv.ttft_ms['p50']:>9.1f} {lv.ttft_ms['p90']:>8.1f} "
                     f"{lv.ttft_ms['p99']:>8.1f} {lv.itl_ms['p50']:>8.1f} {lv.itl_ms['p90']:>7.1f} "
                     f"{lv.itl_ms['p99']:>7.1f} {lv.e2el_ms['p50']:>9.1f} {lv.e2el_ms['p90']:>8.1f} "
                     f"{lv.e2el_ms['p99']:>8.1f}")
    for lv in levels:
        for reason, count in sorted(lv.errors.items(), key=lambda item: -item[1]):
            lines.append(f"concurrency {lv.concurrency}: {count} failed: {reason}")
    lines.append(json.dumps({**asdict(extra), "levels": [asdict(lv) for lv in levels]}))
    return "\n".join(lines)


def bench_serve(url: str, concurrency: list[int], num_prompts: int, input_len: int, output_len: int,
                model: str | None = None, prompt_type: str = "tokens", api_key: str | None = None,
                seed: int = 0, shared_prefix: int = 0, temperature: float = 0.0) -> str:
    async def main() -> str:
        name = model or await first_model(url, api_key)
        levels = [await run_level(url, name, c, num_prompts, input_len, output_len, prompt_type, api_key, seed,
                                  shared_prefix, temperature) for c in concurrency]
        return report(levels, ServeReport(url, name, num_prompts, input_len, output_len, prompt_type, shared_prefix,
                                          temperature))

    return asyncio.run(main())
