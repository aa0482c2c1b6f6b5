"""Shared test setup.

- The tokenizer vocabulary comes from ../shared/tokenizer when it is there (machines here have no
  network). Tests that need it use the `vocab` fixture: it skips when the folder is absent, and
  fails instead under CI=true (CI always has it).
- Random checkpoints are written once per session.
- Without CUDA, Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is
  defined: set here, before any test module imports one).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model_shards.random_checkpoint import make_tiny  # noqa: E402
from model_shards.tokenizer import use_vocab_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOCAB_DIR = SHARED / "tokenizer"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Fixtures that start a `gptoss serve` process (tests/deploy, tests/k8s): their tests are in the server tier.
SERVER_FIXTURES = {"server", "small_server", "metrics_server", "prometheus"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test tiers: a test that uses the session's Ray is marked `ray`, one that uses a server process
    `server` (modules that start either otherwise say so with `pytestmark`); `make test-unit` runs the
    rest but the ones marked `slow`. GPU tests are skipped without CUDA, but for the Triton kernels' (also
marked `kernels`), which run in the interpreter there."""
    import torch

    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "ray_session" in names:
            item.add_marker(pytest.mark.ray)
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and "kernels" not in item.keywords:  # kernels run in the interpreter
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The unit tier must not have started Ray: a test that does so unmarked belongs in the `ray` tier."""
    ray = sys.modules.get("ray")
    if "not ray" in (session.config.option.markexpr or "") and ray is not None and ray.is_initialized():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nRay was started by a test outside the `ray` tier: mark it (pytest.mark.ray)", file=sys.stderr)


def pytest_configure(config: pytest.Config) -> None:
    if (VOCAB_DIR / "o200k_base.tiktoken").exists():
        # Environment variables, so that `gptoss` subprocesses started by tests find it too.
        use_vocab_dir(VOCAB_DIR, cache_dir=tempfile.mkdtemp(prefix="gptoss-tiktoken-"))


def need_shared(path: Path, what: str) -> Path:
    if path.exists():
        return path
    message = f"{what} needs {path.name} from ../shared, which is absent"
    if IN_CI:
        pytest.fail(message + " (CI=true: it must be there)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def vocab() -> Path:
    return need_shared(VOCAB_DIR / "o200k_base.tiktoken", "this test").parent


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, HF layout, MXFP4 experts (what `gptoss make-tiny` writes by default)."""
    return make_tiny(tmp_path_factory.mktemp("tiny-hf"), "tiny", "hf", True, seed=0)


RAY_METRICS_PORT: list[int] = []  # where the session's Ray exports metrics (tests read it)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray for the whole session (starting one costs seconds); clusters come and go inside it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            RAY_METRICS_PORT.append(s.getsockname()[1])
        # More logical CPUs than cores: actors mostly wait on each other.
        ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=RAY_METRICS_PORT[0])
    yield ray
