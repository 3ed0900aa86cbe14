"""flowrun itself: a flow written to a temporary folder and run in this process.

The flow has one producer plugin (an async generator yielding the payloads) and
`subscribers` subscriber plugins on the same topic. Each handler reads `message.payload`
and returns, so `ack: auto` acks it. The run is timed from the first publish to the
return of `run_flow(..., until_drained=True)`, which includes the final acks and the
broker's close.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from benchmarks.workload import MAX_PENDING, TOPIC, RunResult, RunSpec

SERVER_URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
}
PLUGIN_MODULE = "bench_plugins"
PRODUCER = "orders"

# The plugin module a user would write. `benchmarks.workload` provides the payloads and
# the recorder the harness reads; in `flowrun up` worker processes nothing reads it.
PLUGIN_SOURCE = '''\
"""Benchmark plugins: a producer of OrderPlaced payloads and a handler that decodes them."""

from benchmarks import workload


async def produce_orders(context):
    payloads = workload.Payloads(int(context.options["payload_bytes"]))
    recorder = workload.current_recorder()
    async for seq in workload.paced(int(context.options["messages"]), float(context.options["rate"])):
        if recorder is not None:
            recorder.published()
        yield payloads.make(seq)


async def handle_order(message, context):
    payload = message.payload
    recorder = workload.current_recorder()
    if recorder is not None:
        recorder.handle(payload)
'''


def subscriber_names(count: int) -> list[str]:
    return [f"sub-{index + 1}" for index in range(count)]


def write_flow(folder: Path, spec: RunSpec, backend: str, flow_name: str | None = None,
               subscriber_settings: dict[str, Any] | None = None, max_pending: int = MAX_PENDING) -> Path:
    """Write the flow file and its plugin module into `folder`; return the flow's path."""
    (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    broker: dict[str, Any] = {"backend": backend}
    if backend in SERVER_URLS:
        broker["url"] = SERVER_URLS[backend]
    if backend == "sqlite":
        broker["path"] = "bench.db"
    subscriber = {"topic": TOPIC, "plugin": f"{PLUGIN_MODULE}:handle_order", **(subscriber_settings or {})}
    flow = {
        "name": flow_name or f"bench{uuid.uuid4().hex[:10]}",
        "broker": broker,
        "topics": {TOPIC: {"max_pending": max_pending}},
        "producers": {
            PRODUCER: {
                "plugin": f"{PLUGIN_MODULE}:produce_orders",
                "publishes": [TOPIC],
                "with": {"messages": spec.messages, "rate": spec.rate, "payload_bytes": spec.payload_bytes},
            },
        },
        "subscribers": {name: dict(subscriber) for name in subscriber_names(spec.subscribers)},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(flow, sort_keys=False), encoding="utf-8")
    return path


async def delete_resources(flow: Any) -> None:
    """Delete the streams, queues or keys a network backend created for `flow`.

    run_flow closes its broker, so a second broker of the same flow is started to call
    the backend's `delete_flow_resources`, when the backend has one.
    """
    from flowrun.brokers import create_broker
    from flowrun.runtime import build_topology

    broker = create_broker(flow.spec.broker, flow.path, flow.spec.name)
    delete = getattr(broker, "delete_flow_resources", None)
    if delete is None:
        return
    await broker.start(build_topology(flow))
    try:
        await delete()
    finally:
        await broker.close()


async def run(spec: RunSpec) -> RunResult:
    import time

    from benchmarks import workload
    from flowrun.loader import load_flow
    from flowrun.runtime import run_flow

    backend = spec.options["backend"]
    settings = spec.options.get("subscriber", {})
    with tempfile.TemporaryDirectory(prefix="flowrun-bench-") as folder:
        path = write_flow(Path(folder), spec, backend, subscriber_settings=settings)
        flow = load_flow(path)
        recorder = workload.Recorder(spec)
        workload.set_recorder(recorder)
        try:
            result = await run_flow(flow, until_drained=True)
            end = time.perf_counter()
        finally:
            workload.set_recorder(None)
            if backend in SERVER_URLS:
                await delete_resources(flow)

        failures = "; ".join(result.failures)
        if failures:
            raise RuntimeError(f"flowrun reported failures: {failures}")
        for name in subscriber_names(spec.subscribers):
            acked = result.report["subscriptions"][name]["acked"]
            if acked != spec.messages:
                raise RuntimeError(f"subscription '{name}' acked {acked} of {spec.messages} messages")
        return recorder.result(end)
