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
then every participant `connect`s its outbound channels. Same-node pairs use shared-memory rings,
other pairs TCP (channels.py has the measurements behind that choice).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from cluster.channels import ByteStream, ShmRing, StreamClosed, StreamTimeout, TcpStream
from cluster.codec import ALIGN, decode, encode, padded

__all__ = ["Address", "Endpoint", "PlaneSpec", "ChannelSpec", "StreamClosed", "StreamTimeout", "plan_channels"]

_PREFIX = struct.Struct("<QQ")  # header length, body length
_HELLO = struct.Struct("<256s")
_PAD = bytes(ALIGN)
SMALL_MESSAGE = 64 << 10
Address = str | tuple[str, int]  # how a sender reaches an inbound channel: the ring's name, or TCP (host, port)


@dataclass(frozen=True)
class ChannelSpec:
    src: str
    dst: str
    kind: str  # "shm" or "tcp"
    name: str  # unique name; the shm file name for "shm"


@dataclass(frozen=True)
class PlaneSpec:
    prefix: str  # shm names start with it, so leftovers of a dead epoch can be removed
    channels: tuple[ChannelSpec, ...]
    ring_bytes: int


def plan_channels(prefix: str, pairs: list[tuple[str, str]], nodes: dict[str, str], ring_bytes: int,
                  force_tcp: bool = False) -> PlaneSpec:
    """One channel per directed pair; shm when both ends are on one node (and TCP not forced)."""
    channels = []
    for src, dst in pairs:
        kind = "tcp" if force_tcp or nodes[src] != nodes[dst] else "shm"
        channels.append(ChannelSpec(src, dst, kind, f"{prefix}{src}-{dst}"))
    return PlaneSpec(prefix, tuple(channels), ring_bytes)


class Endpoint:
    """One participant's side of the data plane (a replica, the router, a shard, the engine)."""

    def __init__(self, me: str, host: str = "127.0.0.1") -> None:
        self.me = me
        self.host = host
        self._out: dict[str, ByteStream] = {}
        self._in: dict[str, ByteStream] = {}
        self._listener: socket.socket | None = None
        self._pending_tcp: dict[str, ChannelSpec] = {}
        self._stop = threading.Event()

    # -- setup -----------------------------------------------------------------------------------
    def listen(self, spec: PlaneSpec) -> dict[str, Address]:
        """Create inbound channels; returns what senders need to reach them."""
        addresses: dict[str, Address] = {}
        for ch in spec.channels:
            if ch.dst != self.me:
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

    def connect(self, spec: PlaneSpec, addresses: dict[str, Address], timeout: float = 60.0) -> None:
        """Open outbound channels, then accept the inbound TCP ones."""
        for ch in spec.channels:
            if ch.src != self.me:
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

    # -- messages --------------------------------------------------------------------------------
    def send(self, peer: str, message: Any, timeout: float | None = None) -> None:
        header, arrays = encode(message)
        body = sum(padded(a.nbytes) for a in arrays)
        stream = self._stream(self._out, peer)
        deadline = None if timeout is None else time.monotonic() + timeout
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
        self._stream(self._in, peer).readinto(view, deadline, self._stop)

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

    def _stream(self, table: dict[str, ByteStream], peer: str) -> ByteStream:
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
        self._stop.set()
        for stream in [*self._out.values(), *self._in.values()]:
            stream.close()
        self._out.clear()
        self._in.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
