"""`gptoss bench serve` against any OpenAI server: tokens counted from streamed token ids when a
server streams no text, failures reported with their reason, a server that is down is one clear line;
open-loop levels follow their schedule under their cap; chat streams count; vLLM's result file."""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path

import httpx
import pytest

from cluster.bench.datasets import DatasetConfig, SampleRequest, load_requests
from cluster.bench.loadgen import (CompletionBody, Progress, ServeOptions, ServeReport, Target, one_request, report,
                                   run_level)
from cluster.bench.results import LevelSpec
from deploy.cli.main import main

CLOSED = LevelSpec(math.inf, 1.0, 2)


def sse(chunks: list[dict[str, object]]) -> httpx.Response:
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def ids_only_stream(request: httpx.Request) -> httpx.Response:
    """A server started without a tokenizer (vLLM --skip-tokenizer-init): chunks carry ids, no text."""
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"data": [{"id": "served-model"}]})
    body = json.loads(request.content)
    assert body["return_token_ids"] is True and body["ignore_eos"] is True
    chunks: list[dict[str, object]] = [{"choices": [{"index": 0, "text": "", "token_ids": [100 + i]}]}
                                       for i in range(body["max_tokens"])]
    chunks.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"], "prompt_tokens": 99}})
    return sse(chunks)


def mock_server(monkeypatch: pytest.MonkeyPatch, handler: object) -> None:
    real = httpx.AsyncClient
    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kwargs: real(transport=transport, **kwargs))


def test_tokens_are_counted_from_token_ids() -> None:
    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(ids_only_stream)) as client:
            body = CompletionBody(model="m", prompt=[7, 8, 9, 1], max_tokens=5, temperature=0.0, stream=True,
                                  stream_options={"include_usage": True}, ignore_eos=True, return_token_ids=True)
            result = await one_request(client, "http://x/v1/completions", body)
            assert result.ok and result.output_tokens == 5 and len(result.itl) == 4 and result.prompt_tokens == 99

    asyncio.run(go())


