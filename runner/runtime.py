"""Wire a loaded flow to a broker and run its producers and subscribers."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flowrun import codec
from flowrun.broker import Broker, SubscriptionConfig, Topology
from flowrun.brokers import create_broker
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.context import Context
from flowrun.delivery import SubscriptionWorker
from flowrun.errors import EXITS, FlowrunError, HopLimitError, PluginError, PluginExit
from flowrun.ids import new_id
from flowrun.loader import LoadedFlow
from flowrun.message import HOPS_HEADER, Envelope
from flowrun.outgoing import Outgoing
from flowrun.plugins import Handler, Invoker, Producer, plugin_frame, resolve
from flowrun.schemas import SchemaError, TopicSchema, load_topic_schema
from flowrun.publisher import BatchPublisher
from flowrun.pump import SyncPump

logger = logging.getLogger(__name__)

# Max items of a sync producer waiting to reach the event loop.
SYNC_ITERATOR_CHUNK = 256
# Max items of a producer waiting while the previous batch is being published.
ASYNC_BATCH = 256
DRAIN_CHECK_SECONDS = 0.02
# Allocations between collections of the youngest generation while a flow runs.
GC_YOUNG_THRESHOLD = 10_000


def build_topology(flow: LoadedFlow) -> Topology:
    """Translate the flow spec into what a broker declares."""
    spec = flow.spec
    subscriptions = []
    for name, sub in spec.subscribers.items():
        topic_spec = spec.topics[sub.topic]
        subscriptions.append(SubscriptionConfig(
            name=name,
            topic=sub.topic,
            ack=sub.ack,
            ack_timeout=sub.ack_timeout,
            max_deliveries=sub.max_deliveries,
            dead_letter=sub.dead_letter,
            retry=sub.retry,
            max_pending=topic_spec.max_pending,
            on_full=topic_spec.on_full,
            ordered=sub.ordered,
            plugin=sub.plugin,
        ))
    return Topology(spec.name, tuple(spec.topics), tuple(subscriptions))


@dataclass
class RunResult:
    """Result of `flowrun up`: the broker's counters and the failures of producers."""

    report: dict[str, Any]
    failures: list[str] = field(default_factory=list)


