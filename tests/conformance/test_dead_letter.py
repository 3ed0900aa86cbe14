"""Giving up on a message: dead letters with their failure headers, or drops."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from flowrun.broker import DEAD_LETTER_HEADERS, ErrorInfo, Nack

from .helpers import (
    DEAD_LETTER_TOPIC,
    SHORT_ACK_TIMEOUT,
    SUBSCRIPTION,
    TOPIC,
    envelope,
    fetch_one,
    published_count,
    subscription,
    subscription_stats,
)

PLUGIN = "billing.handlers:charge"
ERROR = ErrorInfo("ValueError", "amount must be positive", "Traceback (most recent call last):\n  ...")
DEAD_READER = "dead-reader"


def failing_subscription(**overrides):
    settings = {"max_deliveries": 3, "dead_letter": DEAD_LETTER_TOPIC, "plugin": PLUGIN}
    settings.update(overrides)
    return subscription(**settings)


def dead_reader():
    return subscription(DEAD_READER, topic=DEAD_LETTER_TOPIC)


async def nack_until_given_up(broker, deliveries: int, error: ErrorInfo | None = ERROR) -> list[int]:
    """Fetch and nack the one message `deliveries` times and return the delivery counts seen."""
    counts = []
    for _ in range(deliveries):
        delivery = await fetch_one(broker)
        counts.append(delivery.delivery_count)
        await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, delay=0.01, error=error)])
    return counts


def parse_time(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"timestamp {value!r} has no time zone"
    return parsed


async def test_max_deliveries_dead_letters(broker_factory):
    broker = await broker_factory(failing_subscription(), dead_reader())
    sent = envelope(body=b'{"amount": -3}', key="customer-7", headers={"trace-id": "t-1"})
    await broker.publish([sent])

    counts = await nack_until_given_up(broker, 3)
    leftover = await broker.fetch(SUBSCRIPTION, 10, timeout=0.2)
    stats = await subscription_stats(broker)
    dead = await fetch_one(broker, DEAD_READER)

    assert counts == [1, 2, 3]
    assert leftover == []
    assert stats["delivered"] == 3
    assert stats["redelivered"] == 2
    assert stats["dead_lettered"] == 1
    assert stats["dropped"] == 0
    assert stats["acked"] == 0
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0
    assert await published_count(broker, DEAD_LETTER_TOPIC) == 1
    assert dead.envelope.topic == DEAD_LETTER_TOPIC
    assert dead.envelope.body == b'{"amount": -3}'
    assert dead.envelope.key == "customer-7"
    assert dead.envelope.headers["trace-id"] == "t-1"


async def test_dead_letter_headers(broker_factory):
    broker = await broker_factory(failing_subscription(), dead_reader())
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    sent = envelope()
    await broker.publish([sent])

    await nack_until_given_up(broker, 3)
    headers = (await fetch_one(broker, DEAD_READER)).envelope.headers
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)

    for name in DEAD_LETTER_HEADERS:
        assert name in headers, f"dead letter lacks header {name}"
    assert headers["flowrun.original_topic"] == TOPIC
    assert headers["flowrun.original_id"] == sent.id
    assert headers["flowrun.subscription"] == SUBSCRIPTION
    assert headers["flowrun.plugin"] == PLUGIN
    assert headers["flowrun.delivery_count"] == "3"
    assert headers["flowrun.error_type"] == "ValueError"
    assert headers["flowrun.error"] == "amount must be positive"
    assert headers["flowrun.traceback"] == ERROR.traceback
    first = parse_time(headers["flowrun.first_delivered_at"])
    last = parse_time(headers["flowrun.last_delivered_at"])
    assert before <= first
    assert first <= last
    assert last <= after


def broker_log(caplog) -> list[str]:
    """Return the messages that the broker modules logged at warning level or above."""
    return [record.getMessage() for record in caplog.records
            if record.name.startswith("flowrun.brokers") and record.levelno >= logging.WARNING]


async def test_nack_without_error_dead_letters(broker_factory, caplog):
    broker = await broker_factory(failing_subscription(), dead_reader())
    sent = envelope()
    await broker.publish([sent])

    with caplog.at_level(logging.WARNING, logger="flowrun.brokers"):
        await nack_until_given_up(broker, 3, error=None)
    headers = (await fetch_one(broker, DEAD_READER)).envelope.headers

    assert headers["flowrun.error_type"] == "flowrun.Unknown"
    assert headers["flowrun.error"] == "the nack carried no error"
    assert headers["flowrun.traceback"] == ""
    assert broker_log(caplog) == [
        f"dead-lettered message {sent.id} of subscription '{SUBSCRIPTION}' to '{DEAD_LETTER_TOPIC}' "
        "at delivery 3: the nack carried no error"
    ]


async def test_nack_without_error_drops(broker_factory, caplog):
    broker = await broker_factory(subscription(max_deliveries=2))
    sent = envelope()
    await broker.publish([sent])

    with caplog.at_level(logging.WARNING, logger="flowrun.brokers"):
        await nack_until_given_up(broker, 2, error=None)

    assert (await subscription_stats(broker))["dropped"] == 1
    assert broker_log(caplog) == [
        f"dropped message {sent.id} of subscription '{SUBSCRIPTION}' at delivery 2: the nack carried no error"
    ]


async def test_ack_timeouts_dead_letter(broker_factory):
    broker = await broker_factory(
        failing_subscription(max_deliveries=2, ack_timeout=SHORT_ACK_TIMEOUT), dead_reader()
    )
    await broker.publish([envelope()])

    started = time.monotonic()
    first = await fetch_one(broker)
    second = await fetch_one(broker)
    dead = await fetch_one(broker, DEAD_READER)
    waited = time.monotonic() - started
    stats = await subscription_stats(broker)

    # Two ack timeouts of 0.2 s and two 10 ms retries, plus margin for a loaded machine.
    assert waited < 2 * SHORT_ACK_TIMEOUT + 1.0, f"dead letter arrived {waited:.3f} s after the first fetch"
    assert first.delivery_count == 1
    assert second.delivery_count == 2
    assert dead.envelope.headers["flowrun.delivery_count"] == "2"
    assert dead.envelope.headers["flowrun.error_type"] == "flowrun.AckTimeout"
    assert stats["redelivered"] == 1
    assert stats["dead_lettered"] == 1
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0


async def test_exhausted_without_dead_letter_drops(broker_factory):
    broker = await broker_factory(subscription(max_deliveries=2))
    await broker.publish([envelope()])

    counts = await nack_until_given_up(broker, 2)
    leftover = await broker.fetch(SUBSCRIPTION, 10, timeout=0.2)
    stats = await subscription_stats(broker)

    assert counts == [1, 2]
    assert leftover == []
    assert stats["dropped"] == 1
    assert stats["dead_lettered"] == 0
    assert stats["delivered"] == 2
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0


async def test_terminal_nack_dead_letters_at_once(broker_factory):
    broker = await broker_factory(failing_subscription(max_deliveries=5), dead_reader())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ERROR, terminal=True)])
    dead = await fetch_one(broker, DEAD_READER)
    leftover = await broker.fetch(SUBSCRIPTION, 10, timeout=0.2)
    stats = await subscription_stats(broker)

    assert dead.envelope.headers["flowrun.delivery_count"] == "1"
    assert dead.envelope.headers["flowrun.error_type"] == "ValueError"
    assert leftover == []
    assert stats["delivered"] == 1
    assert stats["redelivered"] == 0
    assert stats["dead_lettered"] == 1
    assert stats["pending"] == 0


async def test_terminal_nack_without_dead_letter_drops(broker_factory):
    broker = await broker_factory(subscription(max_deliveries=5))
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ERROR, terminal=True)])
    leftover = await broker.fetch(SUBSCRIPTION, 10, timeout=0.2)
    stats = await subscription_stats(broker)

    assert leftover == []
    assert stats["dropped"] == 1
    assert stats["dead_lettered"] == 0
    assert stats["redelivered"] == 0


async def test_terminal_nack_wakes_dead_letter_fetch(broker_factory):
    broker = await broker_factory(failing_subscription(), dead_reader())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)
    waiting = asyncio.create_task(broker.fetch(DEAD_READER, 10, timeout=5.0))
    # Let the fetch block on the empty dead-letter queue first.
    await asyncio.sleep(0.1)

    nacked_at = time.monotonic()
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ERROR, terminal=True)])
    dead = await waiting
    latency = time.monotonic() - nacked_at

    assert len(dead) == 1
    # The fetch must wake on the dead letter, long before its 5 s timeout. The bound leaves
    # room for the nack's own round trips to a network broker on a loaded machine.
    assert latency < 0.5, f"fetch on the dead-letter topic returned {latency * 1000:.1f} ms after the nack"


async def test_ack_timeout_wakes_dead_letter_fetch(broker_factory):
    broker = await broker_factory(
        failing_subscription(max_deliveries=1, ack_timeout=SHORT_ACK_TIMEOUT), dead_reader()
    )
    await broker.publish([envelope()])
    fetched_at = time.monotonic()
    await fetch_one(broker)

    dead = await broker.fetch(DEAD_READER, 10, timeout=5.0)
    waited = time.monotonic() - fetched_at

    assert len(dead) == 1
    assert waited < SHORT_ACK_TIMEOUT + 0.5, f"dead letter fetched {waited:.3f} s after the 0.2 s ack timeout began"
