"""Broker on NATS JetStream (nats-py), for flows whose processes share a NATS server.

How flowrun's model maps onto JetStream (`F` is the flow name and `T`, `S` a topic and a
subscription name, each made safe for NATS names by `_server_name`):

| flowrun            | JetStream                                                                |
| ------------------ | ------------------------------------------------------------------------ |
| flow               | stream `F_topics` (interest retention), subjects `F.*`                   |
| topic              | subject `F.T`; a message with no subscription is not kept                |
| subscription       | durable pull consumer `S` filtered on `F.T`, created with deliver new    |
| message id         | `Nats-Msg-Id` header, deduplicated within `duplicate_window`             |
| ack timeout        | a local lease: at the ack timeout the broker naks the delivery with the  |
|                    | retry delay; if the process died, the server redelivers after its        |
|                    | `ack_wait` = ack timeout + 1 s                                           |
| delivery count     | `num_delivered` from the delivery's metadata                             |
| nack / backoff     | `-NAK {"delay": ns}` with the retry delay (jitter included)              |
| max deliveries     | the broker dead-letters the last delivery itself, then sends `+TERM`;    |
|                    | `max_deliver` = max_deliveries + 1 redelivers it if that process died    |
| dead letter        | a publish to the dead-letter topic, plus a copy in stream                |
|                    | `F_dead_letters` (subjects `F.dead-letters.S`) for `flowrun dlq`         |
| ack: none          | consumer ack policy none                                                 |
| max_pending        | checked against the consumers' `num_pending + num_ack_pending` (below)   |
| ordered            | `max_ack_pending` 1: one message in flight for the whole subscription    |
| producer states    | key-value bucket `F_producers`                                           |
| counters           | per process: published, delivered, acked, redelivered, dead_lettered,    |
|                    | dropped; gauges (pending, in_flight) come from the consumer info, and    |
|                    | `flowrun status` reads dead_lettered from the archive                    |

Deliveries are also leased locally: the broker keeps each delivery it handed out with its
ack deadline. It ignores acks and nacks of deliveries it no longer leases, because the
server would apply a stale ack to the current delivery of the same message. It expires
leases on time, so push caps free and a final delivery is dead-lettered without waiting
for the server. The split of the server's `num_ack_pending` into in flight and delayed
uses the retries this process scheduled, so in another process (`flowrun status`) a
scheduled retry shows as in flight.

`max_pending` is exact within one process: every publish reserves a place in an estimate
of each subscription's backlog, and the estimate is refreshed from the server whenever it
reaches the bound. Publishes of other processes reach the estimate only when it is
refreshed (at least every ESTIMATE_MAX_AGE_SECONDS), so with several publishing processes
a subscription can exceed `max_pending` by what they published in that time. A blocked
publish rechecks its estimate as soon as this process settles a message of the full
subscription, and reads the backlog from the server every ROOM_POLL_SECONDS for
settlements elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import re
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as NatsAckPolicy
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from flowrun.broker import (
    NO_ERROR,
    Broker,
    ErrorInfo,
    Nack,
    SubscriptionConfig,
    Topology,
    dead_letter_headers,
    replay_headers,
)
from flowrun.brokers import redact_url
from flowrun.brokers.options import NatsOptions
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.counters import Counters, Gauges
from flowrun.errors import BrokerError, QueueFullError
from flowrun.message import Delivery, Envelope
from flowrun.spec import AckPolicy, BrokerSpec, OnFull

logger = logging.getLogger(__name__)

API_PREFIX = "$JS.API"
CONNECT_SECONDS = 5.0
RECONNECT_ATTEMPTS = 60
RECONNECT_WAIT_SECONDS = 1
API_TIMEOUT_SECONDS = 5.0
PUBLISH_TIMEOUT_SECONDS = 10.0
SETTLE_TIMEOUT_SECONDS = 5.0
CLOSE_SECONDS = 5.0
# Maximum wait for the server's reply to a no-wait pull request.
NO_WAIT_REPLY_SECONDS = 1.0
# Margin by which the server's ack wait trails the local ack deadline, so the process
# holding a delivery naks or dead-letters it first. The server's redelivery after the ack
# wait only takes effect when that process died.
BACKSTOP_GRACE_SECONDS = 1.0
ESTIMATE_MAX_AGE_SECONDS = 1.0
ROOM_POLL_SECONDS = 0.1

ACK = b"+ACK"
TERM = b"+TERM"
STATUS_HEARTBEAT = "100"

MESSAGE_ID_HEADER = "Nats-Msg-Id"
KEY_HEADER = "Flowrun-Key"
HEADERS_HEADER = "Flowrun-Headers"
PUBLISHED_AT_HEADER = "Flowrun-Published-At"
REPLAY_FOR_HEADER = "Flowrun-Replay-For"
SUBSCRIPTION_HEADER = "Flowrun-Subscription"
TOPIC_HEADER = "Flowrun-Topic"
DEAD_LETTERED_AT_HEADER = "Flowrun-Dead-Lettered-At"

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")
DEAD_LETTER_IDS = uuid.UUID("5b3f3f9e-6d0c-4c53-9a55-8f4f0e8a7c21")

CONNECTION_ERRORS = (
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    OSError,
)
JETSTREAM_MISSING_ERRORS = (
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
)


def _server_name(name: str) -> str:
    """Return `name` as a NATS stream, consumer, bucket or subject token.

    Names with characters NATS reserves (the dots flowrun names may contain) get them
    replaced and a short hash appended, so distinct names stay distinct.
    """
    if SAFE_NAME.match(name):
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{UNSAFE_CHARACTERS.sub('_', name)}-{digest}"


def _nanoseconds(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


def _nak(delay: float) -> bytes:
    if delay <= 0:
        return b"-NAK"
    return b'-NAK {"delay": %d}' % _nanoseconds(delay)


@dataclass(frozen=True)
class _Tag:
    """Identifies one delivery: the subscription, the message's stream sequence and its delivery number."""

    subscription: str
    stream_sequence: int
    delivery_count: int


@dataclass
class _Lease:
    """A delivery this process handed out and has not settled."""

    tag: _Tag
    reply: str
    delivery: Delivery
    arrived_at: float
    deadline: float | None


@dataclass
class _Retry:
    """A redelivery the server will make: after a nack or an expired lease."""

    due: float
    published_at: float


