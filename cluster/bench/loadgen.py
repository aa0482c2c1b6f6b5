"""`gptoss bench serve`: load on any OpenAI-compatible server, measured from the client.

Each request streams /v1/completions (or /v1/chat/completions, `endpoint`) with a prompt from a
dataset (datasets.py: random token ids or words, ShareGPT, repeated prefixes, a text file) and asks
for its output length with `ignore_eos` (unless turned off) and, on completions, `return_token_ids`:
vLLM accepts both, and a server started without a tokenizer streams only ids. A sweep runs levels one
after another on the same requests:
- closed loop (no request rate given): at each `--concurrency`, every request is sent at once with at
  most that many in flight, as before open-loop arrivals existed;
- open loop (`--request-rate R,...`): requests arrive on a seeded gamma schedule (arrivals.py), at
  each rate, capped by `--concurrency` when it is given too (vLLM's `--max-concurrency`).
The metrics (results.py) follow vLLM's definitions; failed requests are counted by reason (HTTP status
and the server's message), and the table says why. `save_result` writes vLLM's result file.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO, TypedDict

import httpx

from cluster.bench.arrivals import arrival_offsets, paced
from cluster.bench.datasets import CountTokens, DatasetConfig, SampleRequest, load_requests
from cluster.bench.results import (LevelReport, LevelSpec, RequestResult, RunInfo, level_report, save_records,
                                   vllm_record)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
CLOSED_LOOP_CONCURRENCY = (1, 8, 32)  # the levels of a run given neither a rate nor a concurrency


class CompletionBody(TypedDict):
    model: str
    prompt: list[int] | str
    max_tokens: int
    temperature: float
    stream: bool
    stream_options: dict[str, bool]
    ignore_eos: bool
    return_token_ids: bool


class ChatBody(TypedDict):
    model: str
    messages: list[dict[str, str]]
    max_completion_tokens: int
    temperature: float
    stream: bool
    stream_options: dict[str, bool]
    ignore_eos: bool


@dataclass(frozen=True)
class Target:
    """The server under test and what every request asks of it."""

    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True  # every request generates its full output length, so servers do equal work

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"

    @property
    def request_url(self) -> str:
        return self.url.rstrip("/") + self.endpoint.removeprefix("/v1")

    def body(self, sample: SampleRequest) -> CompletionBody | ChatBody:
        options = {"include_usage": True}
        if self.chat:
            if not isinstance(sample.prompt, str):
                raise ValueError("chat requests take text prompts: use --prompt-type text")
            return ChatBody(model=self.model, messages=[{"role": "user", "content": sample.prompt}],
                            max_completion_tokens=sample.output_len, temperature=self.temperature, stream=True,
                            stream_options=options, ignore_eos=self.ignore_eos)
        return CompletionBody(model=self.model, prompt=sample.prompt, max_tokens=sample.output_len,
                              temperature=self.temperature, stream=True, stream_options=options,
                              ignore_eos=self.ignore_eos, return_token_ids=True)


def _output_of(choice: dict[str, Any]) -> tuple[bool, str]:
    """(whether this streamed choice carries output, its text): completions stream `text` and
    `token_ids`; chat streams a `delta` of content, reasoning (gpt-oss's analysis channel) or tool calls."""
    if "delta" in choice:
        delta = choice["delta"] or {}
        text = "".join(str(delta.get(k) or "") for k in ("reasoning_content", "reasoning", "content"))
        return bool(text or delta.get("tool_calls")), text
    text = str(choice.get("text") or "")
    return bool(text or choice.get("token_ids")), text


async def one_request(client: httpx.AsyncClient, url: str, body: CompletionBody | ChatBody) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last: float | None = None
    texts: list[str] = []
    chunks = 0
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
                    result.output_tokens = chunk["usage"].get("completion_tokens") or 0
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
                outputs = [_output_of(c) for c in chunk.get("choices", [])]
                if any(has for has, _ in outputs):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                    texts += [text for _, text in outputs]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2el = time.perf_counter() - start
    result.ok = last is not None
    result.text = "".join(texts)
    result.output_tokens = result.output_tokens or chunks  # a server that sends no usage: one token a chunk
    if not result.ok:
        result.error = "the stream carried neither text nor token ids"
    return result


class Progress:
    """`label: done/total requests` on one stderr line, rewritten in place; silent unless stderr is a terminal."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._show()

    def _show(self) -> None:
        if self.enabled:
            self.stream.write(f"\r{self.label}: {self.done}/{self.total} requests")
            self.stream.flush()

    def step(self) -> None:
        self.done += 1
        self._show()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


async def run_level(target: Target, requests: list[SampleRequest], spec: LevelSpec, *, seed: int = 0,
                    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0), slos: dict[str, float] | None = None,
                    progress: bool | None = None) -> tuple[LevelReport, list[RequestResult]]:
    """Send `requests` on the level's schedule; its report and every request's result, in request order."""
    offsets = arrival_offsets(len(requests), spec.request_rate, spec.burstiness, seed)
    cap = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    bar = Progress(spec.label, len(requests), enabled=progress)

    async def send(client: httpx.AsyncClient, sample: SampleRequest) -> RequestResult:
        body = target.body(sample)
        if cap is None:
            result = await one_request(client, target.request_url, body)
        else:
            async with cap:
                result = await one_request(client, target.request_url, body)
        if sample.prompt_len is not None:  # the dataset's count is the prompt's, without a chat template
            result.prompt_tokens = sample.prompt_len
        bar.step()
        return result

    timeout = httpx.Timeout(600.0, connect=30.0)
    connections = (spec.max_concurrency or len(requests)) + 4
    async with httpx.AsyncClient(headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=connections)) as client:
        start = time.perf_counter()
        tasks = []
        async for i in paced(offsets):
            tasks.append(asyncio.create_task(send(client, requests[i])))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return level_report(spec, results, duration, percentiles, slos), results


class ServerUnreachable(ConnectionError):
    """The server under test did not answer /v1/models, or failed the test request."""


async def test_request(target: Target, sample: SampleRequest) -> None:
    """One request before the levels, as vLLM's initial test run: a server that refuses what the run
    asks (a flag it does not know, a prompt too long) says why in one line instead of failing every
    request, and the server's first-request costs (lazy initialization) stay out of the first level."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        result = await one_request(client, target.request_url, target.body(sample))
    if not result.ok:
        raise ServerUnreachable(f"the test request to {target.request_url} failed: {result.error}")


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
    dataset_name: str = "random"
    endpoint: str = "/v1/completions"
    range_ratio: float = 0.0
    bench: str = "serve"


def _rate(level: LevelReport) -> str:
    return level.request_rate if isinstance(level.request_rate, str) else f"{level.request_rate:g}"


def report(levels: list[LevelReport], extra: ServeReport) -> str:
    """A table (a row per level; each latency at p50 and every asked percentile), the failures by
    reason, then one JSON line."""
    keys = [k for k in levels[0].ttft_ms if k.startswith("p")] if levels else ["p50"]
    keys.sort(key=lambda k: float(k[1:]))
    goodput = any(lv.request_goodput is not None for lv in levels)
    header = (f"{'rate':>5} {'conc':>5} {'reqs':>5} {'fail':>5} {'req/s':>7} " + (f"{'good/s':>7} " if goodput else "")
              + f"{'tok/s':>8}")
    for name in ("TTFT", "TPOT", "ITL", "E2EL"):
        header += "".join(f" {(name + ' ' if i == 0 else '') + k:>{9 if i == 0 else 7}}" for i, k in enumerate(keys))
    lines = [header + "  (ms)", "-" * (len(header) + 6)]
    for lv in levels:
        row = (f"{_rate(lv):>5} {lv.concurrency if lv.concurrency is not None else '-':>5} {lv.requests:>5} "
               f"{lv.failed:>5} {lv.request_throughput:>7.2f} "
               + (f"{lv.request_goodput or 0.0:>7.2f} " if goodput else "") + f"{lv.output_throughput:>8.1f}")
        for summary in (lv.ttft_ms, lv.tpot_ms, lv.itl_ms, lv.e2el_ms):
            row += "".join(f" {summary[k]:>{9 if i == 0 else 7}.1f}" for i, k in enumerate(keys))
        lines.append(row)
    for lv in levels:
        where = f"rate {_rate(lv)}" + (f", concurrency {lv.concurrency}" if lv.concurrency is not None else "")
        for reason, count in sorted(lv.errors.items(), key=lambda item: -item[1]):
            lines.append(f"{where}: {count} failed: {reason}")
    lines.append(json.dumps({**asdict(extra), "levels": [asdict(lv) for lv in levels]}))
    return "\n".join(lines)


@dataclass(frozen=True)
class ServeOptions:
    """One `gptoss bench serve` run."""

    url: str
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: str | None = None  # None: the first of /v1/models
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    request_rates: tuple[float, ...] | None = None  # None: closed loop at each concurrency
    burstiness: float = 1.0
    concurrency: tuple[int, ...] | None = None  # closed loop: the levels; open loop: caps on requests in flight
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    goodput: dict[str, float] | None = None  # SLOs in ms: ttft, tpot, e2el
    save_result: str | None = None
    label: str | None = None  # the saved records' label (vLLM's --label)
    progress: bool | None = None  # None: when stderr is a terminal

    def levels(self) -> list[LevelSpec]:
        if self.request_rates is None:
            return [LevelSpec(math.inf, self.burstiness, c) for c in self.concurrency or CLOSED_LOOP_CONCURRENCY]
        return [LevelSpec(rate, self.burstiness, cap) for cap in (self.concurrency or (None,))
                for rate in self.request_rates]


def bench_serve(options: ServeOptions, count_tokens: CountTokens | None = None) -> str:
    """Run every level against the server; the table and JSON line (report), the vLLM file if asked."""
    requests = load_requests(options.dataset, count_tokens)
    if options.endpoint == "/v1/chat/completions" and not all(isinstance(r.prompt, str) for r in requests):
        raise ValueError("chat requests take text prompts: use --prompt-type text")

    async def main() -> str:
        name = options.model or await first_model(options.url, options.api_key)
        target = Target(options.url, name, options.endpoint, options.api_key, options.temperature, options.ignore_eos)
        await test_request(target, requests[0])
        runs = [await run_level(target, requests, spec, seed=options.dataset.seed, percentiles=options.percentiles,
                                slos=options.goodput, progress=options.progress) for spec in options.levels()]
        if options.save_result:
            info = RunInfo(name, options.endpoint, len(requests), options.dataset.name, options.label,
                           options.percentiles, options.goodput)
            save_records(options.save_result, [vllm_record(info, lv, results) for lv, results in runs])
        d = options.dataset
        return report([lv for lv, _ in runs], ServeReport(options.url, name, len(requests), d.input_len, d.output_len,
                                                          d.prompt_type, d.shared_prefix, options.temperature,
                                                          d.name, options.endpoint, d.range_ratio))

    return asyncio.run(main())

