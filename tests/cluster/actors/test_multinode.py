"""Many nodes: a two-node Ray cluster on one machine (`ray.cluster_utils.Cluster`), the actors spread
over both, gives the local engine's tokens. Channels between nodes are TCP, within a node shared memory.

The pytest process already belongs to the session's Ray (conftest's `ray_session`), and one process
can join one Ray only, so the two-node part runs in a child process: this module itself, run as
`python -m tests.cluster.actors.test_multinode CHECKPOINT` (see `main`). It prints one JSON line with the
tokens, the nodes and the channels; the test compares that with a LocalExecutor run of its own.

Isolation: the child gets a private RAY_TMPDIR, so the cluster's sessions, sockets and its
`ray_current_cluster` file (which a plain `ray.init()` elsewhere would connect to) stay out of
/tmp/ray, and a marker in its environment that every process it starts inherits (GCS, raylets,
agents, workers): whatever carries the marker once the child is done, normally or by the timeout,
is killed by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from cluster.dataplane.names import ENGINE, member_name
from model_shards.sampling import SamplingParams

pytestmark = pytest.mark.ray  # a second Ray node in a child process

REPO = Path(__file__).resolve().parents[3]
KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)
LENGTHS = (3, 17, 40, 130, 9)  # 130 is longer than the tiny model's sliding window
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
# 2 replicas + router + 2 shards = 5 actors of 1 CPU on two nodes of 3 logical CPUs: neither node can
# hold them all, so they span both whatever SPREAD does; and the node with 3 holds a connected pair
# (the replicas, the router and the shards have no 3 members without a channel between two of them).
NODE_CPUS = 3
CONFIG = ClusterConfig(attention_replicas=2, expert_shards=2, micro_batches=2, cpus_per_actor=1.0,
                       placement_strategy="SPREAD", step_timeout_s=30, recovery_timeout_s=60, max_restarts=0)
CHILD_TIMEOUT_S = 180  # normally ~15s on 2 cores; a hung child fails the test instead of the suite
MARKER = "GPTOSS_MULTINODE_TEST"
RESULT = "MULTINODE-RESULT "


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in LENGTHS]


# -- the child: a two-node cluster ------------------------------------------------------------------

def main(checkpoint: str) -> None:
    import logging

    import ray
    from ray.cluster_utils import Cluster

    import cluster.actors.cluster_executor as ce
    import cluster.dataplane.transport as transport

    planned = []  # the plane's channels as the executor planned them: the real function, recorded
    real_plan = transport.plan_channels

    def recording_plan(*args, **kwargs):
        spec = real_plan(*args, **kwargs)
        planned.append(spec)
        return spec

    for module in (transport, ce):  # wherever the executor looks it up
        if hasattr(module, "plan_channels"):
            module.plan_channels = recording_plan

    # dashboard_agent_listen_port=0: the default fixed port (52365) is held by any other Ray on the machine
    # (the pytest session's), and the head's agent would retry it for seconds, then fail to bind; the
    # worker nodes that cluster_utils adds pick a free port already.
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": NODE_CPUS, "include_dashboard": False, "dashboard_agent_listen_port": 0})
    engine = None
    try:
        nodes.add_node(num_cpus=NODE_CPUS)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False, logging_level=logging.WARNING)
        started = time.monotonic()
        executor = ce.ClusterExecutor(ModelSource(checkpoint, "float32"), CONFIG, KV)
        engine = Engine(executor)
        ready = time.monotonic()
        outs = engine.generate(prompts(), GREEDY, timeout=120)
        done = time.monotonic()
        assert planned, "the executor no longer calls cluster.dataplane.transport.plan_channels; update this test"
        spec = planned[-1]
        # The engine's own endpoint: the streams it actually opened (a private table, read for the test).
        engine_streams = {peer: type(s).__name__ for peer, s in executor.endpoint._out.items()}
        result = {
            "tokens": [o.token_ids for o in outs],
            "logprobs": [o.logprobs for o in outs],
            "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}),
            "head_node": nodes.head_node.node_id,
            "engine_node": ray.get_runtime_context().get_node_id(),
            "actors": [{"role": a.role, "index": a.index, "pid": a.pid, "node": a.node}
                       for a in executor.topology()],
            "channels": [{"src": c.src, "dst": c.dst, "kind": c.kind} for c in spec.channels],
            "engine_streams": engine_streams,
            "seconds": {"actors_ready": round(ready - started, 2), "generate": round(done - ready, 2)},
        }
        print(RESULT + json.dumps(result), flush=True)
    finally:
        if engine is not None:
            engine.shutdown()
        ray.shutdown()
        nodes.shutdown()


# -- the test ---------------------------------------------------------------------------------------

def _marked_pids(token: str) -> list[int]:
    """Processes whose environment carries this run's marker (only ones this test started)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry))
    return pids


