"""The raw transport hop, measured between the engine's process and actors, on the same kind of
channel the cluster uses: bare bytes (the channel's floor), framed messages (what the data plane's
send/recv adds: the header, the received tensor), and the bare three-hop path a layer takes
(engine -> relay -> echo -> engine, shaped like replica -> router -> shard -> replica, with no
compute anywhere): the floor under one layer's data plane."""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
import ray
import torch

from cluster.dataplane.channels import remove_rings
from cluster.dataplane.messages import MoeRequest
from cluster.dataplane.names import ENGINE
from cluster.dataplane.transport import Address, Endpoint, PlaneSpec, plan_channels

ECHO = "echo"
RELAY = "relay"


class EchoPeer:
    """Sends back whatever it receives, or passes it on (`forward_bytes`)."""

    def __init__(self, name: str = ECHO) -> None:
        self.name = name
        self.endpoint: Endpoint | None = None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def listen(self, plane: PlaneSpec) -> dict[str, Address]:
        self.endpoint = Endpoint(self.name, host=ray.util.get_node_ip_address())
        return self.endpoint.listen(plane)

    def connect(self, plane: PlaneSpec, addresses: dict[str, Address]) -> None:
        assert self.endpoint is not None
        self.endpoint.connect(plane, addresses)

    def echo_bytes(self, nbytes: int, count: int, peer: str = ENGINE) -> None:
        assert self.endpoint is not None
        buf = memoryview(bytearray(nbytes))
        for _ in range(count):
            self.endpoint.recv_bytes_into(peer, buf)
            self.endpoint.send_bytes(peer, buf)

    def forward_bytes(self, nbytes: int, count: int, src: str, dst: str) -> None:
        """Receive from `src`, send on to `dst`: one hop of the layer path."""
        assert self.endpoint is not None
        buf = memoryview(bytearray(nbytes))
        for _ in range(count):
            self.endpoint.recv_bytes_into(src, buf)
            self.endpoint.send_bytes(dst, buf)

    def echo_messages(self, count: int) -> None:
        assert self.endpoint is not None
        for _ in range(count):
            self.endpoint.send(ENGINE, self.endpoint.recv(ENGINE))

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()


RemoteEcho = ray.remote(EchoPeer)


@dataclass
class HopRow:
    rows: int  # payload: rows x hidden fp32
    payload_bytes: int
    raw_us: float  # one-way, bare bytes (median round trip / 2)
    framed_us: float  # one-way, a MoeRequest through send/recv
    layer_path_us: float  # bare bytes through the three hops of a layer, end to end


def _median_us(samples: list[float], per: int = 1) -> float:
    return statistics.median(samples) / per * 1e6


def measure_hops(rows: list[int], hidden: int, transport: str = "auto", count: int = 200,
                 rounds: int = 3) -> list[HopRow]:
    peers = {name: RemoteEcho.options(num_cpus=0).remote(name) for name in (ECHO, RELAY)}
    nodes = {ENGINE: ray.get_runtime_context().get_node_id(),
             **{name: ray.get(p.node.remote()) for name, p in peers.items()}}
    prefix = f"gptoss-hop-{uuid.uuid4().hex[:8]}-"
    pairs = [(ENGINE, ECHO), (ECHO, ENGINE), (ENGINE, RELAY), (RELAY, ECHO)]
    # bytes travel on rings and TCP: a gloo or NCCL plane is measured by its own benchmark rows
    plane = plan_channels(prefix, pairs, nodes, 8 << 20, transport="tcp" if transport == "tcp" else "auto")
    endpoint = Endpoint(ENGINE, host=ray.util.get_node_ip_address())
    echo, relay = peers[ECHO], peers[RELAY]
    try:
        addresses = endpoint.listen(plane)
        for part in ray.get([p.listen.remote(plane) for p in peers.values()]):
            addresses.update(part)
        connecting = [p.connect.remote(plane, addresses) for p in peers.values()]
        endpoint.connect(plane, addresses)
        ray.get(connecting)
        out = []
        for n in rows:
            payload = torch.randn(n, hidden)
            view = memoryview(payload.numpy()).cast("B")
            back = memoryview(bytearray(len(view)))

            def timed(target: str, source: str) -> list[float]:
                samples = []
                for _ in range(count):
                    start = time.perf_counter()
                    endpoint.send_bytes(target, view)
                    endpoint.recv_bytes_into(source, back)
                    samples.append(time.perf_counter() - start)
                return samples

            # each quantity is the lowest median of `rounds` interleaved rounds: a floor, which a
            # burst of other work on a small machine would otherwise lift for a whole round
            raw, framed, path = [], [], []
            for _ in range(rounds):
                running = echo.echo_bytes.remote(len(view), count)
                raw.append(_median_us(timed(ECHO, ECHO), 2))
                ray.get(running)
                running = [relay.forward_bytes.remote(len(view), count, ENGINE, ECHO),
                           echo.forward_bytes.remote(len(view), count, RELAY, ENGINE)]
                path.append(_median_us(timed(RELAY, ECHO)))
                ray.get(running)
                running = echo.echo_messages.remote(count)
                samples = []
                for _ in range(count):
                    start = time.perf_counter()
                    endpoint.send(ECHO, MoeRequest(0, 0, 0, payload))
                    endpoint.recv(ECHO)
                    samples.append(time.perf_counter() - start)
                framed.append(_median_us(samples, 2))
                ray.get(running)
            out.append(HopRow(n, len(view), min(raw), min(framed), min(path)))
        return out
    finally:
        endpoint.close()
        ray.get([p.close.remote() for p in peers.values()])
        for p in peers.values():
            ray.kill(p)
        remove_rings(prefix)
