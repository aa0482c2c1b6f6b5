from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_shards.checkpoint import Checkpoint, CheckpointError
from model_shards.hub import resolve_model


def test_local_directory_is_used_as_is(tiny_hf: Path) -> None:
    assert resolve_model(str(tiny_hf)) == tiny_hf


def test_offline_hub_cache(tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-filled Hugging Face cache resolves `org/name` without network (HF_HUB_OFFLINE=1)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openai--gpt-oss-tiny"
    shutil.copytree(tiny_hf, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = resolve_model("openai/gpt-oss-tiny", cache_dir=tmp_path / "hub")
    assert path == repo / "snapshots" / revision
    with Checkpoint(path) as ckpt:
        assert ckpt.config.num_experts == 16
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_model("openai/not-there", cache_dir=tmp_path / "hub")


def test_neither_path_nor_id(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither an existing directory nor"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model(str(tmp_path / "file.bin"))
