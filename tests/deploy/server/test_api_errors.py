"""The error contract (catalogue V-1..V-12, V-20, S-1, S-3, S-7): every bad input gets its 4xx and
an OpenAI error body; nothing leaks a traceback, a path or an object address."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from cluster.engine.engine import Engine
from tests.deploy.conftest import MAX_MODEL_LEN, MODEL, client_for

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
USER = [{"role": "user", "content": "Hi"}]
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/home/|/usr/| at 0x[0-9a-f]+")


def assert_error(response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert not LEAKS.search(response.text), response.text
    if param is not None:
        assert error["param"] == param, error
    assert contains in error["message"], error
    return error


def chat(client: TestClient, **fields) -> object:
    return client.post(CHAT, json={"model": MODEL, "messages": USER, **fields})


def complete(client: TestClient, **fields) -> object:
    return client.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields})


def test_v1_max_tokens_beyond_the_context(client: TestClient, local_engine: Engine) -> None:
    steps = local_engine.steps
    error = assert_error(complete(client, prompt=[5] * 10, max_tokens=MAX_MODEL_LEN), 400, "max_tokens")
    assert f"{MAX_MODEL_LEN} > {MAX_MODEL_LEN} - 10" in error["message"] and error["code"] == "context_length_exceeded"
    assert_error(chat(client, max_tokens=10_000), 400, "max_tokens")
    assert local_engine.steps == steps  # refused before the engine


def test_v2_prompt_too_long_and_the_boundary(client: TestClient) -> None:
    assert_error(complete(client, prompt=[5] * MAX_MODEL_LEN, max_tokens=1), 400, "prompt", "maximum context length")
    assert_error(chat(client, messages=[{"role": "user", "content": "word " * 400}]), 400, "messages")
    ok = complete(client, prompt=[5] * (MAX_MODEL_LEN - 1), max_tokens=1, ignore_eos=True, return_token_ids=True)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", 2**63, True])
def test_v3_bad_max_tokens(client: TestClient, value: object) -> None:
    assert_error(complete(client, max_tokens=value), 400, "max_tokens")
    assert_error(chat(client, max_tokens=value), 400, "max_tokens")


def test_v3_null_max_tokens_means_the_default(client: TestClient) -> None:
    response = chat(client, max_tokens=None, ignore_eos=True)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16  # default_max_tokens


def test_v4_unknown_model(client: TestClient) -> None:
    for route, body in ((CHAT, {"messages": USER}), (COMPLETIONS, {"prompt": "x"}), (RESPONSES, {"input": "x"})):
        assert_error(client.post(route, json={"model": "gpt-4", **body}), 404, "model", "does not exist")


@pytest.mark.parametrize("body", [b'"str"', b"[1, 2]", b"42", b"null", b'{"model": "tiny", "prompt": ', b""])
def test_v5_body_not_an_object(client: TestClient, body: bytes) -> None:
    for route in (CHAT, COMPLETIONS, RESPONSES):
        assert_error(client.post(route, content=body, headers={"content-type": "application/json"}), 400)


def test_v6_wrong_or_missing_content_type(client: TestClient) -> None:
    form = client.post(COMPLETIONS, content=b"model=tiny&prompt=hi",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(form, 400)
    bare = client.post(COMPLETIONS, content=json.dumps({"model": MODEL, "prompt": "x"}).encode(), headers={})
    assert 400 <= bare.status_code < 500


def test_v7_missing_or_empty_inputs(client: TestClient) -> None:
    assert_error(client.post(CHAT, json={"model": MODEL}), 400, "messages")
    assert_error(client.post(CHAT, json={"model": MODEL, "messages": []}), 400, "messages")
    assert_error(client.post(COMPLETIONS, json={"model": MODEL}), 400, "prompt")
    assert_error(client.post(COMPLETIONS, json={"model": MODEL, "prompt": ""}), 400, "prompt")
    assert_error(client.post(COMPLETIONS, json={"model": MODEL, "prompt": []}), 400, "prompt")


@pytest.mark.parametrize("prompt", [[999999], [-1], [[-1]], [[5], [201088]]])
def test_v8_token_ids_outside_the_vocabulary(client: TestClient, prompt: list) -> None:
    assert_error(complete(client, prompt=prompt), 400, "prompt", "out of vocabulary")


def test_v9_logit_bias_names_every_bad_key(client: TestClient) -> None:
    error = assert_error(complete(client, logit_bias={"201088": 1.0, "abc": 2.0, "5": 1.0, "-3": 0.5}), 400,
                         "logit_bias")
    for key in ("201088", "abc", "-3"):
        assert key in error["message"]
    assert "'5'" not in error["message"]
    assert_error(complete(client, logit_bias={"5": "x"}), 400, "logit_bias")
    assert_error(complete(client, logit_bias={"5": 101.0}), 400, "logit_bias")


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("temperature", 2.1), ("top_p", 1.1), ("top_p", 0.0),
                                          ("presence_penalty", 3.0), ("frequency_penalty", -3.0), ("top_k", -2),
                                          ("stop", ["a", "b", "c", "d", "e"]), ("seed", 2**64), ("stop", [""])])
def test_v10_sampling_parameters_out_of_range(client: TestClient, field: str, value: object) -> None:
    assert_error(complete(client, **{field: value}), 400, field)
    assert_error(chat(client, **{field: value}), 400, field)


def test_v10_unsupported_values_are_refused_not_ignored(client: TestClient) -> None:
    assert_error(complete(client, suffix="tail"), 400, "suffix", "not supported")  # (penalties are supported now)
    assert_error(complete(client, echo=True), 400, "echo", "not supported")


@pytest.mark.parametrize("field, value", [("n", 100000), ("n", 17), ("best_of", 100), ("logprobs", 1000)])
def test_v11_amplification_parameters(client: TestClient, field: str, value: object) -> None:
    assert_error(complete(client, **{field: value}), 400, field)


def test_v11_chat_logprob_limits(client: TestClient) -> None:
    assert_error(chat(client, logprobs=True, top_logprobs=21), 400, "top_logprobs")
    assert_error(chat(client, top_logprobs=2), 400, "top_logprobs", "logprobs")
    assert_error(chat(client, n=100000), 400, "n")


def test_v12_response_format_tools_and_tool_choice(client: TestClient) -> None:
    assert_error(chat(client, response_format={"type": "json_schema"}), 400, "response_format")
    assert_error(chat(client, response_format={"type": "xml"}), 400, "response_format")
    assert_error(chat(client, tool_choice="sometimes"), 400, "tool_choice")
    assert_error(chat(client, tool_choice="required"), 400, "tool_choice")
    assert_error(chat(client, tools=[{"type": "retrieval", "function": {"name": "x"}}]), 400, "tools")
    assert_error(chat(client, tools=[{"type": "function", "function": {"name": "has space"}}]), 400, "tools")
    assert_error(chat(client, messages=[{"role": "tool", "content": "42", "tool_call_id": "nope"}]), 400, "messages")


def test_s1_api_key_on_every_inference_route(local_engine: Engine) -> None:
    key = "sk-test-123"
    guarded = client_for(local_engine, api_key=key, default_max_tokens=2)
    routes = guarded.get("/openapi.json").json()["paths"]
    inference = {path for path in routes if path.startswith("/v1")}
    assert inference == {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses",
                         "/v1/responses/{response_id}"}
    assert {p for p in routes if p.startswith("/admin")} == {"/admin/scale", "/admin/topology"}  # guarded too
    assert not [p for p in routes if not p.startswith(("/v1", "/admin")) and p not in ("/health", "/metrics")]
    assert guarded.get("/admin/topology").status_code == 401
    bodies = {"/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 1},
              "/v1/completions": {"model": MODEL, "prompt": "x", "max_tokens": 1},
              "/v1/responses": {"model": MODEL, "input": "x", "max_output_tokens": 1}}
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"},
           {"Authorization": f"bearer {key}"}, {"Authorization": f"Bearer  {key}"}, {"Authorization": f"Bearer {key} "},
           {"Authorization": key}]
    for path in inference - {"/v1/responses/{response_id}"}:
        method = guarded.get if path == "/v1/models" else lambda url, **kw: guarded.post(url, json=bodies[url], **kw)
        for headers in bad:
            assert_error(method(path, headers=headers), 401)
        assert method(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    stored = guarded.post("/v1/responses", json=bodies["/v1/responses"], headers={"Authorization": f"Bearer {key}"})
    one = f"/v1/responses/{stored.json()['id']}"
    for method in (guarded.get, guarded.delete):  # a stored response is read and removed with the key only
        for headers in bad:
            assert_error(method(one, headers=headers), 401)
    assert guarded.get(one, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert guarded.get("/health").status_code == 200 and guarded.get("/metrics").status_code == 200
    assert key not in guarded.get("/openapi.json").text


def test_s3_body_size_limit(local_engine: Engine) -> None:
    limit = 2048
    small = client_for(local_engine, max_body_bytes=limit)
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    exact = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(exact) == limit and small.post(COMPLETIONS, content=exact,
                                              headers={"content-type": "application/json"}).status_code == 200
    over = exact[:-1] + b" }"
    assert_error(small.post(COMPLETIONS, content=over, headers={"content-type": "application/json"}), 413)

    def chunked() -> object:
        yield over[:1000]
        yield over[1000:]

    response = small.post(COMPLETIONS, content=chunked(), headers={"content-type": "application/json"})
    assert_error(response, 413)
    for length in ("-1", "abc", ""):
        response = small.post(COMPLETIONS, content=body,
                              headers={"content-type": "application/json", "content-length": length})
        assert_error(response, 400)


def test_s7_internal_errors_leak_nothing(local_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = client_for(local_engine)
    api = broken.app.state.service

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom in /work/secret/module.py at 0x7f3a2b1c, token=hunter2")

    monkeypatch.setattr(api.async_engine, "submit", explode)
    error = assert_error(broken.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"}), 500)
    assert "hunter2" not in json.dumps(error) and error["type"] == "server_error"
    streamed = broken.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "stream": True})
    assert streamed.status_code == 500 and "hunter2" not in streamed.text
    assert broken.get("/health").status_code == 200  # still serving


def test_timeout_is_408_and_streams_end_with_an_error_event(local_engine: Engine) -> None:
    slow = client_for(local_engine, request_timeout_s=0.05)
    body = {"model": MODEL, "prompt": [5] * 100, "max_tokens": 150, "ignore_eos": True}
    assert_error(slow.post(COMPLETIONS, json=body), 408)
    stream = slow.post(COMPLETIONS, json={**body, "stream": True})
    events = [line for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "request_timeout" in events[-2]


def test_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
