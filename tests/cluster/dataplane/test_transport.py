"""The data plane's channels and framing, in one process (two threads play the two actors)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed import TCPStore

import cluster
from cluster.dataplane.channels import SHM_DIR, WAIT_SLICE_S, ShmRing, StreamClosed, StreamTimeout, remove_rings
from cluster.dataplane.messages import ChunkPlan, MoeRequest, MoeRoute, ReplicaStep, ShardRequest, ShardResult
from cluster.dataplane.dist_channel import GroupSpec
from cluster.dataplane.transport import Endpoint, dist_members, plan_channels
from model_shards.sampling import SamplingParams


@pytest.fixture(params=["shm", "tcp", "gloo"])
def pair(request: pytest.FixtureRequest):
    prefix = f"gptoss-test-{os.getpid()}-{request.param}-"
    spec = plan_channels(prefix, [("a", "b"), ("b", "a")], {"a": "n", "b": "n"}, ring_bytes=1 << 16,
                         transport=request.param)
    assert {c.kind for c in spec.channels} == {request.param}
    store = None
    if request.param == "gloo":  # "a" hosts the group's store, as the engine does
        store = TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
        spec = dataclasses.replace(spec, groups=(GroupSpec("gloo", "127.0.0.1", store.port, ("a", "b"), prefix),))
    a, b = Endpoint("a"), Endpoint("b")
    addresses = {**a.listen(spec), **b.listen(spec)}
    t = threading.Thread(target=b.connect, args=(spec, addresses))
    t.start()
    a.connect(spec, addresses, store=store)
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
    MoeRequest(1, 2, 0, torch.randn(3, 5).to(torch.bfloat16)),
    MoeRequest(1, 3, 1, torch.zeros(0, 5)),
    ShardRequest(4, 5, 1, torch.randn(7, 3), torch.arange(5), torch.arange(5) + 10, torch.rand(5),
                 torch.tensor([0, 2]), torch.tensor([3, 2])),
    MoeRoute(4, 5, 0, torch.tensor([0, 3]), torch.tensor([2, 6]), torch.randperm(8)),
    ShardResult(4, 5, 1, torch.randn(5, 3), 0.125),
    ShardResult(4, 5, 1, torch.randn(2, 3), 0.25, True),  # summed per token
    ReplicaStep(9, [1, 2], [ChunkPlan(3, 0, [5, 6, 7], 40, True, SamplingParams(temperature=0.5), 11, 0)]),
    MoeRequest(2, 0, 0, torch.randn(300, 700)),  # 840 kB through a 64 kB ring: flow control
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
    a.send("b", MoeRequest(1, 2, 0, strided))
    got = b.recv("a", timeout=5)
    assert got.t.shape == (3, 5) and torch.equal(got.t, strided)
    grad = torch.randn(2, 4, requires_grad=True)
    a.send("b", ShardResult(3, 4, 0, grad, 0.5))
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
    a.send("b", MoeRequest(1, 1, 0, torch.ones(2, 2)))
    assert b.wait_any(["a"], timeout=1.0) == ["a"]
    assert b.wait_any(["a"], timeout=1.0) == ["a"]
    _same(b.recv("a", timeout=1), MoeRequest(1, 1, 0, torch.ones(2, 2)))


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


def test_auto_takes_nccl_between_actors_with_whole_gpus_only() -> None:
    pairs = [("engine", "r"), ("r", "router"), ("router", "s"), ("s", "r"), ("s", "t")]
    nodes = {"engine": "n1", "r": "n1", "router": "n1", "s": "n2", "t": "n2"}
    gpus = frozenset({"r", "s", "t"})  # the router shares a GPU (or has none)
    spec = plan_channels("p-", pairs, nodes, 1 << 20, "auto", gpus)
    assert [c.kind for c in spec.channels] == ["shm", "shm", "tcp", "nccl", "nccl"]
    assert dist_members(spec, "nccl") == ("r", "s", "t") and dist_members(spec, "gloo") == ()
    with pytest.raises(ValueError, match="whole GPUs on both r and router"):
        plan_channels("p-", pairs, nodes, 1 << 20, "nccl", gpus)  # the engine's pairs may fall back
    assert {c.kind for c in plan_channels("p-", pairs, nodes, 1 << 20, "gloo", gpus).channels} == {"gloo"}


def test_leftover_rings_are_removed() -> None:
    prefix = f"gptoss-left-{os.getpid()}-"
    spec = plan_channels(prefix, [("x", "y")], {"x": "n", "y": "n"}, 1 << 12)
    Endpoint("y").listen(spec)  # a reader that dies without closing
    assert remove_rings(prefix) == 3  # the ring and its two wake-up FIFOs


# A message three times the ring's size (a long prefill) makes the writer wait for room about three
# times per direction. Each wait used to be ended by the reader only when the reader itself had seen
# a full ring; a writer that filled the ring after that look slept out its wait slice (50 ms).
RING_BYTES = 1 << 20
BIG = 3 * RING_BYTES
FRAME = 16  # written apart with last=False, as transport.py frames a message: the reader then frees
# 16 bytes of a full ring and at once copies the rest, while the writer refills those 16 bytes
ROUNDS = 5  # best of: a loaded 2-core machine may preempt either process in any one round trip

_ECHO_PEER = """
import os, sys, threading, time
from cluster.dataplane.channels import ShmRing
inbound, outbound, capacity, size, rounds, cpu = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
rx = ShmRing(inbound, capacity, create=True)
tx = ShmRing(outbound, capacity, create=False)
print("ready", flush=True)
stop, frame, data = threading.Event(), memoryview(bytearray(16)), memoryview(bytearray(size))
for _ in range(rounds):
    deadline = time.monotonic() + 10
    rx.readinto(frame, deadline, stop)
    rx.readinto(data, deadline, stop)
    tx.write(frame, deadline, stop, last=False)
    tx.write(data, deadline, stop)
