"""The data plane between actors: one small interface over per-pair byte streams.

    endpoint.send(peer, message)          # any picklable object; its tensors travel as raw bytes
    endpoint.recv(peer, timeout) -> message

Framing: [u64 header length][u64 body length][header (codec.py)][tensor bytes, each padded to 16].
A [64, 2880] tensor costs one memcpy into the stream and one out of it, never a pickle of its data;
small messages go in one write, every message is read with two, the peer is woken once per message,
and received tensors are views into the one receive buffer. Tensors arrive on the CPU; the receiver
moves them to its device.

Setup is two-phase, driven by the executor through Ray (the control plane) once per plane epoch:
every participant `listen`s (creates its inbound rings, or a TCP listener) and reports addresses,
then every participant `connect`s its outbound channels, and joins the epoch's torch.distributed
group where it has channels of that kind (dist_channel.py: those move tensors themselves, on their
device, rather than bytes).

Which kind each directed pair gets (`--transport`): `auto` takes NCCL between two actors that each
own whole GPUs (Ray gives each its own), a shared-memory ring within a node, TCP between nodes
(channels.py has the reasons behind that choice, docs/measurements.md the numbers); `shm`, `tcp` and
`gloo` force one kind for every pair; `nccl` is `auto` that fails rather than fall back when some actor
pair has no whole GPUs.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from cluster.dataplane.channels import ByteStream, ShmRing, StreamClosed, StreamTimeout, TcpStream
from cluster.dataplane.codec import ALIGN, decode, encode, padded
from cluster.dataplane.dist_channel import DistGroup, DistIn, DistOut, GroupSpec
from cluster.dataplane.names import ENGINE

__all__ = ["Address", "Endpoint", "PlaneSpec", "ChannelSpec", "StreamClosed", "StreamTimeout", "plan_channels",
           "dist_members"]

_PREFIX = struct.Struct("<QQ")  # header length, body length
_HELLO = struct.Struct("<256s")
_PAD = bytes(ALIGN)
SMALL_MESSAGE = 64 << 10
S = TypeVar("S")
Address = str | tuple[str, int]  # how a sender reaches an inbound channel: the ring's name, or TCP (host, port)


@dataclass(frozen=True)
class ChannelSpec:
    src: str
    dst: str
    kind: str  # "shm", "tcp", "gloo" or "nccl"
    name: str  # unique name; the shm file name for "shm"


@dataclass(frozen=True)
class PlaneSpec:
    prefix: str  # shm names start with it, so leftovers of a dead epoch can be removed
    channels: tuple[ChannelSpec, ...]
    ring_bytes: int
    groups: tuple[GroupSpec, ...] = ()  # one per torch.distributed backend in use (with_groups)


DIST_KINDS = ("gloo", "nccl")


def plan_channels(prefix: str, pairs: list[tuple[str, str]], nodes: dict[str, str], ring_bytes: int,
                  transport: str = "auto", whole_gpus: frozenset[str] = frozenset()) -> PlaneSpec:
    """One channel per directed pair, of the kind the module docstring gives. `whole_gpus`: the
    participants that own one or more whole GPUs."""
    channels = []
    for src, dst in pairs:
        if transport in ("shm", "tcp", "gloo"):
            kind = transport
        elif src in whole_gpus and dst in whole_gpus:
            kind = "nccl"
        elif transport == "nccl" and ENGINE not in (src, dst):
            raise ValueError(f"transport nccl needs whole GPUs on both {src} and {dst}")
        else:
            kind = "shm" if nodes[src] == nodes[dst] else "tcp"
        channels.append(ChannelSpec(src, dst, kind, f"{prefix}{src}-{dst}"))
    return PlaneSpec(prefix, tuple(channels), ring_bytes)


def dist_members(spec: PlaneSpec, backend: str) -> tuple[str, ...]:
    """Who joins the `backend` group: every end of a channel of that kind, in a fixed order."""
    return tuple(sorted({n for c in spec.channels if c.kind == backend for n in (c.src, c.dst)}))


class Endpoint:
    """One participant's side of the data plane (a replica, the router, a shard, the engine)."""

    def __init__(self, me: str, host: str = "127.0.0.1") -> None:
        self.me = me
        self.host = host
        self._out: dict[str, ByteStream] = {}
        self._in: dict[str, ByteStream | DistIn] = {}
        self._dist_out: dict[str, DistOut] = {}
        self._groups: list[DistGroup] = []
        self._listener: socket.socket | None = None
        self._pending_tcp: dict[str, ChannelSpec] = {}
        self._stop = threading.Event()

    # -- setup -----------------------------------------------------------------------------------
    def listen(self, spec: PlaneSpec) -> dict[str, Address]:
        """Create inbound channels; returns what senders need to reach them."""
        addresses: dict[str, Address] = {}
        for ch in spec.channels:
            if ch.dst != self.me or ch.kind in DIST_KINDS:  # dist channels need no addresses
                continue
            if ch.kind == "shm":
                self._in[ch.src] = ShmRing(ch.name, spec.ring_bytes, create=True)
                addresses[ch.name] = ch.name
            else:
                if self._listener is None:
                    self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self._listener.bind((self.host, 0))
                    self._listener.listen(64)
                self._pending_tcp[ch.src] = ch
                addresses[ch.name] = (self.host, self._listener.getsockname()[1])
        return addresses

    def connect(self, spec: PlaneSpec, addresses: dict[str, Address], timeout: float = 60.0,
                store: object | None = None) -> None:
        """Open outbound channels, accept the inbound TCP ones, then join the distributed groups
        (every member joins at once: the executor calls connect everywhere concurrently). `store`:
        the engine's own TCPStore, which it hosts."""
        for ch in spec.channels:
            if ch.src != self.me or ch.kind in DIST_KINDS:
                continue
            if ch.kind == "shm":
                self._out[ch.dst] = ShmRing(str(addresses[ch.name]), spec.ring_bytes, create=False)
            else:
                host, port = addresses[ch.name]
                sock = socket.create_connection((host, int(port)), timeout=timeout)
                sock.sendall(_HELLO.pack(self.me.encode()))
                self._out[ch.dst] = TcpStream(sock)
        deadline = time.monotonic() + timeout
        while self._pending_tcp:
            assert self._listener is not None
            self._listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                raise StreamTimeout(f"{self.me}: peers {sorted(self._pending_tcp)} never connected") from None
            hello = bytearray(_HELLO.size)
            stream = TcpStream(sock)
            stream.readinto(memoryview(hello), deadline, self._stop)
            src = bytes(hello).rstrip(b"\0").decode()
            if self._pending_tcp.pop(src, None) is None:
                sock.close()
                continue
            self._in[src] = stream
        for group_spec in spec.groups:
            if self.me not in group_spec.members:
                continue
            group = DistGroup(group_spec, self.me, store)
            self._groups.append(group)
            for ch in spec.channels:
                if ch.kind == group_spec.backend and ch.src == self.me:
                    self._dist_out[ch.dst] = DistOut(group, ch.dst)
                elif ch.kind == group_spec.backend and ch.dst == self.me:
                    self._in[ch.src] = DistIn(group, ch.src)

    # -- messages --------------------------------------------------------------------------------
    def send(self, peer: str, message: Any, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if peer in self._dist_out:
            self._dist_out[peer].send(message, deadline, self._stop)
            return
        header, arrays = encode(message)
        body = sum(padded(a.nbytes) for a in arrays)
        stream = self._stream(self._out, peer)
        prefix = _PREFIX.pack(len(header), body)
        if body <= SMALL_MESSAGE:  # one write: a copy of a few KB costs less than more calls
            parts = [prefix, header]
            for a in arrays:
                parts.append(a)
                if a.nbytes % ALIGN:
                    parts.append(_PAD[:padded(a.nbytes) - a.nbytes])
            stream.write(memoryview(b"".join(parts)), deadline, self._stop)
            return
        stream.write(memoryview(prefix + header), deadline, self._stop, last=False)
        for i, a in enumerate(arrays):
            n, last = a.nbytes, i == len(arrays) - 1
            if n:
                stream.write(memoryview(a.reshape(-1)).cast("B"), deadline, self._stop, last=last and n % ALIGN == 0)
            if n % ALIGN:
                stream.write(memoryview(_PAD[:padded(n) - n]), deadline, self._stop, last=last)

    def recv(self, peer: str, timeout: float | None = None) -> Any:
        stream = self._stream(self._in, peer)
        deadline = None if timeout is None else time.monotonic() + timeout
        if isinstance(stream, DistIn):
            return stream.recv(deadline, self._stop)
        prefix = bytearray(_PREFIX.size)
        stream.readinto(memoryview(prefix), deadline, self._stop)
        header_len, body = _PREFIX.unpack(prefix)
        data = bytearray(header_len + body)
        stream.readinto(memoryview(data), deadline, self._stop)
        return decode(data, header_len)

    def send_bytes(self, peer: str, data: memoryview, timeout: float | None = None) -> None:
        """Raw bytes, no framing: for measuring the channel itself."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stream(self._out, peer).write(data, deadline, self._stop)

    def recv_bytes_into(self, peer: str, view: memoryview, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._stream(self._in, peer)
        if isinstance(stream, DistIn):
            raise StreamClosed("raw bytes travel on shm and tcp channels only (cluster/bench/hop.py measures those)")
        stream.readinto(view, deadline, self._stop)

    def wait_any(self, peers: list[str], timeout: float) -> list[str]:
        """Peers among `peers` with a message (at least its first byte) waiting; [] after `timeout`.
        Consumes nothing, so a later recv reads whole messages."""
        streams = {peer: self._stream(self._in, peer) for peer in peers}
        ready = [p for p, s in streams.items() if s.ready()]
        if ready or timeout <= 0:
            return ready
        for s in streams.values():
            s.clear_wake()
        ready = [p for p, s in streams.items() if s.ready()]  # data that came before the clear
        if ready:
            return ready
        select.select([s.wait_fd() for s in streams.values()], [], [], timeout)
        return [p for p, s in streams.items() if s.ready()]

    def _stream(self, table: dict[str, S], peer: str) -> S:
        if self._stop.is_set():
            raise StreamClosed(f"{self.me}: endpoint stopped")
        try:
            return table[peer]
        except KeyError:
            raise StreamClosed(f"{self.me} has no channel with {peer}") from None

    # -- teardown --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Wake every blocked send/recv with StreamClosed (thread-safe; used to abandon a step)."""
        self._stop.set()

    def close(self) -> None:
        for out in self._dist_out.values():
            out.bye()  # ends the peer's receiving thread
        self._stop.set()
        receivers = [s for s in self._in.values() if isinstance(s, DistIn)]
        for stream in [*self._out.values(), *self._in.values()]:
            if not isinstance(stream, DistIn):
                stream.close()
        deadline = time.monotonic() + 1.0  # peers that are alive say bye at once
        while any(not r.done for r in receivers) and time.monotonic() < deadline:
            time.sleep(0.01)
        for r in receivers:
            if r.done:  # a thread still waiting on a hung peer keeps its pipe (and its group) to the end
                r.close()
        for group in self._groups:
            group.release(all(r.done for r in receivers))
        self._out.clear()
        self._in.clear()
        self._dist_out.clear()
        self._groups.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
