"""Stateful /v1/responses through the openai SDK: stored responses read back with GET, chained with
previous_response_id (the second turn's prompt holds the first turn), removed with DELETE, shared by
two servers (two Serve replicas) over one store, polled in the background; and the stores themselves
(SQLite, Redis, memory): bounded in number and age."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from cluster.engine.engine import Engine
from deploy.server.store import MemoryStore, RedisStore, SqliteStore, StoredResponse
from model_shards.tokenizer import RETURN
from tests.conftest import IN_CI
from tests.deploy.conftest import MODEL, client_for, sdk_for

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # each test generates through the whole HTTP stack and the SDK

# min_tokens keeps <|return|> out for 4 tokens, the bias makes it win right after: a completed answer.
STOPS_AFTER_4 = {"min_tokens": 4, "logit_bias": {str(RETURN): 100}}


@pytest.fixture(scope="module")
def shared_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("store") / "responses.sqlite")


@pytest.fixture(scope="module")
def replicas(local_engine: Engine, shared_file: str) -> Iterator[tuple]:
    """Two servers (as two Serve replicas of one app are) over one SQLite store. Entered, so that each
    app's event loop keeps running between requests (background responses run there)."""
    with contextlib.ExitStack() as stack:
        yield tuple(sdk_for(stack.enter_context(client_for(local_engine, default_max_tokens=8,
                                                           response_store=shared_file))) for _ in range(2))


def turn(sdk, text: str, **extra: object):
    return sdk.responses.create(model=MODEL, input=text, temperature=0, max_output_tokens=8,
                                extra_body=STOPS_AFTER_4, **extra)


def test_a_stored_response_is_read_back_chained_and_deleted(replicas) -> None:
    a, b = replicas
    first = turn(a, "What is the capital of France?")
    assert first.status == "completed" and first.store
    again = b.responses.retrieve(first.id)  # the other replica reads it
    assert again.id == first.id and again.output_text == first.output_text and again.status == "completed"

    second = turn(b, "And of Italy?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The second prompt is the first turn's input and output, then the new message: the same tokens as
    # sending that conversation explicitly (harmony drops the completed turn's reasoning either way).
    explicit = a.responses.create(model=MODEL, temperature=0, max_output_tokens=8, extra_body=STOPS_AFTER_4,
                                  input=[{"role": "user", "content": "What is the capital of France?"},
                                         *[item.model_dump(exclude_none=True) for item in first.output],
                                         {"role": "user", "content": "And of Italy?"}])
    assert second.usage.input_tokens == explicit.usage.input_tokens > first.usage.input_tokens + 5
    assert second.output_text == explicit.output_text  # greedy: the same context gives the same answer

    third = turn(a, "And of Spain?", previous_response_id=second.id)  # a chain of three, across replicas
    assert third.usage.input_tokens > second.usage.input_tokens

    b.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        turn(a, "Again?", previous_response_id=first.id)
    assert gone.value.body["param"] == "previous_response_id"
    assert a.responses.retrieve(second.id).id == second.id  # only that one went


def test_store_false_keeps_nothing(replicas) -> None:
    a, _ = replicas
    unstored = turn(a, "Hi", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(unstored.id)


def test_a_streamed_response_is_stored_when_it_ends(replicas) -> None:
    a, b = replicas
    events = list(a.responses.create(model=MODEL, input="Hi", temperature=0, max_output_tokens=8,
                                     extra_body=STOPS_AFTER_4, stream=True))
    done = events[-1].response
    assert b.responses.retrieve(done.id).output_text == done.output_text


def test_background_responses_are_polled_until_done(replicas) -> None:
    a, b = replicas
    queued = turn(a, "Tell me something.", background=True)
    assert queued.status == "queued" and queued.background
    deadline = time.monotonic() + 60
    while (polled := b.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, "the background response never finished"
        time.sleep(0.1)
    assert polled.status == "completed" and polled.output_text
    with pytest.raises(openai.BadRequestError):
        turn(a, "Hi", background=True, store=False)


# -- the stores -------------------------------------------------------------------------------------

def record(n: int) -> StoredResponse:
    return StoredResponse({"id": f"r{n}", "status": "completed", "output": []}, [{"role": "user", "content": str(n)}])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this test's own (Debian's package; .ci/run installs it)."""
    exe = shutil.which("redis-server")
    if exe is None:
        message = "needs redis-server (Debian package redis-server; .ci/run installs it)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                RedisStore(url, 60, 10)
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["sqlite", "redis", "memory"])
def test_a_store_keeps_the_newest_and_forgets_the_old(kind: str, tmp_path: Path, request) -> None:
    def make(ttl_s: float, max_items: int):
        if kind == "sqlite":
            return SqliteStore(str(tmp_path / f"s{ttl_s}-{max_items}.sqlite"), ttl_s, max_items)
        if kind == "redis":
            store = RedisStore(request.getfixturevalue("redis_url"), ttl_s, max_items)
            store._db.flushdb()
            return store
        return MemoryStore(ttl_s, max_items)

    store = make(3600, 2)
    for n in range(3):
        store.put(f"r{n}", record(n))
    assert store.get("r0") is None and store.get("r1") == record(1) and store.get("r2") == record(2)
    store.put("r1", record(7))  # an update (a background response finishing) keeps its place
    assert store.get("r1") == record(7) and store.get("r2") is not None
    assert store.delete("r2") and not store.delete("r2") and store.get("r2") is None
    short = make(0.3, 10)
    short.put("old", record(0))
    assert short.get("old") == record(0)
    time.sleep(0.6)
    assert short.get("old") is None


def test_chaining_through_redis_across_two_servers(local_engine: Engine, redis_url: str) -> None:
    a, b = (sdk_for(client_for(local_engine, default_max_tokens=8, response_store=redis_url)) for _ in range(2))
    first = turn(a, "Hello")
    second = turn(b, "Again", previous_response_id=first.id)
    assert b.responses.retrieve(first.id).id == first.id and second.usage.input_tokens > first.usage.input_tokens
