"""RabbitMQ backend on aio-pika: quorum queues, publisher confirms and local ack leases.

How flowrun's model maps onto RabbitMQ. Every name starts with the flow name, so several
flows can share one server (virtual host):

| flowrun | RabbitMQ |
| --- | --- |
| topic | durable fanout exchange `{flow}.topic.{topic}` |
| subscription | durable queue `{flow}.sub.{name}` (quorum unless `queue_type: classic`), bound to its topic's exchange |
| publish | persistent message; `publish` returns after the server's publisher confirm |
| fetch | one consumer per subscription (basic.qos prefetch) fills a local buffer; `fetch` takes from it |
| ack timeout | a lease per delivery kept by this process; past it the broker retries or gives up itself |
| delivery count | header `flowrun-deliveries` (deliveries before the message was last enqueued) + `x-delivery-count` + 1 |
| backoff | queue `{flow}.retry.{name}`: per-message expiration, then dead-lettered back to the subscription queue |
| dead letter | published to the dead-letter topic's exchange with the failure headers and copied to `{flow}.dead-letters`, then the original is acked |
| max_pending | checked before each publish, with `x-max-length` + `x-overflow: reject-publish` as the server-side backstop |
| counters | a `Counters` object per process; pending and delayed come from the server's queue counts |
| producer state | queue `{flow}.producer.{name}.finished`, which contains one message once the producer finished |
| flow settings | queue `{flow}.settings`, whose one message records the settings the queues were declared with |

What is exact and what is not:

- Counters (published, delivered, acked, redelivered, dead_lettered, dropped) and the
  `in_flight` gauge cover this process only. `pending` is the server's count of ready
  messages in the subscription and retry queues plus this process's local buffer; RabbitMQ
  does not report unacknowledged messages over AMQP, so deliveries held by other processes
  appear in no gauge. `oldest_pending_age` is known only while this process buffers
  messages of the subscription, and is None otherwise.
- RabbitMQ has no built-in message deduplication: a message id published twice is stored
  twice.
- `max_pending` counts ready and delayed messages on the server plus the messages this
  process holds. Deliveries held by other processes are not counted, so with several
  processes a subscription can exceed the bound by what they hold. The server's
  `x-max-length` backstop bounds ready messages only, and quorum queues enforce it loosely.
  On RabbitMQ 3.10.8 a quorum queue admitted one message past the limit, and one more per
  new publishing channel. Then it rejected publishes until it was down to 80 % of the limit.
  A publish that the server rejects may already sit in the other subscriptions of its
  topic: with `on_full: block` it is published again (they receive it twice), with
  `on_full: reject` it raises `QueueFullError`.
- Retries wait in the retry queue, and RabbitMQ expires messages only at the head of a
  queue, so with mixed delays a retry can be late by up to the longest delay ahead of it.
- `ordered: true` holds back a key while this process has a message of that key in flight
  or waiting for a retry, which it keeps unacked here instead of in the retry queue.
  Processes do not see each other's busy keys.
- RabbitMQ's own `consumer_timeout` (30 minutes by default) closes a channel that holds a
  delivery longer, so an `ack_timeout` or retry delay above it cannot be honoured.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import json
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
)
from aiormq.exceptions import ChannelAccessRefused

from flowrun.broker import (
    NO_ERROR,
    Broker,
    DeliveryCallback,
    ErrorInfo,
    FetchConsumer,
    Nack,
    SubscriptionConfig,
    Topology,
    dead_letter_headers,
    replay_headers,
)
from flowrun.brokers import redact_url
from flowrun.brokers.options import RabbitmqOptions
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.counters import Counters, Gauges
from flowrun.errors import BrokerError, QueueFullError
from flowrun.logs import RepeatLimiter
from flowrun.message import Delivery, Envelope
from flowrun.spec import AckPolicy, BrokerSpec, OnFull
from flowrun.tasks import cancel_and_wait

logger = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 5.0
# After the first message of a fetch arrives, the fetch waits until no message arrived for
# BURST_QUIET_SECONDS (at most BURST_MAX_SECONDS), so a burst the server sends together is
# returned together instead of one message per fetch.
BURST_QUIET_SECONDS = 0.002
BURST_MAX_SECONDS = 0.01
# A full subscription is checked again on every local ack, and at least this often for acks
# made by other processes (the wait doubles up to the maximum).
ROOM_POLL_SECONDS = 0.01
ROOM_POLL_MAX_SECONDS = 0.5
SETTINGS_VERSION = 1
# First wait before repeating an operation that failed because the connection dropped.
RECONNECT_RETRY_SECONDS = 0.05
# basic.qos prefetch_count is an unsigned 16-bit field.
MAX_PREFETCH = 65_535

# Message headers. The envelope's own headers travel as a nested table under HEADERS. Times
# travel as decimal strings because pamqp 4.0 encodes a Python float as a 32-bit float, which
# rounds Unix timestamps to about a minute.
HEADERS = "flowrun-headers"
KEY = "flowrun-key"
PUBLISHED_AT = "flowrun-published-at"
DELIVERIES = "flowrun-deliveries"
FIRST_DELIVERED_AT = "flowrun-first-delivered-at"
# Extra headers of the copies kept in the dead-letter archive.
ARCHIVE_SUBSCRIPTION = "flowrun-subscription"
ARCHIVE_TOPIC = "flowrun-topic"
ARCHIVE_MESSAGE_ID = "flowrun-message-id"
ARCHIVE_DEAD_LETTERED_AT = "flowrun-dead-lettered-at"

CLASSIC: dict[str, Any] = {"x-queue-type": "classic"}
CLIENT_ERRORS = (AMQPError, OSError, TimeoutError, RuntimeError)


@dataclass(frozen=True)
class _Tag:
    """Identifies one delivery made by this broker, and becomes stale once the delivery is settled."""

    number: int


@dataclass(eq=False)
class _Arrival:
    """A message the consumer received, waiting in the local buffer to be fetched."""

    message: AbstractIncomingMessage
    channel: aio_pika.Channel
    # Ordered subscriptions retry in place: deliveries made from this process's buffer
    # that the message's headers do not count yet.
    local_deliveries: int = 0
    first_delivered_at: float = 0.0


@dataclass(eq=False)
class _Lease:
    """A delivery handed to the application and not yet settled."""

    arrival: _Arrival
    delivery: Delivery
    settled_on_server: bool = False
    """True under ack: none, where the message left the server as it was delivered."""

    @property
    def message(self) -> AbstractIncomingMessage:
        return self.arrival.message


@dataclass(eq=False)
class _Subscription:
    """One subscription's server names and this process's consumer state."""

    config: SubscriptionConfig
    queue: str
    retry_queue: str
    buffer: deque[_Arrival] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    last_arrival: float = 0.0
    leases: dict[_Tag, _Lease] = field(default_factory=dict)
    # Ordered subscriptions: keys with a delivery in flight or waiting for a retry, and the
    # waiting retries, which stay unacked in this process until their backoff passed.
    busy_keys: set[str] = field(default_factory=set)
    waiting_retries: set[_Arrival] = field(default_factory=set)
    channel: aio_pika.Channel | None = None
    consumer_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight_hint: int = 0
    # Ready and delayed messages at the last server check, plus what went to the server since.
    server_size: int = 0
    added_since_check: int = 0


class RabbitmqBroker(Broker):
    """Broker on a RabbitMQ server, shared by every process of a flow."""

    backend = "rabbitmq"

    def __init__(self, url: str, flow_name: str, options: RabbitmqOptions | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock)
        self.url = url
        self.flow_name = flow_name
        self.options = options or RabbitmqOptions()
        self.counters = Counters()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._control: aio_pika.Channel | None = None
        self._publisher: aio_pika.Channel | None = None
        self._channel_lock = asyncio.Lock()
        self._subscriptions: dict[str, _Subscription] = {}
        self._by_topic: dict[str, list[_Subscription]] = {}
        self._topics: tuple[str, ...] = ()
        self._producers: set[str] = set()
        self._tags = itertools.count(1)
        # (due, sequence, subscription, lease to expire or waiting retry to return to the buffer)
        self._timers: list[tuple[float, int, str, _Tag | _Arrival]] = []
        self._sequence = itertools.count()
        self._timer_changed = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._closed = False
        self._warnings = RepeatLimiter(logger, clock)

    @classmethod
    def from_spec(cls, spec: BrokerSpec, options: RabbitmqOptions, flow_path: Path, flow_name: str,
                  clock: Clock) -> RabbitmqBroker:
        if not spec.url:
            raise BrokerError("the rabbitmq backend needs broker.url, for example amqp://user:password@host:5672/")
        return cls(spec.url, flow_name, options, clock)

    @property
    def closed(self) -> bool:
        """Whether `close` was called or the broker never connected."""
        return self._closed or self._connection is None

    # Names on the server

    def _exchange_name(self, topic: str) -> str:
        return f"{self.flow_name}.topic.{topic}"

    def _queue_name(self, subscription: str) -> str:
        return f"{self.flow_name}.sub.{subscription}"

    def _retry_queue_name(self, subscription: str) -> str:
        return f"{self.flow_name}.retry.{subscription}"

    def _producer_queue_name(self, producer: str) -> str:
        return f"{self.flow_name}.producer.{producer}.finished"

    @property
    def _archive_queue(self) -> str:
        return f"{self.flow_name}.dead-letters"

    @property
    def _settings_queue(self) -> str:
        return f"{self.flow_name}.settings"

    @property
    def _producer_registry(self) -> str:
        return f"{self.flow_name}.producers"

    # Lifecycle

    async def start(self, topology: Topology) -> None:
        """Connect, check the flow's settings against the server's, and declare everything."""
        self._use_topology(topology)
        async with self._translate("connecting"):
            await self._connect()
        async with self._translate("declaring the flow's exchanges and queues"):
            await self._declare_checked(topology)
        self._timer_task = asyncio.create_task(self._run_timers(), name="flowrun-rabbitmq-leases")
        logger.info("rabbitmq broker started on %s with %d topics and %d subscriptions",
                    redact_url(self.url), len(self._topics), len(self._subscriptions))

    async def open_for_inspection(self, topology: Topology | None) -> None:
        """Connect without declaring or consuming anything, for `status` and `dlq`."""
        if topology is not None:
            self._use_topology(topology)
        async with self._translate("connecting"):
            await self._connect()

    def _use_topology(self, topology: Topology) -> None:
        self.topology = topology
        self._topics = topology.topics
        for topic in topology.topics:
            self._by_topic.setdefault(topic, [])
        for config in topology.subscriptions:
            subscription = _Subscription(config, self._queue_name(config.name), self._retry_queue_name(config.name))
            self._subscriptions[config.name] = subscription
            self._by_topic.setdefault(config.topic, []).append(subscription)

    async def _connect(self) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            # The connection name shows in the management UI and `rabbitmqctl list_connections`.
            self._connection = await aio_pika.connect_robust(
                self.url, client_properties={"connection_name": f"flowrun {self.flow_name}"})

    async def close(self) -> None:
        """Stop the lease timers and close the connection, so the server requeues unacked messages."""
        self._closed = True
        for subscription in self._subscriptions.values():
            subscription.arrived.set()
        self._room.set()

        await cancel_and_wait(self._timer_task)
        self._timer_task = None

        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await connection.close()
        except CLIENT_ERRORS as error:
            logger.warning("closing the connection to %s failed: %s", redact_url(self.url), self._describe(error))

    async def delete_flow_resources(self) -> None:
        """Delete the flow's exchanges and queues on the server, with their messages."""
        for subscription in self._subscriptions.values():
            await self._stop_consumer(subscription)

        queues = [self._settings_queue, self._archive_queue, self._producer_registry]
        for subscription in self._subscriptions.values():
            queues += [subscription.queue, subscription.retry_queue]

        async with self._translate("deleting the flow's exchanges and queues"):
            producers = await self._registered_producers()
            queues += [self._producer_queue_name(name) for name in sorted(producers)]
            # Taken after the registry read, because a passive declare of a missing registry
            # closes the channel.
            channel = await self._control_channel()
            for name in queues:
                await channel.queue_delete(name)
            for topic in self._topics:
                await channel.exchange_delete(self._exchange_name(topic))
        logger.info("deleted %d queues and %d exchanges of flow '%s'", len(queues), len(self._topics), self.flow_name)

    # Channels: plain channels on a robust connection, opened again after the connection recovers.

    async def _control_channel(self) -> aio_pika.Channel:
        """Return the channel for declarations, counts and basic.get, opened again after a channel error."""
        async with self._channel_lock:
            if self._control is None or self._control.is_closed:
                self._control = await self._open_channel(confirms=True)
            return self._control

    async def _publisher_channel(self) -> aio_pika.Channel:
        async with self._channel_lock:
            if self._publisher is None or self._publisher.is_closed:
                self._publisher = await self._open_channel(confirms=True)
            return self._publisher

    async def _open_channel(self, confirms: bool) -> aio_pika.Channel:
        if self._connection is None or self._closed:
            raise BrokerError(f"the connection to {redact_url(self.url)} is closed")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await self._connection.ready()
        except TimeoutError:
            raise BrokerError(f"the connection to {redact_url(self.url)} is down and did not recover within "
                              f"{CONNECT_TIMEOUT_SECONDS:g}s; check that the server runs") from None
        channel = aio_pika.Channel(self._connection, publisher_confirms=confirms)
        await channel.initialize()
        return channel

    # Declaring, with a check against the settings the queues were declared with

    async def _declare_checked(self, topology: Topology) -> None:
        channel = await self._control_channel()
        settings_queue = await channel.declare_queue(self._settings_queue, durable=True, arguments=CLASSIC)
        records = await _take_all(settings_queue)
        try:
            previous = self._read_settings(records[-1]) if records else None
            current = self._settings(topology)
            removed = self._compare_settings(previous, current)
            await self._declare(topology)
            await self._detach_removed(removed, previous)
            await self._publish_to_queue(self._settings_queue, aio_pika.Message(
                json.dumps(current, sort_keys=True).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        except BaseException:
            for record in records:
                await _settle_quietly(record, requeue=True)
            raise
        for record in records:
            await record.ack()

    def _read_settings(self, record: AbstractIncomingMessage) -> dict[str, Any] | None:
        try:
            settings = json.loads(record.body)
        except ValueError as error:
            logger.warning("ignored the unreadable settings record in queue '%s' (%s); the flow's settings "
                           "replace it", self._settings_queue, error)
            return None
        return settings if isinstance(settings, dict) else None

    def _settings(self, topology: Topology) -> dict[str, Any]:
        subscriptions = {}
        for config in topology.subscriptions:
            settings = asdict(config)
            settings["ack"] = config.ack.value
            settings["on_full"] = config.on_full.value
            settings["retry"] = config.retry.model_dump()
            subscriptions[config.name] = settings
        return {"version": SETTINGS_VERSION, "queue_type": self.options.queue_type, "subscriptions": subscriptions}

    def _compare_settings(self, previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
        """Raise BrokerError for settings baked into existing queues, and return removed subscriptions.

        Settings that live in this process (ack policy, ack timeout, retry, on_full, ...)
        take effect at once and are only logged.
        """
        if previous is None or previous.get("version") != SETTINGS_VERSION:
            return []

        if previous.get("queue_type") != current["queue_type"]:
            queues = [self._archive_queue]
            for name in previous.get("subscriptions", {}):
                queues += [self._queue_name(name), self._retry_queue_name(name)]
            self._raise_drift([f"queue_type {previous.get('queue_type')} -> {current['queue_type']}"], queues)

        # Settings that are queue arguments or bindings. Only quorum queues take dead_letter and max_deliveries.
        fixed = ["topic", "max_pending"]
        if current["queue_type"] == "quorum":
            fixed += ["max_deliveries", "dead_letter"]
        differences = []
        queues = []
        for name, settings in current["subscriptions"].items():
            old = previous["subscriptions"].get(name)
            if old is None:
                continue
            changed = [key for key in fixed if old.get(key) != settings[key]]
            differences += [f"subscription '{name}': {key} {old.get(key)} -> {settings[key]}" for key in changed]
            if changed:
                queues.append(self._queue_name(name))
            for key, value in settings.items():
                if key not in fixed and old.get(key) != value:
                    logger.info("subscription '%s': %s changed from %s to %s; applied", name, key, old.get(key), value)

        if differences:
            self._raise_drift(differences, queues)
        return sorted(set(previous["subscriptions"]) - set(current["subscriptions"]))

    def _raise_drift(self, differences: list[str], queues: list[str]) -> None:
        raise BrokerError(
            f"the queues of flow '{self.flow_name}' on {redact_url(self.url)} were declared with other settings, "
            f"which RabbitMQ cannot change on an existing queue: {'; '.join(differences)}. To apply them, stop "
            "every process of the flow and delete these queues, which discards the messages they hold: "
            + " ".join(f"rabbitmqctl delete_queue {name};" for name in queues)
            + " or restore the previous settings"
        )

    async def _declare(self, topology: Topology) -> None:
        channel = await self._control_channel()
        exchanges = {}
        for topic in topology.topics:
            exchanges[topic] = await channel.declare_exchange(
                self._exchange_name(topic), aio_pika.ExchangeType.FANOUT, durable=True)

        for subscription in self._subscriptions.values():
            name = subscription.queue
            queue = await self._declare_queue(name, self._work_queue_arguments(subscription.config))
            await queue.bind(exchanges[subscription.config.topic])
            retry = {"x-queue-type": self.options.queue_type, "x-dead-letter-exchange": "",
                     "x-dead-letter-routing-key": name}
            await self._declare_queue(subscription.retry_queue, retry)
        await self._declare_queue(self._archive_queue, {"x-queue-type": self.options.queue_type})

    def _work_queue_arguments(self, config: SubscriptionConfig) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": self.options.queue_type,
            "x-max-length": config.max_pending,
            "x-overflow": "reject-publish",
        }
        if self.options.queue_type == "quorum":
            # A backstop for a message whose consumer keeps vanishing before it settles it (a
            # crash loop). This broker gives up on a message at max_deliveries itself, so the
            # server's limit is reached only when that fails too.
            arguments["x-delivery-limit"] = config.max_deliveries
            if config.dead_letter is not None:
                arguments["x-dead-letter-exchange"] = self._exchange_name(config.dead_letter)
        return arguments

    async def _declare_queue(self, name: str, arguments: dict[str, Any]) -> AbstractQueue:
        channel = await self._control_channel()
        try:
            return await channel.declare_queue(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as error:
            raise BrokerError(
                f"queue '{name}' on {redact_url(self.url)} exists with other settings ({self._describe(error)}); "
                f"stop every process of flow '{self.flow_name}' and delete it (rabbitmqctl delete_queue {name}), "
                "which discards its messages, or restore the previous settings"
            ) from None

    async def _detach_removed(self, removed: list[str], previous: dict[str, Any] | None) -> None:
        """Unbind queues of subscriptions the flow no longer has, so they stop filling up."""
        if not removed or previous is None:
            return
        channel = await self._control_channel()
        for name in removed:
            topic = previous["subscriptions"][name]["topic"]
            queue = await channel.get_queue(self._queue_name(name), ensure=False)
            try:
                await queue.unbind(self._exchange_name(topic))
            except ChannelNotFoundEntity:
                continue
            logger.warning(
                "subscription '%s' is no longer in flow '%s', so its queue '%s' was unbound from topic '%s'; "
                "it keeps the messages it holds until you delete it (rabbitmqctl delete_queue %s)",
                name, self.flow_name, self._queue_name(name), topic, self._queue_name(name),
            )

    # Publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish each envelope to its topic's exchange and wait for the server's confirms.

        Publishes are pipelined: the room check of the next envelope does not wait for the
        confirm of the previous one unless a subscription is full. Each message is counted
        as published when it is sent, because a consumer may receive it before the confirm
        arrives, and the count is taken back if the publish fails.
        """
        self._check_open()
        pending: list[tuple[Envelope, asyncio.Task[None]]] = []
        try:
            for envelope in envelopes:
                subscriptions = self._topic_subscriptions(envelope.topic)
                if self._needs_room_check(subscriptions):
                    await self._finish_publishes(pending)
                    await self._wait_for_room(envelope.topic, subscriptions)
                pending.append((envelope, asyncio.ensure_future(self._publish_to_topic(envelope))))
                self.counters.published[envelope.topic] += 1
                for subscription in subscriptions:
                    subscription.added_since_check += 1
            await self._finish_publishes(pending)
        finally:
            for envelope, task in pending:
                task.cancel()
                self.counters.published[envelope.topic] -= 1

    def _topic_subscriptions(self, topic: str) -> list[_Subscription]:
        subscriptions = self._by_topic.get(topic)
        if subscriptions is None:
            raise BrokerError(f"topic '{topic}' is not declared on the broker")
        return subscriptions

    async def _finish_publishes(self, pending: list[tuple[Envelope, asyncio.Task[None]]]) -> None:
        """Wait for confirms in order, removing each confirmed publish from `pending`.

        A publish that the server rejected as full is published again.
        """
        while pending:
            envelope, task = pending[0]
            try:
                await task
            except DeliveryError:
                await self._publish_after_reject(envelope)
            except CLIENT_ERRORS as error:
                raise self._error(f"publishing message {envelope.id} to topic '{envelope.topic}'", error) from None
            pending.pop(0)

    async def _publish_after_reject(self, envelope: Envelope) -> None:
        subscriptions = self._topic_subscriptions(envelope.topic)
        delay = ROOM_POLL_SECONDS
        while True:
            for subscription in subscriptions:
                await self._refresh_size(subscription)
            if any(subscription.config.on_full is OnFull.REJECT for subscription in subscriptions):
                raise QueueFullError(
                    f"the server rejected message {envelope.id} because a subscription of topic '{envelope.topic}' "
                    "is full (x-max-length); subscriptions that had room may have stored it. Retry later or "
                    "raise max_pending"
                )
            logger.warning("the server rejected message %s to topic '%s' as full; publishing it again in %gs, "
                           "so subscriptions that stored it receive it twice", envelope.id, envelope.topic, delay)
            await self.clock.sleep(delay)
            await self._wait_for_room(envelope.topic, subscriptions)
            try:
                await self._publish_to_topic(envelope)
                return
            except DeliveryError:
                delay = min(delay * 2, ROOM_POLL_MAX_SECONDS)
            except CLIENT_ERRORS as error:
                raise self._error(f"publishing message {envelope.id} to topic '{envelope.topic}'", error) from None

    async def _publish_to_topic(self, envelope: Envelope) -> None:
        # With mandatory=False a topic without subscriptions drops the message, as the other backends do.
        await self._publish(self._exchange_name(envelope.topic), "", _encode(envelope))

    async def _publish_to_queue(self, queue: str, message: aio_pika.Message) -> None:
        """Publish straight to one queue through the default exchange and wait for the confirm."""
        await self._publish("", queue, message)

    async def _publish(self, exchange_name: str, routing_key: str, message: aio_pika.Message) -> None:
        """Publish and wait for the confirm, publishing again while the connection recovers."""
        async def attempt() -> None:
            channel = await self._publisher_channel()
            exchange: AbstractExchange = channel.default_exchange
            if exchange_name:
                exchange = await channel.get_exchange(exchange_name, ensure=False)
            await exchange.publish(message, routing_key=routing_key, mandatory=False,
                                   timeout=self.options.confirm_timeout)

        # The server may have stored the message before the connection dropped, so a message
        # published again may be stored twice.
        await self._retry_while_reconnecting(f"publishing message {message.message_id}", attempt)

    async def _retry_while_reconnecting(self, action: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt`, and again after a dropped connection, for up to CONNECT_TIMEOUT_SECONDS."""
        deadline = self.clock.monotonic() + CONNECT_TIMEOUT_SECONDS
        delay = RECONNECT_RETRY_SECONDS
        while True:
            try:
                return await attempt()
            except (ConnectionError, ChannelInvalidStateError) as error:
                if self._closed or self.clock.monotonic() + delay > deadline:
                    raise
                self._warnings.warning("reconnect", "%s failed because the connection dropped (%s); trying again "
                                       "in %gs", action, self._describe(error), delay)
            await self.clock.sleep(delay)
            delay = min(delay * 2, 1.0)

    # Room for new messages: max_pending

    def _estimated_size(self, subscription: _Subscription) -> int:
        """Return an upper bound of the subscription's size, as far as this process can tell."""
        return (subscription.server_size + subscription.added_since_check + len(subscription.buffer)
                + len(subscription.waiting_retries) + len(subscription.leases))

    def _needs_room_check(self, subscriptions: list[_Subscription]) -> bool:
        return any(self._estimated_size(s) >= s.config.max_pending for s in subscriptions)

    async def _wait_for_room(self, topic: str, subscriptions: list[_Subscription]) -> None:
        delay = ROOM_POLL_SECONDS
        while True:
            self._room.clear()
            full = await self._full_subscription(subscriptions)
            if full is None:
                return
            if full.config.on_full is OnFull.REJECT:
                raise QueueFullError(
                    f"subscription '{full.config.name}' of topic '{topic}' contains {self._estimated_size(full)} "
                    "messages, its max_pending; retry later or raise max_pending"
                )
            await self.clock.wait(self._room, delay)
            delay = min(delay * 2, ROOM_POLL_MAX_SECONDS)
            self._check_open()

    async def _full_subscription(self, subscriptions: list[_Subscription]) -> _Subscription | None:
        for subscription in subscriptions:
            if self._estimated_size(subscription) < subscription.config.max_pending:
                continue
            await self._refresh_size(subscription)
            if self._estimated_size(subscription) >= subscription.config.max_pending:
                return subscription
        return None

    async def _refresh_size(self, subscription: _Subscription) -> None:
        ready, delayed = await self._queue_counts(subscription, missing_ok=False)
        subscription.server_size = ready + delayed
        subscription.added_since_check = 0

    async def _queue_counts(self, subscription: _Subscription, missing_ok: bool) -> tuple[int, int]:
        """Return the ready messages in the subscription queue and in its retry queue."""
        async def attempt() -> tuple[int, int]:
            ready = await self._message_count(subscription.queue, missing_ok)
            return ready, await self._message_count(subscription.retry_queue, missing_ok)

        action = f"reading the size of subscription '{subscription.config.name}'"
        async with self._translate(action):
            return await self._retry_while_reconnecting(action, attempt)

    async def _message_count(self, queue: str, missing_ok: bool) -> int:
        channel = await self._control_channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            if missing_ok:
                return 0
            raise BrokerError(f"queue '{queue}' is missing on {redact_url(self.url)}; it was deleted while "
                              f"flow '{self.flow_name}' ran, so restart the flow to declare it again") from None
        assert declared.declaration_result is not None
        return int(declared.declaration_result.message_count or 0)

    # Fetching

    def consume(self, subscription: str, callback: DeliveryCallback, max_in_flight: int) -> FetchConsumer:
        """Start push delivery on top of `fetch`, with `max_in_flight` added to the consumer's prefetch."""
        self._subscription(subscription).in_flight_hint = max(
            self._subscription(subscription).in_flight_hint, max_in_flight)
        return super().consume(subscription, callback, max_in_flight)

    async def fetch(self, subscription: str, max_messages: int, timeout: float) -> list[Delivery]:
        """Return up to `max_messages` deliveries from the local buffer, waiting up to `timeout` for one."""
        state = self._subscription(subscription)
        deadline = self.clock.monotonic() + timeout
        while not self._closed:
            state.arrived.clear()
            if state.channel is None and not await self._try_start_consumer(state, max_messages):
                await self.clock.wait(state.arrived, min(max(deadline - self.clock.monotonic(), 0.0), 1.0))
                if self.clock.monotonic() >= deadline:
                    return []
                continue
            if state.buffer:
                await self._wait_for_burst(state, max_messages, deadline)
                deliveries = await self._take(state, max_messages)
                if deliveries:
                    return deliveries

            # Nothing deliverable: the buffer is empty or holds only messages of busy keys.
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return []
            await self.clock.wait(state.arrived, remaining)
        return []

    async def _try_start_consumer(self, state: _Subscription, max_messages: int) -> bool:
        """Start the consumer, or log the failure and return False, so a push or pull loop keeps going."""
        try:
            await self._start_consumer(state, max_messages)
        except BrokerError as error:
            self._warnings.warning("consumer", "%s; trying again", error)
            return False
        return True

    async def _start_consumer(self, state: _Subscription, max_messages: int) -> None:
        async with state.consumer_lock:
            if state.channel is not None or self._closed:
                return
            # Fetched deliveries stay unacked on the server, so the prefetch must leave room
            # for the application's unsettled deliveries besides the buffer.
            prefetch = min(self.options.prefetch + max(state.in_flight_hint, max_messages), MAX_PREFETCH)
            async with self._translate(f"starting the consumer of subscription '{state.config.name}'"):
                channel = await self._open_channel(confirms=False)
                await channel.set_qos(prefetch_count=prefetch)
                queue = await channel.get_queue(state.queue, ensure=False)
                channel.close_callbacks.add(lambda _, error: self._on_consumer_closed(state, channel, error))
                await queue.consume(functools.partial(self._on_message, state, channel))
                state.channel = channel
            logger.debug("consuming '%s' with prefetch %d", state.queue, prefetch)

    async def _on_message(self, state: _Subscription, channel: aio_pika.Channel,
                          message: AbstractIncomingMessage) -> None:
        state.buffer.append(_Arrival(message, channel))
        state.last_arrival = self.clock.monotonic()
        state.arrived.set()

    def _on_consumer_closed(self, state: _Subscription, channel: aio_pika.Channel, error: BaseException | None) -> None:
        """Forget the messages of a closed consumer channel, because the server requeued them."""
        if state.channel is not channel:
            return
        state.channel = None
        buffered = len(state.buffer) + len(state.waiting_retries)
        state.buffer.clear()
        state.waiting_retries.clear()
        state.busy_keys.clear()
        lost = [tag for tag, lease in state.leases.items()
                if lease.arrival.channel is channel and not lease.settled_on_server]
        for tag in lost:
            del state.leases[tag]
            self._released(state.config.name, tag)
        state.arrived.set()
        self._room.set()
        if not self._closed:
            logger.warning("the consumer channel of subscription '%s' closed (%s); the server returns its %d "
                           "buffered and %d unacked messages to the queue", state.config.name,
                           self._describe(error) if error else "no reason given", buffered, len(lost))

    async def _stop_consumer(self, state: _Subscription) -> None:
        channel, state.channel = state.channel, None
        if channel is not None and not channel.is_closed:
            async with self._translate(f"stopping the consumer of subscription '{state.config.name}'"):
                await channel.close()
        state.buffer.clear()
        state.waiting_retries.clear()
        state.busy_keys.clear()

    async def _wait_for_burst(self, state: _Subscription, max_messages: int, deadline: float) -> None:
        started = self.clock.monotonic()
        while len(state.buffer) < max_messages:
            now = self.clock.monotonic()
            wait = min(state.last_arrival + BURST_QUIET_SECONDS - now, started + BURST_MAX_SECONDS - now,
                       deadline - now)
            if wait <= 0:
                return
            state.arrived.clear()
            await self.clock.wait(state.arrived, wait)

    async def _take(self, state: _Subscription, max_messages: int) -> list[Delivery]:
        deliveries: list[Delivery] = []
        skipped: list[_Arrival] = []
        while state.buffer and len(deliveries) < max_messages:
            arrival = state.buffer.popleft()
            if arrival.channel is not state.channel:
                continue  # the server took it back when its channel closed
            if self._key_is_busy(state, arrival):
                skipped.append(arrival)
                continue
            delivery = await self._deliver(state, arrival)
            if delivery is not None:
                deliveries.append(delivery)
        # Messages of busy keys keep their place at the front.
        state.buffer.extendleft(reversed(skipped))
        return deliveries

    def _key_is_busy(self, state: _Subscription, arrival: _Arrival) -> bool:
        """Whether an ordered subscription must hold this message back behind an earlier one of its key."""
        if not state.config.ordered or arrival.local_deliveries:
            return False
        key = (arrival.message.headers or {}).get(KEY)
        return key is not None and str(key) in state.busy_keys

    def _free_key(self, state: _Subscription, lease: _Lease) -> None:
        key = lease.delivery.envelope.key
        if state.config.ordered and key is not None:
            state.busy_keys.discard(key)
            if state.buffer:
                state.arrived.set()

    async def _deliver(self, state: _Subscription, arrival: _Arrival) -> Delivery | None:
        config = state.config
        envelope, earlier, first_delivered_at = _decode(arrival.message, config.topic)
        count = earlier + _returns(arrival.message) + 1 + arrival.local_deliveries
        now = self.clock.wall()
        tag = _Tag(next(self._tags))
        delivery = Delivery(envelope, config.name, count, tag, arrival.first_delivered_at or first_delivered_at or now)
        lease = _Lease(arrival, delivery)

        if config.ack is not AckPolicy.NONE and count > config.max_deliveries:
            await self._give_up_lost(state, lease)
            return None

        counters = self.counters.subscriptions[config.name]
        counters.delivered += 1
        if count > 1:
            counters.redelivered += 1
        if config.ordered and envelope.key is not None:
            state.busy_keys.add(envelope.key)

        if config.ack is AckPolicy.NONE:
            # At-most-once: the message leaves the server as it is delivered.
            await _settle_quietly(arrival.message, ack=True)
            lease.settled_on_server = True
            state.leases[tag] = lease
            return delivery

        state.leases[tag] = lease
        self._schedule(self.clock.monotonic() + config.ack_timeout, config.name, tag)
        return delivery

    async def _give_up_lost(self, state: _Subscription, lease: _Lease) -> None:
        """Give up on a message that the server returned with its deliveries used up.

        That happens when its consumer vanished (a crashed process or a lost connection)
        during the last delivery, so the failure envelope counts the deliveries before.
        """
        delivery = lease.delivery
        last = delivery.delivery_count - 1
        lease.delivery = Delivery(delivery.envelope, delivery.subscription, last, delivery.tag,
                                  delivery.first_delivered_at)
        error = ErrorInfo("flowrun.ConsumerLost", f"the consumer of delivery {last} disconnected before "
                          "settling it, and max_deliveries was reached")
        try:
            await self._fail(state, lease, None, error, terminal=True)
        except BrokerError as failure:
            logger.error("giving up on message %s of subscription '%s' failed, so it stays queued: %s",
                         delivery.envelope.id, state.config.name, failure)

    # Settling

    async def ack(self, subscription: str, tags: Sequence[Any]) -> None:
        """Ack deliveries on the server, ignoring unknown, expired or already settled tags."""
        state = self._subscription(subscription)
        counters = self.counters.subscriptions[subscription]
        for tag in tags:
            lease = state.leases.pop(tag, None)
            if lease is None:
                logger.debug("ignored ack of unknown or expired delivery %s on '%s'", tag, subscription)
                continue
            self._released(subscription, tag)
            self._free_key(state, lease)
            if lease.settled_on_server or await _settle_quietly(lease.message, ack=True):
                counters.acked += 1
        self._room.set()

    async def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        """Retry after the delay or backoff, or give up once the deliveries are used up."""
        state = self._subscription(subscription)
        for nack in nacks:
            lease = state.leases.pop(nack.tag, None)
            if lease is None:
                logger.debug("ignored nack of unknown or expired delivery %s on '%s'", nack.tag, subscription)
                continue
            self._released(subscription, nack.tag)
            if lease.settled_on_server:
                self._free_key(state, lease)
                self._count_at_most_once_drop(state, lease, nack.error)
                continue
            await self._fail(state, lease, nack.delay, nack.error, nack.terminal, nack.dead_letter)
        self._room.set()

    def _count_at_most_once_drop(self, state: _Subscription, lease: _Lease, error: ErrorInfo | None) -> None:
        self.counters.subscriptions[state.config.name].dropped += 1
        logger.warning("dropped message %s of subscription '%s' (ack: none): %s", lease.delivery.envelope.id,
                       state.config.name, (error or NO_ERROR).message)

    async def _fail(self, state: _Subscription, lease: _Lease, delay: float | None, error: ErrorInfo | None,
                    terminal: bool, dead_letter: bool = True) -> None:
        """Retry a failed delivery or give up on it, and requeue the message if the server fails."""
        config = state.config
        count = lease.delivery.delivery_count
        try:
            if terminal or count >= config.max_deliveries:
                await self._give_up(state, lease, error, dead_letter)
                return
            wait = config.backoff(count) if delay is None else max(delay, 0.0)
            await self._retry(state, lease, wait)
        except BrokerError:
            # The message is still unacked on the server, so a requeue keeps it.
            await _settle_quietly(lease.message, requeue=True)
            raise

    async def _retry(self, state: _Subscription, lease: _Lease, wait: float) -> None:
        """Requeue at once, or park the message in the retry queue for `wait` seconds."""
        if state.config.ordered:
            self._retry_in_place(state, lease, wait)
        elif wait <= 0 and self.options.queue_type == "quorum":
            # The quorum queue counts the return in x-delivery-count.
            await _settle_quietly(lease.message, requeue=True)
        else:
            await self._republish(state, lease, wait)
        state.added_since_check += 1

    async def _republish(self, state: _Subscription, lease: _Lease, wait: float) -> None:
        """Publish a copy carrying the delivery count to the retry queue (or the subscription queue), then ack."""
        # NOTE: RabbitMQ expires messages only at the head of a queue, so a retry also waits
        # for the retries ahead of it. With mixed delays a short one can be late by up to the
        # longest delay ahead of it.
        delivery = lease.delivery
        target = state.retry_queue if wait > 0 else state.queue
        message = _encode(delivery.envelope, deliveries=delivery.delivery_count,
                          first_delivered_at=delivery.first_delivered_at,
                          expiration=max(wait, 0.001) if wait > 0 else None)
        try:
            await self._publish_to_queue(target, message)
        except DeliveryError:
            # Only a full classic subscription queue rejects the copy. The requeued original
            # stays on the server, though the server does not count the delivery.
            await _settle_quietly(lease.message, requeue=True)
            return
        except CLIENT_ERRORS as error:
            raise self._error(f"scheduling a retry of message {delivery.envelope.id}", error) from None
        await _settle_quietly(lease.message, ack=True)

    def _retry_in_place(self, state: _Subscription, lease: _Lease, wait: float) -> None:
        """Keep a message of an ordered subscription unacked here and deliver it again after `wait`.

        Its key stays busy meanwhile, so later messages of the key wait behind it.
        """
        # NOTE: these messages count against the consumer's prefetch and RabbitMQ's
        # consumer_timeout, and a crash loses their local delivery count (the server then
        # counts one return).
        arrival = _Arrival(lease.arrival.message, lease.arrival.channel,
                           lease.arrival.local_deliveries + 1, lease.delivery.first_delivered_at)
        state.waiting_retries.add(arrival)
        self._schedule(self.clock.monotonic() + wait, state.config.name, arrival)

    def _return_to_buffer(self, state: _Subscription, arrival: _Arrival) -> None:
        if arrival not in state.waiting_retries:
            return  # its channel closed, so the server requeued it
        state.waiting_retries.discard(arrival)
        state.buffer.appendleft(arrival)
        state.arrived.set()

    async def _give_up(self, state: _Subscription, lease: _Lease, error: ErrorInfo | None, dead_letter: bool) -> None:
        config = state.config
        delivery = lease.delivery
        counters = self.counters.subscriptions[config.name]
        self._free_key(state, lease)

        if config.dead_letter is None or not dead_letter:
            counters.dropped += 1
            await _settle_quietly(lease.message, ack=True)
            logger.warning("dropped message %s of subscription '%s' at delivery %d: %s", delivery.envelope.id,
                           config.name, delivery.delivery_count, (error or NO_ERROR).message)
            return

        now = self.clock.wall()
        headers = dead_letter_headers(delivery, config, error, now)
        letter = Envelope(uuid.uuid4().hex, config.dead_letter, delivery.envelope.body, delivery.envelope.key,
                          headers, now)
        # Counted first, because a subscriber of the dead-letter topic may receive the letter
        # before its confirm arrives.
        counters.dead_lettered += 1
        self.counters.published[config.dead_letter] += 1
        for subscription in self._by_topic.get(config.dead_letter, []):
            subscription.added_since_check += 1
        # Publish and archive before the ack: a crash in between repeats the dead letter
        # instead of losing it.
        action = f"dead-lettering message {delivery.envelope.id} to '{config.dead_letter}'"
        try:
            async with self._translate(action):
                results = await asyncio.gather(self._publish_dead_letter(letter),
                                               self._archive(config, delivery, letter), return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
        except BaseException:
            counters.dead_lettered -= 1
            self.counters.published[config.dead_letter] -= 1
            raise
        await _settle_quietly(lease.message, ack=True)
        logger.error("dead-lettered message %s of subscription '%s' to '%s' at delivery %d: %s",
                     delivery.envelope.id, config.name, config.dead_letter, delivery.delivery_count,
                     headers["flowrun.error"])

    async def _publish_dead_letter(self, letter: Envelope) -> None:
        """Publish a dead letter, skipping the max_pending check; wait while the server rejects it as full."""
        delay = ROOM_POLL_SECONDS
        while True:
            try:
                await self._publish_to_topic(letter)
                return
            except DeliveryError:
                self._check_open()
                logger.warning("the server rejected a dead letter to '%s' as full; trying again in %gs",
                               letter.topic, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, ROOM_POLL_MAX_SECONDS)

    async def _archive(self, config: SubscriptionConfig, delivery: Delivery, letter: Envelope) -> None:
        headers: dict[str, Any] = {
            HEADERS: dict(letter.headers),
            ARCHIVE_SUBSCRIPTION: config.name,
            ARCHIVE_TOPIC: delivery.envelope.topic,
            ARCHIVE_MESSAGE_ID: delivery.envelope.id,
            ARCHIVE_DEAD_LETTERED_AT: repr(letter.published_at),
        }
        if letter.key is not None:
            headers[KEY] = letter.key
        message = aio_pika.Message(letter.body, headers=headers, message_id=letter.id,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._publish_to_queue(self._archive_queue, message)

    # Ack timeouts: leases kept by this process

    def _schedule(self, due: float, subscription: str, item: _Tag | _Arrival) -> None:
        earliest = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (due, next(self._sequence), subscription, item))
        if earliest is None or due < earliest:
            self._timer_changed.set()

    async def _run_timers(self) -> None:
        while True:
            now = self.clock.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, subscription, item = heapq.heappop(self._timers)
                state = self._subscriptions[subscription]
                if isinstance(item, _Arrival):
                    self._return_to_buffer(state, item)
                    continue
                # One failed expiry must not stop the lease timers of every subscription.
                try:
                    await self._expire(state, item)
                except Exception:
                    logger.exception("expiring a delivery of subscription '%s' failed", subscription)

            timeout = self._timers[0][0] - self.clock.monotonic() if self._timers else None
            self._timer_changed.clear()
            await self.clock.wait(self._timer_changed, timeout)

    async def _expire(self, state: _Subscription, tag: _Tag) -> None:
        lease = state.leases.pop(tag, None)
        if lease is None:
            return
        config = state.config
        logger.warning("message %s of subscription '%s' was not acked within %gs (delivery %d); delivering it again",
                       lease.delivery.envelope.id, config.name, config.ack_timeout, lease.delivery.delivery_count)
        self._released(config.name, tag)
        try:
            await self._fail(state, lease, None, ErrorInfo.timeout(config.ack_timeout), terminal=False)
        except BrokerError as error:
            logger.error("retrying message %s of subscription '%s' after its ack timeout failed: %s",
                         lease.delivery.envelope.id, config.name, error)
        self._room.set()

    # Inspection

    async def stats(self) -> dict[str, Any]:
        """Counters of this process with pending and delayed counts from the server."""
        self._check_open()
        gauges = {}
        for name, state in self._subscriptions.items():
            ready, delayed = await self._queue_counts(state, missing_ok=True)
            delayed += len(state.waiting_retries)
            gauges[name] = Gauges(len(state.leases), ready + delayed + len(state.buffer), delayed,
                                  self._oldest_buffered_age(state))
        topics = {name: state.config.topic for name, state in self._subscriptions.items()}
        return self.counters.snapshot(self._topics, topics, gauges)

    def _oldest_buffered_age(self, state: _Subscription) -> float | None:
        # NOTE: the server does not report the age of its ready messages over AMQP, so the
        # age is known only for messages buffered here, and None when there are none.
        published = [_published_at(arrival.message) for arrival in state.buffer]
        if not published:
            return None
        return max(self.clock.wall() - min(published), 0.0)

    # Producers

    async def set_producer_state(self, name: str, finished: bool) -> None:
        """Record the state in the producer's queue, which contains a message once the producer finished."""
        queue_name = self._producer_queue_name(name)
        async with self._translate(f"recording the state of producer '{name}'"):
            await self._register_producer(name)
            queue = await self._declare_producer_queue(queue_name)
            if not finished:
                await queue.purge()
                return
            await self._publish_to_queue(queue_name, aio_pika.Message(
                b"finished", delivery_mode=aio_pika.DeliveryMode.PERSISTENT))

    async def producers_finished(self, names: Sequence[str]) -> bool:
        """Return whether the queue of every named producer contains its finished message."""
        for name in names:
            async with self._translate(f"reading the state of producer '{name}'"):
                queue = await self._declare_producer_queue(self._producer_queue_name(name))
            assert queue.declaration_result is not None
            if not queue.declaration_result.message_count:
                return False
        return True

    async def _register_producer(self, name: str) -> None:
        """Add the producer's name to the flow's registry once per process, so any process can delete its queue."""
        if name in self._producers:
            return
        channel = await self._control_channel()
        await channel.declare_queue(self._producer_registry, durable=True, arguments=CLASSIC)
        await self._publish_to_queue(self._producer_registry, aio_pika.Message(
            name.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        self._producers.add(name)

    async def _registered_producers(self) -> set[str]:
        channel = await self._control_channel()
        try:
            registry = await channel.declare_queue(self._producer_registry, passive=True)
        except ChannelNotFoundEntity:
            return set(self._producers)
        return {message.body.decode() for message in await _take_all(registry)} | self._producers

    async def _declare_producer_queue(self, name: str) -> AbstractQueue:
        # At most one message: a second "finished" replaces the first (overflow drop-head).
        channel = await self._control_channel()
        return await channel.declare_queue(name, durable=True, arguments={**CLASSIC, "x-max-length": 1})

    # Dead letters, for `flowrun dlq`

    async def dead_letters(self, subscription: str | None = None) -> list[dict[str, Any]]:
        """List the archived dead letters, oldest first, numbered by their position in the archive."""
        letters = []
        async with self._reading_archive() as messages:
            for number, message in enumerate(messages, start=1):
                letter = _archived_letter(number, message)
                if subscription is None or letter["subscription"] == subscription:
                    letters.append(letter)
        return letters

    async def replay_dead_letters(self, subscription: str | None = None) -> int:
        """Put dead letters back on their subscription's queue as new first deliveries."""
        replayed = 0
        async with self._reading_archive() as messages:
            for number, message in enumerate(messages, start=1):
                letter = _archived_letter(number, message)
                if subscription is not None and letter["subscription"] != subscription:
                    continue
                await self._replay(letter)
                await message.ack()
                replayed += 1
        return replayed

    async def purge_dead_letters(self, subscription: str | None = None) -> int:
        """Delete archived dead letters, of one subscription or all."""
        purged = 0
        async with self._reading_archive() as messages:
            for message in messages:
                if subscription is None or (message.headers or {}).get(ARCHIVE_SUBSCRIPTION) == subscription:
                    await message.ack()
                    purged += 1
        return purged

    async def _replay(self, letter: dict[str, Any]) -> None:
        name = letter["subscription"]
        if name not in self._subscriptions:
            raise BrokerError(f"dead letter {letter['number']} belongs to subscription '{name}', "
                              "which the flow no longer declares")
        headers = replay_headers(letter)
        envelope = Envelope(uuid.uuid4().hex, letter["topic"], letter["body"], letter["key"], headers,
                            self.clock.wall())
        async with self._translate(f"replaying dead letter {letter['number']}"):
            await self._publish_to_queue(self._queue_name(name), _encode(envelope))

    @asynccontextmanager
    async def _reading_archive(self) -> AsyncIterator[list[AbstractIncomingMessage]]:
        """Take every archived dead letter unacked; closing the channel afterwards requeues those not acked."""
        async with self._translate("reading the dead-letter archive"):
            channel = await self._open_channel(confirms=False)
            try:
                messages = await self._take_archive(channel)
                yield messages
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def _take_archive(self, channel: aio_pika.Channel) -> list[AbstractIncomingMessage]:
        try:
            queue = await channel.declare_queue(self._archive_queue, passive=True)
        except ChannelNotFoundEntity:
            return []
        return await _take_all(queue)

    # Helpers

    def _subscription(self, name: str) -> _Subscription:
        try:
            return self._subscriptions[name]
        except KeyError:
            raise BrokerError(f"subscription '{name}' is not declared on the broker") from None

    def _check_open(self) -> None:
        if self.closed:
            raise BrokerError(f"the rabbitmq broker for {redact_url(self.url)} is closed or not started")

    @asynccontextmanager
    async def _translate(self, action: str) -> AsyncIterator[None]:
        """Turn client-library errors into BrokerError naming the action and the server."""
        try:
            yield
        except CLIENT_ERRORS as error:
            raise self._error(action, error) from None

    def _error(self, action: str, error: BaseException) -> BrokerError:
        if isinstance(error, DeliveryError):
            hint = "the server rejected the message because a queue of the flow is full; retry later"
        elif isinstance(error, ChannelPreconditionFailed):
            hint = "an exchange or queue of the flow exists with other settings; delete it or restore them"
        elif isinstance(error, ChannelNotFoundEntity):
            hint = "an exchange or queue of the flow is missing; restart the flow to declare it again"
        elif isinstance(error, ChannelAccessRefused):
            hint = "the user lacks permissions on the virtual host; grant them with rabbitmqctl set_permissions"
        elif isinstance(error, TimeoutError):
            hint = "the server did not answer in time; check that it runs and is not overloaded"
        else:
            hint = "check that the server runs, that the URL's virtual host exists and that it accepts the credentials"
        return BrokerError(f"{action} failed on RabbitMQ at {redact_url(self.url)}: {self._describe(error)}; {hint}")

    def _describe(self, error: BaseException) -> str:
        text = str(error) or type(error).__name__
        return text.replace(self.url, redact_url(self.url))


def _encode(envelope: Envelope, deliveries: int = 0, first_delivered_at: float = 0.0,
            expiration: float | None = None) -> aio_pika.Message:
    """Build the AMQP message of an envelope, where `deliveries` counts the deliveries made before."""
    headers: dict[str, Any] = {HEADERS: dict(envelope.headers), PUBLISHED_AT: repr(envelope.published_at)}
    if envelope.key is not None:
        headers[KEY] = envelope.key
    if deliveries:
        headers[DELIVERIES] = deliveries
        headers[FIRST_DELIVERED_AT] = repr(first_delivered_at)
    return aio_pika.Message(envelope.body, headers=headers, message_id=envelope.id, expiration=expiration,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


def _decode(message: AbstractIncomingMessage, topic: str) -> tuple[Envelope, int, float]:
    """Return the envelope, the deliveries made before the last enqueue, and the first delivery time."""
    headers = message.headers or {}
    own = headers.get(HEADERS)
    envelope_headers = {str(k): str(v) for k, v in own.items()} if isinstance(own, dict) else {}
    key = headers.get(KEY)
    envelope = Envelope(message.message_id or uuid.uuid4().hex, topic, message.body,
                        None if key is None else str(key), envelope_headers, _published_at(message))
    earlier = headers.get(DELIVERIES, 0)
    if not isinstance(earlier, int):
        earlier = 0
    return envelope, earlier, _time_header(headers, FIRST_DELIVERED_AT)


def _published_at(message: AbstractIncomingMessage) -> float:
    return _time_header(message.headers or {}, PUBLISHED_AT)


def _time_header(headers: dict[str, Any], name: str) -> float:
    """Read a Unix time written by `repr(float)`, or 0.0 when it is missing or malformed."""
    try:
        return float(headers.get(name, 0.0))
    except (TypeError, ValueError):
        return 0.0


def _returns(message: AbstractIncomingMessage) -> int:
    """Count how often the server returned the message to its queue since it was enqueued."""
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int):
        return count
    # Classic queues only flag a redelivery, without counting them.
    return 1 if message.redelivered else 0


def _archived_letter(number: int, message: AbstractIncomingMessage) -> dict[str, Any]:
    headers = message.headers or {}
    letter_headers = headers.get(HEADERS)
    key = headers.get(KEY)
    return {
        "number": number,
        "subscription": str(headers.get(ARCHIVE_SUBSCRIPTION, "")),
        "topic": str(headers.get(ARCHIVE_TOPIC, "")),
        "message_id": str(headers.get(ARCHIVE_MESSAGE_ID, "")),
        "body": message.body,
        "key": None if key is None else str(key),
        "headers": {str(k): str(v) for k, v in letter_headers.items()} if isinstance(letter_headers, dict) else {},
        "dead_lettered_at": _time_header(headers, ARCHIVE_DEAD_LETTERED_AT),
    }


async def _take_all(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Take every ready message of `queue` with basic.get, unacked."""
    messages = []
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        messages.append(message)
    return messages


async def _settle_quietly(message: AbstractIncomingMessage, ack: bool = False, requeue: bool = False) -> bool:
    """Ack, or nack with `requeue`, and return False when the channel closed and the server requeued the message."""
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=requeue)
    except CLIENT_ERRORS as error:
        # A failed ack or nack closes the channel or comes from a closed one, and the server
        # requeues every unacked message of a closed channel.
        logger.debug("could not settle delivery %s, so the server requeues it: %s", message.delivery_tag, error)
        return False
    return True
