"""Turning `--model` into a local checkpoint directory.

A path that exists is used as it is. Anything shaped like `org/name` is a Hugging Face model id,
fetched with `huggingface_hub.snapshot_download`: only the files the HF-root layout needs (not
`original/` or `metal/`, which would double the download), with its progress bars. With
HF_HUB_OFFLINE=1 a filled cache works without network.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from model_shards.checkpoint import CheckpointError

HF_ROOT_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "model-*.safetensors"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{model} is a file; pass the checkpoint directory")
        return path
    if not _REPO_ID.match(model):
        raise CheckpointError(f"{model!r} is neither an existing directory nor a Hugging Face model id (org/name)")
    try:
        local = snapshot_download(repo_id=model, revision=revision, cache_dir=cache_dir, allow_patterns=HF_ROOT_FILES)
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{model} is not in the local Hugging Face cache and the hub cannot be reached "
                              "(offline, or HF_HUB_OFFLINE=1)") from None
    except (HfHubHTTPError, HFValidationError) as exc:
        raise CheckpointError(f"could not fetch {model} from the Hugging Face hub: {exc}") from None
    return Path(local)