def _kill_leftovers(token: str, grace_s: float = 10.0) -> list[int]:
    """Give Ray's own shutdown `grace_s` to finish, then SIGKILL what is left; returns those pids."""
    deadline = time.monotonic() + grace_s
    while (left := _marked_pids(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def run_two_node_cluster(checkpoint: Path) -> dict:
    token = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="gptoss-mn-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({MARKER: token, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"})
    child = subprocess.Popen([sys.executable, "-m", "tests.cluster.actors.test_multinode", str(checkpoint)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        try:
            output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            pytest.fail(f"the two-node run took over {CHILD_TIMEOUT_S}s; its output:\n{output[-6000:]}")
    finally:
        if child.poll() is None:  # interrupted (Ctrl-C) while waiting
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        _kill_leftovers(token)
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    assert child.returncode == 0 and lines, f"the two-node run failed ({child.returncode}):\n{output[-6000:]}"
    return json.loads(lines[-1][len(RESULT):])


def test_two_nodes_tcp_between_shm_within_match_the_local_engine(tiny_hf: Path) -> None:
    engine = Engine(LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV))
    try:
        reference = engine.generate(prompts(), GREEDY)
    finally:
        engine.shutdown()

    result = run_two_node_cluster(tiny_hf)

    # the actors span both nodes of the cluster (distinct node ids, though one machine and one IP)
    assert len(result["cluster_nodes"]) == 2
    actor_nodes = {a["node"]: [] for a in result["actors"]}
    for a in result["actors"]:
        actor_nodes[a["node"]].append(a["role"])
    assert set(actor_nodes) == set(result["cluster_nodes"]), actor_nodes
    assert result["engine_node"] in result["cluster_nodes"]
    assert sorted(a["role"] for a in result["actors"]) == \
        ["attention_replica"] * 2 + ["expert_shard"] * 2 + ["router"]
    assert len({a["pid"] for a in result["actors"]}) == 5

    # TCP exactly between nodes, shared memory within one; both kinds are in use
    node_of = {member_name(a["role"], a["index"]): a["node"] for a in result["actors"]}
    node_of[ENGINE] = result["engine_node"]
    for c in result["channels"]:
        assert c["kind"] == ("shm" if node_of[c["src"]] == node_of[c["dst"]] else "tcp"), c
    kinds = [c["kind"] for c in result["channels"]]
    assert "tcp" in kinds and "shm" in kinds, (actor_nodes, result["channels"])
    # the engine's own outbound streams are what was planned: TcpStream across, ShmRing within
    engine_kinds = {c["dst"]: c["kind"] for c in result["channels"] if c["src"] == ENGINE}
    assert engine_kinds and {peer: result["engine_streams"][peer] for peer in engine_kinds} == \
        {peer: {"tcp": "TcpStream", "shm": "ShmRing"}[kind] for peer, kind in engine_kinds.items()}

    # the local engine's tokens, log-probs within 1e-4
    assert len(result["tokens"]) == len(reference)
    for ref, tokens, logprobs in zip(reference, result["tokens"], result["logprobs"]):
        assert tokens == ref.token_ids
        assert max(abs(a - b) for a, b in zip(logprobs, ref.logprobs)) < 1e-4


if __name__ == "__main__":
    main(sys.argv[1])
