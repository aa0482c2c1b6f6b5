"""The raw transport hop, measured between the engine's process and one actor, on the same kind
of channel the cluster uses: bare bytes (the channel's floor) and framed messages (what the data
plane's send/recv adds: pickling the header, allocating the received tensor)."""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
import torch

from cluster.channels import remove_rings
from cluster.messages import MoeRequest
from cluster.roles import ENGINE
from cluster.transport import Endpoint, PlaneSpec, plan_channels

ECHO = "echo"


class EchoPeer:
    """Sends back whatever the engine sends it."""

    def __init__(self) -> None:
        self.endpoint: Endpoint | None = None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def listen(self, plane: PlaneSpec) -> dict[str, Any]:
        self.endpoint = Endpoint(ECHO, host=ray.util.get_node_ip_address())
        return self.endpoint.listen(plane)

    def connect(self, plane: PlaneSpec, addresses: dict[str, Any]) -> None:
        assert self.endpoint is not None
        self.endpoint.connect(plane, addresses)

    def echo_bytes(self, nbytes: int, count: int) -> None:
        assert self.endpoint is not None
        buf = memoryview(bytearray(nbytes))
        for _ in range(count):
            self.endpoint.recv_bytes_into(ENGINE, buf)
            self.endpoint.send_bytes(ENGINE, buf)

    def echo_messages(self, count: int) -> None:
        assert self.endpoint is not None
        for _ in range(count):
            self.endpoint.send(ENGINE, self.endpoint.recv(ENGINE))

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()


@dataclass
class HopRow:
    rows: int  # payload: rows x hidden fp32
    payload_bytes: int
    raw_us: float  # one-way, bare bytes (median round trip / 2)
    framed_us: float  # one-way, a MoeRequest through send/recv


def measure_hops(rows: list[int], hidden: int, transport: str = "auto", count: int = 200) -> list[HopRow]:
    from cluster.actors import RemoteEcho

    peer = RemoteEcho.options(num_cpus=0).remote()
    nodes = {ENGINE: ray.get_runtime_context().get_node_id(), ECHO: ray.get(peer.node.remote())}
    prefix = f"gptoss-hop-{uuid.uuid4().hex[:8]}-"
    plane = plan_channels(prefix, [(ENGINE, ECHO), (ECHO, ENGINE)], nodes, 8 << 20, force_tcp=transport == "tcp")
    endpoint = Endpoint(ENGINE, host=ray.util.get_node_ip_address())
    try:
        addresses = {**endpoint.listen(plane), **ray.get(peer.listen.remote(plane))}
        connecting = peer.connect.remote(plane, addresses)
        endpoint.connect(plane, addresses)
        ray.get(connecting)
        out = []
        for n in rows:
            payload = torch.randn(n, hidden)
            view = memoryview(payload.numpy()).cast("B")
            back = memoryview(bytearray(len(view)))
            running = peer.echo_bytes.remote(len(view), count)
            raw = []
            for _ in range(count):
                start = time.perf_counter()
                endpoint.send_bytes(ECHO, view)
                endpoint.recv_bytes_into(ECHO, back)
                raw.append(time.perf_counter() - start)
            ray.get(running)
            running = peer.echo_messages.remote(count)
            framed = []
            for _ in range(count):
                start = time.perf_counter()
                endpoint.send(ECHO, MoeRequest(0, 0, payload))
                endpoint.recv(ECHO)
                framed.append(time.perf_counter() - start)
            ray.get(running)
            out.append(HopRow(n, len(view), statistics.median(raw) / 2 * 1e6, statistics.median(framed) / 2 * 1e6))
        return out
    finally:
        endpoint.close()
        ray.get(peer.close.remote())
        ray.kill(peer)
        remove_rings(prefix)
