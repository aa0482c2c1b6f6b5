"""One-way byte streams between two processes: a shared-memory ring (same node) and TCP.

Why not torch.distributed or Ray calls: by one-way latency between two processes for a small message,
shared memory with a FIFO wake-up beats TCP loopback about threefold, gloo send/recv is slower than
both by far, and a Ray actor call is two orders of magnitude slower (docs/measurements.md).

Shared-memory ring: one writer, one reader, a file in /dev/shm holding two monotonic byte counters
(written, read), a "writer waiting" flag and `capacity` bytes of data. The reader creates it; the
writer removes its name (and the FIFOs') once it has opened them, so a killed process leaves nothing
behind. Messages of any size stream through it with flow control. Each side sleeps in select() on a
FIFO and the other side writes one byte into it: a wake-up can be early or repeated but never lost,
because the byte stays in the FIFO until read. The reader is woken when the writer has filled the
ring or ended a message. The writer only sleeps on a full ring, after raising the flag; a reader that
has freed space and finds the flag raised lowers it and wakes the writer, so no wake-up waits for the
end of a wait slice.

Memory ordering the ring relies on, and where it holds: x86-64 only.
- The data copy comes before the counter store (both plain stores; counters are 8-byte aligned, so
  each store is atomic). x86 never reorders a store with an earlier store, or a load with an earlier
  load, so a side that sees a counter move also sees the bytes it covers (glibc's large copies use
  weakly ordered non-temporal stores, but end them with an sfence).
- The flag/counter exchange is Dekker's pattern: the writer stores the flag then loads the read
  counter; the reader stores the read counter then loads the flag. Even x86 (TSO) lets a load pass an
  earlier store still in the store buffer, so both sides put a full fence between their store and
  their load (`_full_fence`); then at least one of them sees the other's store: the writer sees the
  room, or the reader sees the flag and wakes it.
On ARM (e.g. GH200's Grace CPU) plain stores and loads may be reordered with each other: the counter
stores would need release semantics, the counter loads acquire semantics, and the fence a `dmb ish`.
This Python code provides none of that (numpy stores are plain stores), so as written the ring is
correct on x86-64 only; do not run it on ARM without porting those three points.

All waits are cut into short slices so that a `stop` event or a deadline ends them: a dead peer
never leaves a reader blocked forever.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
import time
from abc import ABC, abstractmethod

import numpy as np

SHM_DIR = "/dev/shm"
WAIT_SLICE_S = 0.05
_HEADER = 64  # the header (uint64s: written, read, writer waiting) lives in the first cache line
_WRITTEN, _READ, _WRITER_WAITING = range(3)
_FENCE = threading.Lock()


class StreamTimeout(TimeoutError):
    """No data (or no room) before the deadline."""


class StreamClosed(ConnectionError):
    """The stream was stopped, closed, or its peer went away."""


def _check(deadline: float | None, stop: threading.Event) -> float:
    """Seconds to wait in the next slice; raises when stopped or past the deadline."""
    if stop.is_set():
        raise StreamClosed("stopped")
    if deadline is None:
        return WAIT_SLICE_S
    left = deadline - time.monotonic()
    if left <= 0:
        raise StreamTimeout("timed out")
    return min(WAIT_SLICE_S, left)


def _full_fence() -> None:
    """A full memory barrier (store-load included) for the ring's Dekker exchange, on x86-64.

    Python has no fence instruction, but on x86 any locked read-modify-write instruction is one, and
    acquiring and releasing an uncontended `threading.Lock` does at least one (a `lock cmpxchg` in
    glibc's semaphore or CPython's mutex), negligible next to a message's other costs
    (docs/measurements.md). Nothing else ever holds _FENCE, so it never blocks. This is no barrier
    on ARM (see the module docstring)."""
    with _FENCE:
        pass


class ByteStream(ABC):
    @abstractmethod
    def ready(self) -> bool:
        """True when at least one byte can be read without waiting."""

    @abstractmethod
    def wait_fd(self) -> int:
        """A file descriptor that becomes readable when data may have arrived (for select)."""

    def clear_wake(self) -> None:
        """Forget stale wake-ups on wait_fd (the data, not the wake-up, is the truth)."""

    @abstractmethod
    def write(self, data: memoryview, deadline: float | None, stop: threading.Event, last: bool = True) -> None:
        """Append bytes; `last=False` when more parts of the same message follow (the reader is
        then woken once, after the last part)."""

    @abstractmethod
    def readinto(self, view: memoryview, deadline: float | None, stop: threading.Event) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class ShmRing(ByteStream):
    """Either end of a shared-memory ring. The reader creates it (and removes it on close)."""

    def __init__(self, name: str, capacity: int, create: bool) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self._owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _HEADER + capacity)
                for suffix in (".data", ".space"):
                    os.mkfifo(self.path + suffix, 0o600)
            size = os.fstat(fd).st_size
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.capacity = size - _HEADER
        self._view = memoryview(self._mm)
        self._counters = np.frombuffer(self._mm, dtype=np.uint64, count=3)  # [written, read, writer waiting]
        # O_RDWR keeps a FIFO open without a peer; O_NONBLOCK lets a full FIFO (a reader with many
        # wake-ups pending) drop the extra byte instead of blocking.
        self._data_fd = os.open(self.path + ".data", os.O_RDWR | os.O_NONBLOCK)
        self._space_fd = os.open(self.path + ".space", os.O_RDWR | os.O_NONBLOCK)
        if not create:
            # Both ends now hold the ring and its FIFOs open, so nobody needs the names any more:
            # removing them here means a process killed with SIGKILL leaves nothing in /dev/shm
            # (the kernel frees the memory with the last mapping).
            self._unlink()

    def ready(self) -> bool:
        return int(self._counters[_WRITTEN]) != int(self._counters[_READ])

    def wait_fd(self) -> int:
        return self._data_fd

    def clear_wake(self) -> None:
        try:
            os.read(self._data_fd, 4096)
        except BlockingIOError:
            pass

    @staticmethod
    def _notify(fd: int) -> None:
        try:
            os.write(fd, b"\0")
        except BlockingIOError:
            pass

    @staticmethod
    def _wait(fd: int, deadline: float | None, stop: threading.Event) -> None:
        ready, _, _ = select.select([fd], [], [], _check(deadline, stop))
        if ready:
            try:
                os.read(fd, 4096)
            except BlockingIOError:
                pass

    def write(self, data: memoryview, deadline: float | None, stop: threading.Event, last: bool = True) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        done, total, cap = 0, len(data), self.capacity
        while done < total:
            written, read = int(self._counters[_WRITTEN]), int(self._counters[_READ])
            room = cap - (written - read)
            if room == 0:
                if self._room_after_raising_flag(read):
                    continue
                self._notify(self._data_fd)  # the reader may be asleep on what is already there
                self._wait(self._space_fd, deadline, stop)
                continue
            pos = written % cap
            n = min(room, total - done, cap - pos)
            self._view[_HEADER + pos:_HEADER + pos + n] = data[done:done + n]
            self._counters[_WRITTEN] = written + n
            done += n
        if last:
            self._notify(self._data_fd)

    def readinto(self, view: memoryview, deadline: float | None, stop: threading.Event) -> None:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        done, total, cap = 0, len(view), self.capacity
        while done < total:
            written, read = int(self._counters[_WRITTEN]), int(self._counters[_READ])
            ready = written - read
            if ready == 0:
                self._wait(self._data_fd, deadline, stop)
                continue
            pos = read % cap
            n = min(ready, total - done, cap - pos)
            view[done:done + n] = self._view[_HEADER + pos:_HEADER + pos + n]
            self._counters[_READ] = read + n
            _full_fence()  # the counter store must be visible before the flag is loaded (Dekker)
            if self._counters[_WRITER_WAITING]:
                self._counters[_WRITER_WAITING] = 0
                self._notify(self._space_fd)  # lowered, then woken: a flag is never lowered silently
            done += n

    def _room_after_raising_flag(self, read: int) -> bool:
        """Called by the writer on a full ring: raise the flag, then look again. True when the reader
        had freed space meanwhile (the flag is lowered again and the writer goes on); False when the
        writer may sleep: any reader that frees space from now on sees the flag and wakes it."""
        self._counters[_WRITER_WAITING] = 1
        _full_fence()  # the flag store must be visible before the read counter is loaded (Dekker)
        if int(self._counters[_READ]) == read:
            return False
        self._counters[_WRITER_WAITING] = 0  # a wake-up the reader may still send is only early
        return True

    def close(self) -> None:
        if self._mm.closed:
            return
        os.close(self._data_fd)
        os.close(self._space_fd)
        self._counters = None  # type: ignore[assignment]  # release the buffer exports before closing
        self._view.release()
        self._mm.close()
        if self._owner:
            self._unlink()  # a writer never connected

    def _unlink(self) -> None:
        for path in (self.path, self.path + ".data", self.path + ".space"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def remove_rings(prefix: str) -> int:
    """Delete leftover rings whose name starts with `prefix` (their reader died without closing)."""
    removed = 0
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


class TcpStream(ByteStream):
    """A connected TCP socket used in one direction."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(WAIT_SLICE_S)
        self._sock = sock

    def ready(self) -> bool:
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def wait_fd(self) -> int:
        return self._sock.fileno()

    def write(self, data: memoryview, deadline: float | None, stop: threading.Event, last: bool = True) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        done = 0
        while done < len(data):
            _check(deadline, stop)
            try:
                done += self._sock.send(data[done:])
            except socket.timeout:
                continue
            except OSError as exc:
                raise StreamClosed(f"peer closed the connection: {exc}") from None

    def readinto(self, view: memoryview, deadline: float | None, stop: threading.Event) -> None:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        done = 0
        while done < len(view):
            _check(deadline, stop)
            try:
                n = self._sock.recv_into(view[done:])
            except socket.timeout:
                continue
            except OSError as exc:
                raise StreamClosed(f"peer closed the connection: {exc}") from None
            if n == 0:
                raise StreamClosed("peer closed the connection")
            done += n

    def close(self) -> None:
        self._sock.close()
