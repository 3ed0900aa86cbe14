"""The systems the harness compares, and why one cannot run here.

Each system is a module of this package with `run(spec)` (a function or a coroutine
function) plus the options it is called with. `scale` sizes its message count relative
to `--messages`. The scales were chosen so that each throughput run takes roughly 5-15 s
on a quiet 2-core machine (an estimate from the runs in docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass, field
from typing import Any

SERVER_PORTS = {"redis": 6379, "rabbitmq": 5672, "nats": 4222}
# Minimum message count of every system, however small its scale.
MIN_MESSAGES = 100


@dataclass(frozen=True)
class System:
    """One row of the table: a module of this package run with fixed options."""

    name: str
    module: str
    scale: float
    options: dict[str, Any] = field(default_factory=dict)
    # Python modules it imports; a missing one skips the system.
    modules: tuple[str, ...] = ()
    server: str | None = None
    description: str = ""

    def messages(self, base: int) -> int:
        """Return this system's message count when the fastest system runs `base`."""
        return max(min(base, MIN_MESSAGES), round(base * self.scale))

    def missing(self) -> str | None:
        """Return why the system cannot run here, or None when it can."""
        for module in self.modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"module {module} is not installed or does not exist yet"
        if self.server is not None:
            port = SERVER_PORTS[self.server]
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    return f"no {self.server} server accepts connections on 127.0.0.1:{port}"
        return None


def _flowrun(backend: str, scale: float, client: str | None = None) -> System:
    modules = ("flowrun.brokers." + backend,) + ((client,) if client else ())
    return System(
        name=f"flowrun-{backend}",
        module="flowrun_flow",
        scale=scale,
        options={"backend": backend},
        modules=modules,
        server=backend if backend in SERVER_PORTS else None,
        description=f"flowrun run_flow on the {backend} backend, default subscriber settings",
    )


SYSTEMS: list[System] = [
    System("asyncio-orjson", "asyncio_queues", 1.0, {"codec": "orjson"},
           description="bounded asyncio.Queue per subscriber, orjson"),
    System("asyncio-json", "asyncio_queues", 0.2, {"codec": "json"},
           description="bounded asyncio.Queue per subscriber, stdlib json"),
    System("sqlite3-batched", "sqlite_raw", 0.4, {"mode": "batched", "batch": 500},
           description="raw sqlite3 WAL, 500 messages or acks per transaction"),
    System("sqlite3-per-message", "sqlite_raw", 0.05, {"mode": "per-message"},
           description="raw sqlite3 WAL, one transaction per message and per ack"),
    System("persist-queue", "persistqueue_ack", 0.001, {}, modules=("persistqueue",),
           description="persist-queue SQLiteAckQueue, defaults (synchronous=FULL)"),
    System("persist-queue-normal", "persistqueue_ack", 0.01, {"synchronous": "normal"}, modules=("persistqueue",),
           description="persist-queue SQLiteAckQueue, PRAGMA synchronous=NORMAL"),
    System("redis-py-batched", "redis_streams", 0.3, {"mode": "batched", "batch": 100},
           modules=("redis",), server="redis",
           description="redis-py Streams, pipelined XADD, XREADGROUP COUNT 100, XACK"),
    System("redis-py-single", "redis_streams", 0.01, {"mode": "single"}, modules=("redis",), server="redis",
           description="redis-py Streams, one command at a time"),
    System("faststream-redis", "faststream_redis", 0.006, {}, modules=("faststream", "redis"), server="redis",
           description="FastStream publisher and stream subscribers in consumer groups"),
    System("nats-py-batched", "nats_jetstream", 0.05, {"mode": "batched", "batch": 100},
           modules=("nats",), server="nats",
           description="nats-py JetStream, publish_async, pull fetch 100, ack"),
    System("nats-py-single", "nats_jetstream", 0.01, {"mode": "single"}, modules=("nats",), server="nats",
           description="nats-py JetStream, awaited publish, fetch 1, ack"),
    System("aio-pika", "rabbitmq_aiopika", 0.006, {"batch": 100, "prefetch": 100},
           modules=("aio_pika",), server="rabbitmq",
           description="aio-pika, confirms every 100 publishes, fanout to 2 quorum queues, prefetch 100"),
    _flowrun("memory", 0.3),
    _flowrun("sqlite", 0.1),
    _flowrun("redis", 0.1, "redis"),
    _flowrun("rabbitmq", 0.013, "aio_pika"),
    _flowrun("nats", 0.035, "nats"),
]


def find(name: str) -> System:
    for system in SYSTEMS:
        if system.name == name:
            return system
    raise KeyError(name)