rx.close()
tx.close()
"""


def _two_cpus() -> tuple[int, int] | None:
    """One CPU for each process, so reader and writer run truly at once, as on a many-core server.
    Unpinned on a 2-core machine, the kernel tends to run a woken writer at once on the waker's
    CPU, which hides a missed wake-up (the old rule missed about 1 in 10 round trips, not all)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def _start_echo_peer(prefix: str, cpu: int) -> tuple[subprocess.Popen, ShmRing, ShmRing]:
    """A second process that sends every message back; returns it and this side's (to, from) rings."""
    rx = ShmRing(prefix + "ba", RING_BYTES, create=True)  # each reader creates its ring
    root = str(Path(cluster.__file__).resolve().parents[1])  # the peer runs the code under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    args = [prefix + "ab", prefix + "ba", str(RING_BYTES), str(BIG), str(ROUNDS), str(cpu)]
    peer = subprocess.Popen([sys.executable, "-c", _ECHO_PEER, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert peer.stdout is not None and peer.stdout.readline() == "ready\n", "the echo peer did not start"
    return peer, ShmRing(prefix + "ab", RING_BYTES, create=False), rx


def _round_trip(tx: ShmRing, rx: ShmRing, payload: memoryview, back: memoryview) -> float:
    stop, frame = threading.Event(), memoryview(bytearray(FRAME))
    deadline = time.monotonic() + 10
    start = time.perf_counter()
    tx.write(frame, deadline, stop, last=False)
    tx.write(payload, deadline, stop)
    rx.readinto(frame, deadline, stop)
    rx.readinto(back, deadline, stop)
    return time.perf_counter() - start


def _bare_copies(payload: memoryview, sink: memoryview) -> float:
    """The copies a round trip makes: into the ring and out of it, each way."""
    start = time.perf_counter()
    for _ in range(4):
        sink[:] = payload
    return time.perf_counter() - start


def test_message_larger_than_the_ring_wakes_the_writer_at_once() -> None:
    prefix = f"gptoss-echo-{os.getpid()}-"
    payload = memoryview(np.random.default_rng(0).integers(0, 256, BIG, dtype=np.uint8)).cast("B")
    back, sink = memoryview(bytearray(BIG)), memoryview(bytearray(BIG))
    cpus, mine = _two_cpus(), os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        peer, tx, rx = _start_echo_peer(prefix, cpus[1] if cpus else -1)
        try:
            trip = min(_round_trip(tx, rx, payload, back) for _ in range(ROUNDS))
            assert peer.wait(timeout=10) == 0
        finally:
            peer.kill()
            tx.close()
            rx.close()
        copy = min(_bare_copies(payload, sink) for _ in range(ROUNDS))
    finally:
        os.sched_setaffinity(0, mine)
        remove_rings(prefix)  # the peer's ring, if it died before this side opened it
    assert back == payload
    # One missed wake-up costs a whole wait slice, so half a slice tells "none" from "one". The old
    # rule missed about one per message each way here: best round trips of 52-103 ms against ~1.5 ms
    # now, so a 100 ms margin would not reliably catch it.
    assert trip < copy + WAIT_SLICE_S / 2, f"round trip {trip * 1e3:.1f} ms, bare copies {copy * 1e3:.1f} ms"