class _Puller:
    """Pull requests of one consumer, received on one inbox.

    Each request has its own reply subject, so the server's status that ends a request
    (404 no messages, 408 expired or done, 409 conflict) is matched to it. Messages arrive
    with their own subject, so they all go to one buffer. A message that arrives after its
    fetch gave up stays there for the next fetch.
    """

    def __init__(self, client: Client, next_subject: str, clock: Clock) -> None:
        self.client = client
        self.next_subject = next_subject
        self.clock = clock
        self.inbox = client.new_inbox()
        self.buffer: deque[tuple[Msg, float]] = deque()
        self.changed = asyncio.Event()
        self.closed = False
        self._active: set[str] = set()
        self._finished: set[str] = set()
        self._tokens = itertools.count(1)

    async def start(self) -> None:
        await self.client.subscribe(f"{self.inbox}.*", cb=self._receive)

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def _receive(self, message: Msg) -> None:
        if message.reply:
            self.buffer.append((message, self.clock.monotonic()))
        else:
            status = (message.headers or {}).get("Status", "")
            token = message.subject.rsplit(".", 1)[-1]
            if status == STATUS_HEARTBEAT or token not in self._active:
                return
            if status not in ("404", "408"):
                logger.debug("pull request on %s ended with status %s %s", self.next_subject, status,
                             (message.headers or {}).get("Description", ""))
            self._finished.add(token)
        self.changed.set()

    async def pull(self, max_messages: int, deadline: float) -> list[tuple[Msg, float]]:
        """Return up to `max_messages` messages, waiting until `deadline` for the first."""
        if not self.buffer:
            await self._ask(max_messages, deadline)

        messages: list[tuple[Msg, float]] = []
        while self.buffer and len(messages) < max_messages:
            messages.append(self.buffer.popleft())
        return messages

    async def _ask(self, max_messages: int, deadline: float) -> None:
        """Ask the server for up to `max_messages`, waiting until `deadline` for the first.

        A no-wait request with an expiry returns what is ready at once, or else the first
        messages to arrive, and then ends (as nats-server 2.9.10 does). A server that replies
        to it at once with 404 (no messages) gets a long poll for one message next.
        """
        remaining = deadline - self.clock.monotonic()
        if remaining > 0:
            request = {"batch": max_messages, "no_wait": True, "expires": _nanoseconds(remaining)}
            await self._request(request, max_messages, deadline)
        else:
            # Take what is ready at once, because the server replies to a no-wait request immediately.
            reply_deadline = self.clock.monotonic() + NO_WAIT_REPLY_SECONDS
            await self._request({"batch": max_messages, "no_wait": True}, max_messages, reply_deadline)

        remaining = deadline - self.clock.monotonic()
        if not self.buffer and remaining > 0:
            # Long poll for one message, so the fetch returns as soon as anything arrives.
            await self._request({"batch": 1, "expires": _nanoseconds(remaining)}, 1, deadline)

    async def _request(self, request: dict[str, Any], target: int, deadline: float) -> None:
        """Send a pull request, then wait until `target` messages are buffered or it ends."""
        token = str(next(self._tokens))
        self._active.add(token)
        try:
            await self.client.publish(self.next_subject, json.dumps(request).encode(), reply=f"{self.inbox}.{token}")
            while len(self.buffer) < target and token not in self._finished and not self.closed:
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    return
                self.changed.clear()
                await self.clock.wait(self.changed, remaining)
        finally:
            self._active.discard(token)
            self._finished.discard(token)


@dataclass
class _Subscription:
    """One subscription's consumer, leases and backlog estimate in this process."""

    config: SubscriptionConfig
    consumer: str
    subject: str
    puller: _Puller | None = None
    leases: dict[_Tag, _Lease] = field(default_factory=dict)
    # The latest delivery of each stream sequence this process holds.
    latest: dict[int, _Tag] = field(default_factory=dict)
    first_delivered_at: dict[int, float] = field(default_factory=dict)
    retries: dict[int, _Retry] = field(default_factory=dict)
    # Messages being given up: still unacked on the server until their term is confirmed.
    terminating: set[int] = field(default_factory=set)
    backlog: int = 0
    reserved: int = 0
    backlog_checked_at: float | None = None
    backlog_refreshes: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def explicit(self) -> bool:
        return self.config.ack is not AckPolicy.NONE


