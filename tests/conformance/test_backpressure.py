"""Backpressure: `max_pending` with `on_full: block` or `reject`."""

from __future__ import annotations

import asyncio

import pytest

from flowrun import QueueFullError
from flowrun.spec import OnFull

from .helpers import (
    SUBSCRIPTION,
    WAIT_SECONDS,
    envelope,
    envelopes,
    fetch_exactly,
    fetch_one,
    is_still_pending,
    published_count,
    subscription,
    subscription_stats,
)

# How long a publish must stay blocked to count as blocked.
BLOCKED_CHECK_SECONDS = 0.3


async def test_full_subscription_blocks_publish_until_ack(broker_factory):
    broker = await broker_factory(subscription(max_pending=2, on_full=OnFull.BLOCK))
    await broker.publish(envelopes(2))

    blocked = asyncio.create_task(broker.publish([envelope()]))
    try:
        blocked_while_ready = await is_still_pending(blocked, BLOCKED_CHECK_SECONDS)
        # A delivery in flight still occupies its place.
        delivery = await fetch_one(broker)
        blocked_while_in_flight = await is_still_pending(blocked, BLOCKED_CHECK_SECONDS)
        count_while_blocked = await published_count(broker, "Orders")

        await broker.ack(SUBSCRIPTION, [delivery.tag])
        await asyncio.wait_for(blocked, WAIT_SECONDS)
    finally:
        blocked.cancel()
    stats = await subscription_stats(broker)

    assert blocked_while_ready
    assert blocked_while_in_flight
    assert count_while_blocked == 2
    assert await published_count(broker, "Orders") == 3
    assert stats["pending"] == 2
    assert stats["acked"] == 1


async def test_one_full_subscription_blocks_topic(broker_factory):
    broker = await broker_factory(
        subscription("billing", max_pending=1), subscription("shipping", max_pending=100)
    )
    await broker.publish([envelope()])

    blocked = asyncio.create_task(broker.publish([envelope()]))
    try:
        blocked_by_billing = await is_still_pending(blocked, BLOCKED_CHECK_SECONDS)
        delivery = await fetch_one(broker, "billing")
        await broker.ack("billing", [delivery.tag])
        await asyncio.wait_for(blocked, WAIT_SECONDS)
    finally:
        blocked.cancel()
    shipping = await subscription_stats(broker, "shipping")

    assert blocked_by_billing
    assert shipping["pending"] == 2


async def test_full_subscription_rejects_publish(broker_factory):
    broker = await broker_factory(subscription(max_pending=2, on_full=OnFull.REJECT))
    await broker.publish(envelopes(2))

    with pytest.raises(QueueFullError):
        await broker.publish([envelope()])
    count_after_reject = await published_count(broker, "Orders")
    pending_after_reject = (await subscription_stats(broker))["pending"]

    delivery = await fetch_one(broker)
    await broker.ack(SUBSCRIPTION, [delivery.tag])
    await broker.publish([envelope()])

    assert count_after_reject == 2
    assert pending_after_reject == 2
    assert await published_count(broker, "Orders") == 3


async def test_rejected_message_reaches_no_subscription(broker_factory):
    broker = await broker_factory(
        subscription("billing", max_pending=1, on_full=OnFull.REJECT),
        subscription("shipping", max_pending=100, on_full=OnFull.REJECT),
    )
    await broker.publish([envelope()])

    with pytest.raises(QueueFullError):
        await broker.publish([envelope()])
    shipping = await subscription_stats(broker, "shipping")

    assert shipping["pending"] == 1
    assert await published_count(broker, "Orders") == 1


async def test_mixed_batch_waits_at_full_subscription(broker_factory):
    # Orders fits two messages, Refunds many. The batch stops at the third Orders
    # message and goes on, in order, once an ack frees a place.
    broker = await broker_factory(
        subscription("billing", max_pending=2), subscription("refunds", topic="Refunds", max_pending=100)
    )
    batch = [envelope(body=b"1"), envelope("Refunds", b"2"), envelope(body=b"3"), envelope("Refunds", b"4"),
             envelope(body=b"5"), envelope("Refunds", b"6")]

    blocked = asyncio.create_task(broker.publish(batch))
    try:
        blocked_at_third = await is_still_pending(blocked, BLOCKED_CHECK_SECONDS)
        refunds_while_blocked = await published_count(broker, "Refunds")
        first = await fetch_one(broker, "billing")
        await broker.ack("billing", [first.tag])
        await asyncio.wait_for(blocked, WAIT_SECONDS)
    finally:
        blocked.cancel()
    billing = [first, *await fetch_exactly(broker, "billing", 2)]
    refunds = await fetch_exactly(broker, "refunds", 3)

    assert blocked_at_third
    assert refunds_while_blocked == 2
    assert [delivery.envelope.body for delivery in billing] == [b"1", b"3", b"5"]
    assert [delivery.envelope.body for delivery in refunds] == [b"2", b"4", b"6"]
    assert await published_count(broker, "Orders") == 3
    assert await published_count(broker, "Refunds") == 3


async def test_rejecting_batch_stores_what_fits(broker_factory):
    # Three messages published at once into room for two: the first two are stored,
    # the third is rejected, as if they were published one by one.
    broker = await broker_factory(subscription(max_pending=2, on_full=OnFull.REJECT))

    with pytest.raises(QueueFullError) as raised:
        await broker.publish(envelopes(3))
    stored = await fetch_exactly(broker, SUBSCRIPTION, 2)

    assert await published_count(broker, "Orders") == 2
    assert [delivery.envelope.body for delivery in stored] == [b"0", b"1"]
    assert "'billing'" in str(raised.value)
    assert "max_pending" in str(raised.value)
