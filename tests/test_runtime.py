"""End-to-end runs of `FlowRuntime` and `run_flow`: real flow files, real plugin modules, real brokers.

Each test writes its flow file and plugin modules into tmp_path. The runtime puts the flow
file's folder on sys.path for `module:attribute` references, so every plugin module gets a
unique name to keep Python's import cache from handing one test another test's module.
Plugins record what they saw in module-level state, which the test reads back through
sys.modules once the runtime imported them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import shutil
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from flowrun.brokers import BROKER_URL_VARIABLE, create_broker
from flowrun.loader import load_flow
from flowrun.runtime import FlowRuntime, RunResult, run_flow

# In-process backends: they need no server, so every runtime test runs on both.
RUNTIME_BACKENDS = ["memory", "sqlite"]
RUN_TIMEOUT = 60.0
# Retries every 10 ms, so failing messages reach max_deliveries quickly. The lines carry the
# indentation of subscriber keys inside the flow bodies below, before those are dedented.
FAST_RETRY = """\
            retry:
              initial: 10ms
              max: 10ms"""


class FlowFolder:
    """A tmp_path folder with one flow file and the plugin modules it references."""

    def __init__(self, path: Path, backend: str) -> None:
        self.path = path
        self.backend = backend
        self.flow_path = path / "flow.yaml"

    def plugin(self, stem: str, source: str) -> str:
        """Write a plugin module under a unique name and return that name."""
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        (self.path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        # The folder may already be on sys.path with its listing cached by an earlier import.
        importlib.invalidate_caches()
        return name

    def write_flow(self, body: str) -> Path:
        """Write flow.yaml: the test's topics, producers and subscribers on this folder's backend."""
        header = f"name: test\nbroker:\n  backend: {self.backend}\n"
        self.flow_path.write_text(header + textwrap.dedent(body), encoding="utf-8")
        return self.flow_path

    def append_subscribers(self, entries: str) -> None:
        """Append entries to the flow's `subscribers` section, which must come last in the file."""
        with self.flow_path.open("a", encoding="utf-8") as stream:
            stream.write(textwrap.indent(textwrap.dedent(entries), "  "))

    def forget_broker_state(self) -> None:
        """Delete a file-based broker's database so the next run starts empty."""
        shutil.rmtree(self.path / ".flowrun", ignore_errors=True)


