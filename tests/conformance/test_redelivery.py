"""Redelivery: nack delays, retry backoff, ack timeouts and stale tags."""

from __future__ import annotations

import time

from flowrun.broker import Nack
from flowrun.spec import RetrySpec

from .helpers import (
    SHORT_ACK_TIMEOUT,
    SUBSCRIPTION,
    envelope,
    fetch_one,
    subscription,
    subscription_stats,
)

# Extra time a redelivery may take on a loaded machine beyond its nominal delay.
LATE_MARGIN = 1.0
# Timers may fire a little early within the clock's resolution.
EARLY_MARGIN = 0.01


async def test_nack_with_delay_redelivers_after_delay(broker_factory):
    broker = await broker_factory(subscription())
    sent = envelope()
    await broker.publish([sent])
    first = await fetch_one(broker)

    nacked_at = time.monotonic()
    await broker.nack(SUBSCRIPTION, [Nack(first.tag, delay=0.4)])
    early = await broker.fetch(SUBSCRIPTION, 10, timeout=0.2)
    second = await fetch_one(broker)
    waited = time.monotonic() - nacked_at
    stats = await subscription_stats(broker)

    assert early == []
    assert second.envelope.id == sent.id
    assert second.delivery_count == 2
    assert waited >= 0.4 - EARLY_MARGIN, f"redelivered after {waited:.3f} s, before the 0.4 s delay"
    assert waited < 0.4 + LATE_MARGIN, f"redelivered after {waited:.3f} s for a 0.4 s delay"
    assert stats["delivered"] == 2
    assert stats["redelivered"] == 1
    assert stats["acked"] == 0
    assert stats["in_flight"] == 1


async def test_nack_with_zero_delay_redelivers_at_once(broker_factory):
    broker = await broker_factory(subscription(retry=RetrySpec(initial=5.0, max=5.0)))
    await broker.publish([envelope()])
    first = await fetch_one(broker)

    nacked_at = time.monotonic()
    await broker.nack(SUBSCRIPTION, [Nack(first.tag, delay=0.0)])
    second = await fetch_one(broker)
    waited = time.monotonic() - nacked_at

    assert second.delivery_count == 2
    assert waited < LATE_MARGIN, f"delay 0 redelivered after {waited:.3f} s, as if the 5 s backoff applied"


async def test_nack_default_delay_follows_retry_backoff(broker_factory):
    retry = RetrySpec(initial=0.2, multiplier=2.0, max=5.0)
    broker = await broker_factory(subscription(retry=retry))
    await broker.publish([envelope()])
    waits = []
    counts = []

    delivery = await fetch_one(broker)
    for _ in range(2):
        nacked_at = time.monotonic()
        await broker.nack(SUBSCRIPTION, [Nack(delivery.tag)])
        delivery = await fetch_one(broker)
        waits.append(time.monotonic() - nacked_at)
        counts.append(delivery.delivery_count)

    assert counts == [2, 3]
    # The backoff after delivery n is initial * multiplier ** (n - 1): 0.2 s, then 0.4 s.
    assert waits[0] >= 0.2 - EARLY_MARGIN, f"first retry after {waits[0]:.3f} s"
    assert waits[0] < 0.2 + LATE_MARGIN, f"first retry after {waits[0]:.3f} s"
    assert waits[1] >= 0.4 - EARLY_MARGIN, f"second retry after {waits[1]:.3f} s"
    assert waits[1] < 0.4 + LATE_MARGIN, f"second retry after {waits[1]:.3f} s"


async def test_nack_batch_redelivers_each(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish([envelope(), envelope(), envelope()])
    deliveries = await broker.fetch(SUBSCRIPTION, 3, timeout=1.0)

    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, delay=0.01) for delivery in deliveries])
    again = [await fetch_one(broker) for _ in range(3)]

    assert len(deliveries) == 3
    assert sorted(delivery.delivery_count for delivery in again) == [2, 2, 2]
    assert sorted(d.envelope.id for d in again) == sorted(d.envelope.id for d in deliveries)


