"""The broker interface every backend implements, and the pieces backends share.

A backend stores messages per subscription and settles them. The runtime never talks to a
broker client directly, so a new backend is one module implementing `Broker`:

- `publish` accepts a batch of envelopes and returns once they are stored (waiting for
  room when a subscription is full, unless its topic rejects on full);
- `fetch` is a long poll: it returns up to `max_messages` deliveries as soon as any are
  ready, or an empty list after `timeout`;
- `ack` and `nack` take batches; a nack either schedules a redelivery after a delay or,
  once `max_deliveries` is reached or the nack is terminal, dead-letters or drops;
- `consume` starts push delivery with a cap on unacknowledged messages;
- `stats` returns the counters in the report shape.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.codec import iso_time
from flowrun.errors import BrokerError
from flowrun.message import HEADER_PREFIX, REPLAYED_FROM_HEADER, Delivery, Envelope
from flowrun.spec import AckPolicy, OnFull, RetrySpec

logger = logging.getLogger(__name__)

# Push consumers call this for each delivery; an awaitable it returns runs as a task.
DeliveryCallback = Callable[[Delivery], Awaitable[None] | None]


@dataclass(frozen=True)
class SubscriptionConfig:
    """Settings of one subscription that a broker applies."""

    name: str
    topic: str
    ack: AckPolicy = AckPolicy.AUTO
    ack_timeout: float = 30.0
    max_deliveries: int = 5
    dead_letter: str | None = None
    retry: RetrySpec = field(default_factory=RetrySpec)
    max_pending: int = 10_000
    on_full: OnFull = OnFull.BLOCK
    ordered: bool = False
    plugin: str = ""

    def backoff(self, delivery_count: int) -> float:
        """Delay before the delivery that follows delivery number `delivery_count`."""
        retry = self.retry
        delay = min(retry.max, retry.initial * retry.multiplier ** max(delivery_count - 1, 0))
        if retry.jitter:
            delay -= delay * retry.jitter * random.random()
        return delay


@dataclass(frozen=True)
class Topology:
    """Every topic and subscription of a flow, declared on the broker at start."""

    flow_name: str
    topics: tuple[str, ...]
    subscriptions: tuple[SubscriptionConfig, ...]

    def subscription(self, name: str) -> SubscriptionConfig:
        for config in self.subscriptions:
            if config.name == name:
                return config
        raise KeyError(name)


@dataclass(frozen=True)
class ErrorInfo:
    """Failure of a delivery, as carried into dead-letter headers."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def timeout(cls, seconds: float) -> ErrorInfo:
        return cls("flowrun.AckTimeout", f"not acked within the ack timeout of {seconds:g}s")


# The error of a nack that carried none. The runtime gives every nack an error, so only
# programs that call a broker's `nack` themselves can see this.
NO_ERROR = ErrorInfo("flowrun.Unknown", "the nack carried no error")


@dataclass(frozen=True)
class Nack:
    """A negative acknowledgement of one delivery."""

    tag: Any
    delay: float | None = None
    error: ErrorInfo | None = None
    terminal: bool = False
    dead_letter: bool = True
    """With `terminal`: send to the dead-letter topic (True) or drop (False)."""


DEAD_LETTER_HEADERS = (
    "flowrun.original_topic",
    "flowrun.original_id",
    "flowrun.subscription",
    "flowrun.plugin",
    "flowrun.delivery_count",
    "flowrun.error_type",
    "flowrun.error",
    "flowrun.traceback",
    "flowrun.first_delivered_at",
    "flowrun.last_delivered_at",
)


def dead_letter_headers(
    delivery: Delivery, config: SubscriptionConfig, error: ErrorInfo | None, now: float
) -> dict[str, str]:
    """Build the failure envelope every backend attaches to a dead letter."""
    error = error or NO_ERROR
    headers = dict(delivery.envelope.headers)
    headers.update(
        {
            "flowrun.original_topic": delivery.envelope.topic,
            "flowrun.original_id": delivery.envelope.id,
            "flowrun.subscription": config.name,
            "flowrun.plugin": config.plugin,
            "flowrun.delivery_count": str(delivery.delivery_count),
            "flowrun.error_type": error.type,
            "flowrun.error": error.message,
            "flowrun.traceback": error.traceback,
            "flowrun.first_delivered_at": iso_time(delivery.first_delivered_at),
            "flowrun.last_delivered_at": iso_time(now),
        }
    )
    return headers


