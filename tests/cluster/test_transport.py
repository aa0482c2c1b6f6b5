"""The data plane's channels and framing, in one process (two threads play the two actors)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from cluster.channels import SHM_DIR, StreamClosed, StreamTimeout, remove_rings
from cluster.messages import ChunkPlan, MoeRequest, MoeResult, ReplicaStep, ShardRequest, ShardResult
from cluster.transport import Endpoint, plan_channels
from model_shards.sampling import SamplingParams


@pytest.fixture(params=["shm", "tcp"])
def pair(request: pytest.FixtureRequest):
    prefix = f"gptoss-test-{os.getpid()}-{request.param}-"
    spec = plan_channels(prefix, [("a", "b"), ("b", "a")], {"a": "n", "b": "n"}, ring_bytes=1 << 16,
                         force_tcp=request.param == "tcp")
    assert {c.kind for c in spec.channels} == {request.param}
    a, b = Endpoint("a"), Endpoint("b")
    addresses = {**a.listen(spec), **b.listen(spec)}
    t = threading.Thread(target=b.connect, args=(spec, addresses))
    t.start()
    a.connect(spec, addresses)
    t.join()
    # connected shm rings have no names left: a process killed now leaves nothing in /dev/shm
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    yield a, b
    a.close()
    b.close()
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]  # readers remove their rings


def _same(x: object, y: object) -> None:
    assert type(x) is type(y)
    for name in x.__dataclass_fields__:  # type: ignore[attr-defined]
        u, v = getattr(x, name), getattr(y, name)
        if isinstance(u, torch.Tensor):
            assert u.dtype == v.dtype and torch.equal(u, v), name
        else:
            assert u == v, name


MESSAGES = [
    MoeRequest(1, 2, torch.randn(3, 5).to(torch.bfloat16)),
    MoeRequest(1, 3, torch.zeros(0, 5)),
    ShardRequest(4, 5, torch.randn(7, 3), torch.arange(5), torch.arange(5) + 10, torch.rand(5)),
    ShardResult(4, 5, torch.randn(5, 3), 0.125),
    ReplicaStep(9, [1, 2], [ChunkPlan(3, 0, [5, 6, 7], 40, True, SamplingParams(temperature=0.5), 11, 0)]),
    MoeRequest(2, 0, torch.randn(300, 700)),  # 840 kB through a 64 kB ring: flow control
]


def test_messages_round_trip(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    for message in MESSAGES:
        sender = threading.Thread(target=a.send, args=("b", message))
        sender.start()
        got = b.recv("a", timeout=10)
        sender.join()
        _same(message, got)


def test_tensors_that_are_not_plain_contiguous_cpu_ones(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    strided = torch.randn(5, 3).t()  # not contiguous: sent as a copy
    a.send("b", MoeResult(1, 2, strided))
    got = b.recv("a", timeout=5)
    assert got.y.shape == (3, 5) and torch.equal(got.y, strided)
    grad = torch.randn(2, 4, requires_grad=True)
    a.send("b", ShardResult(3, 4, grad, 0.5))
    assert torch.equal(b.recv("a", timeout=5).weighted, grad.detach())
    # the pickled path carries tensors out of band too, in any dtype, empty ones included
    loose = {"bf16": torch.randn(3, 2).to(torch.bfloat16), "i32": torch.arange(7, dtype=torch.int32),
             "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False]), "n": 5}
    a.send("b", loose)
    got = b.recv("a", timeout=5)
    assert got["n"] == 5
    for key in ("bf16", "i32", "empty", "mask"):
        assert got[key].dtype == loose[key].dtype and torch.equal(got[key], loose[key]), key


def test_wait_any_does_not_consume(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    assert b.wait_any(["a"], timeout=0.05) == []
    a.send("b", MoeRequest(1, 1, torch.ones(2, 2)))
    assert b.wait_any(["a"], timeout=1.0) == ["a"]
    assert b.wait_any(["a"], timeout=1.0) == ["a"]
    _same(b.recv("a", timeout=1), MoeRequest(1, 1, torch.ones(2, 2)))


def test_timeout_and_stop(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    start = time.monotonic()
    with pytest.raises(StreamTimeout):
        b.recv("a", timeout=0.2)
    assert 0.15 < time.monotonic() - start < 1.0
    threading.Timer(0.2, b.stop).start()
    start = time.monotonic()
    with pytest.raises(StreamClosed):
        b.recv("a")  # no timeout: only stop() can end it
    assert time.monotonic() - start < 1.0


def test_same_node_pairs_use_shared_memory() -> None:
    spec = plan_channels("p-", [("x", "y"), ("y", "z")], {"x": "n1", "y": "n1", "z": "n2"}, 1 << 20)
    assert [c.kind for c in spec.channels] == ["shm", "tcp"]


def test_leftover_rings_are_removed() -> None:
    prefix = f"gptoss-left-{os.getpid()}-"
    spec = plan_channels(prefix, [("x", "y")], {"x": "n", "y": "n"}, 1 << 12)
    Endpoint("y").listen(spec)  # a reader that dies without closing
    assert remove_rings(prefix) == 3  # the ring and its two wake-up FIFOs