class FlowRuntime:
    """Runs one flow: producers publish, subscription workers deliver, until stopped or drained."""

    def __init__(
        self,
        flow: LoadedFlow,
        broker: Broker | None = None,
        clock: Clock = SYSTEM_CLOCK,
        only: set[str] | None = None,
    ) -> None:
        self.flow = flow
        self.clock = clock
        self.broker = broker or create_broker(flow.spec.broker, flow.path, flow.spec.name, clock)
        self.only = only
        self.workers: dict[str, SubscriptionWorker] = {}
        self.failures: list[str] = []
        self.stop_requested = asyncio.Event()
        self._producers: dict[str, tuple[Producer, Context, Invoker]] = {}
        self._producer_tasks: dict[str, asyncio.Task[None]] = {}
        self._handlers: dict[str, tuple[Handler, Context]] = {}
        self._schemas: dict[str, TopicSchema] = {}
        self._started = False
        self._frozen = False
        self._gc_thresholds: tuple[int, ...] = gc.get_threshold()

    def _selected(self, name: str) -> bool:
        return self.only is None or name in self.only

    # Starting

    async def start(self) -> None:
        """Declare the topology, load and set up plugins, then start delivering and producing."""
        loop = asyncio.get_running_loop()
        self._load_schemas()
        await self.broker.start(build_topology(self.flow))
        self._started = True

        self._load_plugins(loop)
        for name, (handler, context) in self._handlers.items():
            invoker = Invoker(name, 1)
            try:
                await handler.setup(invoker, context)
            except (Exception, *EXITS) as error:
                raise PluginError(handler.reference, f"setup() of subscriber '{name}' failed: {_plugin_failure(error)}") from error
            finally:
                invoker.shutdown()

        for name, (producer, context, invoker) in self._producers.items():
            try:
                await producer.setup(invoker, context)
            except (Exception, *EXITS) as error:
                raise PluginError(producer.reference, f"setup() of producer '{name}' failed: {_plugin_failure(error)}") from error

        # Everything alive now (modules, plugins, the flow) lives as long as the run, so
        # full garbage collections while messages flow need not scan it again. Each
        # delivery allocates a few dozen objects (most of them its decoded payload), so the
        # youngest generation is collected every GC_YOUNG_THRESHOLD allocations instead of
        # Python's 700. Measured on the in-process benchmark: about 5% more messages per
        # second from the freeze and 3.5% from the threshold.
        gc.freeze()
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *self._gc_thresholds[1:])
        self._frozen = True
        self._start_workers()
        for name in self._producers:
            await self.broker.set_producer_state(name, False)
            self._producer_tasks[name] = asyncio.create_task(self._run_producer(name), name=f"flowrun-producer-{name}")

    def _load_schemas(self) -> None:
        for name, topic_spec in self.flow.spec.topics.items():
            if topic_spec.schema_ is None:
                continue
            try:
                self._schemas[name] = load_topic_schema(name, topic_spec.schema_, self.flow.path.parent)
            except SchemaError as error:
                raise FlowrunError(f"{self.flow.locate_value('topics', name, 'schema')}: error: {error}") from None

    def _load_plugins(self, loop: asyncio.AbstractEventLoop) -> None:
        spec = self.flow.spec
        search_path = self.flow.path.parent

        for name, sub in spec.subscribers.items():
            if not self._selected(name):
                continue
            location = self.flow.locate_value("subscribers", name, "plugin")
            handler = _with_location(lambda: Handler(sub.plugin, resolve(sub.plugin, search_path)), location)
            self._handlers[name] = (handler, self._context(name, sub.with_, sub.publishes, loop))

        for name, producer_spec in spec.producers.items():
            if not self._selected(name):
                continue
            location = self.flow.locate_value("producers", name, "plugin")
            producer = _with_location(lambda: Producer(producer_spec.plugin, resolve(producer_spec.plugin, search_path)),
                                      location)
            context = self._context(name, producer_spec.with_, producer_spec.publishes, loop)
            self._producers[name] = (producer, context, Invoker(name, 1))

    def _context(self, name: str, options: dict[str, Any], publishes: list[str], loop: asyncio.AbstractEventLoop) -> Context:
        return Context(name, options, publishes, self.publish, loop, self.clock, self.flow.path, self.flow.spec.name)

    def _start_workers(self) -> None:
        topology = self.broker.topology
        assert topology is not None
        for name, (handler, context) in self._handlers.items():
            sub = self.flow.spec.subscribers[name]
            worker = SubscriptionWorker(name, sub, topology.subscription(name), self.broker, handler, context,
                                        self.flow.spec.max_hops)
            self.workers[name] = worker
            worker.start()

    # Publishing

    async def publish(
        self, topic: str, payload: Any, key: str | None = None, headers: dict[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Encode and store one message; the single path every publish takes."""
        envelope = self._envelope(topic, payload, key, headers, message_id)
        await self.broker.publish([envelope])
        return envelope.id

    def _envelope(
        self, topic: str, payload: Any, key: str | None, headers: dict[str, str] | None, message_id: str | None
    ) -> Envelope:
        if headers:
            self._check_hops(topic, headers)
        else:
            headers = {}
        body = codec.encode(payload, topic)
        schema = self._schemas.get(topic)
        if schema is not None:
            schema.validate(body)
        if message_id is None:
            return Envelope(new_id(), topic, body, key, headers, self.clock.wall())
        return Envelope(message_id, topic, body, key, headers, self.clock.wall(), dedupe=True)

    def _check_hops(self, topic: str, headers: dict[str, str]) -> None:
        hops = int(headers.get(HOPS_HEADER, "0") or 0)
        if hops > self.flow.spec.max_hops:
            raise HopLimitError(
                f"message to topic '{topic}' passed {hops} handlers, above max_hops {self.flow.spec.max_hops}; "
                "the flow loops, so the message is dead-lettered (or dropped without a dead-letter topic)"
            )

    # Producers

    async def _run_producer(self, name: str) -> None:
        producer, context, invoker = self._producers[name]
        logger.info("producer '%s' started", name)
        try:
            result = await self._start_producer(producer, context, invoker)
            if inspect.isawaitable(result):
                await result
            elif hasattr(result, "__aiter__"):
                await self._publish_async_items(name, context, result)
            elif hasattr(result, "__next__") or hasattr(result, "__iter__"):
                await self._publish_sync_items(name, context, invoker, iter(result))
            elif result is not None:
                raise PluginError(producer.reference, f"run() returned {type(result).__name__}; "
                                  "return an iterator or async iterator of payloads, or publish via context.publish")
            logger.info("producer '%s' finished", name)
            await self.broker.set_producer_state(name, True)
        except asyncio.CancelledError:
            logger.info("producer '%s' stopped", name)
            raise
        except EXITS as raised:
            await self._producer_failed(name, PluginExit(raised))
        except Exception as error:  # noqa: BLE001 - a producer's failure is reported, not raised
            await self._producer_failed(name, error)

    async def _producer_failed(self, name: str, error: Exception) -> None:
        """Log a producer's failure in one line, at the line of its own code that raised, and record it.

        The full traceback is logged at debug level (`--log-level debug`).
        """
        where = plugin_frame(error)
        at = f" at {where}" if where else ""
        logger.error("producer '%s' failed%s: %s: %s", name, at, type(error).__name__, error)
        logger.debug("traceback of the failure of producer '%s'", name, exc_info=error)
        self.failures.append(f"producer '{name}' failed: {type(error).__name__}: {error}")
        # A failed producer publishes nothing more, so waiting for it cannot end.
        await self.broker.set_producer_state(name, True)

    async def _start_producer(self, producer: Producer, context: Context, invoker: Invoker) -> Any:
        function = producer.function
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function) or inspect.isgeneratorfunction(function):
            return producer.start(context)
        return await invoker.call(producer.start, context)

    def _route(self, name: str, context: Context, item: Any) -> Envelope:
        """Turn a produced item into an envelope, checking its topic against `publishes`."""
        if isinstance(item, Outgoing):
            topic, payload, key, headers, message_id = item.topic, item.payload, item.key, item.headers, item.id
        elif len(context.publishes) == 1:
            # The producer's only topic: nothing to check.
            return self._envelope(context.publishes[0], item, None, None, None)
        else:
            raise FlowrunError(f"producer '{name}' publishes to {len(context.publishes)} topics, so each item "
                               "must be a flowrun.Outgoing naming its topic")
        context.check_topic(topic)
        return self._envelope(topic, payload, key, dict(headers) if headers else None, message_id)

    async def _publish_async_items(self, name: str, context: Context, items: AsyncIterator[Any]) -> None:
        publisher = BatchPublisher(self.broker, name, ASYNC_BATCH)
        try:
            async for item in items:
                if publisher.put(self._route(name, context, item)):
                    # Backpressure: wait until the waiting items are stored.
                    await publisher.flush()
        except asyncio.CancelledError:
            # Items already yielded are published before the producer stops, unless the
            # broker cannot take them within shutdown_timeout.
            await publisher.close(self.flow.spec.shutdown_timeout)
            raise
        except Exception:
            # Items yielded before a failing one are published, as they would be one by one.
            await publisher.flush()
            raise
        await publisher.flush()

    async def _publish_sync_items(self, name: str, context: Context, invoker: Invoker, items: Iterator[Any]) -> None:
        # Sync iterators may block (files, network), so they are read on the producer's
        # thread, and each item reaches the event loop as soon as it is yielded.
        pump = SyncPump(items, asyncio.get_running_loop(), SYNC_ITERATOR_CHUNK)
        reading = asyncio.ensure_future(invoker.call(pump.run))
        try:
            await self._publish_async_items(name, context, aiter(pump))
        finally:
            pump.stop()
        await reading

    @property
    def producers_done(self) -> bool:
        return all(task.done() for task in self._producer_tasks.values())

    # Running and stopping

    async def drained(self) -> bool:
        """Return whether producers finished and every subscription is empty with nothing in flight."""
        if not self.producers_done:
            return False
        if not await self.broker.producers_finished(list(self.flow.spec.producers)):
            return False
        if not all(worker.idle for worker in self.workers.values()):
            return False
        names = [name for name in self.flow.spec.subscribers if self._selected(name)]
        return await self.broker.all_settled(names)

    async def wait(self, until_drained: bool) -> None:
        """Return when a stop was requested or, with `until_drained`, when the flow drained."""
        while not self.stop_requested.is_set():
            if until_drained and await self.drained():
                return
            await self.clock.wait(self.stop_requested, DRAIN_CHECK_SECONDS if until_drained else None)

    async def stop(self) -> RunResult:
        """Stop producers, let running handlers finish within shutdown_timeout, close everything."""
        for context in [context for _, context, _ in self._producers.values()]:
            context.stopping.set()
        for task in self._producer_tasks.values():
            task.cancel()
        await asyncio.gather(*self._producer_tasks.values(), return_exceptions=True)

        for worker in self.workers.values():
            worker.context.stopping.set()
            await worker.stop_fetching()
        await self._finish_handlers()

        for worker in self.workers.values():
            await worker.close()
        await self._close_plugins()

        report = await self.broker.stats() if self._started else {"topics": {}, "subscriptions": {}}
        await self.broker.close()
        if self._frozen:
            gc.unfreeze()
            gc.set_threshold(*self._gc_thresholds)
            self._frozen = False
        return RunResult(report, list(self.failures))

    async def _finish_handlers(self) -> None:
        timeout = self.flow.spec.shutdown_timeout
        busy = sum(1 for worker in self.workers.values() if not worker.idle)
        if busy:
            logger.info("waiting up to %gs for the running handlers of %d subscribers", timeout, busy)

        results = await asyncio.gather(*(worker.finish(timeout) for worker in self.workers.values()))
        unfinished = sum(results)
        if unfinished:
            logger.warning("stopped %d handler calls still running after %gs; their messages stay unacked "
                           "and are delivered again", unfinished, timeout)

    async def _close_plugins(self) -> None:
        for name, (handler, _) in self._handlers.items():
            invoker = Invoker(name, 1)
            try:
                await self._close_plugin(f"subscriber '{name}'", handler.close(invoker))
            finally:
                invoker.shutdown()

        for name, (producer, _, invoker) in self._producers.items():
            try:
                await self._close_plugin(f"producer '{name}'", producer.close(invoker))
            finally:
                invoker.shutdown()

    async def _close_plugin(self, plugin: str, closing: Awaitable[None]) -> None:
        """Await one plugin's close() for at most shutdown_timeout; log a failure instead of raising it.

        A sync close() that runs on past the timeout is left on its thread, as a stuck
        handler call is (`flowrun up` then exits without waiting for it).
        """
        timeout = self.flow.spec.shutdown_timeout
        try:
            await asyncio.wait_for(closing, timeout)
        except TimeoutError:
            logger.warning("close() of %s did not return within shutdown_timeout %gs; stopping without it",
                           plugin, timeout)
        except (Exception, *EXITS) as error:  # noqa: BLE001 - a failing close() must not stop the others
            logger.error("close() of %s failed: %s", plugin, _plugin_failure(error))


def _with_location(build: Any, location: Any) -> Any:
    try:
        return build()
    except PluginError as error:
        if error.location is None:
            raise PluginError(error.reference, error.detail, location) from error.__cause__
        raise


async def run_flow(
    flow: LoadedFlow,
    until_drained: bool = False,
    broker: Broker | None = None,
    clock: Clock = SYSTEM_CLOCK,
    only: set[str] | None = None,
) -> RunResult:
    """Start a flow, wait until it drains (or forever), then stop it and return the report."""
    runtime = FlowRuntime(flow, broker=broker, clock=clock, only=only)
    try:
        await runtime.start()
        await runtime.wait(until_drained)
    finally:
        result = await runtime.stop()
    return result


def _plugin_failure(error: BaseException) -> str:
    """Describe a failure of plugin code for a one-line message; exits become PluginExit's text."""
    if isinstance(error, EXITS):
        return str(PluginExit(error))
    return str(error) or type(error).__name__
