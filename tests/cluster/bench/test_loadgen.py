"""`gptoss bench serve` against any OpenAI server: tokens counted from streamed token ids when a
server streams no text, failures reported with their reason, a server that is down is one clear line."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deploy.cli.main import main
from cluster.bench.loadgen import CompletionBody, ServeReport, one_request, report, run_level


def ids_only_stream(request: httpx.Request) -> httpx.Response:
    """A server started without a tokenizer (vLLM --skip-tokenizer-init): chunks carry ids, no text."""
    body = json.loads(request.content)
    assert body["return_token_ids"] is True and body["prompt"][:3] == [7, 8, 9]  # the shared prefix leads
    chunks = [{"choices": [{"index": 0, "text": "", "token_ids": [100 + i]}]} for i in range(body["max_tokens"])]
    chunks.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_tokens_are_counted_from_token_ids() -> None:
    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(ids_only_stream)) as client:
            body = CompletionBody(model="m", prompt=[7, 8, 9, 1], max_tokens=5, temperature=0.0, stream=True,
                                  stream_options={"include_usage": True}, ignore_eos=True, return_token_ids=True)
            result = await one_request(client, "http://x/v1/completions", body)
            assert result.ok and result.output_tokens == 5 and len(result.itl) == 4

    asyncio.run(go())


def test_failures_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "stream_options is not allowed"}})

    real = httpx.AsyncClient

    def client(**kwargs: object) -> httpx.AsyncClient:
        return real(transport=httpx.MockTransport(refuse), **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx, "AsyncClient", client)
    level = asyncio.run(run_level("http://x/v1", "m", 2, 3, 4, 4, "tokens", None, 0))
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

    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient",
                        lambda **kwargs: real(transport=httpx.MockTransport(record), **kwargs))  # type: ignore[arg-type]
    asyncio.run(run_level("http://x/v1", "m", 1, 3, 4, 4, "tokens", None, 0, shared_prefix=50, temperature=0.8))
    assert len(prompts) == 3 and all(len(p) == 54 for p in prompts) and temperatures == [0.8] * 3
    assert prompts[0][:50] == prompts[1][:50] == prompts[2][:50] and prompts[0][50:] != prompts[1][50:]
