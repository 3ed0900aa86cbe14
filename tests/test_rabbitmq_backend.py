"""RabbitMQ-specific behaviour of the rabbitmq backend, on the real server on 127.0.0.1.

The conformance suite covers the shared contract; these tests cover what only this backend
has: the settings check against queues declared earlier, redaction of the password, the
dead-letter archive, state shared between processes, and the limits of RabbitMQ
(no deduplication, the server-side max-length backstop).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from flowrun.broker import ErrorInfo, Nack, SubscriptionConfig
from flowrun.brokers.options import RabbitmqOptions
from flowrun.clock import SYSTEM_CLOCK
from flowrun.errors import BrokerError, QueueFullError
from flowrun.message import Envelope
from flowrun.spec import AckPolicy, BrokerSpec, OnFull, RetrySpec
from tests.conftest import SERVER_URLS, make_topology, require_server

# The backend module imports aio_pika, which the test extra installs.
pytest.importorskip("aio_pika")
from flowrun.brokers.rabbitmq import RabbitmqBroker

URL = SERVER_URLS["rabbitmq"]
TOPIC = "Orders"
DEAD_LETTER_TOPIC = "Orders.dead"
FAST_RETRY = RetrySpec(initial=0.01, multiplier=1.0, max=0.01)
WAIT_SECONDS = 5.0

Opener = Callable[..., Awaitable[RabbitmqBroker]]


def subscription(name: str = "billing", **overrides: Any) -> SubscriptionConfig:
    settings: dict[str, Any] = {"topic": TOPIC, "ack_timeout": 5.0, "retry": FAST_RETRY}
    settings.update(overrides)
    return SubscriptionConfig(name=name, **settings)


def envelope(key: str | None = None, message_id: str | None = None, body: bytes = b"{}") -> Envelope:
    return Envelope(message_id or uuid.uuid4().hex, TOPIC, body, key, {"trace-id": "t-1"}, time.time())


def build(flow_name: str, url: str = URL) -> RabbitmqBroker:
    spec = BrokerSpec(backend="rabbitmq", url=url)
    return RabbitmqBroker.from_spec(spec, RabbitmqOptions(), Path("flow.yaml"), flow_name, SYSTEM_CLOCK)


@pytest.fixture
def flow_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def open_broker(flow_name: str) -> AsyncIterator[Opener]:
    """Return `await open_broker(*subscriptions)`: a started broker of one flow, like one process.

    Every broker of a test shares the flow name; the flow's server objects are deleted after.
    """
    require_server("rabbitmq")
    brokers: list[RabbitmqBroker] = []
    declared: dict[str, SubscriptionConfig] = {}

    async def opener(*subscriptions: SubscriptionConfig, inspect: bool = False) -> RabbitmqBroker:
        broker = RabbitmqBroker(URL, flow_name)
        brokers.append(broker)
        declared.update({config.name: config for config in subscriptions})
        topology = make_topology(*subscriptions, flow_name=flow_name)
        if inspect:
            await broker.open_for_inspection(topology)
        else:
            await broker.start(topology)
        return broker

    yield opener
    for broker in brokers:
        await broker.close()
    # One topology naming every subscription and topic the test used, so all of them are deleted.
    cleaner = RabbitmqBroker(URL, flow_name)
    topics = tuple({config.topic for config in declared.values()} | {TOPIC, DEAD_LETTER_TOPIC, "Refunds"})
    await cleaner.open_for_inspection(make_topology(*declared.values(), topics=topics, flow_name=flow_name))
    await cleaner.delete_flow_resources()
    await cleaner.close()


async def fetch_one(broker: RabbitmqBroker, name: str = "billing") -> Any:
    deliveries = await broker.fetch(name, 1, timeout=WAIT_SECONDS)
    assert len(deliveries) == 1, f"no delivery on '{name}' within {WAIT_SECONDS}s"
    return deliveries[0]


async def queue_length(name: str) -> int:
    """Count the ready messages of a queue with a separate client, as an operator would."""
    import aio_pika

    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


# Settings check

async def test_changed_queue_setting_raises(open_broker, flow_name):
    first = await open_broker(subscription(max_pending=10))
    await first.close()

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(max_pending=20))
    message = str(raised.value)

    assert "subscription 'billing': max_pending 10 -> 20" in message
    assert f"rabbitmqctl delete_queue {flow_name}.sub.billing" in message


async def test_every_changed_setting_is_listed(open_broker):
    first = await open_broker(subscription(max_pending=10, max_deliveries=3), subscription("shipping"))
    await first.close()

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(max_pending=20, max_deliveries=4, dead_letter=DEAD_LETTER_TOPIC),
                          subscription("shipping", topic="Refunds"))
    message = str(raised.value)

    assert "subscription 'billing': max_pending 10 -> 20" in message
    assert "subscription 'billing': max_deliveries 3 -> 4" in message
    assert f"subscription 'billing': dead_letter None -> {DEAD_LETTER_TOPIC}" in message
    assert "subscription 'shipping': topic Orders -> Refunds" in message


async def test_changed_process_setting_is_applied(open_broker):
    first = await open_broker(subscription(ack_timeout=30.0))
    await first.close()

    second = await open_broker(subscription(ack_timeout=0.2))
    await second.publish([envelope()])
    delivery = await fetch_one(second)
    again = await fetch_one(second)

    assert delivery.delivery_count == 1
    assert again.delivery_count == 2


async def test_removed_subscription_stops_receiving(open_broker, flow_name):
    first = await open_broker(subscription("billing"), subscription("shipping"))
    await first.close()

    second = await open_broker(subscription("billing"))
    await second.publish([envelope()])

    assert await queue_length(f"{flow_name}.sub.billing") == 1
    assert await queue_length(f"{flow_name}.sub.shipping") == 0


async def test_settings_check_survives_failed_start(open_broker):
    first = await open_broker(subscription(max_pending=10))
    await first.close()
    with pytest.raises(BrokerError):
        await open_broker(subscription(max_pending=20))

    # The failed start must leave the recorded settings in place.
    with pytest.raises(BrokerError, match="max_pending 10 -> 30"):
        await open_broker(subscription(max_pending=30))


# Credentials and errors

async def test_wrong_password_is_redacted():
    require_server("rabbitmq")
    broker = build(f"t{uuid.uuid4().hex[:10]}", "amqp://guest:not-the-password@127.0.0.1:5672/")

    with pytest.raises(BrokerError) as raised:
        await broker.start(make_topology(subscription()))
    await broker.close()

    assert "not-the-password" not in str(raised.value)
    assert "guest:***@127.0.0.1:5672" in str(raised.value)


async def test_unreachable_server_is_broker_error():
    broker = build(f"t{uuid.uuid4().hex[:10]}", "amqp://guest:secret-value@127.0.0.1:1/")

    with pytest.raises(BrokerError) as raised:
        await broker.start(make_topology(subscription()))
    await broker.close()

    assert "secret-value" not in str(raised.value)
    assert raised.value.__cause__ is None


# Dead-letter archive

async def dead_letter_one(broker: RabbitmqBroker, body: bytes = b'{"amount": -3}') -> str:
    sent = envelope(key="customer-7", body=body)
    await broker.publish([sent])
    delivery = await fetch_one(broker)
    await broker.nack("billing", [Nack(delivery.tag, error=ErrorInfo("ValueError", "bad amount"), terminal=True)])
    return sent.id


async def test_dead_letters_lists_archive(open_broker):
    config = subscription(dead_letter=DEAD_LETTER_TOPIC)
    broker = await open_broker(config)
    message_id = await dead_letter_one(broker)

    inspector = await open_broker(config, inspect=True)
    letters = await inspector.dead_letters()
    again = await inspector.dead_letters()

    assert len(letters) == 1
    letter = letters[0]
    assert letter["number"] == 1
    assert letter["subscription"] == "billing"
    assert letter["topic"] == TOPIC
    assert letter["message_id"] == message_id
    assert letter["body"] == b'{"amount": -3}'
    assert letter["key"] == "customer-7"
    assert letter["headers"]["flowrun.error"] == "bad amount"
    assert letter["headers"]["trace-id"] == "t-1"
    assert abs(letter["dead_lettered_at"] - time.time()) < 60
    assert [item["message_id"] for item in again] == [message_id], "listing must not consume the archive"


async def test_replay_delivers_dead_letter_again(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC), subscription("shipping"))
    message_id = await dead_letter_one(broker, body=b'{"amount": 5}')

    replayed = await broker.replay_dead_letters("billing")
    delivery = await fetch_one(broker)
    remaining = await broker.dead_letters()
    shipping = await broker.fetch("shipping", 10, timeout=0.2)

    assert replayed == 1
    assert delivery.delivery_count == 1
    assert delivery.envelope.body == b'{"amount": 5}'
    assert delivery.envelope.key == "customer-7"
    assert delivery.envelope.headers == {"trace-id": "t-1", "flowrun.replayed_from": message_id}
    assert remaining == []
    assert len(shipping) == 1, "a replay goes to the failed subscription only, so shipping keeps its one copy"


async def test_purge_removes_only_that_subscription(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC),
                               subscription("shipping", dead_letter=DEAD_LETTER_TOPIC))
    await dead_letter_one(broker)
    shipping = await fetch_one(broker, "shipping")
    await broker.nack("shipping", [Nack(shipping.tag, terminal=True)])

    purged = await broker.purge_dead_letters("billing")
    remaining = await broker.dead_letters()

    assert purged == 1
    assert [letter["subscription"] for letter in remaining] == ["shipping"]


# State shared between processes

async def test_producer_state_is_shared(open_broker):
    writer = await open_broker(subscription())
    reader = await open_broker(subscription(), inspect=True)

    before = await reader.producers_finished(["replay"])
    await writer.set_producer_state("replay", True)
    finished = await reader.producers_finished(["replay"])
    await writer.set_producer_state("replay", False)
    restarted = await reader.producers_finished(["replay"])

    assert before is False
    assert finished is True
    assert restarted is False


async def test_other_process_sees_pending(open_broker):
    broker = await open_broker(subscription())
    await broker.publish([envelope(), envelope()])

    inspector = await open_broker(subscription(), inspect=True)
    stats = (await inspector.stats())["subscriptions"]["billing"]

    assert stats["pending"] == 2
    assert stats["delivered"] == 0


async def test_inspecting_undeclared_flow_reports_zeros(open_broker):
    inspector = await open_broker(subscription(), inspect=True)

    stats = (await inspector.stats())["subscriptions"]["billing"]
    letters = await inspector.dead_letters()

    assert stats["pending"] == 0
    assert letters == []


async def test_delivery_count_survives_lost_consumer(open_broker):
    first = await open_broker(subscription(max_deliveries=5))
    await first.publish([envelope()])
    await fetch_one(first)
    # Closing without acking is what a crashed process does: the server requeues the message.
    await first.close()

    second = await open_broker(subscription(max_deliveries=5))
    delivery = await fetch_one(second)

    assert delivery.delivery_count == 2


async def test_lost_consumer_at_limit_dead_letters(open_broker):
    config = subscription(max_deliveries=1, dead_letter=DEAD_LETTER_TOPIC)
    reader = subscription("dead-reader", topic=DEAD_LETTER_TOPIC)
    first = await open_broker(config, reader)
    await first.publish([envelope()])
    await fetch_one(first)
    await first.close()

    second = await open_broker(config, reader)
    again = await second.fetch("billing", 10, timeout=0.5)
    dead = await fetch_one(second, "dead-reader")

    assert again == []
    assert dead.envelope.headers["flowrun.error_type"] == "flowrun.ConsumerLost"
    assert dead.envelope.headers["flowrun.delivery_count"] == "1"


# What RabbitMQ does not do

async def test_same_id_is_stored_twice(open_broker):
    broker = await open_broker(subscription())
    message_id = uuid.uuid4().hex

    await broker.publish([envelope(message_id=message_id)])
    await broker.publish([envelope(message_id=message_id)])
    deliveries = await broker.fetch("billing", 10, timeout=1.0)

    # RabbitMQ has no built-in deduplication, so a repeated id is stored again.
    assert [delivery.envelope.id for delivery in deliveries] == [message_id, message_id]


async def test_server_limit_stops_other_process(open_broker):
    config = subscription(max_pending=2, on_full=OnFull.REJECT)
    first = await open_broker(config)
    second = await open_broker(config)
    await first.publish([envelope(), envelope()])

    # The second process has not checked the queue yet, so only the server's x-max-length
    # stops it. A quorum queue (the default type) admits one message past the limit first.
    await second.publish([envelope()])
    with pytest.raises(QueueFullError):
        await second.publish([envelope()])
    with pytest.raises(QueueFullError):
        await first.publish([envelope()])


# Ordered subscriptions

async def test_ordered_retry_holds_back_its_key(open_broker):
    broker = await open_broker(subscription(ordered=True, retry=RetrySpec(initial=0.3, max=0.3)))
    await broker.publish([envelope(key="a", body=b"1"), envelope(key="a", body=b"2"), envelope(key="b", body=b"3")])

    first = await broker.fetch("billing", 10, timeout=1.0)
    await broker.nack("billing", [Nack(first[0].tag)])
    waiting = await broker.fetch("billing", 10, timeout=0.1)
    retried = await fetch_one(broker)
    await broker.ack("billing", [first[1].tag, retried.tag])
    last = await fetch_one(broker)

    assert [delivery.envelope.body for delivery in first] == [b"1", b"3"]
    assert waiting == []
    assert retried.envelope.body == b"1"
    assert retried.delivery_count == 2
    assert last.envelope.body == b"2"


async def test_ordered_delayed_retry_counts_as_pending(open_broker):
    broker = await open_broker(subscription(ordered=True))
    await broker.publish([envelope(key="a")])
    delivery = await fetch_one(broker)

    await broker.nack("billing", [Nack(delivery.tag, delay=30.0)])
    stats = (await broker.stats())["subscriptions"]["billing"]

    assert stats["pending"] == 1
    assert stats["delayed"] == 1
    assert stats["in_flight"] == 0


# Shutdown

async def test_close_ends_waiting_fetch_and_publish(open_broker):
    broker = await open_broker(subscription(max_pending=1), subscription("refunds", topic="Refunds"))
    await broker.publish([envelope()])
    fetch = asyncio.create_task(broker.fetch("refunds", 10, timeout=30.0))
    blocked = asyncio.create_task(broker.publish([envelope()]))
    await asyncio.sleep(0.3)

    started = time.monotonic()
    await broker.close()
    fetched = await asyncio.wait_for(fetch, WAIT_SECONDS)
    with pytest.raises(BrokerError):
        await asyncio.wait_for(blocked, WAIT_SECONDS)

    assert fetched == []
    assert time.monotonic() - started < WAIT_SECONDS


async def test_ack_none_removes_on_delivery(open_broker, flow_name):
    broker = await open_broker(subscription(ack=AckPolicy.NONE))
    await broker.publish([envelope()])

    await fetch_one(broker)
    await broker.close()

    assert await queue_length(f"{flow_name}.sub.billing") == 0
