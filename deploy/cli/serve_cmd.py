"""`gptoss serve`: the OpenAI-compatible server on Ray Serve.

With no --model it serves a small random-weight model, made once into ~/.cache/gptoss, and says
so. Ray starts inside this process unless --ray-address names an existing cluster. SIGTERM or
Ctrl-C drains: in-flight requests get up to --drain-timeout seconds, new ones are refused.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

from cluster.engine.executor import error_line
from deploy.app import application
from deploy.config import APP_GROUPS, AppConfig, LaunchOptions, prepare
from deploy.cli.flags import read_options

log = logging.getLogger(__name__)
APP_NAME = "gptoss"


class ServeFailed(RuntimeError):
    """The application could not be deployed (the Serve log above says why)."""


def drain(handle: object, timeout_s: float) -> None:
    """New requests get 503 from now on; in-flight ones get up to `timeout_s` to finish."""
    left = handle.begin_drain.remote().result()  # type: ignore[attr-defined]
    print(f"gptoss serve: draining {left} request(s) (up to {timeout_s:.0f}s), then shutting down",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = handle.begin_drain.remote().result()  # type: ignore[attr-defined]


def check_port_free(host: str, port: int) -> None:
    """Fail now if another process listens on host:port. (Serve's HTTP server binds with SO_REUSEPORT, so
    a second server would start anyway and the kernel would split connections between the two.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeFailed(f"cannot serve on {host}:{port}: {exc.strerror or exc} (is another server running "
                              f"there? choose another --port)") from None


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's settings (read by Ray's processes when they start) for the ingress replica to answer
    HTTP on `port` itself. Through the proxy every streamed chunk costs one more process hop, which
    costs concurrent streams throughput (docs/performance.md). Serve takes replica ports from [MIN, MAX); there is one ingress
    replica, so a replica that Serve restarts must get the same port back at once (no quarantine).
    Our own drain (drain()) runs before Serve shuts down: Serve's extra draining period for load
    balancers is not needed here."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def free_port(host: str) -> int:
    """A port the kernel has free on host now (for the Serve proxy, which direct ingress still starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


_SESSION_CHILD = "GPTOSS_SERVE_SESSION_CHILD"  # set for the child run_in_own_session starts


def run(args: argparse.Namespace, argv: list[str]) -> int:
    config = AppConfig.from_options(read_options(args, APP_GROUPS))  # bad arguments fail here, before Ray starts
    launch = LaunchOptions(**read_options(args, [LaunchOptions]))
    check_port_free(launch.host, launch.port)
    if config.model.model is not None:
        with config.engine_args().resolved().model.source().open() as ckpt:  # a checkpoint that cannot be read fails here, in one line
            if config.engine.engine == "cluster":  # and so do expert shards the model cannot be split into
                config.cluster.expert_layout(ckpt.config.num_experts)
    if not launch.ray_address and os.environ.get(_SESSION_CHILD) != "1":
        return run_in_own_session(argv, config.server.drain_timeout_s)
    return serve_here(config, launch)


def run_in_own_session(argv: list[str], drain_timeout_s: float) -> int:
    """Run the server in a child process in a session of its own, and pass it SIGTERM and SIGINT.

    Ray, started in the server's process, puts its daemons and workers in that process's group.
    Supervisors (systemd, most init systems, a shell's job control) signal the whole group: without
    this, SIGTERM would reach Ray's processes before the server could drain. The child dies with
    this process (PR_SET_PDEATHSIG) if this one is killed outright.

    Whatever the child does, nothing it started outlives it: when it exits, what is left of its
    process group is killed; if it has not exited STOP_GRACE_S after the drain a signal asked for
    (or at a second signal), the whole group is killed."""
    child = subprocess.Popen([sys.executable, "-m", "deploy.cli.main", *argv], env={**os.environ, _SESSION_CHILD: "1"},
                             start_new_session=True, preexec_fn=_terminate_with_parent)
    asked: list[float] = []  # when each signal arrived

    def forward(number: int, _frame: object) -> None:
        asked.append(time.monotonic())
        if len(asked) == 1:
            child.send_signal(number)  # the server alone: it drains, then stops Ray itself
        else:
            _signal_group(child.pid, signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if asked and time.monotonic() - asked[0] > drain_timeout_s + STOP_GRACE_S:
                    print("gptoss serve: the server did not stop in time; killing it", file=sys.stderr, flush=True)
                    _signal_group(child.pid, signal.SIGKILL)
            except KeyboardInterrupt:  # SIGINT arrived between handler installs; it was forwarded or will be
                continue
    finally:
        _signal_group(child.pid, signal.SIGKILL)  # stragglers of the child's group (Ray's daemons)
    if code < 0:  # killed by a signal: one that was asked for (before the server could handle it) is a stop
        return 0 if asked else 128 - code
    return code


STOP_GRACE_S = 10.0  # beyond the drain: what stopping Serve and Ray may take before the group is killed


def _signal_group(pgid: int, number: int) -> None:
    try:
        os.killpg(pgid, number)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: Linux only; elsewhere nothing ties the child
    except (OSError, AttributeError):
        pass


def serve_here(config: AppConfig, launch: LaunchOptions) -> int:
    # The handler only records the signal: it runs on the main thread, inside whatever that thread
    # is blocked in, so it must not take locks (Event.set inside Event.wait deadlocks). Installed
    # before Ray starts, so that a signal at any moment of startup stops everything started so far.
    signals: list[int] = []

    def record_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, _frame: signals.append(number))

    record_signals()
    import ray
    from ray import serve

    # A missing vocabulary (no network and no --vocab-dir) fails here, before Ray starts.
    config = prepare(config, lambda note: print(f"gptoss serve: {note}", file=sys.stderr, flush=True))
    cluster = config.cluster
    actors = 1 + (cluster.attention_replicas + cluster.expert_shards + 1 if config.engine.engine == "cluster" else 0)
    started_ray = not launch.ray_address
    direct = started_ray and launch.direct_ingress
    if direct:
        os.environ.update(direct_ingress_env(launch.port))
    if signals:
        return _stopped(signals)
    running = False
    try:
        if started_ray:
            # Ray Serve's HTTP proxy runs our guard around its own request-id middleware (middleware.py);
            # the proxy is started by Ray from this process's environment.
            os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "deploy.server.middleware:proxy_middlewares")
            extra = {"_metrics_export_port": launch.metrics_export_port} if launch.metrics_export_port else {}
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(actors * cluster.cpus_per_actor) + 2),
                     include_dashboard=False, logging_level=logging.WARNING, **extra)
        else:
            ray.init(address=launch.ray_address, logging_level=logging.WARNING)
        record_signals()  # again: ray.init installs its own SIGTERM handler, which ends the process at once
        if signals:
            return _stopped(signals)
        proxy_port = free_port(launch.host) if direct else launch.port
        serve.start(http_options={"host": launch.host, "port": proxy_port})
        serve._run(application(config), name=APP_NAME, route_prefix="/", _blocking=False)
        if not wait_until_running(signals):
            return _stopped(signals)
        running = True
        print(f"gptoss serve: ready on http://{launch.host}:{launch.port}/v1 (model '{config.model_name()}', "
              f"engine {config.engine.engine}, dtype {config.model.dtype})", flush=True)
        while not signals:
            time.sleep(0.2)
        drain(serve.get_app_handle(APP_NAME), config.server.drain_timeout_s)
    finally:
        if started_ray:
            if running:  # Serve's own shutdown waits for replicas that are still starting: only when up
                serve.shutdown()
            ray.shutdown()  # stops every process Ray started, replicas and actors included
        elif ray.is_initialized():
            serve.delete(APP_NAME, _blocking=running)
    return 0


def wait_until_running(signals: list[int]) -> bool:
    """Until the application serves (True) or a signal arrives (False). Raises ServeFailed at the
    first failure of its replica's constructor: Serve would try it again, and again fail the same way
    (an unsupported CPU, no memory, a broken checkpoint, an actor that cannot start), each time
    after loading for a while, with nothing on the terminal."""
    from ray import serve

    while not signals:
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            if app.status == "RUNNING":
                return True
            failures = [d.message for d in app.deployments.values() if d.message.startswith(REPLICA_FAILED)]
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY") or failures:
                raise ServeFailed(f"the server did not start: {error_line((failures or [app.message])[0])}")
        time.sleep(0.25)
    return False


REPLICA_FAILED = "A replica failed to start"  # how Serve's deployment status begins after a constructor raised


def _stopped(signals: list[int]) -> int:
    print(f"gptoss serve: stopped by {signal.Signals(signals[0]).name} while starting", file=sys.stderr, flush=True)
    return 0