def test_chat_streams_count_content_and_reasoning(monkeypatch: pytest.MonkeyPatch) -> None:
    def chat(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        assert body["messages"] == [{"role": "user", "content": "hello there"}] and "return_token_ids" not in body
        deltas = [{"role": "assistant"}, {"reasoning": "think"}, {"content": "Hi"}, {"content": "!"}]
        return sse([{"choices": [{"index": 0, "delta": d}]} for d in deltas]
                   + [{"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 20}}])

    mock_server(monkeypatch, chat)
    target = Target("http://x/v1", "m", "/v1/chat/completions")
    level, results = asyncio.run(run_level(target, [SampleRequest("hello there", None, 3)], CLOSED))
    assert level.failed == 0 and results[0].text == "think" + "Hi!" and len(results[0].itl) == 2
    assert results[0].prompt_tokens == 20 and level.total_output_tokens == 3  # the server's usage, no dataset count


def test_failures_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    mock_server(monkeypatch, lambda request: httpx.Response(
        400, json={"error": {"message": "stream_options is not allowed"}}))
    requests = load_requests(DatasetConfig(num_prompts=3, input_len=4, output_len=4))
    level, _ = asyncio.run(run_level(Target("http://x/v1", "m"), requests, CLOSED))
    assert level.failed == 3 and len(level.errors) == 1
    reason = next(iter(level.errors))
    assert "HTTP 400" in reason and "stream_options is not allowed" in reason
    table = report([level], ServeReport("http://x/v1", "m", 3, 4, 4, "tokens", 0, 0.0))
    assert "3 failed: HTTP 400" in table


def test_a_server_that_is_down_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9/v1", "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:9/v1/models" in err and "Traceback" not in err


def test_shared_prefix_leads_every_prompt_and_the_temperature_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[list[int]] = []
    temperatures: list[float] = []

    def record(request: httpx.Request) -> httpx.Response:
        prompts.append(json.loads(request.content)["prompt"])
        temperatures.append(json.loads(request.content)["temperature"])
        return httpx.Response(400, json={"error": {"message": "recorded"}})

    mock_server(monkeypatch, record)
    requests = load_requests(DatasetConfig(num_prompts=3, input_len=4, output_len=4, shared_prefix=50))
    asyncio.run(run_level(Target("http://x/v1", "m", temperature=0.8), requests, LevelSpec(math.inf, 1.0, 1)))
    assert len(prompts) == 3 and all(len(p) == 54 for p in prompts) and temperatures == [0.8] * 3
    assert prompts[0][:50] == prompts[1][:50] == prompts[2][:50] and prompts[0][50:] != prompts[1][50:]


def test_an_open_loop_level_keeps_its_schedule_under_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight, peak, sent = 0, 0, []

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        sent.append(asyncio.get_running_loop().time())
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return ids_only_stream(request)

    mock_server(monkeypatch, slow)
    requests = load_requests(DatasetConfig(num_prompts=12, input_len=4, output_len=3))
    level, _ = asyncio.run(run_level(Target("http://x/v1", "m"), requests, LevelSpec(40.0, 1.0, 2)))
    assert level.failed == 0 and peak <= 2 and level.concurrency == 2 and level.request_rate == 40.0
    in_flight, peak = 0, 0
    level, _ = asyncio.run(run_level(Target("http://x/v1", "m"), requests, LevelSpec(math.inf, 1.0, None)))
    assert peak == 12  # no cap, infinite rate: all at once


def test_no_new_flags_is_the_closed_loop_sweep_of_before() -> None:
    assert [(s.request_rate, s.max_concurrency) for s in ServeOptions("u").levels()] == [
        (math.inf, 1), (math.inf, 8), (math.inf, 32)]
    both = ServeOptions("u", request_rates=(1.0, math.inf), concurrency=(4,)).levels()
    assert [(s.request_rate, s.max_concurrency) for s in both] == [(1.0, 4), (math.inf, 4)]
    assert [s.max_concurrency for s in ServeOptions("u", request_rates=(2.0,)).levels()] == [None]


def test_the_progress_bar_shows_on_a_terminal_only() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress("rate 2", 2, stream)
        bar.step()
        bar.step()
        bar.close()
    assert tty.getvalue().endswith("\rrate 2: 2/2 requests\n") and pipe.getvalue() == ""


def test_bench_serve_sweeps_rates_and_saves_vllms_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    mock_server(monkeypatch, ids_only_stream)
    out = tmp_path / "r.json"
    argv = ["bench", "serve", "--url", "http://x/v1", "--num-prompts", "4", "--input-len", "8", "--output-len", "3",
            "--request-rate", "50,inf", "--goodput", "ttft:10000", "e2el:10000", "--percentiles", "50,99",
            "--save-result", str(out), "--label", "mine"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:7] == ["rate", "conc", "reqs", "fail", "req/s", "good/s", "tok/s"]
    assert lines[2].split()[:4] == ["50", "-", "4", "0"] and lines[3].split()[:2] == ["inf", "-"]
    summary = json.loads(lines[-1])
    assert summary["model"] == "served-model" and [lv["request_rate"] for lv in summary["levels"]] == [50.0, "inf"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["request_rate"] for r in records] == [50.0, "inf"] and {r["label"] for r in records} == {"mine"}
    assert all(r["completed"] == 4 and r["total_input_tokens"] == 32 and r["request_goodput"] > 0 for r in records)
    assert {"p50_ttft_ms", "p99_tpot_ms", "median_itl_ms"} <= set(records[0])


def test_a_refused_test_request_stops_the_run_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(400, json={"error": {"message": "ignore_eos is not allowed"}})

    mock_server(monkeypatch, refuse)
    assert main(["bench", "serve", "--url", "http://x/v1", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err
    assert "test request to http://x/v1/completions failed: HTTP 400" in err and "ignore_eos is not allowed" in err


def test_chat_with_token_prompts_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "serve", "--url", "http://x/v1", "--endpoint", "/v1/chat/completions", "--prompt-type", "tokens"]
    assert main(argv) == 2
    assert "--prompt-type text" in capsys.readouterr().err
