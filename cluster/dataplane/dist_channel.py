"""Channels over a torch.distributed process group: NCCL between actors that each own a whole GPU
(tensors go from device to device, never through host memory), gloo on CPUs (which is how CI tests
this code; on CPU it is several times slower than the shared-memory ring for a small message:
docs/measurements.md).

One group per plane epoch, over every participant that has a channel of this kind, built on the
engine's TCPStore (keys under the epoch's prefix) with the process-group classes themselves, not
`init_process_group`: there is no default group to tear down when a failed plane is replaced.

A message is its codec header (codec.encode_tensors) then its tensors, each one point-to-point
send: [1] int64 header length, the header as uint8, every non-empty tensor on the group's device.
Gloo's receives cannot be polled (a receive counts as complete only once waited for), so each
inbound channel has a thread that receives whole messages, queues them and writes a byte into a
pipe: the pipe is what the endpoint's wait_any selects on, as it does for the other channels. A
participant that closes its endpoint sends BYE on each outbound channel, so the peers' receiving
threads end; a dead peer ends them with a connection error.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributed import ProcessGroup, Store, Work

from cluster.dataplane.channels import StreamClosed, StreamTimeout, WAIT_SLICE_S
from cluster.dataplane.codec import encode_tensors, rebuild

BYE = -1  # in place of a header length: the sender closed its endpoint
_ABANDONED: list[ProcessGroup] = []  # groups with receives still pending: destroying one would wait for them


@dataclass(frozen=True)
class GroupSpec:
    backend: str  # "gloo" or "nccl"
    host: str  # the engine's TCPStore
    port: int
    members: tuple[str, ...]  # participant names; rank = position
    prefix: str  # this epoch's keys in the store
    timeout_s: float = 600.0


def group_device(backend: str) -> torch.device:
    """Where a group's tensors live: NCCL moves CUDA tensors only (each actor sees its one GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class DistGroup:
    """One participant's view of the group: its rank, the process group, the device of its tensors."""

    def __init__(self, spec: GroupSpec, me: str, store: Store | None = None) -> None:
        from torch.distributed import PrefixStore, TCPStore

        self.spec, self.rank = spec, spec.members.index(me)
        self.device = group_device(spec.backend)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = store or TCPStore(spec.host, spec.port, len(spec.members), is_master=False, timeout=timeout)
        prefixed = PrefixStore(spec.prefix, store)
        if spec.backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.pg = ProcessGroupNCCL(prefixed, self.rank, len(spec.members))
        else:
            from torch.distributed import ProcessGroupGloo

            self.pg = ProcessGroupGloo(prefixed, self.rank, len(spec.members), timeout)  # connects every pair

    def rank_of(self, name: str) -> int:
        return self.spec.members.index(name)

    def release(self, receivers_done: bool) -> None:
        if not receivers_done:
            _ABANDONED.append(self.pg)


def _run(op: Callable[[], Work], deadline: float | None, what: str) -> None:
    """Start a point-to-point op and wait for it; a lost peer (either may raise) is StreamClosed."""
    timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
    try:
        work = op()
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError for timeouts and lost peers alike
        if deadline is not None and time.monotonic() >= deadline:
            raise StreamTimeout(f"{what} timed out") from None
        raise StreamClosed(f"{what} failed: {str(exc).splitlines()[0][:200]}") from None


class DistOut:
    """Sends whole messages to one peer."""

    def __init__(self, group: DistGroup, peer: str) -> None:
        self.group, self.peer, self.dst = group, peer, group.rank_of(peer)

    def send(self, message: Any, deadline: float | None, stop: threading.Event) -> None:
        header, tensors = encode_tensors(message)
        self._send(torch.tensor([len(header)], dtype=torch.int64), deadline, stop)
        self._send(torch.frombuffer(bytearray(header), dtype=torch.uint8), deadline, stop)
        for t in tensors:
            if t.numel():
                self._send(t.detach().contiguous(), deadline, stop)

    def bye(self) -> None:
        try:
            self._send(torch.tensor([BYE], dtype=torch.int64), time.monotonic() + 1.0, threading.Event())
        except (StreamClosed, StreamTimeout):
            pass  # the peer is gone already

    def _send(self, t: torch.Tensor, deadline: float | None, stop: threading.Event) -> None:
        if stop.is_set():
            raise StreamClosed("stopped")
        t = t.to(self.group.device)
        _run(lambda: self.group.pg.send([t], self.dst, 0), deadline, f"send to {self.peer}")


class DistIn:
    """Receives whole messages from one peer on a thread of its own; readable like a byte stream."""

    def __init__(self, group: DistGroup, peer: str) -> None:
        self.group, self.peer, self.src = group, peer, group.rank_of(peer)
        self._messages: queue.Queue[object] = queue.Queue()  # messages, or the StreamClosed that ended them
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._receive, name=f"recv-{peer}", daemon=True)
        self._thread.start()

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        _run(lambda: self.group.pg.recv([t], self.src, 0), None, f"receive from {self.peer}")
        return t

    def _receive(self) -> None:
        device = self.group.device
        try:
            while True:
                length = int(self._recv(torch.empty(1, dtype=torch.int64, device=device)).item())
                if length == BYE:
                    raise StreamClosed(f"{self.peer} closed its endpoint")
                header = bytes(self._recv(torch.empty(length, dtype=torch.uint8, device=device)).cpu().numpy())
                self._put(rebuild(header, lambda dtype, shape: self._recv(torch.empty(shape, dtype=dtype, device=device))
                                  if 0 not in shape else torch.empty(shape, dtype=dtype)))
        except StreamClosed as exc:
            self._put(exc)
        except Exception as exc:  # a message that cannot be decoded: the plane is broken
            self._put(StreamClosed(f"receiving from {self.peer} failed: {type(exc).__name__}: {exc}"))

    def _put(self, item: object) -> None:
        self._messages.put(item)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # closed meanwhile

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    # the part of ByteStream that Endpoint.wait_any uses
    def ready(self) -> bool:
        return not self._messages.empty()

    def wait_fd(self) -> int:
        return self._wake_r

    def clear_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except (BlockingIOError, OSError):
            pass

    def recv(self, deadline: float | None, stop: threading.Event) -> Any:
        while True:
            if stop.is_set():
                raise StreamClosed("stopped")
            slice_s = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if slice_s <= 0:
                raise StreamTimeout(f"nothing from {self.peer} before the deadline")
            try:
                item = self._messages.get(timeout=slice_s)
            except queue.Empty:
                continue
            if isinstance(item, StreamClosed):
                self._messages.put(item)  # every later recv fails the same way
                raise StreamClosed(str(item))
            return item

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
