"""Pull delivery: long-poll `fetch`, batch limits and what an ack does."""

from __future__ import annotations

import asyncio
import time

from .helpers import (
    SHORT_ACK_TIMEOUT,
    SUBSCRIPTION,
    TOPIC,
    envelope,
    envelopes,
    fetch_one,
    ids_of,
    subscription,
    subscription_stats,
)

WAKE_LIMIT_SECONDS = 0.05


async def test_fetch_wakes_on_publish(broker_factory):
    broker = await broker_factory(subscription())

    fetch = asyncio.create_task(broker.fetch(SUBSCRIPTION, 10, timeout=5.0))
    # Give the fetch time to block on the empty queue, so the publish has to wake it.
    await asyncio.sleep(0.2)
    assert not fetch.done(), "fetch returned before anything was published"

    publish_started = time.monotonic()
    await broker.publish([envelope(body=b'{"order": 1}')])
    deliveries = await fetch
    latency = time.monotonic() - publish_started

    assert len(deliveries) == 1
    assert deliveries[0].envelope.body == b'{"order": 1}'
    assert latency < WAKE_LIMIT_SECONDS, f"fetch returned {latency * 1000:.1f} ms after the publish"


async def test_fetch_returns_empty_after_timeout(broker_factory):
    broker = await broker_factory(subscription())

    started = time.monotonic()
    deliveries = await broker.fetch(SUBSCRIPTION, 10, timeout=0.3)
    elapsed = time.monotonic() - started

    assert deliveries == []
    assert elapsed >= 0.29, f"fetch gave up after {elapsed:.3f} s, before its 0.3 s timeout"
    assert elapsed < 2.0, f"fetch took {elapsed:.3f} s for a 0.3 s timeout"


async def test_fetch_returns_at_most_max_messages(broker_factory):
    broker = await broker_factory(subscription())
    published = envelopes(10)
    await broker.publish(published)

    first = await broker.fetch(SUBSCRIPTION, 3, timeout=1.0)
    rest = await broker.fetch(SUBSCRIPTION, 100, timeout=1.0)
    after = await broker.fetch(SUBSCRIPTION, 100, timeout=0.1)

    assert len(first) == 3
    assert len(rest) == 7
    assert after == []
    assert ids_of(first + rest) == sorted(item.id for item in published)


async def test_fetch_returns_partial_batch_at_once(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish(envelopes(2))

    started = time.monotonic()
    deliveries = await broker.fetch(SUBSCRIPTION, 10, timeout=5.0)
    elapsed = time.monotonic() - started

    assert len(deliveries) == 2
    assert elapsed < 1.0, f"fetch waited {elapsed:.3f} s to fill a batch instead of returning what was ready"


async def test_delivery_preserves_envelope(broker_factory):
    broker = await broker_factory(subscription())
    sent = envelope(body=b'{"total": "12.50"}', key="customer-7", headers={"trace-id": "t-1"})
    await broker.publish([sent])

    delivery = await fetch_one(broker)

    assert delivery.subscription == SUBSCRIPTION
    assert delivery.delivery_count == 1
    assert delivery.envelope.id == sent.id
    assert delivery.envelope.topic == TOPIC
    assert delivery.envelope.body == b'{"total": "12.50"}'
    assert delivery.envelope.key == "customer-7"
    assert delivery.envelope.headers["trace-id"] == "t-1"


async def test_ack_removes_message(broker_factory):
    broker = await broker_factory(subscription(ack_timeout=SHORT_ACK_TIMEOUT))
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [delivery.tag])
    # Wait past the ack timeout: an acked message must not come back.
    again = await broker.fetch(SUBSCRIPTION, 10, timeout=SHORT_ACK_TIMEOUT * 3)
    stats = await subscription_stats(broker)

    assert again == []
    assert stats["acked"] == 1
    assert stats["delivered"] == 1
    assert stats["redelivered"] == 0
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0


async def test_ack_accepts_batch(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish(envelopes(5))
    deliveries = await broker.fetch(SUBSCRIPTION, 5, timeout=1.0)

    await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
    stats = await subscription_stats(broker)

    assert len(deliveries) == 5
    assert stats["acked"] == 5
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0