async def test_ack_timeout_redelivers(broker_factory):
    broker = await broker_factory(subscription(ack_timeout=SHORT_ACK_TIMEOUT))
    sent = envelope()
    await broker.publish([sent])

    fetched_at = time.monotonic()
    first = await fetch_one(broker)
    second = await fetch_one(broker)
    waited = time.monotonic() - fetched_at
    stats = await subscription_stats(broker)

    assert first.delivery_count == 1
    assert second.envelope.id == sent.id
    assert second.delivery_count == 2
    assert waited >= SHORT_ACK_TIMEOUT - EARLY_MARGIN, f"redelivered {waited:.3f} s after the first delivery"
    assert stats["delivered"] == 2
    assert stats["redelivered"] == 1
    assert stats["acked"] == 0
    assert stats["in_flight"] == 1
    assert stats["pending"] == 0


async def test_ack_after_timeout_is_ignored(broker_factory):
    broker = await broker_factory(subscription(ack_timeout=SHORT_ACK_TIMEOUT))
    await broker.publish([envelope()])
    first = await fetch_one(broker)
    second = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [first.tag])
    after_stale_ack = await subscription_stats(broker)
    await broker.ack(SUBSCRIPTION, [second.tag])
    after_ack = await subscription_stats(broker)
    # An acked message must not come back once its ack timeout passes.
    third = await broker.fetch(SUBSCRIPTION, 10, timeout=SHORT_ACK_TIMEOUT * 3)
    final = await subscription_stats(broker)

    assert second.delivery_count == 2
    assert after_stale_ack["acked"] == 0
    assert after_stale_ack["in_flight"] == 1
    assert after_ack["acked"] == 1
    assert after_ack["in_flight"] == 0
    assert third == []
    assert final["acked"] == 1
    assert final["delivered"] == 2
    assert final["redelivered"] == 1


async def test_second_ack_of_same_tag_is_ignored(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish([envelope(), envelope()])
    first = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [first.tag])
    await broker.ack(SUBSCRIPTION, [first.tag])
    stats = await subscription_stats(broker)

    assert stats["acked"] == 1
    assert stats["in_flight"] == 0
    assert stats["pending"] == 1


async def test_ack_with_other_subscription_tag_is_ignored(broker_factory):
    broker = await broker_factory(subscription("billing"), subscription("shipping"))
    await broker.publish([envelope()])
    await fetch_one(broker, "billing")
    shipping_delivery = await fetch_one(broker, "shipping")

    await broker.ack("billing", [shipping_delivery.tag])
    billing = await subscription_stats(broker, "billing")
    shipping = await subscription_stats(broker, "shipping")

    assert billing["acked"] == 0
    assert billing["in_flight"] == 1
    assert shipping["acked"] == 0
    assert shipping["in_flight"] == 1


async def test_nack_after_ack_is_ignored(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)

    await broker.ack(SUBSCRIPTION, [delivery.tag])
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, delay=0.0)])
    again = await broker.fetch(SUBSCRIPTION, 10, timeout=0.3)
    stats = await subscription_stats(broker)

    assert again == []
    assert stats["acked"] == 1
    assert stats["delivered"] == 1
    assert stats["redelivered"] == 0
    assert stats["pending"] == 0


async def test_nack_after_timeout_is_ignored(broker_factory):
    # Long enough that the second delivery is still held when it is acked on a loaded machine.
    broker = await broker_factory(subscription(ack_timeout=1.0))
    await broker.publish([envelope()])
    first = await fetch_one(broker)
    second = await fetch_one(broker)

    # The stale nack must not schedule a second copy next to the delivery in flight.
    await broker.nack(SUBSCRIPTION, [Nack(first.tag, delay=0.0)])
    extra = await broker.fetch(SUBSCRIPTION, 10, timeout=0.1)
    await broker.ack(SUBSCRIPTION, [second.tag])
    stats = await subscription_stats(broker)

    assert extra == []
    assert stats["delivered"] == 2
    assert stats["redelivered"] == 1
    assert stats["acked"] == 1
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0