@pytest.fixture(params=RUNTIME_BACKENDS)
def folder(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FlowFolder:
    # FLOWRUN_BROKER_URL would override the backend each flow names.
    monkeypatch.delenv(BROKER_URL_VARIABLE, raising=False)
    return FlowFolder(tmp_path, str(request.param))


def module(name: str) -> ModuleType:
    return sys.modules[name]


async def run_until_drained(folder: FlowFolder) -> RunResult:
    result = await asyncio.wait_for(run_flow(load_flow(folder.flow_path), until_drained=True), RUN_TIMEOUT)
    assert result.failures == []
    return result


async def wait_for_stats(
    runtime: FlowRuntime, condition: Callable[[dict[str, Any]], bool], timeout: float = 20.0
) -> dict[str, Any]:
    """Poll the broker's stats until `condition` holds; fail with the last stats after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        report = await runtime.broker.stats()
        if condition(report):
            return report
        assert time.monotonic() < deadline, f"condition not reached within {timeout:g}s; stats: {report}"
        await asyncio.sleep(0.01)


def counts_of(report: dict[str, Any], subscription: str) -> dict[str, Any]:
    return report["subscriptions"][subscription]


def published(report: dict[str, Any], topic: str) -> int:
    return int(report["topics"][topic]["published"])


NUMBERS_PRODUCER = """
    def numbers(context):
        yield from range(context.options.get("count", 5))
"""

DEAD_READER = """
    headers = []
    payloads = []

    def read(message, context):
        headers.append(dict(message.headers))
        payloads.append(message.payload)
"""


# Ack policies


async def test_auto_ack_acks_on_return(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    sink = folder.plugin("sink", """
        seen = []

        async def handle(message, context):
            seen.append(message.payload)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {sink}:handle
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")

    assert sorted(module(sink).seen) == [0, 1, 2, 3, 4]
    assert published(report, "Orders") == 5
    assert billing["delivered"] == 5
    assert billing["acked"] == 5
    assert billing["redelivered"] == 0


async def test_auto_ack_retries_raised_error(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    flaky = folder.plugin("flaky", """
        counts = []

        def handle(message, context):
            counts.append(message.delivery_count)
            if message.delivery_count < 3:
                raise ConnectionError("gateway unavailable")
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 2
        subscribers:
          billing:
            topic: Orders
            plugin: {flaky}:handle
            max_deliveries: 5
{FAST_RETRY}
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")

    assert sorted(module(flaky).counts) == [1, 1, 2, 2, 3, 3]
    assert billing["delivered"] == 6
    assert billing["redelivered"] == 4
    assert billing["acked"] == 2
    assert billing["dead_lettered"] == 0


async def test_auto_ack_dead_letters_after_max_deliveries(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    failing = folder.plugin("failing", """
        def handle(message, context):
            raise ValueError(f"amount {message.payload} is invalid")
    """)
    reader = folder.plugin("reader", DEAD_READER)
    folder.write_flow(f"""
        topics:
          Orders:
          Orders.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          billing:
            topic: Orders
            plugin: {failing}:handle
            max_deliveries: 3
            dead_letter: Orders.dead
{FAST_RETRY}
          dead-reader:
            topic: Orders.dead
            plugin: {reader}:read
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")
    (headers,) = module(reader).headers

    assert billing["delivered"] == 3
    assert billing["redelivered"] == 2
    assert billing["dead_lettered"] == 1
    assert billing["acked"] == 0
    assert published(report, "Orders.dead") == 1
    assert counts_of(report, "dead-reader")["acked"] == 1
    assert module(reader).payloads == [0]
    assert headers["flowrun.original_topic"] == "Orders"
    assert headers["flowrun.subscription"] == "billing"
    assert headers["flowrun.plugin"] == f"{failing}:handle"
    assert headers["flowrun.delivery_count"] == "3"
    assert headers["flowrun.error_type"] == "ValueError"
    assert headers["flowrun.error"] == "amount 0 is invalid"
    assert "ValueError: amount 0 is invalid" in headers["flowrun.traceback"]


def write_settling_flow(folder: FlowFolder, call: str, dead_letter: bool = True) -> str:
    """Write a flow whose explicit-ack handler settles each message with `call` and no error.

    Return the module name of the dead-letter topic's reader.
    """
    source = folder.plugin("source", NUMBERS_PRODUCER)
    settler = folder.plugin("settler", f"""
        def handle(message, context):
            message.{call}()
    """)
    reader = folder.plugin("reader", DEAD_READER)
    dead_letter_line = "dead_letter: Orders.dead" if dead_letter else ""
    folder.write_flow(f"""
        topics:
          Orders:
          Orders.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          billing:
            topic: Orders
            plugin: {settler}:handle
            ack: explicit
            max_deliveries: 3
            {dead_letter_line}
{FAST_RETRY}
          dead-reader:
            topic: Orders.dead
            plugin: {reader}:read
    """)
    return reader


@pytest.mark.parametrize(("call", "error_type", "delivery"), [
    ("nack", "flowrun.Nacked", 3),
    ("reject", "flowrun.Rejected", 1),
])
async def test_settle_without_error_dead_letters(folder, call, error_type, delivery):
    reader = write_settling_flow(folder, call)

    report = (await run_until_drained(folder)).report
    (headers,) = module(reader).headers

    assert counts_of(report, "billing")["dead_lettered"] == 1
    assert headers["flowrun.delivery_count"] == str(delivery)
    assert headers["flowrun.error_type"] == error_type
    assert headers["flowrun.error"] == (
        f"the handler called {call}() without an error on delivery {delivery} (max_deliveries 3)"
    )
    assert headers["flowrun.traceback"] == ""


@pytest.mark.parametrize(("call", "delivery"), [("nack", 3), ("drop", 1)])
async def test_settle_without_error_logs_drop(folder, caplog, call, delivery):
    write_settling_flow(folder, call, dead_letter=False)

    with caplog.at_level(logging.WARNING, logger="flowrun.brokers"):
        report = (await run_until_drained(folder)).report
    drops = [record.getMessage() for record in caplog.records if record.getMessage().startswith("dropped message")]

    assert counts_of(report, "billing")["dropped"] == 1
    assert len(drops) == 1
    assert drops[0].endswith(
        f"of subscription 'billing' at delivery {delivery}: "
        f"the handler called {call}() without an error on delivery {delivery} (max_deliveries 3)"
    )


@pytest.mark.parametrize("raising", [
    "async def handle(message, context):\n    sys.exit(3)",
    "def handle(message, context):\n    sys.exit(3)",
    "async def handle(message, context):\n    raise KeyboardInterrupt",
], ids=["async-exit", "sync-exit", "keyboard-interrupt"])
async def test_handler_exit_dead_letters(folder, raising):
    # SystemExit and KeyboardInterrupt are not Exceptions. A handler that raises them must
    # fail its message like any error instead of ending its worker with the message in flight.
    source = folder.plugin("source", NUMBERS_PRODUCER)
    exiting = folder.plugin("exiting", "import sys\n\n" + raising + "\n")
    reader = folder.plugin("reader", DEAD_READER)
    folder.write_flow(f"""
        topics:
          Orders:
          Dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 2
        subscribers:
          billing:
            topic: Orders
            plugin: {exiting}:handle
            max_deliveries: 2
            dead_letter: Dead
{FAST_RETRY}
          dead:
            topic: Dead
            plugin: {reader}:read
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")
    errors = [headers["flowrun.error_type"] for headers in module(reader).headers]

    assert billing["delivered"] == 4
    assert billing["dead_lettered"] == 2
    assert billing["acked"] == 0
    assert errors == ["flowrun.errors.PluginExit"] * 2
    assert "raised by plugin code" in module(reader).headers[0]["flowrun.error"]
    # The traceback reaches into the handler's own module.
    assert f"{exiting}.py" in module(reader).headers[0]["flowrun.traceback"]


async def test_producer_exit_reported_as_failure(folder, caplog):
    source = folder.plugin("source", """
        import sys

        def numbers(context):
            yield 1
            sys.exit(4)
    """)
    sink = folder.plugin("sink", DEAD_READER)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {sink}:read
    """)

    with caplog.at_level(logging.ERROR, logger="flowrun.runtime"):
        result = await asyncio.wait_for(run_flow(load_flow(folder.flow_path), until_drained=True), RUN_TIMEOUT)
    failure_lines = [record.getMessage() for record in caplog.records if "failed" in record.getMessage()]

    assert result.failures == ["producer 'source' failed: PluginExit: SystemExit(4) raised by plugin code; a "
                               "plugin cannot stop flowrun this way, so raise an exception instead"]
    assert counts_of(result.report, "billing")["acked"] == 1
    assert len(failure_lines) == 1
    assert f"{source}.py:6: PluginExit" in failure_lines[0]
    assert all(record.exc_info is None for record in caplog.records)


async def test_explicit_ack_by_handler(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    acker = folder.plugin("acker", """
        async def handle(message, context):
            message.ack()
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {acker}:handle
            ack: explicit
            ack_timeout: 10s
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")

    assert billing["acked"] == 5
    assert billing["redelivered"] == 0


async def test_explicit_unacked_redelivered_after_timeout(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    forgetful = folder.plugin("forgetful", """
        import time

        deliveries = []

        async def handle(message, context):
            deliveries.append((message.delivery_count, time.monotonic()))
            if message.delivery_count == 2:
                message.ack()
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          billing:
            topic: Orders
            plugin: {forgetful}:handle
            ack: explicit
            ack_timeout: 200ms
{FAST_RETRY}
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")
    (first_count, first_at), (second_count, second_at) = module(forgetful).deliveries

    assert (first_count, second_count) == (1, 2)
    assert second_at - first_at >= 0.19, f"redelivered {second_at - first_at:.3f} s after the first delivery"
    assert billing["delivered"] == 2
    assert billing["redelivered"] == 1
    assert billing["acked"] == 1


NACK_WITH_DELAY_SYNC = """
    import threading
    import time

    deliveries = []
    threads = []

    def handle(message, context):
        deliveries.append((message.delivery_count, time.monotonic()))
        threads.append(threading.current_thread() is threading.main_thread())
        if message.delivery_count == 1:
            message.nack(delay=0.3)
        else:
            message.ack()
"""

NACK_WITH_DELAY_ASYNC = """
    import threading
    import time

    deliveries = []
    threads = []

    async def handle(message, context):
        deliveries.append((message.delivery_count, time.monotonic()))
        threads.append(threading.current_thread() is threading.main_thread())
        if message.delivery_count == 1:
            message.nack(delay=0.3)
        else:
            message.ack()
"""


@pytest.mark.parametrize(
    ("source_code", "on_main_thread"),
    [(NACK_WITH_DELAY_SYNC, False), (NACK_WITH_DELAY_ASYNC, True)],
    ids=["sync-handler", "async-handler"],
)
async def test_explicit_nack_with_delay(folder, source_code, on_main_thread):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    nacker = folder.plugin("nacker", source_code)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          billing:
            topic: Orders
            plugin: {nacker}:handle
            ack: explicit
            ack_timeout: 10s
            retry:
              initial: 5s
              max: 5s
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")
    (first_count, first_at), (second_count, second_at) = module(nacker).deliveries
    gap = second_at - first_at

    assert module(nacker).threads == [on_main_thread, on_main_thread]
    assert (first_count, second_count) == (1, 2)
    assert gap >= 0.29, f"redelivered {gap:.3f} s after a nack with delay 0.3 s"
    # The 5 s retry backoff must not apply when the nack gives a delay.
    assert gap < 3.0, f"redelivered {gap:.3f} s after a nack with delay 0.3 s"
    assert billing["delivered"] == 2
    assert billing["redelivered"] == 1
    assert billing["acked"] == 1


async def test_ack_none_drops_failures(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    odd_fails = folder.plugin("odd_fails", """
        calls = []

        def handle(message, context):
            calls.append(message.payload)
            if message.payload % 2:
                raise ValueError("odd")
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 4
        subscribers:
          audit:
            topic: Orders
            plugin: {odd_fails}:handle
            ack: none
    """)

    report = (await run_until_drained(folder)).report
    audit = counts_of(report, "audit")

    assert sorted(module(odd_fails).calls) == [0, 1, 2, 3]
    assert audit["delivered"] == 4
    assert audit["acked"] == 2
    assert audit["dropped"] == 2
    assert audit["redelivered"] == 0
    assert audit["dead_lettered"] == 0


# Handler and producer shapes


HANDLER_SHAPES = {
    "sync-function": ("handle", """
        import threading

        seen = []
        on_main_thread = []

        def handle(message, context):
            seen.append(message.payload)
            on_main_thread.append(threading.current_thread() is threading.main_thread())
    """),
    "async-function": ("handle", """
        import asyncio

        seen = []

        async def handle(message, context):
            await asyncio.sleep(0)
            seen.append(message.payload)
    """),
    "class": ("Billing", """
        seen = []
        calls = []

        class Billing:
            def setup(self, context):
                calls.append("setup")
                self.prefix = context.options["prefix"]

            async def handle(self, message, context):
                seen.append(message.payload)

            def close(self):
                calls.append("close")
    """),
    "message-only": ("handle", """
        seen = []

        def handle(message):
            seen.append(message.payload)
    """),
}


@pytest.mark.parametrize("shape", list(HANDLER_SHAPES))
async def test_handler_shape(folder, shape):
    attribute, source_code = HANDLER_SHAPES[shape]
    source = folder.plugin("source", NUMBERS_PRODUCER)
    handler = folder.plugin("handler", source_code)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 3
        subscribers:
          billing:
            topic: Orders
            plugin: {handler}:{attribute}
            with:
              prefix: inv-
    """)

    report = (await run_until_drained(folder)).report

    assert sorted(module(handler).seen) == [0, 1, 2]
    assert counts_of(report, "billing")["acked"] == 3
    if shape == "sync-function":
        assert module(handler).on_main_thread == [False, False, False]


async def test_handler_class_setup_and_close_once(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    _, source_code = HANDLER_SHAPES["class"]
    handler = folder.plugin("handler", source_code)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 3
        subscribers:
          billing:
            topic: Orders
            plugin: {handler}:Billing
            concurrency: 3
            with:
              prefix: inv-
    """)

    await run_until_drained(folder)

    assert module(handler).calls == ["setup", "close"]


PRODUCER_SHAPES = {
    "generator": ("produce", """
        def produce(context):
            for number in range(3):
                yield {"number": number}
    """),
    "async-generator": ("produce", """
        import asyncio

        async def produce(context):
            for number in range(3):
                await asyncio.sleep(0)
                yield {"number": number}
    """),
    "class-with-run": ("Produce", """
        calls = []

        class Produce:
            def setup(self, context):
                calls.append("setup")

            def run(self, context):
                for number in range(3):
                    yield {"number": number}

            def close(self):
                calls.append("close")
    """),
    "coroutine": ("produce", """
        async def produce(context):
            for number in range(3):
                await context.publish("Orders", {"number": number})
    """),
}


@pytest.mark.parametrize("shape", list(PRODUCER_SHAPES))
async def test_producer_shape(folder, shape):
    attribute, source_code = PRODUCER_SHAPES[shape]
    producer = folder.plugin("producer", source_code)
    sink = folder.plugin("sink", """
        seen = []

        async def handle(message, context):
            seen.append(message.payload["number"])
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {producer}:{attribute}
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {sink}:handle
    """)

    report = (await run_until_drained(folder)).report

    assert sorted(module(sink).seen) == [0, 1, 2]
    assert published(report, "Orders") == 3
    assert counts_of(report, "billing")["acked"] == 3
    if shape == "class-with-run":
        assert module(producer).calls == ["setup", "close"]


async def test_producer_outgoing_picks_topic(folder):
    producer = folder.plugin("producer", """
        from flowrun import Outgoing

        def produce(context):
            yield Outgoing("Orders", {"invoice": "536365"}, key="customer-1")
            yield Outgoing("Refunds", {"invoice": "C536379"}, key="customer-2", headers={"source": "replay"})
            yield Outgoing("Orders", {"invoice": "536366"}, id="order-536366")
    """)
    recorder = folder.plugin("recorder", """
        received = {}

        def handle(message, context):
            received.setdefault(message.topic, []).append(
                (message.payload["invoice"], message.key, message.headers.get("source"), message.id)
            )
    """)
    folder.write_flow(f"""
        topics:
          Orders:
          Refunds:
        producers:
          replay:
            plugin: {producer}:produce
            publishes: [Orders, Refunds]
        subscribers:
          orders:
            topic: Orders
            plugin: {recorder}:handle
          refunds:
            topic: Refunds
            plugin: {recorder}:handle
    """)

    report = (await run_until_drained(folder)).report
    received = module(recorder).received
    (refund,) = received["Refunds"]
    first_order, second_order = sorted(received["Orders"])

    assert published(report, "Orders") == 2
    assert published(report, "Refunds") == 1
    assert refund[:3] == ("C536379", "customer-2", "replay")
    assert first_order[:3] == ("536365", "customer-1", None)
    assert second_order == ("536366", None, None, "order-536366")


# Publishing from handlers


UNDECLARED_PUBLISH_ASYNC = """
    errors = []

    async def handle(message, context):
        try:
            await context.publish("Refunds", message.payload)
        except Exception as error:
            errors.append(type(error).__name__)
            raise
"""

UNDECLARED_PUBLISH_SYNC = """
    errors = []

    def handle(message, context):
        try:
            context.publish("Refunds", message.payload)
        except Exception as error:
            errors.append(type(error).__name__)
            raise
"""


@pytest.mark.parametrize(
    "source_code", [UNDECLARED_PUBLISH_ASYNC, UNDECLARED_PUBLISH_SYNC], ids=["async-handler", "sync-handler"]
)
async def test_undeclared_publish_fails_message(folder, source_code):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    stray = folder.plugin("stray", source_code)
    reader = folder.plugin("reader", DEAD_READER)
    folder.write_flow(f"""
        topics:
          Orders:
          Receipts:
          Refunds:
          Orders.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          billing:
            topic: Orders
            plugin: {stray}:handle
            publishes: [Receipts]
            max_deliveries: 2
            dead_letter: Orders.dead
{FAST_RETRY}
          dead-reader:
            topic: Orders.dead
            plugin: {reader}:read
    """)

    report = (await run_until_drained(folder)).report
    billing = counts_of(report, "billing")
    (headers,) = module(reader).headers

    # The mistake repeats on every delivery, so it is final: one attempt, then the dead letter.
    assert module(stray).errors == ["UndeclaredTopicError"]
    assert billing["acked"] == 0
    assert billing["dead_lettered"] == 1
    assert published(report, "Refunds") == 0
    assert headers["flowrun.error_type"] == "flowrun.errors.UndeclaredTopicError"


async def test_unawaited_publish_stored_before_ack(folder):
    """A blocked publish that the handler never awaited keeps its message unacked."""
    source = folder.plugin("source", NUMBERS_PRODUCER)
    forward = folder.plugin("forward", """
        async def handle(message, context):
            context.publish("Receipts", message.payload)
    """)
    gated = folder.plugin("gated", """
        import asyncio

        gate = asyncio.Event()

        async def handle(message, context):
            await gate.wait()
    """)
    folder.write_flow(f"""
        topics:
          Orders:
          Receipts:
            max_pending: 1
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 2
        subscribers:
          forward:
            topic: Orders
            plugin: {forward}:handle
            publishes: [Receipts]
            ack_timeout: 30s
          receipts:
            topic: Receipts
            plugin: {gated}:handle
            ack_timeout: 30s
    """)

    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        # The first receipt fills Receipts, so the second publish waits for room.
        await wait_for_stats(runtime, lambda report: counts_of(report, "forward")["delivered"] == 2)
        await asyncio.sleep(0.3)
        blocked = await runtime.broker.stats()

        module(gated).gate.set()
        await asyncio.wait_for(runtime.wait(until_drained=True), RUN_TIMEOUT)
    finally:
        result = await runtime.stop()

    assert counts_of(blocked, "forward")["acked"] == 1
    assert counts_of(blocked, "forward")["in_flight"] == 1
    assert published(blocked, "Receipts") == 1
    assert counts_of(result.report, "forward")["acked"] == 2
    assert counts_of(result.report, "receipts")["acked"] == 2
    assert published(result.report, "Receipts") == 2


async def test_unawaited_failing_publish_fails_message(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    forward = folder.plugin("forward", """
        async def handle(message, context):
            # object() cannot be encoded as JSON, so the publish fails after the handler returned.
            context.publish("Receipts", {"items": object()})
    """)
    reader = folder.plugin("reader", DEAD_READER)
    folder.write_flow(f"""
        topics:
          Orders:
          Receipts:
          Orders.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          forward:
            topic: Orders
            plugin: {forward}:handle
            publishes: [Receipts]
            dead_letter: Orders.dead
{FAST_RETRY}
          dead-reader:
            topic: Orders.dead
            plugin: {reader}:read
    """)

    report = (await run_until_drained(folder)).report
    forward_counts = counts_of(report, "forward")
    (headers,) = module(reader).headers

    assert forward_counts["acked"] == 0
    assert forward_counts["dead_lettered"] == 1
    assert published(report, "Receipts") == 0
    assert headers["flowrun.error_type"] == "flowrun.errors.PayloadError"


# Flow control


async def test_push_respects_max_in_flight(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    holder = folder.plugin("holder", """
        import asyncio

        unacked = set()
        peak = []

        def release(message):
            unacked.discard(message.id)
            message.ack()

        async def handle(message, context):
            unacked.add(message.id)
            peak.append(len(unacked))
            # Hold each message a few milliseconds, varied so acks come out of order.
            delay = 0.005 * (len(peak) % 4 + 1)
            asyncio.get_running_loop().call_later(delay, release, message)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 30
        subscribers:
          billing:
            topic: Orders
            plugin: {holder}:handle
            ack: explicit
            ack_timeout: 30s
            concurrency: 1
            max_in_flight: 3
    """)

    report = (await run_until_drained(folder)).report

    assert max(module(holder).peak) == 3
    assert len(module(holder).peak) == 30
    assert counts_of(report, "billing")["acked"] == 30


async def test_async_items_sent_while_producer_waits(folder):
    # The producer yields three items without waiting, then waits until the handler has
    # seen all three. An item kept in a batch until the next yield would never arrive.
    plugins = folder.plugin("gate", """
        import asyncio

        seen = []
        all_seen = asyncio.Event()

        async def produce(context):
            for number in range(3):
                yield number
            await asyncio.wait_for(all_seen.wait(), 10)
            yield 3

        async def handle(message, context):
            seen.append(message.payload)
            if len(seen) == 3:
                all_seen.set()
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {plugins}:produce
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {plugins}:handle
    """)

    result = await run_until_drained(folder)

    assert result.failures == []
    assert module(plugins).seen == [0, 1, 2, 3]
    assert counts_of(result.report, "billing")["acked"] == 4


async def test_sync_items_sent_while_producer_blocks(folder):
    # A sync generator yields three items, then blocks its thread until the handler has
    # seen all three. Items held back until the next one would never arrive.
    plugins = folder.plugin("blocking", """
        import threading

        seen = []
        all_seen = threading.Event()

        def produce(context):
            for number in range(3):
                yield number
            if not all_seen.wait(10):
                raise RuntimeError("the first three items were not handled within 10 s")
            yield 3

        async def handle(message, context):
            seen.append(message.payload)
            if len(seen) == 3:
                all_seen.set()
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {plugins}:produce
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {plugins}:handle
    """)

    result = await run_until_drained(folder)

    assert result.failures == []
    assert module(plugins).seen == [0, 1, 2, 3]
    assert counts_of(result.report, "billing")["acked"] == 4


async def test_push_window_shrinks_for_slow_handlers(folder):
    # 20 messages of 100 ms each take 2 s in all, twice the ack timeout. Fetching the
    # default max_in_flight (1,000) at once would let the later ones wait out their lease
    # and be delivered again. The window must shrink to what 0.5 s of handling covers.
    source = folder.plugin("source", NUMBERS_PRODUCER)
    slow = folder.plugin("slow", """
        import asyncio

        seen = []

        async def handle(message, context):
            seen.append(message.payload)
            await asyncio.sleep(0.1)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 20
        subscribers:
          billing:
            topic: Orders
            plugin: {slow}:handle
            ack_timeout: 1s
    """)

    report = (await run_until_drained(folder)).report

    assert counts_of(report, "billing")["redelivered"] == 0
    assert counts_of(report, "billing")["acked"] == 20
    assert sorted(module(slow).seen) == list(range(20))


async def test_push_window_starts_at_concurrency(folder):
    # Each call takes 0.6 s of a 1 s ack timeout. A second fetched message waiting
    # behind the first would finish at 1.2 s, past its lease, and be delivered again.
    source = folder.plugin("source", NUMBERS_PRODUCER)
    slow = folder.plugin("slow", """
        import time

        def handle(message, context):
            time.sleep(0.6)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 4
        subscribers:
          billing:
            topic: Orders
            plugin: {slow}:handle
            ack_timeout: 1s
    """)

    report = (await run_until_drained(folder)).report

    assert counts_of(report, "billing")["redelivered"] == 0
    assert counts_of(report, "billing")["acked"] == 4


async def test_handler_slowdown_handles_nothing_twice(folder):
    # The first 10 calls are fast, so the window opens wide and the 20 slow ones are
    # fetched at once. Those that wait past the 0.5 s ack timeout must not be handled:
    # the broker delivers them again, and every message is handled exactly once.
    source = folder.plugin("source", NUMBERS_PRODUCER)
    slowing = folder.plugin("slowing", """
        import asyncio

        handled = []

        async def handle(message, context):
            if message.payload >= 10:
                await asyncio.sleep(0.1)
            handled.append(message.payload)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 30
        subscribers:
          billing:
            topic: Orders
            plugin: {slowing}:handle
            ack_timeout: 500ms
            retry:
              initial: 10ms
              max: 10ms
    """)

    report = (await run_until_drained(folder)).report

    assert sorted(module(slowing).handled) == list(range(30))
    assert counts_of(report, "billing")["acked"] == 30
    assert counts_of(report, "billing")["dead_lettered"] == 0


async def test_push_window_grows_for_fast_handlers(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    counter = folder.plugin("counter", """
        waiting = []

        async def handle(message, context):
            waiting.append(message.payload)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 3000
        subscribers:
          billing:
            topic: Orders
            plugin: {counter}:handle
            max_in_flight: 50
    """)
    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        await asyncio.wait_for(runtime.wait(until_drained=True), RUN_TIMEOUT)
        consumer = runtime.workers["billing"]._consumer
        assert consumer is not None
        peak = consumer.peak_outstanding
    finally:
        result = await runtime.stop()

    assert peak == 50
    assert counts_of(result.report, "billing")["acked"] == 3000


async def test_pull_respects_batch_size_and_concurrency(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    gated = folder.plugin("gated", """
        import asyncio

        gate = asyncio.Event()
        running = []
        peak = []

        async def handle(message, context):
            running.append(message.id)
            peak.append(len(running))
            await gate.wait()
            await asyncio.sleep(0.005)
            running.remove(message.id)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 10
        subscribers:
          billing:
            topic: Orders
            plugin: {gated}:handle
            mode: pull
            batch_size: 4
            concurrency: 2
            max_wait: 100ms
            ack_timeout: 30s
    """)

    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        await wait_for_stats(runtime, lambda report: counts_of(report, "billing")["in_flight"] >= 4)
        # Give the pull loop time to take more than it may, if it would.
        await asyncio.sleep(0.3)
        while_blocked = counts_of(await runtime.broker.stats(), "billing")
        running_while_blocked = len(module(gated).running)

        module(gated).gate.set()
        await asyncio.wait_for(runtime.wait(until_drained=True), RUN_TIMEOUT)
    finally:
        result = await runtime.stop()

    # The pull loop keeps one batch (batch_size 4) in flight and runs 2 handlers (concurrency 2).
    assert while_blocked["in_flight"] == 4
    assert while_blocked["pending"] == 6
    assert running_while_blocked == 2
    assert max(module(gated).peak) == 2
    assert counts_of(result.report, "billing")["acked"] == 10


async def test_slow_subscriber_does_not_slow_fast_one(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    fast = folder.plugin("fast", """
        def handle(message, context):
            pass
    """)
    # The slow handler sleeps until the test opens the gate, so the counts are exact.
    slow = folder.plugin("slow", """
        import asyncio

        gate = asyncio.Event()

        async def handle(message, context):
            while not gate.is_set():
                await asyncio.sleep(0.01)
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 20
        subscribers:
          fast:
            topic: Orders
            plugin: {fast}:handle
          slow:
            topic: Orders
            plugin: {slow}:handle
            concurrency: 1
            max_in_flight: 1
            ack_timeout: 30s
    """)

    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        finished = await wait_for_stats(runtime, lambda report: counts_of(report, "fast")["acked"] == 20)
        module(slow).gate.set()
        await asyncio.wait_for(runtime.wait(until_drained=True), RUN_TIMEOUT)
    finally:
        result = await runtime.stop()
    slow_counts = counts_of(finished, "slow")

    assert slow_counts["acked"] == 0
    assert slow_counts["in_flight"] == 1
    assert slow_counts["pending"] == 19
    assert counts_of(result.report, "slow")["acked"] == 20
    assert counts_of(result.report, "fast")["acked"] == 20


async def test_cycle_stopped_by_max_hops(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    bounce = folder.plugin("bounce", """
        hops = []

        async def ping(message, context):
            hops.append(("ping", message.headers.get("flowrun.hops", "0")))
            await context.publish("Pong", message.payload)

        async def pong(message, context):
            hops.append(("pong", message.headers.get("flowrun.hops", "0")))
            await context.publish("Ping", message.payload)
    """)
    reader = folder.plugin("reader", DEAD_READER)
    folder.write_flow(f"""
        allow_cycles: true
        max_hops: 3
        topics:
          Ping:
          Pong:
          Loop.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Ping]
            with:
              count: 1
        subscribers:
          ping:
            topic: Ping
            plugin: {bounce}:ping
            publishes: [Pong]
            dead_letter: Loop.dead
          pong:
            topic: Pong
            plugin: {bounce}:pong
            publishes: [Ping]
            dead_letter: Loop.dead
          dead-reader:
            topic: Loop.dead
            plugin: {reader}:read
    """)

    report = (await run_until_drained(folder)).report
    ping = counts_of(report, "ping")
    pong = counts_of(report, "pong")
    (headers,) = module(reader).headers

    assert module(bounce).hops == [("ping", "0"), ("pong", "1"), ("ping", "2"), ("pong", "3")]
    assert published(report, "Ping") == 2
    assert published(report, "Pong") == 2
    assert published(report, "Loop.dead") == 1
    assert ping["acked"] == 2
    assert pong["acked"] == 1
    assert pong["dead_lettered"] == 1
    assert pong["redelivered"] == 0
    assert headers["flowrun.error_type"] == "flowrun.errors.HopLimitError"
    assert headers["flowrun.subscription"] == "pong"


async def test_drained_report_accounts_for_every_message(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    handlers = folder.plugin("handlers", """
        def billing(message, context):
            if message.payload % 3 == 0:
                raise ValueError("not billable")

        def audit(message, context):
            if message.payload % 2:
                raise ValueError("odd")

        async def notify(message, context):
            if message.payload % 2 == 0:
                message.ack()

        def dead(message, context):
            pass
    """)
    folder.write_flow(f"""
        topics:
          Orders:
          Orders.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 10
        subscribers:
          billing:
            topic: Orders
            plugin: {handlers}:billing
            max_deliveries: 2
            dead_letter: Orders.dead
{FAST_RETRY}
          audit:
            topic: Orders
            plugin: {handlers}:audit
            ack: none
          notify:
            topic: Orders
            plugin: {handlers}:notify
            ack: explicit
            ack_timeout: 100ms
            max_deliveries: 2
{FAST_RETRY}
          dead-reader:
            topic: Orders.dead
            plugin: {handlers}:dead
    """)

    report = (await run_until_drained(folder)).report
    subscriptions = report["subscriptions"]

    for name, counts in subscriptions.items():
        settled = counts["acked"] + counts["dead_lettered"] + counts["dropped"]
        assert settled == published(report, counts["topic"]), name
        assert counts["pending"] == 0, name
        assert counts["in_flight"] == 0, name
    assert published(report, "Orders") == 10
    assert (subscriptions["billing"]["acked"], subscriptions["billing"]["dead_lettered"]) == (6, 4)
    assert (subscriptions["audit"]["acked"], subscriptions["audit"]["dropped"]) == (5, 5)
    assert (subscriptions["notify"]["acked"], subscriptions["notify"]["dropped"]) == (5, 5)
    assert subscriptions["dead-reader"]["acked"] == 4


async def test_new_subscriber_changes_no_other_counts(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    flaky = folder.plugin("flaky", """
        def handle(message, context):
            if message.payload == 3 and message.delivery_count == 1:
                raise ConnectionError("gateway unavailable")
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 10
        subscribers:
          billing:
            topic: Orders
            plugin: {flaky}:handle
{FAST_RETRY}
    """)
    before = (await run_until_drained(folder)).report

    audit = folder.plugin("audit", """
        seen = []

        def handle(message, context):
            seen.append(message.payload)
    """)
    folder.append_subscribers(f"""
        audit:
          topic: Orders
          plugin: {audit}:handle
    """)
    folder.forget_broker_state()
    after = (await run_until_drained(folder)).report

    assert after["topics"]["Orders"] == before["topics"]["Orders"]
    assert after["subscriptions"]["billing"] == before["subscriptions"]["billing"]
    assert before["subscriptions"]["billing"]["redelivered"] == 1
    assert "audit" not in before["subscriptions"]
    assert after["subscriptions"]["audit"]["acked"] == 10
    assert sorted(module(audit).seen) == list(range(10))


async def test_handler_timeout_cancels_handler(folder):
    source = folder.plugin("source", NUMBERS_PRODUCER)
    sleeper = folder.plugin("sleeper", """
        import asyncio

        cancelled = []

        async def handle(message, context):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(message.delivery_count)
                raise
    """)
    reader = folder.plugin("reader", DEAD_READER)
    folder.write_flow(f"""
        topics:
          Orders:
          Orders.dead:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 1
        subscribers:
          billing:
            topic: Orders
            plugin: {sleeper}:handle
            handler_timeout: 100ms
            max_deliveries: 2
            dead_letter: Orders.dead
{FAST_RETRY}
          dead-reader:
            topic: Orders.dead
            plugin: {reader}:read
    """)

    runtime = FlowRuntime(load_flow(folder.flow_path))
    started = time.monotonic()
    await runtime.start()
    try:
        await asyncio.wait_for(runtime.wait(until_drained=True), RUN_TIMEOUT)
        failed = runtime.workers["billing"].failed
    finally:
        result = await runtime.stop()
    elapsed = time.monotonic() - started
    billing = counts_of(result.report, "billing")
    (headers,) = module(reader).headers

    assert module(sleeper).cancelled == [1, 2]
    assert failed == 2
    assert billing["delivered"] == 2
    assert billing["acked"] == 0
    assert billing["dead_lettered"] == 1
    assert headers["flowrun.error_type"] == "TimeoutError"
    assert "handler_timeout" in headers["flowrun.error"]
    assert elapsed < 10.0, f"the run took {elapsed:.1f} s although each handler call is cut at 0.1 s"


async def test_fetch_failure_does_not_stop_consumer() -> None:
    """A broker error from one fetch is retried after a backoff; delivery goes on."""
    from flowrun.broker import SubscriptionConfig
    from flowrun.brokers.memory import MemoryBroker
    from flowrun.errors import BrokerError
    from flowrun.message import Envelope
    from tests.conftest import make_topology

    class FailsOnce(MemoryBroker):
        calls = 0

        async def fetch(self, subscription, max_messages, timeout):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 1:
                raise BrokerError("transient failure")
            return await super().fetch(subscription, max_messages, timeout)

    broker = FailsOnce()
    await broker.start(make_topology(SubscriptionConfig("s", "T")))
    received = asyncio.Event()

    def callback(delivery):  # type: ignore[no-untyped-def]
        received.set()

    consumer = broker.consume("s", callback, 4)
    await broker.publish([Envelope("one", "T", b"{}")])
    await asyncio.wait_for(received.wait(), 5)
    await consumer.stop()
    await broker.close()

    assert broker.calls >= 2


# Handles payloads 0-4 at once, and waits from payload 5 on until the test opens `gate`.
GATED_AFTER_FIVE = """
    import asyncio

    gate = asyncio.Event()
    handled = []

    async def handle(message, context):
        if message.payload >= 5:
            await gate.wait()
        handled.append(message.payload)
"""


def write_gated_flow(folder: FlowFolder, *settings: str) -> str:
    """Write a flow of 40 numbers to one GATED_AFTER_FIVE subscriber; return its module name."""
    source = folder.plugin("source", NUMBERS_PRODUCER)
    gated = folder.plugin("gated", GATED_AFTER_FIVE)
    # Each setting goes on its own line, at the indentation of the subscriber's keys.
    subscriber_settings = ("\n" + " " * 12).join(settings)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 40
        subscribers:
          billing:
            topic: Orders
            plugin: {gated}:handle
            {subscriber_settings}
    """)
    return gated


async def stop_then_open_gate(runtime: FlowRuntime, gated: str) -> RunResult:
    """Request a stop while the gated call runs, then let that call finish."""
    stopping = asyncio.create_task(runtime.stop())
    await asyncio.sleep(0.2)
    module(gated).gate.set()
    return await asyncio.wait_for(stopping, RUN_TIMEOUT)


async def test_stop_hands_back_unstarted_deliveries(folder):
    # The first five calls are quick, so the push window grows and the consumer fetches
    # far ahead. The sixth call waits until the test opens the gate after asking to
    # stop. The running call finishes, and the fetched ones that never started go back
    # at once, so they are neither handled during the stop nor left waiting for their lease.
    gated = write_gated_flow(folder, "max_in_flight: 20", "ack_timeout: 30s")

    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        await wait_for_stats(runtime, lambda report: counts_of(report, "billing")["in_flight"] >= 10)
    finally:
        result = await stop_then_open_gate(runtime, gated)
    billing = counts_of(result.report, "billing")

    assert module(gated).handled == [0, 1, 2, 3, 4, 5]
    assert billing["acked"] == 6
    assert billing["in_flight"] == 0
    assert billing["pending"] == 34
    if folder.backend == "sqlite":
        # SQLite undoes the deliveries it hands back, so they do not count as delivered.
        assert billing["delivered"] == 6
        assert billing["redelivered"] == 0


async def test_stop_loses_nothing_under_ack_none(folder):
    # Under ack: none the broker removes a message as it delivers it, so the worker may
    # fetch only what its handler calls take at once. A stop then loses nothing fetched.
    gated = write_gated_flow(folder, "ack: none")

    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        await wait_for_stats(runtime, lambda report: counts_of(report, "billing")["delivered"] >= 6)
        await asyncio.sleep(0.2)
    finally:
        result = await stop_then_open_gate(runtime, gated)
    billing = counts_of(result.report, "billing")

    assert module(gated).handled == [0, 1, 2, 3, 4, 5]
    assert billing["delivered"] == 6
    assert billing["dropped"] == 0
    assert billing["pending"] == 34


async def test_stop_ends_despite_swallowed_cancel(folder):
    # A handler that catches its cancellation and returns must not keep its worker, and so
    # the stop, waiting for more work after shutdown_timeout.
    source = folder.plugin("source", NUMBERS_PRODUCER)
    stubborn = folder.plugin("stubborn", """
        import asyncio

        started = []

        async def handle(message, context):
            started.append(message.payload)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)
    """)
    folder.write_flow(f"""
        shutdown_timeout: 0.5s
        topics:
          Orders:
        producers:
          source:
            plugin: {source}:numbers
            publishes: [Orders]
            with:
              count: 3
        subscribers:
          billing:
            topic: Orders
            plugin: {stubborn}:handle
    """)

    runtime = FlowRuntime(load_flow(folder.flow_path))
    await runtime.start()
    try:
        while not module(stubborn).started:
            await asyncio.sleep(0.01)
    finally:
        began = time.monotonic()
        result = await asyncio.wait_for(runtime.stop(), 10.0)
    stopped_after = time.monotonic() - began

    assert module(stubborn).started == [0]
    # The handler returned normally after catching the cancellation, so its message is acked.
    assert counts_of(result.report, "billing")["acked"] == 1
    assert stopped_after < 3.0


async def test_publish_batches_bounded_by_bytes(folder):
    # A producer that yields 1 MiB payloads without waiting fills a batch by bytes long
    # before the item limit. At most WAITING_BYTES (16 MiB) wait for each publish, plus the
    # item that crossed it.
    plugins = folder.plugin("large", """
        async def produce(context):
            blob = "x" * (1024 * 1024)
            for number in range(80):
                yield {"n": number, "blob": blob}

        async def handle(message, context):
            return None
    """)
    folder.write_flow(f"""
        topics:
          Orders:
        producers:
          source:
            plugin: {plugins}:produce
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {plugins}:handle
    """)
    flow = load_flow(folder.flow_path)
    broker = create_broker(flow.spec.broker, flow.path, flow.spec.name)
    batches: list[int] = []
    publish = broker.publish

    async def recorded_publish(envelopes):
        batches.append(len(envelopes))
        await publish(envelopes)

    broker.publish = recorded_publish
    result = await asyncio.wait_for(run_flow(flow, until_drained=True, broker=broker), RUN_TIMEOUT)

    assert sum(batches) == 80
    assert max(batches) <= 17
    assert counts_of(result.report, "billing")["acked"] == 80
