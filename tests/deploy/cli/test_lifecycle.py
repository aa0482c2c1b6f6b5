"""A real `gptoss serve` process as operators and supervisors treat it: a busy port, a missing model, an
impossible expert layout, SIGTERM to the whole process group, the API key from the environment, client
disconnects, request ids through the HTTP server (the Serve replica itself, or Ray Serve's proxy)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import free_port

pytestmark = pytest.mark.server  # real `gptoss serve` processes

BODY = {"model": "tiny", "prompt": [11, 22, 33], "max_tokens": 80, "ignore_eos": True, "temperature": 0}


def gptoss_exe() -> str:
    return shutil.which("gptoss") or str(Path(sys.executable).parent / "gptoss")


def test_a_second_server_on_a_busy_port_exits_with_a_reason(vocab: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        run = subprocess.run([gptoss_exe(), "--vocab-dir", str(vocab), "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and time.monotonic() - started < 60
    assert f"cannot serve on 127.0.0.1:{port}" in run.stderr and "in use" in run.stderr
    assert "Traceback" not in run.stderr and "ready on" not in run.stdout


def test_a_missing_model_is_one_line_at_once(vocab: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    run = subprocess.run([gptoss_exe(), "--vocab-dir", str(vocab), "serve", "--model", str(tmp_path / "nope"),
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and time.monotonic() - started < 20
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "neither an existing directory nor" in lines[0], run.stderr


@pytest.mark.parametrize("flags, says", [(["--expert-shards", "17"], "between 1 and the number of experts"),
                                         (["--redundant-experts", "2"], "at least 2 expert shards")])
def test_an_impossible_expert_layout_is_one_line_before_ray_starts(tiny_hf: Path, vocab: Path, flags: list[str],
                                                                   says: str) -> None:
    started = time.monotonic()
    run = subprocess.run([gptoss_exe(), "--vocab-dir", str(vocab), "serve", "--model", str(tiny_hf), "--engine",
                          "cluster", *flags, "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and time.monotonic() - started < 20
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], run.stderr


def test_sigterm_to_the_process_group_drains(tiny_hf: Path, vocab: Path, tmp_path: Path) -> None:
    port, key = free_port(), "sk-from-the-environment"
    log = open(tmp_path / "serve.log", "w+")
    # a session of its own, as a supervisor starts it: the group signal below must not reach pytest
    proc = subprocess.Popen([gptoss_exe(), "--vocab-dir", str(vocab), "serve", "--port", str(port), "--model",
                             str(tiny_hf), "--served-model-name", "tiny", "--engine", "local", "--dtype", "float32",
                             "--max-model-len", "2048", "--kv-cache-tokens", "4096",
                             "--drain-timeout", "110"],  # a loaded CI machine may take over 30 s for 1000 tokens
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                            env={**os.environ, "GPTOSS_API_KEY": key})
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while "ready on" not in proc.stdout.readline():
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 2}, headers={**auth, "X-Request-Id": "r-1"},
                        timeout=60)
        assert ok.status_code == 200 and ok.headers.get_list("x-request-id") == ["r-1"]  # once, through the HTTP server
        odd = httpx.get(f"{url}/v1/models", headers={**auth, "X-Request-Id": "<" * 300}, timeout=30)
        assert odd.status_code == 200 and len(odd.headers.get_list("x-request-id")) == 1
        assert "<" not in odd.headers["x-request-id"]
        with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}, headers=auth,
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # then the client leaves
        result: dict[str, object] = {}
        started = threading.Event()

        def long_request() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "max_tokens": 1000, "stream": True},
                              headers=auth, timeout=120) as response:
                chunks = []
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(line)
                        started.set()
                result.update(status=response.status_code, chunks=chunks)

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(60)
        os.killpg(proc.pid, signal.SIGTERM)  # what systemd and most supervisors send
        time.sleep(0.5)
        assert worker.is_alive()  # (1000 tokens take seconds)
        refused = httpx.post(f"{url}/v1/completions", json=BODY, headers=auth, timeout=30)
        assert refused.status_code == 503  # draining: new requests are refused ...
        worker.join(120)
        assert result["status"] == 200 and '"finish_reason":"length"' in str(result["chunks"][-1])  # ... in-flight finish
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
    assert "Traceback" not in text and "TaskCancelledError" not in text, text[-3000:]


def test_without_direct_ingress_the_proxy_answers_on_the_port(vocab: Path) -> None:
    """--no-direct-ingress: Ray Serve's proxy holds --port and passes requests (and the request id, once)
    to the replica, as before direct ingress."""
    from tests.deploy.conftest import gptoss_serve

    with gptoss_serve(["--no-direct-ingress", "--served-model-name", "tiny"], vocab) as (url, _proc):
        ok = httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 2}, headers={"X-Request-Id": "r-2"},
                        timeout=60)
        assert ok.status_code == 200 and ok.headers.get_list("x-request-id") == ["r-2"]
        assert ok.json()["usage"]["completion_tokens"] == 2


def broken_router_checkpoint(source: Path, out: Path) -> Path:
    """A copy of `source` whose layer-0 router weight lost a column: its config and index read fine (the
    command line's checks pass), and the router actor's constructor raises while loading."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        name = next((k for k in tensors if k.endswith("layers.0.mlp.router.weight")), None)
        if name is not None:
            tensors[name] = tensors[name][:, :-1].contiguous()
            save_file(tensors, path, metadata={"format": "pt"})
            return out
    raise AssertionError("no router weight found")


def test_an_actor_that_cannot_start_is_one_line_and_a_non_zero_exit(tiny_hf: Path, vocab: Path,
                                                                    tmp_path: Path) -> None:
    """Ray would not restart an actor whose constructor raised, and Serve would try the replica that
    waits for it again: the command says why in one line and exits instead."""
    model = broken_router_checkpoint(tiny_hf, tmp_path / "broken")
    started = time.monotonic()
    run = subprocess.run([gptoss_exe(), "--vocab-dir", str(vocab), "serve", "--model", str(model), "--engine",
                          "cluster", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    last = [line for line in run.stderr.splitlines() if line.strip()][-1]
    assert run.returncode == 2 and took < 60, (run.returncode, took, run.stderr[-3000:])
    assert last.startswith("gptoss serve: error: the server did not start: ") and "router could not start" in last
    assert "CheckpointError" in last and "router.weight has shape" in last, last
    assert "ready on" not in run.stdout


def test_sigterm_while_the_replica_starts_leaves_no_process(vocab: Path, tmp_path: Path) -> None:
    """SIGTERM while the Serve replica is still building the cluster: the server and every process it
    started (Ray's daemons, the replica, the actors) are gone within 15 s."""
    import psutil

    proc = subprocess.Popen([gptoss_exe(), "--vocab-dir", str(vocab), "serve", "--engine", "cluster",
                             "--expert-shards", "2", "--port", str(free_port())],
                            stdout=open(tmp_path / "out", "w"), stderr=open(tmp_path / "err", "w"), start_new_session=True)
    root = psutil.Process(proc.pid)
    tree: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180
        while not any("ServeReplica" in _cmdline(p) for p in tree.values()):
            assert proc.poll() is None and time.monotonic() < deadline, "the Serve replica never started"
            tree.update({p.pid: p for p in root.children(recursive=True)})
            time.sleep(0.05)
        tree.update({p.pid: p for p in root.children(recursive=True)})
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while time.monotonic() - signalled < 15:
            alive = [p for p in tree.values() if _alive(p)]
            if proc.poll() is not None and not alive:
                break
            time.sleep(0.1)
        alive = [_cmdline(p)[:120] for p in tree.values() if _alive(p)]
        assert proc.poll() is not None and not alive, alive
        assert proc.returncode == 0
        assert "stopped by SIGTERM while starting" in (tmp_path / "err").read_text()
        assert "ready on" not in (tmp_path / "out").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree.values():
            if _alive(p):
                p.kill()


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except Exception:  # gone meanwhile
        return ""


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