class NatsBroker(Broker):
    """Broker on a NATS server with JetStream, shared by every process of a flow."""

    backend = "nats"

    def __init__(self, url: str, flow_name: str, options: NatsOptions | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock)
        self.url = url
        self.options = options or NatsOptions()
        self.flow_name = flow_name
        self.counters = Counters()
        prefix = _server_name(flow_name)
        self.stream = f"{prefix}_topics"
        self.archive_stream = f"{prefix}_dead_letters"
        self.producer_bucket = f"{prefix}_producers"
        self._subject_prefix = prefix
        self._password = urlsplit(url).password
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._producers: KeyValue | None = None
        self._subscriptions: dict[str, _Subscription] = {}
        self._by_topic: dict[str, list[_Subscription]] = {}
        self._topic_by_subject: dict[str, str] = {}
        self._timers: list[tuple[float, int, str, _Tag]] = []
        self._timer_sequence = itertools.count()
        self._timer_changed = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._inspecting = False
        self._closed = False

    @classmethod
    def from_spec(cls, spec: BrokerSpec, options: NatsOptions, flow_path: Path, flow_name: str,
                  clock: Clock) -> NatsBroker:
        if not spec.url:
            raise BrokerError("the nats backend needs broker.url (or FLOWRUN_BROKER_URL), e.g. nats://127.0.0.1:4222")
        return cls(spec.url, flow_name, options, clock)

    # Lifecycle

    async def start(self, topology: Topology) -> None:
        """Connect, declare the streams, one consumer per subscription and the producer bucket."""
        self.topology = topology
        self._index(topology)
        try:
            with self._translated("start"):
                await self._connect()
                await self._declare()
        except BaseException:
            await self.close()
            raise
        self._timer_task = asyncio.create_task(self._run_timers(), name="flowrun-nats-timers")
        logger.info("nats broker connected to %s: stream %s with %d subscriptions", redact_url(self.url),
                    self.stream, len(self._subscriptions))

    async def open_for_inspection(self, topology: Topology | None) -> None:
        """Connect without declaring or consuming anything, for `status` and `dlq`."""
        self.topology = topology
        self._inspecting = True
        if topology is not None:
            self._index(topology)
        try:
            with self._translated("open for inspection"):
                await self._connect()
                self._producers = await self._producer_bucket(create=False)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop timers and waiting fetches and publishes, then close the connection.

        Messages that arrived for a fetch but were never handed out are returned with a
        nak, so the server redelivers them at once. Deliveries handed out and still
        unsettled stay with the server, which redelivers them after their ack wait.
        """
        self._closed = True
        for state in self._subscriptions.values():
            state.room.set()
            if state.puller is not None:
                state.puller.close()

        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None

        client, self._client = self._client, None
        if client is None or client.is_closed:
            return
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await self._return_unfetched(client)
                await client.close()
        except (nats.errors.Error, OSError, TimeoutError) as error:
            logger.warning("closing the connection to %s failed: %s", redact_url(self.url), self._describe(error))

    async def _return_unfetched(self, client: Client) -> None:
        """Nak the messages waiting in the pullers' buffers: a fetch cancelled by a stop left them."""
        returned = 0
        for state in self._subscriptions.values():
            puller = state.puller
            if puller is None:
                continue
            while puller.buffer:
                message, _ = puller.buffer.popleft()
                await client.publish(message.reply, _nak(0.0))
                returned += 1
        if returned:
            await client.flush()
            logger.info("returned %d messages that no fetch handed out", returned)

    async def delete_flow_resources(self) -> None:
        """Delete the flow's streams (with their consumers) and its producer bucket."""
        with self._translated("delete the flow's streams"):
            js = self._jetstream
            for stream in (self.stream, self.archive_stream):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(self.producer_bucket)

    async def _declare(self) -> None:
        await self._declare_stream(self._topics_stream_config())
        await self._declare_stream(self._archive_stream_config())
        for state in self._subscriptions.values():
            await self._declare_consumer(state)
            next_subject = f"{API_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{state.consumer}"
            state.puller = _Puller(self._connected, next_subject, self.clock)
            await state.puller.start()
        self._producers = await self._producer_bucket(create=True)

    def _index(self, topology: Topology) -> None:
        for topic in topology.topics:
            self._by_topic.setdefault(topic, [])
            self._topic_by_subject[self._topic_subject(topic)] = topic
        for config in topology.subscriptions:
            subject = self._topic_subject(config.topic)
            state = _Subscription(config, _server_name(config.name), subject)
            self._subscriptions[config.name] = state
            self._by_topic.setdefault(config.topic, []).append(state)
            self._topic_by_subject[subject] = config.topic

    def _topic_subject(self, topic: str) -> str:
        return f"{self._subject_prefix}.{_server_name(topic)}"

    async def _connect(self) -> None:
        client = Client()
        self._client = client
        try:
            # The client retries a refused connection RECONNECT_ATTEMPTS times, which
            # suits a running flow but not a server that is down at start.
            async with asyncio.timeout(CONNECT_SECONDS):
                await client.connect(
                    servers=[self.url],
                    name=f"flowrun {self.flow_name}",
                    connect_timeout=2,
                    reconnect_time_wait=RECONNECT_WAIT_SECONDS,
                    max_reconnect_attempts=RECONNECT_ATTEMPTS,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except TimeoutError:
            await client.close()
            raise BrokerError(
                f"cannot connect to NATS at {redact_url(self.url)} within {CONNECT_SECONDS:g}s; check that "
                "nats-server is running (with -js) and that broker.url or FLOWRUN_BROKER_URL points to it"
            ) from None
        self._js = client.jetstream(timeout=API_TIMEOUT_SECONDS)

    async def _on_error(self, error: Exception) -> None:
        logger.warning("NATS connection to %s reported an error: %s", redact_url(self.url), self._describe(error))

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("disconnected from NATS at %s; reconnecting", redact_url(self.url))

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS at %s", redact_url(self.url))

    @property
    def _connected(self) -> Client:
        if self._client is None or self._closed:
            raise BrokerError(f"the NATS broker for flow '{self.flow_name}' is not connected")
        return self._client

    @property
    def _jetstream(self) -> JetStreamContext:
        if self._js is None or self._closed:
            raise BrokerError(f"the NATS broker for flow '{self.flow_name}' is not connected")
        return self._js

    # Declaring streams and consumers, without silent drift

    def _topics_stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            description=f"flowrun flow '{self.flow_name}': one subject per topic",
            subjects=[f"{self._subject_prefix}.*"],
            retention=RetentionPolicy.INTEREST,
            storage=StorageType(self.options.storage),
            num_replicas=self.options.replicas,
            duplicate_window=self.options.duplicate_window,
        )

    def _archive_stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.archive_stream,
            description=f"flowrun flow '{self.flow_name}': a copy of every dead letter, kept until purged",
            subjects=[f"{self._subject_prefix}.dead-letters.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType(self.options.storage),
            num_replicas=self.options.replicas,
            duplicate_window=self.options.duplicate_window,
        )

    async def _declare_stream(self, expected: StreamConfig) -> None:
        js = self._jetstream
        assert expected.name is not None
        try:
            existing = (await js.stream_info(expected.name)).config
        except nats.js.errors.NotFoundError:
            await js.add_stream(expected)
            logger.info("created stream %s", expected.name)
            return

        changes = _stream_changes(existing, expected)
        fixed = [change for change in changes if change[0] in ("retention", "storage")]
        if fixed:
            raise BrokerError(
                f"stream {expected.name} on {redact_url(self.url)} has settings that cannot change: "
                f"{_describe_changes(fixed)}; delete it (nats stream rm {expected.name}), which drops its "
                "messages, and start the flow again"
            )
        if changes:
            await js.update_stream(expected)
            logger.warning("updated stream %s: %s", expected.name, _describe_changes(changes))

    def _consumer_config(self, state: _Subscription) -> ConsumerConfig:
        config = state.config
        description = f"flowrun subscription '{config.name}' of topic '{config.topic}' in flow '{self.flow_name}'"
        if not state.explicit:
            return ConsumerConfig(name=state.consumer, durable_name=state.consumer, description=description,
                                  deliver_policy=DeliverPolicy.NEW, ack_policy=NatsAckPolicy.NONE,
                                  filter_subject=state.subject)
        return ConsumerConfig(
            name=state.consumer,
            durable_name=state.consumer,
            description=description,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=NatsAckPolicy.EXPLICIT,
            filter_subject=state.subject,
            # No backoff list: with one, nats-server 2.9.10 adds the growth of the list to
            # the delay of every nak, so retries would wait longer than the retry policy sets.
            ack_wait=config.ack_timeout + BACKSTOP_GRACE_SECONDS,
            max_deliver=config.max_deliveries + 1,
            # NOTE: `ordered` holds back every key while one message is unsettled, not only
            # the key of that message, because JetStream has no per-key flow control.
            max_ack_pending=1 if config.ordered else config.max_pending,
        )

    async def _declare_consumer(self, state: _Subscription) -> None:
        js = self._jetstream
        expected = self._consumer_config(state)
        try:
            existing = (await js.consumer_info(self.stream, state.consumer)).config
        except nats.js.errors.NotFoundError:
            await js.add_consumer(self.stream, expected)
            logger.info("created consumer %s on stream %s for subscription '%s'", state.consumer, self.stream,
                        state.config.name)
            return

        changes = _consumer_changes(existing, expected)
        fixed = [change for change in changes if change[0] in ("topic subject", "ack policy")]
        if fixed:
            raise BrokerError(
                f"consumer {state.consumer} of stream {self.stream} on {redact_url(self.url)} (subscription "
                f"'{state.config.name}') has settings that cannot change: {_describe_changes(fixed)}; delete it "
                f"(nats consumer rm {self.stream} {state.consumer}), which drops the subscription's unsettled "
                "messages, and start the flow again"
            )
        if changes:
            await js.add_consumer(self.stream, expected)
            # The consumer's numbers derive from the flow's: ack_wait adds a grace period to
            # ack_timeout, and max_deliver allows one delivery more than max_deliveries.
            logger.warning("updated consumer %s of stream %s to the changed settings of subscription '%s' "
                           "(server values: %s)", state.consumer, self.stream, state.config.name,
                           _describe_changes(changes))

    async def _producer_bucket(self, create: bool) -> KeyValue | None:
        js = self._jetstream
        try:
            return await js.key_value(self.producer_bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                return None
        config = KeyValueConfig(bucket=self.producer_bucket, history=1, storage=StorageType(self.options.storage),
                                replicas=self.options.replicas,
                                description=f"flowrun flow '{self.flow_name}': whether each producer finished")
        return await js.create_key_value(config)

    # Publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store the envelopes in order; return once the server confirmed each one.

        Envelopes are sent without waiting for each confirmation, so a failed batch may be
        partly stored. Publishing it again is safe, because the server drops ids it already
        stored within `duplicate_window`. A full subscription makes the batch wait (or
        raise QueueFullError) before the envelope that does not fit.
        """
        sent: list[tuple[Envelope, list[_Subscription], asyncio.Future[PubAck]]] = []
        try:
            for envelope in envelopes:
                holders = self._holders(envelope.topic)
                if sent and any(state.backlog + state.reserved >= state.config.max_pending for state in holders):
                    # Reservations of this batch end only at confirmation, so confirm the
                    # envelopes sent so far before waiting for room, or the batch waits on itself.
                    pending, sent = sent, []
                    error = await self._confirm(pending)
                    if error is not None:
                        raise error
                await self._reserve_room(envelope.topic, holders)
                try:
                    with self._translated(f"publish to topic '{envelope.topic}'"):
                        future = await self._jetstream.publish_async(
                            self._topic_subject(envelope.topic), envelope.body, stream=self.stream,
                            headers=self._headers(envelope))
                except BaseException:
                    for state in holders:
                        state.reserved -= 1
                    raise
                sent.append((envelope, holders, future))
        finally:
            error = await self._confirm(sent)
        if error is not None:
            raise error

    async def _confirm(self, sent: list[tuple[Envelope, list[_Subscription], asyncio.Future[PubAck]]]
                       ) -> BrokerError | None:
        """Wait for the server's acks of sent envelopes; return the first failure."""
        first_error: BrokerError | None = None
        deadline = asyncio.get_running_loop().time() + PUBLISH_TIMEOUT_SECONDS
        for envelope, holders, future in sent:
            stored = False
            try:
                with self._translated(f"publish to topic '{envelope.topic}'"):
                    async with asyncio.timeout_at(deadline):
                        stored = self._count_published(envelope, await future)
            except BrokerError as error:
                first_error = first_error or error
            finally:
                for state in holders:
                    state.reserved -= 1
                    if stored:
                        state.backlog += 1
        return first_error

    def _holders(self, topic: str) -> list[_Subscription]:
        holders = self._by_topic.get(topic)
        if holders is None:
            raise BrokerError(f"topic '{topic}' is not declared on the broker")
        return holders

    def _headers(self, envelope: Envelope, replay_for: str | None = None) -> dict[str, str]:
        headers = {
            MESSAGE_ID_HEADER: quote(envelope.id, safe=""),
            PUBLISHED_AT_HEADER: repr(envelope.published_at),
        }
        if envelope.key is not None:
            headers[KEY_HEADER] = quote(envelope.key, safe="")
        if envelope.headers:
            headers[HEADERS_HEADER] = json.dumps(envelope.headers, ensure_ascii=True, separators=(",", ":"))
        if replay_for is not None:
            headers[REPLAY_FOR_HEADER] = quote(replay_for, safe="")
        return headers

    async def _store(self, envelope: Envelope, replay_for: str | None = None) -> bool:
        """Publish one envelope outside max_pending; return False when the server dropped a duplicate id."""
        ack = await self._jetstream.publish(self._topic_subject(envelope.topic), envelope.body, stream=self.stream,
                                            headers=self._headers(envelope, replay_for))
        if replay_for is not None:
            return not ack.duplicate
        return self._count_published(envelope, ack)

    def _count_published(self, envelope: Envelope, ack: PubAck) -> bool:
        if ack.duplicate:
            logger.debug("skipped message %s: its id was already published", envelope.id)
            return False
        self.counters.published[envelope.topic] += 1
        return True

    async def _reserve_room(self, topic: str, holders: list[_Subscription]) -> None:
        """Wait until every subscription of the topic has room, then reserve a place in each.

        Settlements of this process lower the estimates at once, so a publish woken by one
        needs no server round trip. The server is asked when an estimate is older than
        ESTIMATE_MAX_AGE_SECONDS, and before a publish blocks or is rejected.
        """
        confirm = False
        while True:
            now = self.clock.monotonic()
            stale = [state for state in holders if self._estimate_stale(state, now, confirm)]
            if stale:
                await asyncio.gather(*(self._refresh_backlog(state) for state in stale))

            full = [state for state in holders if state.backlog + state.reserved >= state.config.max_pending]
            if not full:
                for state in holders:
                    state.reserved += 1
                return
            if any(state not in stale for state in full):
                confirm = True
                continue

            state = full[0]
            if state.config.on_full is OnFull.REJECT:
                raise QueueFullError(
                    f"subscription '{state.config.name}' of topic '{topic}' has {state.backlog} unsettled messages, "
                    f"its max_pending of {state.config.max_pending}; retry later or raise max_pending"
                )
            if self._closed:
                raise BrokerError(f"the NATS broker closed while a publish to topic '{topic}' waited for room")
            state.room.clear()
            # A timeout means no settlement here freed room, but another process's may have.
            confirm = not await self.clock.wait(state.room, ROOM_POLL_SECONDS)

    def _estimate_stale(self, state: _Subscription, now: float, confirm: bool) -> bool:
        if state.backlog_checked_at is None or now - state.backlog_checked_at > ESTIMATE_MAX_AGE_SECONDS:
            return True
        return confirm and state.backlog + state.reserved >= state.config.max_pending

    async def _refresh_backlog(self, state: _Subscription) -> None:
        with self._translated(f"read the backlog of subscription '{state.config.name}'"):
            info = await self._jetstream.consumer_info(self.stream, state.consumer)
        # Publishes in progress may already be counted by the server, so the estimate can
        # only be too high, which the next refresh corrects.
        state.backlog = (info.num_pending or 0) + (info.num_ack_pending or 0)
        state.backlog_checked_at = self.clock.monotonic()
        state.backlog_refreshes += 1

    # Fetching

    async def fetch(self, subscription: str, max_messages: int, timeout: float) -> list[Delivery]:
        """Long-poll the subscription's consumer: return as soon as any delivery is ready."""
        state = self._subscription(subscription)
        if state.puller is None:
            raise BrokerError(f"the NATS broker for flow '{self.flow_name}' was opened for inspection only")
        deadline = self.clock.monotonic() + timeout
        while not self._closed and max_messages > 0:
            with self._translated(f"fetch from subscription '{subscription}'"):
                messages = await state.puller.pull(max_messages, deadline)
                deliveries = await self._accept(state, messages)
            if deliveries or self.clock.monotonic() >= deadline:
                return deliveries
        return []

    async def _accept(self, state: _Subscription, messages: list[tuple[Msg, float]]) -> list[Delivery]:
        """Turn pulled messages into leased deliveries, skipping copies this process may not hand out."""
        deliveries = []
        for message, arrived_at in messages:
            metadata = message.metadata
            sequence = metadata.sequence.stream
            count = metadata.num_delivered
            headers = message.headers or {}

            replay_for = headers.get(REPLAY_FOR_HEADER)
            if replay_for is not None and unquote(replay_for) != state.config.name:
                # A dead letter replayed for another subscription of this topic.
                if state.explicit:
                    await self._settle_skipped(state, message, "ack a replay meant for another subscription")
                continue

            if not self._supersede(state, sequence, count):
                continue
            state.retries.pop(sequence, None)

            envelope = self._envelope(message)
            if state.explicit and count > state.config.max_deliveries:
                await self._give_up_abandoned(state, message, envelope, count, arrived_at)
                continue

            deliveries.append(self._lease(state, message, envelope, count, arrived_at))
        return deliveries

    async def _settle_skipped(self, state: _Subscription, message: Msg, action: str) -> None:
        """Ack a message that reaches no handler; on failure the server redelivers it after its ack wait."""
        try:
            with self._translated(f"{action} on '{state.config.name}'"):
                await self._settle([message.reply], ACK)
        except BrokerError as error:
            logger.error("%s", error)

    def _supersede(self, state: _Subscription, sequence: int, count: int) -> bool:
        """Drop an older lease of the same message; return False if this copy is the older one."""
        previous = state.latest.get(sequence)
        if previous is None:
            return True
        if previous.delivery_count >= count:
            logger.debug("skipped stale delivery %d of message seq %d on '%s'", count, sequence, state.config.name)
            return False
        if state.leases.pop(previous, None) is not None:
            self._released(state.config.name, previous)
        return True

    def _lease(self, state: _Subscription, message: Msg, envelope: Envelope, count: int,
               arrived_at: float) -> Delivery:
        config = state.config
        sequence = message.metadata.sequence.stream
        now = self.clock.wall()
        if count == 1 or not state.explicit:
            first_delivered_at = now
        else:
            # NOTE: a message first delivered by another process reports its publish time.
            first_delivered_at = state.first_delivered_at.get(sequence, envelope.published_at)

        tag = _Tag(state.config.name, sequence, count)
        delivery = Delivery(envelope, config.name, count, tag, first_delivered_at)
        deadline = arrived_at + config.ack_timeout if state.explicit else None
        state.leases[tag] = _Lease(tag, message.reply, delivery, arrived_at, deadline)
        state.latest[sequence] = tag
        if state.explicit:
            state.first_delivered_at[sequence] = first_delivered_at
        if deadline is not None:
            self._schedule(deadline, config.name, tag)

        counters = self.counters.subscriptions[config.name]
        counters.delivered += 1
        if count > 1:
            counters.redelivered += 1
        return delivery

    def _envelope(self, message: Msg) -> Envelope:
        headers = message.headers or {}
        metadata = message.metadata
        message_id = unquote(headers.get(MESSAGE_ID_HEADER, "")) or f"{metadata.stream}-{metadata.sequence.stream}"
        key = unquote(headers[KEY_HEADER]) if KEY_HEADER in headers else None
        published_at = float(headers.get(PUBLISHED_AT_HEADER, metadata.timestamp.timestamp()))
        topic = self._topic_by_subject.get(message.subject, message.subject.rsplit(".", 1)[-1])
        envelope_headers = json.loads(headers[HEADERS_HEADER]) if HEADERS_HEADER in headers else {}
        return Envelope(message_id, topic, message.data, key, envelope_headers, published_at)

    # Settling

    async def ack(self, subscription: str, tags: Sequence[Any]) -> None:
        """Settle deliveries as done; tags this process has no lease for are ignored."""
        state = self._subscription(subscription)
        leases = self._take_leases(state, tags, "ack")
        refreshes = state.backlog_refreshes
        try:
            if state.explicit and leases:
                with self._translated(f"ack on subscription '{subscription}'"):
                    await self._ack_all([lease.reply for lease in leases])
        except BaseException:
            # The server redelivers what it did not record as acked; only the push cap is freed.
            for lease in leases:
                self._released(subscription, lease.tag)
            raise

        self.counters.subscriptions[subscription].acked += len(leases)
        for lease in leases:
            self._finish(state, lease, refreshes)

    async def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        """Redeliver after the nack's delay or the retry backoff, or give up on the last delivery."""
        state = self._subscription(subscription)
        config = state.config
        by_tag = {nack.tag: nack for nack in nacks}
        leases = self._take_leases(state, list(by_tag), "nack")

        retries: list[tuple[_Lease, float]] = []
        given_up: list[_Lease] = []
        now = self.clock.monotonic()
        for lease in leases:
            nack = by_tag[lease.tag]
            count = lease.delivery.delivery_count
            if not state.explicit:
                self._drop_unacked(state, lease, nack.error)
            elif nack.terminal or count >= config.max_deliveries:
                given_up.append(lease)
            else:
                delay = config.backoff(count) if nack.delay is None else max(nack.delay, 0.0)
                # Recorded before the nak is sent: a fetch running meanwhile may receive
                # the redelivery before the nak's reply arrives.
                self._schedule_retry(state, lease, now + delay)
                retries.append((lease, delay))

        try:
            with self._translated(f"nack on subscription '{subscription}'"):
                for lease in given_up:
                    await self._give_up(state, lease, by_tag[lease.tag].error, by_tag[lease.tag].dead_letter)
                await asyncio.gather(*(self._settle([lease.reply], _nak(delay)) for lease, delay in retries))
        finally:
            for lease in given_up + [lease for lease, _ in retries]:
                self._released(subscription, lease.tag)

    def _take_leases(self, state: _Subscription, tags: Sequence[Any], action: str) -> list[_Lease]:
        leases = []
        for tag in tags:
            lease = state.leases.pop(tag, None)
            if lease is None:
                logger.debug("ignored %s of unknown or expired delivery %s on '%s'", action, tag, state.config.name)
                continue
            leases.append(lease)
        return leases

    async def _ack_all(self, replies: Sequence[str]) -> None:
        """Publish acks without a reply, the last one as a request, and wait for its reply.

        The consumer applies acks in the order they arrive and replies to the last one once
        it applied it, so one round trip covers the whole batch, and the consumer's counts
        include every ack when this returns. (A flush only shows that the server read the
        acks, and the consumer applies them later.) Acks sent as requests each cost a reply.
        """
        client = self._connected
        for reply in replies[:-1]:
            await client.publish(reply, ACK)
        await client.request(replies[-1], ACK, timeout=SETTLE_TIMEOUT_SECONDS)

    async def _settle(self, replies: Sequence[str], payload: bytes) -> None:
        """Send acks (or naks, terms) as requests, so they are applied when this returns."""
        client = self._connected
        results = await asyncio.gather(
            *(client.request(reply, payload, timeout=SETTLE_TIMEOUT_SECONDS) for reply in replies),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _finish(self, state: _Subscription, lease: _Lease, refreshes: int | None) -> None:
        """Forget a settled message and free its place in the push cap and the backlog.

        `refreshes` is the backlog refresh count when the settlement was sent. After a
        later refresh the server's number may already exclude the message, so the
        estimate is left high rather than lowered twice.
        """
        sequence = lease.tag.stream_sequence
        if state.latest.get(sequence) == lease.tag:
            del state.latest[sequence]
        state.first_delivered_at.pop(sequence, None)
        if state.explicit and refreshes == state.backlog_refreshes:
            state.backlog = max(state.backlog - 1, 0)
        state.room.set()
        self._released(state.config.name, lease.tag)

    def _schedule_retry(self, state: _Subscription, lease: _Lease, due: float) -> None:
        sequence = lease.tag.stream_sequence
        state.retries[sequence] = _Retry(due, lease.delivery.envelope.published_at)
        if state.latest.get(sequence) == lease.tag:
            del state.latest[sequence]

    def _drop_unacked(self, state: _Subscription, lease: _Lease, error: ErrorInfo | None) -> None:
        """Count a nack under ack: none, where the server already removed the message."""
        self.counters.subscriptions[state.config.name].dropped += 1
        logger.warning("dropped message %s of subscription '%s' (ack: none): %s", lease.delivery.envelope.id,
                       state.config.name, (error or NO_ERROR).message)
        self._finish(state, lease, None)

    async def _give_up(self, state: _Subscription, lease: _Lease, error: ErrorInfo | None,
                       dead_letter: bool = True) -> None:
        """Dead-letter or drop a message, then terminate it on the server."""
        config = state.config
        counters = self.counters.subscriptions[config.name]
        delivery = lease.delivery
        sequence = lease.tag.stream_sequence

        if config.dead_letter is None or not dead_letter:
            refreshes = state.backlog_refreshes
            await self._settle([lease.reply], TERM)
            counters.dropped += 1
            logger.warning("dropped message %s of subscription '%s' at delivery %d: %s", delivery.envelope.id,
                           config.name, delivery.delivery_count, (error or NO_ERROR).message)
            self._finish(state, lease, refreshes)
            return

        # The letter is published before the original is terminated, so a process dying in
        # between leaves the original to be redelivered, and the letter's fixed id makes the
        # server drop a second copy. Until the term is confirmed, `stats` and the counters
        # already treat the original as settled, because the letter may be fetched meanwhile.
        state.terminating.add(sequence)
        counters.dead_lettered += 1
        try:
            letter = await self._dead_letter(config, delivery, sequence, error)
        except BaseException:
            counters.dead_lettered -= 1
            state.terminating.discard(sequence)
            raise
        refreshes = state.backlog_refreshes
        try:
            await self._settle([lease.reply], TERM)
        finally:
            state.terminating.discard(sequence)
        logger.error("dead-lettered message %s of subscription '%s' to '%s' at delivery %d: %s",
                     delivery.envelope.id, config.name, config.dead_letter, delivery.delivery_count,
                     letter.headers["flowrun.error"])
        self._finish(state, lease, refreshes)

    async def _give_up_abandoned(self, state: _Subscription, message: Msg, envelope: Envelope, count: int,
                                 arrived_at: float) -> None:
        """Give up on a message whose final delivery timed out in a process that is gone."""
        sequence = message.metadata.sequence.stream
        first_delivered_at = state.first_delivered_at.get(sequence, envelope.published_at)
        tag = _Tag(state.config.name, sequence, count)
        delivery = Delivery(envelope, state.config.name, count - 1, tag, first_delivered_at)
        lease = _Lease(tag, message.reply, delivery, arrived_at, None)
        logger.warning("message %s of subscription '%s' was not acked within %gs on its last delivery",
                       envelope.id, state.config.name, state.config.ack_timeout)
        try:
            with self._translated(f"dead-letter a message of subscription '{state.config.name}'"):
                await self._give_up(state, lease, ErrorInfo.timeout(state.config.ack_timeout))
        except BrokerError as error:
            # TODO: the server has used up max_deliver here, so it keeps the message (interest
            # retention) but never delivers it again. Only a manual purge removes it.
            logger.error("%s", error)

    async def _dead_letter(self, config: SubscriptionConfig, delivery: Delivery, sequence: int,
                           error: ErrorInfo | None) -> Envelope:
        """Publish the dead letter to its topic and a copy to the archive stream."""
        assert config.dead_letter is not None
        now = self.clock.wall()
        headers = dead_letter_headers(delivery, config, error, now)
        letter_id = uuid.uuid5(DEAD_LETTER_IDS, f"{self.stream}:{sequence}:{config.name}").hex
        original = delivery.envelope
        letter = Envelope(letter_id, config.dead_letter, original.body, original.key, headers, now)

        archive_headers = {
            MESSAGE_ID_HEADER: letter_id,
            SUBSCRIPTION_HEADER: quote(config.name, safe=""),
            TOPIC_HEADER: quote(original.topic, safe=""),
            HEADERS_HEADER: json.dumps(headers, ensure_ascii=True, separators=(",", ":")),
            DEAD_LETTERED_AT_HEADER: repr(now),
            PUBLISHED_AT_HEADER: repr(original.published_at),
            "Flowrun-Original-Id": quote(original.id, safe=""),
        }
        if original.key is not None:
            archive_headers[KEY_HEADER] = quote(original.key, safe="")

        # Both are sent at once, to save a round trip. Dead letters skip max_pending,
        # because blocking here would stall the subscription that failed.
        archived = self._jetstream.publish(self._archive_subject(config.name), original.body,
                                           stream=self.archive_stream, headers=archive_headers)
        stored, _ = await asyncio.gather(self._store(letter), archived)
        if stored:
            for holder in self._by_topic.get(config.dead_letter, []):
                holder.backlog += 1
        return letter

    def _archive_subject(self, subscription: str) -> str:
        return f"{self._subject_prefix}.dead-letters.{_server_name(subscription)}"

    # Lease timers

    def _schedule(self, deadline: float, subscription: str, tag: _Tag) -> None:
        earliest = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (deadline, next(self._timer_sequence), subscription, tag))
        if earliest is None or deadline < earliest:
            self._timer_changed.set()

    async def _run_timers(self) -> None:
        while True:
            now = self.clock.monotonic()
            while self._timers and self._timers[0][0] <= now:
                deadline, _, subscription, tag = heapq.heappop(self._timers)
                await self._expire(self._subscriptions[subscription], tag, deadline)

            timeout = self._timers[0][0] - self.clock.monotonic() if self._timers else None
            self._timer_changed.clear()
            await self.clock.wait(self._timer_changed, timeout)

    async def _expire(self, state: _Subscription, tag: _Tag, deadline: float) -> None:
        """End a lease at its ack deadline: nak it with the retry delay, or give up on the last delivery."""
        lease = state.leases.get(tag)
        if lease is None or lease.deadline != deadline:
            return
        del state.leases[tag]
        config = state.config
        count = tag.delivery_count
        logger.warning("message %s of subscription '%s' was not acked within %gs (delivery %d)",
                       lease.delivery.envelope.id, config.name, config.ack_timeout, count)

        try:
            if count < config.max_deliveries:
                delay = config.backoff(count)
                self._schedule_retry(state, lease, self.clock.monotonic() + delay)
                with self._translated(f"nak an expired delivery of subscription '{config.name}'"):
                    await self._settle([lease.reply], _nak(delay))
            else:
                with self._translated(f"dead-letter a message of subscription '{config.name}'"):
                    await self._give_up(state, lease, ErrorInfo.timeout(config.ack_timeout))
        except BrokerError as error:
            # The server redelivers the message after its ack wait, BACKSTOP_GRACE_SECONDS
            # later, and a fetch then retries it or gives up on it.
            logger.error("%s", error)
        finally:
            self._released(config.name, tag)

    # Inspection

    async def stats(self) -> dict[str, Any]:
        """Counters of this process, with pending and in-flight gauges from the server."""
        states = list(self._subscriptions.values())
        terminating = [set(state.terminating) for state in states]
        with self._translated("read the consumers' state"):
            infos = await asyncio.gather(*(self._consumer_info(state) for state in states))
            backlogs = await asyncio.gather(
                *(self._gauges(state, info, before) for state, info, before in zip(states, infos, terminating))
            )
            gauges = {state.config.name: gauge for state, gauge in zip(states, backlogs)}
            if self._inspecting:
                await self._count_archived_letters(states)
        topics = {state.config.name: state.config.topic for state in states}
        return self.counters.snapshot(self._by_topic, topics, gauges)

    async def _consumer_info(self, state: _Subscription) -> ConsumerInfo | None:
        try:
            return await self._jetstream.consumer_info(self.stream, state.consumer)
        except nats.js.errors.NotFoundError:
            return None

    async def _gauges(self, state: _Subscription, info: ConsumerInfo | None, terminating: set[int]) -> Gauges:
        """Split the consumer's counts into the report's gauges.

        `terminating` lists the messages being given up when `info` was requested. The
        server may have taken its numbers before or after their term, so they count as
        settled either way.
        """
        if info is None:
            return Gauges()
        now = self.clock.monotonic()
        for sequence in [sequence for sequence, retry in state.retries.items()
                         if retry.due + state.config.ack_timeout < now]:
            # Long due and not fetched here, so another process took it.
            del state.retries[sequence]

        waiting = len(state.retries)
        delayed = sum(1 for retry in state.retries.values() if retry.due > now)
        undelivered = info.num_pending or 0
        pending = undelivered + waiting
        settling = len(terminating | state.terminating)
        in_flight = max((info.num_ack_pending or 0) - waiting - settling, 0)

        oldest = [retry.published_at for retry in state.retries.values()]
        if undelivered:
            oldest += await self._first_undelivered_time(state, info)
        age = max(self.clock.wall() - min(oldest), 0.0) if oldest else None
        return Gauges(in_flight, pending, delayed, age)

    async def _first_undelivered_time(self, state: _Subscription, info: ConsumerInfo) -> list[float]:
        start = (info.delivered.stream_seq if info.delivered else 0) + 1
        try:
            message = await self._jetstream.get_msg(self.stream, start, subject=state.subject, next=True)
        except nats.js.errors.NotFoundError:
            return []
        headers = message.headers or {}
        if PUBLISHED_AT_HEADER in headers:
            return [float(headers[PUBLISHED_AT_HEADER])]
        return [message.time.timestamp()] if message.time else []

    async def _count_archived_letters(self, states: list[_Subscription]) -> None:
        """Fill dead_lettered from the archive, since counters of other processes are not visible here."""
        try:
            info = await self._jetstream.stream_info(self.archive_stream,
                                                     subjects_filter=f"{self._subject_prefix}.dead-letters.*")
        except nats.js.errors.NotFoundError:
            return
        counts = info.state.subjects or {}
        for state in states:
            self.counters.subscriptions[state.config.name].dead_lettered = counts.get(
                self._archive_subject(state.config.name), 0)

    def _subscription(self, name: str) -> _Subscription:
        try:
            return self._subscriptions[name]
        except KeyError:
            raise BrokerError(f"subscription '{name}' is not declared on the broker") from None

    # Producers and dead letters, for the runtime and the CLI

    async def set_producer_state(self, name: str, finished: bool) -> None:
        """Record in the flow's key-value bucket whether a producer finished."""
        with self._translated(f"record the state of producer '{name}'"):
            await self._producer_kv().put(_server_name(name), b"1" if finished else b"0")

    async def producers_finished(self, names: Sequence[str]) -> bool:
        """Return whether every named producer recorded, in any process, that it finished."""
        bucket = self._producer_kv()
        with self._translated("read the producers' states"):
            for name in names:
                try:
                    entry = await bucket.get(_server_name(name))
                except nats.js.errors.KeyNotFoundError:
                    return False
                if entry.value != b"1":
                    return False
        return True

    def _producer_kv(self) -> KeyValue:
        if self._producers is None:
            raise BrokerError(f"the producer bucket {self.producer_bucket} of flow '{self.flow_name}' does not exist; "
                              "start the flow first")
        return self._producers

    async def dead_letters(self, subscription: str | None = None) -> list[dict[str, Any]]:
        """List archived dead letters, oldest first, in the shape the sqlite backend returns."""
        subject = self._archive_subject(subscription) if subscription else f"{self._subject_prefix}.dead-letters.*"
        letters: list[dict[str, Any]] = []
        sequence = 1
        with self._translated("list dead letters"):
            while True:
                try:
                    message = await self._jetstream.get_msg(self.archive_stream, sequence, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    return letters
                letters.append(_archived_letter(message.seq or sequence, message.data or b"", message.headers or {}))
                sequence = (message.seq or sequence) + 1

    async def replay_dead_letters(self, subscription: str | None = None) -> int:
        """Put dead letters back on their subscription as new first deliveries.

        A replay is published to the original topic with a header naming the subscription;
        other subscriptions of the topic ack it without counting it.
        """
        letters = await self.dead_letters(subscription)
        for letter in letters:
            if letter["subscription"] not in self._subscriptions:
                raise BrokerError(f"dead letter {letter['number']} belongs to subscription '{letter['subscription']}', "
                                  "which the flow no longer declares")
            headers = replay_headers(letter)
            envelope = Envelope(uuid.uuid4().hex, letter["topic"], letter["body"], letter["key"], headers,
                                self.clock.wall())
            with self._translated(f"replay dead letter {letter['number']}"):
                await self._store(envelope, replay_for=letter["subscription"])
                await self._jetstream.delete_msg(self.archive_stream, letter["number"])
        return len(letters)

    async def purge_dead_letters(self, subscription: str | None = None) -> int:
        """Delete archived dead letters; return how many there were."""
        subject = self._archive_subject(subscription) if subscription else f"{self._subject_prefix}.dead-letters.*"
        with self._translated("purge dead letters"):
            try:
                info = await self._jetstream.stream_info(self.archive_stream, subjects_filter=subject)
            except nats.js.errors.NotFoundError:
                return 0
            count = sum((info.state.subjects or {}).values())
            if count:
                await self._jetstream.purge_stream(self.archive_stream, subject=subject)
        return count

    # Errors

    @contextlib.contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Raise client errors of `action` as BrokerError, with the server's URL redacted."""
        try:
            yield
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise BrokerError(
                f"NATS {action} failed on {redact_url(self.url)} for flow '{self.flow_name}': "
                f"{self._describe(error)}{_hint(error)}"
            ) from None

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, nats.js.errors.APIError) and error.description:
            text = f"{error.description} (code {error.code}, error code {error.err_code})"
        else:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text


def _hint(error: BaseException) -> str:
    if isinstance(error, nats.errors.AuthorizationError):
        return "; check the user and password in broker.url or FLOWRUN_BROKER_URL"
    if isinstance(error, CONNECTION_ERRORS):
        return "; check that nats-server is running and that broker.url or FLOWRUN_BROKER_URL points to it"
    if isinstance(error, JETSTREAM_MISSING_ERRORS):
        return "; JetStream is not available: start nats-server with -js"
    if isinstance(error, TimeoutError):
        return "; the server did not answer in time, so check its load and the network"
    return ""


def _stream_changes(existing: StreamConfig, expected: StreamConfig) -> list[tuple[str, Any, Any]]:
    changes = []
    pairs = [
        ("retention", existing.retention, expected.retention),
        ("storage", existing.storage, expected.storage),
        ("subjects", sorted(existing.subjects or []), sorted(expected.subjects or [])),
        ("replicas", existing.num_replicas or 1, expected.num_replicas or 1),
        ("duplicate window", _nanoseconds(existing.duplicate_window or 0), _nanoseconds(expected.duplicate_window)),
    ]
    for name, old, new in pairs:
        if _plain(old) != _plain(new):
            changes.append((name, _plain(old), _plain(new)))
    return changes


def _plain(value: Any) -> Any:
    """Return an enum's value, since the client returns server settings as plain strings."""
    return value.value if isinstance(value, Enum) else value


def _consumer_changes(existing: ConsumerConfig, expected: ConsumerConfig) -> list[tuple[str, Any, Any]]:
    pairs = [
        ("topic subject", existing.filter_subject, expected.filter_subject),
        ("ack policy", _plain(existing.ack_policy), _plain(expected.ack_policy)),
    ]
    if expected.ack_policy is NatsAckPolicy.EXPLICIT:
        pairs += [
            ("ack_wait (s)", round(existing.ack_wait or 0, 6), round(expected.ack_wait or 0, 6)),
            ("backoff (s)", existing.backoff or [], expected.backoff or []),
            ("max_deliver", existing.max_deliver, expected.max_deliver),
            ("max_ack_pending", existing.max_ack_pending, expected.max_ack_pending),
        ]
    return [(name, old, new) for name, old, new in pairs if old != new]


def _describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} {old} -> {new}" for name, old, new in changes)


def _archived_letter(number: int, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """Build the dict `flowrun dlq` lists from one message of the archive stream."""
    key = unquote(headers[KEY_HEADER]) if KEY_HEADER in headers else None
    return {
        "number": number,
        "subscription": unquote(headers.get(SUBSCRIPTION_HEADER, "")),
        "topic": unquote(headers.get(TOPIC_HEADER, "")),
        "message_id": unquote(headers.get("Flowrun-Original-Id", "")),
        "body": body,
        "key": key,
        "headers": json.loads(headers.get(HEADERS_HEADER, "{}")),
        "dead_lettered_at": float(headers.get(DEAD_LETTERED_AT_HEADER, "0")),
    }
