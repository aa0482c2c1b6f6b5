"""What a new user hit (issue list 'rough edges'), in process against the local engine: each problem
has its test here (the ones that need a real server are in test_lifecycle.py and test_server.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from cluster.engine.engine import Engine
from cluster.launch import EngineArgs, build_engine
from deploy.config import AppConfig, ModelConfig
from tests.deploy.conftest import MODEL, client_for
from tests.deploy.server.test_api_behaviour import sse
from tests.deploy.server.test_api_errors import assert_error

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
SURROGATE = "hello \ud800 there"


def test_a_lone_surrogate_is_a_bad_request(client: TestClient) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": SURROGATE}]})
    headers = {"content-type": "application/json"}
    assert_error(client.post(CHAT, content=body, headers=headers), 400, "messages", "not valid Unicode")
    body = json.dumps({"model": MODEL, "input": SURROGATE})
    assert_error(client.post(RESPONSES, content=body, headers=headers), 400, "input", "not valid Unicode")
    body = json.dumps({"model": MODEL, "prompt": SURROGATE})
    assert_error(client.post(COMPLETIONS, content=body, headers=headers), 400, "prompt", "unicode")


@pytest.fixture(scope="module")
def small_queue(tiny_hf: Path, vocab: Path) -> Iterator[Engine]:
    engine = build_engine(EngineArgs.from_options(model=str(tiny_hf), engine="local", dtype="float32",
                                                  kv_cache_tokens=8192, max_model_len=256, max_waiting=4))
    yield engine
    engine.shutdown()


def test_requests_with_room_are_admitted_not_counted_as_waiting(small_queue: Engine) -> None:
    client = client_for(small_queue)
    body = {"model": MODEL, "prompt": [11, 22, 33], "max_tokens": 8, "ignore_eos": True}
    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda _: client.post(COMPLETIONS, json=body).status_code, range(40)))
    assert statuses == [200] * 40  # 64 sequence slots and KV for all: none may get 429


def test_request_ids_and_header_limits(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"X-Request-Id": "abc-123"}).headers.get_list("x-request-id") == \
        ["abc-123"]
    odd = client.get("/v1/models", headers={"X-Request-Id": "x" * 500})
    assert "x" * 500 not in odd.headers.get_list("x-request-id")
    many = {f"x-h{i}": "v" for i in range(150)}
    assert_error(client.get("/v1/models", headers=many), 431)
    assert_error(client.get("/v1/models", headers={"x-big": "v" * 20_000}), 431)


def test_model_id_is_never_a_path(tiny_hf: Path) -> None:
    assert AppConfig(EngineArgs(ModelConfig(model=str(tiny_hf)))).model_name() == tiny_hf.name
    assert AppConfig(EngineArgs(ModelConfig(model="openai/gpt-oss-20b"))).model_name() == "openai/gpt-oss-20b"


def test_docs_are_off_unless_asked(local_engine: Engine) -> None:
    plain = client_for(local_engine)
    assert plain.get("/docs").status_code == 404 and plain.get("/redoc").status_code == 404
    assert plain.get("/openapi.json").status_code == 200  # the schema, as vLLM serves it
    assert client_for(local_engine, docs=True).get("/docs").status_code == 200


@pytest.mark.parametrize("route, body, param, words", [
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters", "not a valid JSON schema"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, "tool_choice", "needs tools"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     "stream_options", "only allowed when stream"),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages", "has no content"),
    (RESPONSES, {"input": [1] * 300, "max_output_tokens": 10_000}, "max_output_tokens", ""),
])
def test_accepted_but_invalid_is_refused(client: TestClient, route: str, body: dict, param: str, words: str) -> None:
    if route == RESPONSES:  # an input too long for max_output_tokens: the error names the Responses field
        body = {"input": "word " * 100, "max_output_tokens": 10_000}
    assert_error(client.post(route, json={"model": MODEL, **body}), 400, param, words)


def test_missing_content_type_says_so(client: TestClient) -> None:
    response = client.post(COMPLETIONS, content=json.dumps({"model": MODEL, "prompt": "x"}).encode(), headers={})
    assert_error(response, 400, None, "Content-Type must be application/json")


def test_streamed_top_logprobs_include_the_sampled_token(client: TestClient) -> None:
    response = client.post(COMPLETIONS, json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 12, "stream": True,
                                              "logprobs": 1, "temperature": 1.5, "seed": 3, "ignore_eos": True})
    pieces = [c["choices"][0] for c in sse(response.text) if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(pieces) == 12
    for p in pieces:
        (token,), (top,) = p["logprobs"]["tokens"], p["logprobs"]["top_logprobs"]
        assert token in top and 1 <= len(top) <= 2  # the most likely one, and the sampled one if it differs
