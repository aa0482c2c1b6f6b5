"""What this machine can compute fast: the one place every fast path asks, and `--dtype auto`.

CPUs differ in what torch's kernels can use. The fast paths of this project need:

- **oneDNN's bf16 path** (prepacked linear weights, linear.py; the stacked and fused experts built on
  them, moe.py): oneDNN runs bf16 matmuls only on CPUs with AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX;
  elsewhere reordering a weight raises ("bf16 path needs the cpu support avx_ne_convert or avx512bw,
  avx512vl and avx512dq"). Without it every linear goes through `F.linear`, bf16 included: it runs on
  any CPU, computing the same products in another order (within bf16 rounding of the fast path).
- AMX and AVX-512 BF16 make that path fast; they are reported for the topology and the docs.

`GPTOSS_CPU_FALLBACK=1` turns the fast paths off on any machine, so that every machine can test the
fallback (CI runs the numerics tests both ways where the CPU has the fast paths). It is read once per
process: Ray actors started by this process inherit it.

Triton kernels (model_shards/kernels/) run where `triton_kernels(device)` says: on CUDA with triton
installed, unless `GPTOSS_KERNELS=torch`; `GPTOSS_KERNELS=triton` runs them on the CPU too, which works
only under Triton's interpreter (TRITON_INTERPRET=1): how tests and `gptoss bench` count the CUDA
path's ops on a machine without a GPU.

`--dtype auto` (the default) computes in bf16 on CUDA and on CPUs with oneDNN's bf16 path; on other
CPUs in float32, which measured several times faster there than bf16 through the fallback (docs/cpu.md).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass

import torch

FALLBACK_ENV = "GPTOSS_CPU_FALLBACK"
KERNELS_ENV = "GPTOSS_KERNELS"  # auto (default), triton, torch
AUTO = "auto"


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # the CPU's model name, as the OS reports it
    isa: str  # the vector instructions torch's own kernels use here: DEFAULT, AVX2, AVX512, ...
    avx512: bool
    avx512_bf16: bool
    amx: bool
    onednn: bool  # oneDNN is part of this torch build
    onednn_bf16: bool  # oneDNN's bf16 kernels run on this CPU (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX)
    forced_fallback: bool  # GPTOSS_CPU_FALLBACK is set: every fast path is off

    @property
    def fast_bf16(self) -> bool:
        """bf16 linears may go through oneDNN's prepacked path (linear.can_prepack asks this)."""
        return self.onednn_bf16 and not self.forced_fallback

    def name(self) -> str:
        """The CPU and the vector units that matter here, e.g. "AMD EPYC (AVX2)"."""
        units = [name for name, has in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if has]
        return f"{self.model} ({', '.join([self.isa, *units])})"

    def summary(self) -> str:
        """One line for logs and the topology: the CPU and what the fast paths get on it."""
        path = "oneDNN bf16" if self.fast_bf16 else (
            f"fallback ({FALLBACK_ENV})" if self.forced_fallback else "fallback (no oneDNN bf16 on this CPU)")
        return f"{self.name()}: {path}"


def _flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private helpers of torch.cpu; absent in some builds
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _onednn_bf16() -> bool:
    """Asks torch itself (the check its bf16 matmuls use), so it holds for every oneDNN version."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def fallback_forced() -> bool:
    return os.environ.get(FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This process's CPU, detected once (`cpu_features.cache_clear()` re-reads the environment)."""
    return CpuFeatures(
        model=_cpu_model(), isa=torch.backends.cpu.get_cpu_capability(), avx512=_flag("_is_avx512_supported"),
        avx512_bf16=_flag("_is_avx512_bf16_supported"), amx=_flag("_is_amx_tile_supported"),
        onednn=torch.backends.mkldnn.is_available(), onednn_bf16=_onednn_bf16(), forced_fallback=fallback_forced())


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what a resolved --dtype may name


def triton_kernels(device: torch.device | str) -> bool:
    """Whether the Triton kernels compute on `device` (read at every call: tests switch it)."""
    asked = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if asked not in ("auto", "triton", "torch"):
        raise ValueError(f"{KERNELS_ENV}={asked!r}: choose auto, triton or torch")
    if asked == "torch" or importlib.util.find_spec("triton") is None:
        return False
    if asked == "triton":
        if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{KERNELS_ENV}=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return True
    return torch.device(device).type == "cuda"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # float32 | bfloat16
    reason: str  # one line: why this one


def choose_dtype(asked: str, device: str) -> DtypeChoice:
    """The dtype to compute in on `device` ("cpu", "cuda", "cuda:1"...) for `asked` (auto or a dtype)."""
    if asked != AUTO:
        return DtypeChoice(asked, "as asked")
    if device.startswith("cuda"):
        return DtypeChoice("bfloat16", "CUDA computes bf16 natively")
    cpu = cpu_features()
    if cpu.fast_bf16:
        return DtypeChoice("bfloat16", f"{cpu.name()} computes bf16 natively (oneDNN's bf16 path)")
    why = f"the CPU fallback is forced ({FALLBACK_ENV})" if cpu.forced_fallback else \
        f"{cpu.name()} has no oneDNN bf16 path"
    return DtypeChoice("float32", f"{why}, and float32 is faster than bf16 without it")


def main(argv: list[str] | None = None) -> int:
    """`python -m model_shards.capabilities [--has-fast-bf16]`: print what this CPU gives the fast
    paths; with --has-fast-bf16, exit 0 only where oneDNN's bf16 path runs (the Makefile's test pass
    with the fallback forced runs only there: elsewhere the first pass already took the fallback)."""
    argv = sys.argv[1:] if argv is None else argv
    cpu = cpu_features()
    if "--has-fast-bf16" in argv:
        return 0 if cpu.fast_bf16 else 1
    for name, value in vars(cpu).items():
        print(f"{name:16} {value}")
    print(f"{'dtype auto':16} {choose_dtype(AUTO, 'cpu').dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
