"""NATS-specific behaviour of the nats backend, on the real server on 127.0.0.1.

The conformance suite covers the shared contract, and these tests cover what only this
backend has. They check settings against streams and consumers declared earlier, the
redaction of the password, deduplication by message id, and the dead-letter archive with
its replay. They also cover state shared between processes, the server's redelivery of a
final delivery whose process is gone, and the cleanup of the flow's server objects.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from flowrun.broker import DEAD_LETTER_HEADERS, ErrorInfo, Nack, SubscriptionConfig
from flowrun.errors import BrokerError
from flowrun.message import Delivery, Envelope
from flowrun.spec import AckPolicy, RetrySpec
from tests.conftest import SERVER_URLS, make_topology, require_server

pytest.importorskip("nats")

import nats
import nats.js.errors

from flowrun.brokers import nats as nats_backend
from flowrun.brokers.nats import NatsBroker
from flowrun.brokers.options import NatsOptions

URL = SERVER_URLS["nats"]
TOPIC = "Orders"
DEAD_LETTER_TOPIC = "Orders.dead"
FAST_RETRY = RetrySpec(initial=0.01, multiplier=1.0, max=0.01)
WAIT_SECONDS = 5.0
ERROR = ErrorInfo("ValueError", "amount must be positive", "Traceback (most recent call last):\n  ...")

Opener = Callable[..., Awaitable[NatsBroker]]


def subscription(name: str = "billing", **overrides: Any) -> SubscriptionConfig:
    settings: dict[str, Any] = {"topic": TOPIC, "ack_timeout": 5.0, "retry": FAST_RETRY}
    settings.update(overrides)
    return SubscriptionConfig(name=name, **settings)


def dead_reader() -> SubscriptionConfig:
    return subscription("dead-reader", topic=DEAD_LETTER_TOPIC)


def envelope(message_id: str | None = None, key: str | None = None, headers: dict[str, str] | None = None,
             body: bytes = b"{}") -> Envelope:
    return Envelope(message_id or uuid.uuid4().hex, TOPIC, body, key, dict(headers or {"trace-id": "t-1"}),
                    time.time())


async def fetch_one(broker: NatsBroker, name: str = "billing") -> Delivery:
    deliveries = await broker.fetch(name, 1, timeout=WAIT_SECONDS)
    assert len(deliveries) == 1, f"no delivery on '{name}' within {WAIT_SECONDS}s"
    return deliveries[0]


async def stats_of(broker: NatsBroker, name: str = "billing") -> dict[str, Any]:
    return dict((await broker.stats())["subscriptions"][name])


@pytest.fixture
def flow_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def open_broker(flow_name: str) -> AsyncIterator[Opener]:
    """Return `await open_broker(*subscriptions)`: a started broker of one flow, like one process.

    Every broker of a test shares the flow name; the flow's server objects are deleted after.
    """
    require_server("nats")
    brokers: list[NatsBroker] = []

    async def opener(*subscriptions: SubscriptionConfig, inspect: bool = False,
                     options: NatsOptions | None = None) -> NatsBroker:
        broker = NatsBroker(URL, flow_name, options)
        topology = make_topology(*subscriptions, flow_name=flow_name)
        if inspect:
            await broker.open_for_inspection(topology)
        else:
            await broker.start(topology)
        brokers.append(broker)
        return broker

    yield opener
    cleaner = NatsBroker(URL, flow_name)
    await cleaner.open_for_inspection(None)
    await cleaner.delete_flow_resources()
    await cleaner.close()
    for broker in brokers:
        await broker.close()


async def consumer_config(flow_name: str, consumer: str) -> Any:
    client = await nats.connect(URL)
    try:
        info = await client.jetstream().consumer_info(f"{flow_name}_topics", consumer)
    finally:
        await client.close()
    return info.config


# Settings declared earlier


async def test_changed_ack_timeout_updates_consumer(open_broker, flow_name):
    first = await open_broker(subscription(ack_timeout=5.0, max_deliveries=3))
    await first.close()

    await open_broker(subscription(ack_timeout=1.0, max_deliveries=4))
    config = await consumer_config(flow_name, "billing")

    assert config.ack_wait == pytest.approx(1.0 + nats_backend.BACKSTOP_GRACE_SECONDS)
    assert config.backoff is None
    assert config.max_deliver == 5


async def test_changed_max_pending_updates_consumer(open_broker, flow_name):
    first = await open_broker(subscription(max_pending=100))
    await first.close()

    await open_broker(subscription(max_pending=50))
    config = await consumer_config(flow_name, "billing")

    assert config.max_ack_pending == 50


async def test_changed_ack_policy_raises_with_migration(open_broker, flow_name):
    first = await open_broker(subscription())
    await first.close()

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(ack=AckPolicy.NONE))
    message = str(raised.value)

    assert "ack policy explicit -> none" in message
    assert f"nats consumer rm {flow_name}_topics billing" in message


async def test_changed_topic_raises(open_broker, flow_name):
    first = await open_broker(subscription())
    await first.close()

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(topic="Refunds"))
    message = str(raised.value)

    assert f"topic subject {flow_name}.Orders -> {flow_name}.Refunds" in message


async def test_changed_storage_raises_with_migration(open_broker, flow_name):
    first = await open_broker(subscription())
    await first.close()

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(), options=NatsOptions(storage="memory"))
    message = str(raised.value)

    assert "storage file -> memory" in message
    assert f"nats stream rm {flow_name}_topics" in message


async def test_changed_duplicate_window_updates_stream(open_broker, flow_name):
    first = await open_broker(subscription())
    await first.close()

    await open_broker(subscription(), options=NatsOptions(duplicate_window=30.0))
    client = await nats.connect(URL)
    try:
        info = await client.jetstream().stream_info(f"{flow_name}_topics")
    finally:
        await client.close()

    assert info.config.duplicate_window == pytest.approx(30.0)


# Errors


async def test_connection_error_hides_password(monkeypatch, caplog):
    monkeypatch.setattr(nats_backend, "CONNECT_SECONDS", 1.0)
    broker = NatsBroker("nats://flow-user:s3cret-pw@127.0.0.1:1", "redaction")

    with pytest.raises(BrokerError) as raised:
        await broker.start(make_topology(subscription(), flow_name="redaction"))
    message = str(raised.value)

    assert "s3cret-pw" not in message
    assert "nats://flow-user:***@127.0.0.1:1" in message
    assert "s3cret-pw" not in caplog.text


async def test_client_error_becomes_broker_error(open_broker, flow_name):
    broker = await open_broker(subscription())
    cleaner = await open_broker(inspect=True)
    await cleaner.delete_flow_resources()

    with pytest.raises(BrokerError) as raised:
        await broker.publish([envelope()])

    assert "failed on nats://127.0.0.1:4222" in str(raised.value)
    assert "stream not found" in str(raised.value)


# Messages


async def test_duplicate_id_is_stored_once(open_broker):
    broker = await open_broker(subscription())
    sent = envelope("invoice-536365")

    await broker.publish([sent])
    await broker.publish([envelope("invoice-536365")])
    first = await broker.fetch("billing", 10, timeout=1.0)
    again = await broker.fetch("billing", 10, timeout=0.3)
    report = await broker.stats()

    assert [delivery.envelope.id for delivery in first] == ["invoice-536365"]
    assert again == []
    assert report["topics"][TOPIC]["published"] == 1


async def test_envelope_round_trip_keeps_unusual_values(open_broker):
    broker = await open_broker(subscription())
    headers = {"trace-id": "t-1", "note": "line one\nline two", "währung": "€ 12,50", "empty": ""}
    sent = envelope("id with spaces/ünï", key="customer 7: Zoë", headers=headers, body=b"\x00\xffbinary")

    await broker.publish([sent])
    delivery = await fetch_one(broker)

    assert delivery.envelope.id == sent.id
    assert delivery.envelope.key == sent.key
    assert delivery.envelope.headers == headers
    assert delivery.envelope.body == sent.body
    assert delivery.envelope.published_at == sent.published_at


async def test_empty_key_differs_from_no_key(open_broker):
    broker = await open_broker(subscription())

    await broker.publish([envelope(key=""), envelope(key=None)])
    deliveries = await broker.fetch("billing", 2, timeout=WAIT_SECONDS)

    assert sorted(repr(delivery.envelope.key) for delivery in deliveries) == ["''", "None"]


async def test_ordered_subscription_has_one_in_flight(open_broker):
    broker = await open_broker(subscription(ordered=True))
    await broker.publish([envelope(key="a"), envelope(key="b"), envelope(key="a")])

    first = await broker.fetch("billing", 10, timeout=1.0)
    blocked = await broker.fetch("billing", 10, timeout=0.3)
    await broker.ack("billing", [first[0].tag])
    second = await broker.fetch("billing", 10, timeout=1.0)

    assert len(first) == 1
    assert blocked == []
    assert len(second) == 1


async def test_retry_delays_follow_policy_exactly(open_broker):
    retry = RetrySpec(initial=0.1, multiplier=3.0, max=5.0)
    broker = await open_broker(subscription(retry=retry, max_deliveries=5))
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)
    waits = []

    for _ in range(3):
        nacked_at = time.monotonic()
        await broker.nack("billing", [Nack(delivery.tag)])
        delivery = await fetch_one(broker)
        waits.append(time.monotonic() - nacked_at)

    # The delays after deliveries 1, 2 and 3 are 0.1 s, 0.3 s and 0.9 s.
    for expected, waited in zip([0.1, 0.3, 0.9], waits):
        assert waited >= expected - 0.01, f"retry after {waited:.3f} s, before its {expected} s delay"
        assert waited < expected + 0.25, f"retry after {waited:.3f} s for a {expected} s delay"


async def test_expired_lease_retries_after_delay(open_broker):
    retry = RetrySpec(initial=0.5, multiplier=1.0, max=0.5)
    broker = await open_broker(subscription(ack_timeout=0.2, retry=retry))
    await broker.publish([envelope()])

    first = await fetch_one(broker)
    fetched_at = time.monotonic()
    second = await fetch_one(broker)
    waited = time.monotonic() - fetched_at

    assert first.delivery_count == 1
    assert second.delivery_count == 2
    # The 0.2 s ack timeout, then the 0.5 s retry delay.
    assert waited >= 0.7 - 0.01, f"redelivered {waited:.3f} s after the first delivery"
    assert waited < 0.7 + 0.25, f"redelivered {waited:.3f} s after the first delivery"


# Dead letters


async def give_up_one(broker: NatsBroker, sent: Envelope) -> None:
    await broker.publish([sent])
    delivery = await fetch_one(broker)
    await broker.nack("billing", [Nack(delivery.tag, error=ERROR, terminal=True)])


async def test_dead_letter_archive_lists_letter(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC, plugin="billing:charge"), dead_reader())
    sent = envelope(key="customer-7", body=b'{"amount": -3}')
    before = time.time()

    await give_up_one(broker, sent)
    (letter,) = await broker.dead_letters("billing")
    everything = await broker.dead_letters()
    other = await broker.dead_letters("dead-reader")

    assert letter["number"] >= 1
    assert letter["subscription"] == "billing"
    assert letter["topic"] == TOPIC
    assert letter["message_id"] == sent.id
    assert letter["body"] == b'{"amount": -3}'
    assert letter["key"] == "customer-7"
    assert before <= letter["dead_lettered_at"] <= time.time()
    for name in DEAD_LETTER_HEADERS:
        assert name in letter["headers"], f"archived letter lacks header {name}"
    assert letter["headers"]["flowrun.error_type"] == "ValueError"
    assert letter["headers"]["trace-id"] == "t-1"
    assert everything == [letter]
    assert other == []


async def test_replay_reaches_only_its_subscription(open_broker):
    broker = await open_broker(
        subscription(dead_letter=DEAD_LETTER_TOPIC), subscription("shipping"), dead_reader()
    )
    sent = envelope()
    await give_up_one(broker, sent)
    shipped = await fetch_one(broker, "shipping")
    await broker.ack("shipping", [shipped.tag])

    replayed = await broker.replay_dead_letters("billing")
    again = await fetch_one(broker)
    shipping_extra = await broker.fetch("shipping", 10, timeout=0.3)
    shipping = await stats_of(broker, "shipping")
    remaining = await broker.dead_letters()

    assert replayed == 1
    assert again.envelope.body == sent.body
    assert again.envelope.topic == TOPIC
    assert again.delivery_count == 1
    assert again.envelope.headers == {"trace-id": "t-1", "flowrun.replayed_from": sent.id}
    assert shipping_extra == []
    assert shipping["delivered"] == 1
    assert shipping["pending"] == 0
    assert remaining == []


async def test_purge_deletes_letters(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC), dead_reader())
    await give_up_one(broker, envelope())
    await give_up_one(broker, envelope())

    purged = await broker.purge_dead_letters("billing")
    remaining = await broker.dead_letters()

    assert purged == 2
    assert remaining == []


async def test_status_counts_archived_letters(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC), dead_reader())
    await give_up_one(broker, envelope())

    inspector = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC), dead_reader(), inspect=True)
    billing = await stats_of(inspector)
    reader = await stats_of(inspector, "dead-reader")

    assert billing["dead_lettered"] == 1
    assert reader["pending"] == 1


async def test_final_delivery_of_gone_process_is_dead_lettered(open_broker):
    config = subscription(max_deliveries=1, ack_timeout=0.2, dead_letter=DEAD_LETTER_TOPIC)
    crashed = await open_broker(config, dead_reader())
    await crashed.publish([envelope()])
    await fetch_one(crashed)
    # Closing keeps the delivery unsettled on the server, as a killed process would.
    await crashed.close()

    survivor = await open_broker(config, dead_reader())
    wait = 0.2 + nats_backend.BACKSTOP_GRACE_SECONDS + 1.0
    handed_out = await survivor.fetch("billing", 10, timeout=wait)
    dead = await fetch_one(survivor, "dead-reader")
    billing = await stats_of(survivor)

    assert handed_out == []
    assert dead.envelope.headers["flowrun.error_type"] == "flowrun.AckTimeout"
    assert dead.envelope.headers["flowrun.delivery_count"] == "1"
    assert billing["in_flight"] == 0
    assert billing["pending"] == 0


# State shared between processes, and cleanup


async def test_producer_state_shared_between_processes(open_broker):
    producer = await open_broker(subscription())
    reader = await open_broker(subscription(), inspect=True)

    await producer.set_producer_state("replay.orders", False)
    unfinished = await reader.producers_finished(["replay.orders"])
    await producer.set_producer_state("replay.orders", True)
    finished = await reader.producers_finished(["replay.orders"])
    with_unknown = await reader.producers_finished(["replay.orders", "never-started"])

    assert unfinished is False
    assert finished is True
    assert with_unknown is False


async def test_delete_flow_resources_removes_server_objects(open_broker, flow_name):
    broker = await open_broker(subscription())
    await broker.set_producer_state("replay", True)

    await broker.delete_flow_resources()
    client = await nats.connect(URL)
    js = client.jetstream()
    missing = []
    try:
        for stream in (f"{flow_name}_topics", f"{flow_name}_dead_letters", f"KV_{flow_name}_producers"):
            try:
                await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                missing.append(stream)
    finally:
        await client.close()

    assert len(missing) == 3, f"still on the server: {missing}"


async def test_close_fails_waiting_publish(open_broker):
    broker = await open_broker(subscription(max_pending=1))
    await broker.publish([envelope()])
    blocked = asyncio.create_task(broker.publish([envelope()]))
    await asyncio.sleep(0.2)

    await broker.close()

    with pytest.raises(BrokerError):
        await asyncio.wait_for(blocked, WAIT_SECONDS)


async def test_close_returns_messages_no_fetch_took(open_broker):
    # A fetch cancelled by a stop leaves what the server sent in the puller's buffer.
    # Closing naks it, so the next process gets it at once, not after the ack timeout.
    config = subscription(ack_timeout=60.0)
    stopping = await open_broker(config)
    await stopping.publish([envelope(body=b"1"), envelope(body=b"2")])
    puller = stopping._subscription("billing").puller
    await puller._request({"batch": 2, "no_wait": True}, 2, time.monotonic() + WAIT_SECONDS)
    buffered = len(puller.buffer)
    await stopping.close()

    restarted = await open_broker(config)
    again: list[Delivery] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while len(again) < 2 and time.monotonic() < deadline:
        again += await restarted.fetch("billing", 10, timeout=deadline - time.monotonic())

    assert buffered == 2
    assert sorted(delivery.envelope.body for delivery in again) == [b"1", b"2"]
