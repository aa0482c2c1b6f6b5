"""One place decides what this CPU can do (model_shards/capabilities.py); every fast path asks it, the
fallback can be forced anywhere, and `--dtype auto` follows from it."""

from __future__ import annotations

import pytest
import torch

from model_shards import capabilities, linear
from model_shards.capabilities import AUTO, FALLBACK_ENV, choose_dtype, cpu_features
from model_shards.linear import Linear


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(FALLBACK_ENV, "1")
    cpu_features.cache_clear()
    yield cpu_features()
    monkeypatch.delenv(FALLBACK_ENV)
    cpu_features.cache_clear()


def test_the_bf16_capability_is_what_onednn_can_really_do() -> None:
    """Where the check says oneDNN's bf16 path runs, reordering a weight works; where it says no, the
    reorder raises (the crash every bf16 model hit on AVX2-only CPUs)."""
    weight = torch.randn(32, 64).bfloat16()
    if not torch.backends.mkldnn.is_available():
        assert not cpu_features().onednn_bf16
        return
    try:
        torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        works = True
    except RuntimeError:
        works = False
    assert cpu_features().onednn_bf16 == works


def test_a_bf16_linear_runs_on_every_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(torch.randn(48, 64, generator=gen).bfloat16(), torch.randn(48, generator=gen).bfloat16())
    layer.prepare()
    assert (layer.packed is not None) == cpu_features().fast_bf16
    x = torch.randn(5, 64, generator=gen).bfloat16()
    torch.testing.assert_close(layer(x).float(), torch.nn.functional.linear(x.float(), layer.weight.float(),
                                                                          layer.bias.float()), atol=0.06, rtol=0.02)


def test_the_fallback_can_be_forced(forced: capabilities.CpuFeatures) -> None:
    assert forced.forced_fallback and not forced.fast_bf16
    weight = torch.randn(16, 32).bfloat16()
    assert not linear.can_prepack(weight) and linear.prepack(weight) is None
    assert choose_dtype(AUTO, "cpu").dtype == "float32" and FALLBACK_ENV in choose_dtype(AUTO, "cpu").reason
    assert "fallback" in forced.summary()


def test_dtype_auto() -> None:
    assert choose_dtype(AUTO, "cuda").dtype == choose_dtype(AUTO, "cuda:1").dtype == "bfloat16"
    assert choose_dtype(AUTO, "cpu").dtype == ("bfloat16" if cpu_features().fast_bf16 else "float32")
    assert choose_dtype("float32", "cuda") == capabilities.DtypeChoice("float32", "as asked")
    assert choose_dtype("bfloat16", "cpu").dtype == "bfloat16"


def test_the_module_reports_and_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert capabilities.main([]) == 0
    out = capsys.readouterr().out
    assert "onednn_bf16" in out and "dtype auto" in out
    assert capabilities.main(["--has-fast-bf16"]) == (0 if cpu_features().fast_bf16 else 1)
