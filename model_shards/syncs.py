"""Counting what a step asks of the host, on any device: host synchronisations and dispatched ops.

A GPU runs a step's kernels from a queue the host fills ahead of them; every call that needs a
device result on the host (`.item()`, `bool()`, `int()`, `.tolist()`, `.numpy()`, a device-to-host
copy), and every op whose output size depends on device data (`nonzero`, `bincount`, `unique`,
`masked_select`, `repeat_interleave` by a tensor, indexing by a bool mask), stops the host until the
queue drains: the GPU then idles while the host catches up. Those calls are visible on the CPU too, as
aten ops seen by a `TorchDispatchMode` (plus `.tolist()`/`.numpy()`, which read memory directly and
are wrapped while counting), so the rule "at most 2 per decode step" is tested without a GPU.

Dispatched ops that are neither views nor bare allocations each launch a kernel on a GPU: their count
per layer says how far a step is from the handful of fused kernels per layer a CUDA graph replays.

A Triton kernel launches without dispatching aten ops: its wrapper runs the launch inside
`kernel_launch`, which counts it as one op. Under Triton's interpreter (the CPU) the launch copies its
arguments through aten ops; those are the interpreter's, not the step's, and are not counted.

Index building that works on host tensors by construction (a step's block rows, its static buffers'
inputs) runs inside `host_work`: on a GPU those ops run on the CPU and launch nothing, so their ops
are not counted (a sync inside still is).

Counting is for tests and benchmarks only: every op pays a Python call while it runs. The mode is
per thread (torch's dispatch-mode stack is thread-local): count in the thread that runs the step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

# Ops whose result (or output size) comes from device data: each one waits for the device.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(), float(), bool() of a tensor
    aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.nonzero_static.default,
    aten.bincount.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
# Ops that neither compute nor launch anything (views, metadata, bare allocations).
FREE_OPS = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.detach.default,
    aten.lift_fresh.default, aten._local_scalar_dense.default, aten.alias.default,
    aten.new_empty.default, aten.new_empty_strided.default,
    aten.set_.source_Storage_storage_offset, aten.resize_.default,
}


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def is_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether one dispatched op waits for the device."""
    if func in SYNC_OPS:
        return True
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None  # with the size given, nothing is read back
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return _has_bool_index(args)  # a bool mask becomes indices through nonzero
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device", src.device)
        if isinstance(src, torch.Tensor) and dst_device is not None:
            to_host = torch.device(dst_device).type == "cpu" and src.device.type != "cpu"
            blocking_up = (src.device.type == "cpu" and torch.device(dst_device).type != "cpu"
                           and not kwargs.get("non_blocking", False))
            return to_host or blocking_up
    if func is aten.lift_fresh.default:  # torch.tensor(data, device=gpu) copies synchronously
        return isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
    return False


@dataclass
class DispatchCount:
    """What one counted region dispatched."""

    syncs: int = 0
    ops: int = 0  # kernel-launching ops (neither views nor allocations)
    sync_ops: Counter[str] = field(default_factory=Counter)  # op name -> syncs it caused
    sync_sites: Counter[str] = field(default_factory=Counter)  # "op at file:line" -> syncs (for failure messages)
    op_names: Counter[str] = field(default_factory=Counter)

    def add_sync(self, name: str) -> None:
        self.syncs += 1
        self.sync_ops[name] += 1
        self.sync_sites[f"{name} at {_caller()}"] += 1


def _caller() -> str:
    """The innermost frame of this project's code (not torch's, not this module's)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "torch" not in path.split(os.sep)[-3:-1] and path not in (__file__, contextlib.__file__) \
                and "site-packages" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class _Counting(TorchDispatchMode):
    def __init__(self, count: DispatchCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if is_sync(func, args, kwargs):
            self.count.add_sync(name)
        if func not in FREE_OPS and not func.is_view and not getattr(_local, "host", False):
            self.count.ops += 1
            self.count.op_names[name] += 1
        return func(*args, **kwargs)


_patch_lock = threading.Lock()
_local = threading.local()  # .counts: the counts open in this thread; .paused: in a kernel launch; .host: host_work


@contextlib.contextmanager
def host_work() -> Iterator[None]:
    """Ops on host tensors (built from Python values, on the CPU whatever the model's device): not
    counted as device ops."""
    outer = getattr(_local, "host", False)
    _local.host = True
    try:
        yield
    finally:
        _local.host = outer


def _open_counts() -> list[DispatchCount]:
    if not hasattr(_local, "counts"):
        _local.counts = []
    return _local.counts


@contextlib.contextmanager
def kernel_launch(name: str) -> Iterator[None]:
    """One Triton kernel's launch: one op for every count open in this thread, and nothing it
    dispatches inside (the interpreter's copies) counted."""
    counts = _open_counts()
    if not counts:
        yield
        return
    for count in counts:
        count.ops += 1
        count.op_names[f"triton.{name}"] += 1
    _local.paused = True
    try:
        with _disable_current_modes():
            yield
    finally:
        _local.paused = False


def _wrapped(method: Callable[..., Any], count: DispatchCount, name: str, owner: threading.Thread) -> Callable[..., Any]:
    def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is owner and not getattr(_local, "paused", False):
            count.add_sync(name)
        return method(self, *args, **kwargs)
    return call


@contextlib.contextmanager
def count_dispatch(count: DispatchCount | None = None) -> Iterator[DispatchCount]:
    """Counts, in this thread, the host syncs and kernel-launching ops of what runs inside (added to
    `count` when given: an actor counts message by message into one)."""
    count = count if count is not None else DispatchCount()
    owner = threading.current_thread()
    with _patch_lock:
        saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in saved.items():
            setattr(torch.Tensor, name, _wrapped(method, count, name, owner))
    _open_counts().append(count)
    try:
        with _Counting(count):
            yield count
    finally:
        _open_counts().remove(count)
        with _patch_lock:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)


def host_list(t: torch.Tensor) -> list:
    """t.tolist() for a tensor in host memory by construction (a received message's metadata): not a
    device read, so not counted; a tensor on a device is read (and counted) as usual."""
    return torch._C.TensorBase.tolist(t) if t.device.type == "cpu" else t.tolist()


def host_numpy(t: torch.Tensor) -> Any:
    """t.numpy() for a CPU tensor (the transport's view of host memory): not counted."""
    return torch._C.TensorBase.numpy(t)


class Meter:
    """Counting on request inside a loop that runs in another thread (an actor's data-plane loop):
    `start` from any thread; the loop wraps each message's handling in `measure()`; `stop` returns
    what was counted since `start`."""

    def __init__(self) -> None:
        self._count: DispatchCount | None = None

    def start(self) -> None:
        self._count = DispatchCount()

    def stop(self) -> DispatchCount:
        count, self._count = self._count, None
        return count if count is not None else DispatchCount()

    def measure(self) -> contextlib.AbstractContextManager[Any]:
        count = self._count
        return count_dispatch(count) if count is not None else contextlib.nullcontext()
