"""Ack policy `none`: at-most-once, never redelivered."""

from __future__ import annotations

from flowrun.broker import ErrorInfo, Nack
from flowrun.spec import AckPolicy

from .helpers import (
    DEAD_LETTER_TOPIC,
    SHORT_ACK_TIMEOUT,
    SUBSCRIPTION,
    envelope,
    fetch_one,
    published_count,
    subscription,
    subscription_stats,
)

DEAD_READER = "dead-reader"


def at_most_once(**overrides):
    settings = {"ack": AckPolicy.NONE, "ack_timeout": SHORT_ACK_TIMEOUT}
    settings.update(overrides)
    return subscription(**settings)


async def test_unacked_message_is_not_redelivered(broker_factory):
    broker = await broker_factory(at_most_once())
    await broker.publish([envelope()])
    await fetch_one(broker)

    again = await broker.fetch(SUBSCRIPTION, 10, timeout=SHORT_ACK_TIMEOUT * 3)
    stats = await subscription_stats(broker)

    assert again == []
    assert stats["delivered"] == 1
    assert stats["redelivered"] == 0
    assert stats["pending"] == 0


async def test_ack_counts_acked(broker_factory):
    broker = await broker_factory(at_most_once())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [delivery.tag])
    stats = await subscription_stats(broker)

    assert stats["acked"] == 1
    assert stats["dropped"] == 0
    assert stats["in_flight"] == 0


async def test_nack_counts_dropped(broker_factory):
    broker = await broker_factory(
        at_most_once(dead_letter=DEAD_LETTER_TOPIC, max_deliveries=5),
        subscription(DEAD_READER, topic=DEAD_LETTER_TOPIC),
    )
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, delay=0.0, error=ErrorInfo("ValueError", "bad"))])
    again = await broker.fetch(SUBSCRIPTION, 10, timeout=0.3)
    dead = await broker.fetch(DEAD_READER, 10, timeout=0.1)
    stats = await subscription_stats(broker)

    assert again == []
    assert stats["dropped"] == 1
    assert stats["dead_lettered"] == 0
    assert stats["acked"] == 0
    assert stats["redelivered"] == 0
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0
    assert dead == []
    assert await published_count(broker, DEAD_LETTER_TOPIC) == 0


async def test_second_ack_is_ignored(broker_factory):
    broker = await broker_factory(at_most_once())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [delivery.tag])
    await broker.ack(SUBSCRIPTION, [delivery.tag])
    stats = await subscription_stats(broker)

    assert stats["acked"] == 1
    assert stats["delivered"] == 1


async def test_nack_after_ack_is_ignored(broker_factory):
    broker = await broker_factory(at_most_once())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [delivery.tag])
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ErrorInfo("ValueError", "bad"))])
    stats = await subscription_stats(broker)

    # One delivery settles once: it cannot count as both acked and dropped.
    assert stats["acked"] == 1
    assert stats["dropped"] == 0