def replay_headers(letter: dict[str, Any]) -> dict[str, str]:
    """Build the headers of a replayed dead letter, without the failure headers.

    `letter` is a dead letter as the backends' `dead_letters` list it. The replay links to
    the id the message was first published under, also when it was replayed before.
    """
    original = letter["headers"]
    headers = {name: value for name, value in original.items() if not name.startswith(HEADER_PREFIX)}
    headers[REPLAYED_FROM_HEADER] = original.get(REPLAYED_FROM_HEADER, letter["message_id"])
    return headers


class Broker(abc.ABC):
    """Stores messages per subscription and delivers them with acks, retries and dead letters."""

    backend = "abstract"

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.topology: Topology | None = None
        self._consumers: dict[str, list[FetchConsumer]] = {}
        self.__producer_states: dict[str, bool] = {}

    @abc.abstractmethod
    async def start(self, topology: Topology) -> None:
        """Connect and declare every topic and subscription of the flow."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; unacked messages stay with the broker where it is durable."""

    @abc.abstractmethod
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store each envelope for every subscription of its topic."""

    @abc.abstractmethod
    async def fetch(self, subscription: str, max_messages: int, timeout: float) -> list[Delivery]:
        """Return up to `max_messages` deliveries, waiting up to `timeout` seconds for the first."""

    @abc.abstractmethod
    async def ack(self, subscription: str, tags: Sequence[Any]) -> None:
        """Settle deliveries as done; unknown or expired tags are ignored."""

    @abc.abstractmethod
    async def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        """Redeliver later, or dead-letter or drop once the deliveries are used up."""

    async def give_back(self, subscription: str, tags: Sequence[Any]) -> None:
        """Return deliveries that no handler received, because their consumer is stopping.

        By default this is a nack without delay, so the next delivery counts as a
        redelivery. Backends that can undo a delivery override it.
        """
        error = ErrorInfo("flowrun.Stopped", "fetched, but its consumer stopped before a handler took it")
        await self.nack(subscription, [Nack(tag, delay=0.0, error=error) for tag in tags])

    @abc.abstractmethod
    async def stats(self) -> dict[str, Any]:
        """Counters in the report shape: topics with published, subscriptions with counts."""

    async def all_settled(self, subscriptions: Sequence[str]) -> bool:
        """Return whether these subscriptions have nothing pending, delayed or in flight.

        Backends with a cheaper way to tell than `stats` override this, because the
        runtime calls it often while it waits for a flow to drain.
        """
        report = await self.stats()
        for name in subscriptions:
            counts = report["subscriptions"].get(name)
            if counts is not None and (counts["pending"] or counts["in_flight"]):
                return False
        return True

    async def set_producer_state(self, name: str, finished: bool) -> None:
        """Record whether a producer finished, for processes that drain without running it."""
        self.__producer_states[name] = finished

    async def producers_finished(self, names: Sequence[str]) -> bool:
        """Return whether every named producer recorded that it finished."""
        return all(self.__producer_states.get(name, False) for name in names)

    def consume(self, subscription: str, callback: DeliveryCallback, max_in_flight: int) -> FetchConsumer:
        """Start push delivery of `subscription` to `callback`, at most `max_in_flight` unacked."""
        consumer = FetchConsumer(self, subscription, callback, max_in_flight)
        self._consumers.setdefault(subscription, []).append(consumer)
        consumer.start()
        return consumer

    def _released(self, subscription: str, tag: Any) -> None:
        """Tell push consumers that a delivery was acked, nacked or expired."""
        for consumer in self._consumers.get(subscription, ()):
            consumer.release(tag)

    def _released_all(self, subscription: str, tags: Sequence[Any]) -> None:
        """Tell push consumers that these deliveries were acked, nacked or expired."""
        for consumer in self._consumers.get(subscription, ()):
            consumer.release_all(tags)


class FetchFailures:
    """Consecutive fetch failures of one consumer, for the backoff before the next try."""

    FIRST_DELAY = 0.1
    MAX_DELAY = 5.0

    def __init__(self) -> None:
        self.count = 0

    def next_delay(self) -> float:
        self.count += 1
        return min(self.MAX_DELAY, self.FIRST_DELAY * 2 ** (self.count - 1))


async def fetch_or_back_off(
    broker: Broker, subscription: str, max_messages: int, timeout: float, failures: FetchFailures
) -> list[Delivery]:
    """Fetch; on a broker failure log it, wait with exponential backoff and return nothing.

    A consumer keeps running through a broker outage instead of stopping for good.
    """
    try:
        deliveries = await broker.fetch(subscription, max_messages, timeout)
    except BrokerError as error:
        delay = failures.next_delay()
        if failures.count == 1 or failures.count % 10 == 0:
            logger.warning("fetch from subscription '%s' failed (%d in a row), retrying in %gs: %s",
                           subscription, failures.count, delay, error)
        await broker.clock.sleep(delay)
        return []

    if failures.count:
        logger.info("fetch from subscription '%s' works again after %d failures", subscription, failures.count)
        failures.count = 0
    return deliveries


# Bytes of message bodies that a push consumer keeps fetched and unacked, at most about:
# the window shrinks below `limit` when messages are large, so memory stays bounded also
# with megabyte payloads. Estimated from the first body of each fetch.
WINDOW_BYTES = 16 * 1024 * 1024
# Weight of the newest sample in the mean body size.
BODY_SIZE_WEIGHT = 0.25


class FetchConsumer:
    """Push delivery built on `fetch`: dispatches while fewer than the cap are unacked."""

    def __init__(self, broker: Broker, subscription: str, callback: DeliveryCallback, max_in_flight: int) -> None:
        self.broker = broker
        self.subscription = subscription
        self.callback = callback
        self.max_in_flight = max_in_flight
        # The window in use, at most max_in_flight; the runtime fits it to the handler's speed.
        self.limit = max_in_flight
        self.outstanding: set[Any] = set()
        self.peak_outstanding = 0
        # The window that WINDOW_BYTES allows for the mean body size seen so far.
        self.byte_limit = max_in_flight
        self._mean_body = 0.0
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._failures = FetchFailures()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"flowrun-consume-{self.subscription}")

    def set_limit(self, limit: int) -> None:
        """Change the window, between 1 and max_in_flight."""
        limit = max(1, min(limit, self.max_in_flight))
        if limit > self.limit:
            self._room.set()
        self.limit = limit

    def release(self, tag: Any) -> None:
        if tag in self.outstanding:
            self.outstanding.discard(tag)
            self._room.set()

    def release_all(self, tags: Sequence[Any]) -> None:
        before = len(self.outstanding)
        self.outstanding.difference_update(tags)
        if len(self.outstanding) < before:
            self._room.set()

    async def _run(self) -> None:
        while True:
            while len(self.outstanding) >= min(self.limit, self.byte_limit):
                self._room.clear()
                await self._room.wait()

            free = min(self.limit, self.byte_limit) - len(self.outstanding)
            deliveries = await fetch_or_back_off(self.broker, self.subscription, free, 5.0, self._failures)

            if not deliveries:
                # A closed broker returns at once; yield so the loop cannot starve others.
                await asyncio.sleep(0)
                continue
            self._note_body_size(len(deliveries[0].envelope.body))
            for delivery in deliveries:
                self.outstanding.add(delivery.tag)
                result = self.callback(delivery)
                if result is not None and inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)
            self.peak_outstanding = max(self.peak_outstanding, len(self.outstanding))

    def _note_body_size(self, size: int) -> None:
        """Fold one fetch's body size into the mean, and fit byte_limit to it."""
        if self._mean_body:
            self._mean_body += BODY_SIZE_WEIGHT * (size - self._mean_body)
        else:
            self._mean_body = float(size)
        self.byte_limit = max(1, int(WINDOW_BYTES // max(self._mean_body, 1.0)))

    async def stop(self) -> None:
        """Stop fetching; handlers already dispatched keep running."""
        if self._task is None:
            return
        # TODO: on Redis, a cancel that lands while the server runs the fetch script leases
        # entries that no handler receives, so they wait out their ack timeout. The other
        # backends hand such messages back or lease nothing before their wait ends.
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    @property
    def running_handlers(self) -> set[asyncio.Task[None]]:
        return self._handlers
