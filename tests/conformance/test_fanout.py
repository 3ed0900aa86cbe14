"""Fan-out: every subscription of a topic receives every message, each at its own pace."""

from __future__ import annotations

from .helpers import (
    envelopes,
    fetch_exactly,
    ids_of,
    published_count,
    subscription,
    subscription_stats,
)

SUBSCRIPTIONS = ("billing", "shipping", "audit")


async def test_every_subscription_gets_every_message(broker_factory):
    broker = await broker_factory(*(subscription(name) for name in SUBSCRIPTIONS))
    published = envelopes(5)
    await broker.publish(published)

    for name in SUBSCRIPTIONS:
        deliveries = await fetch_exactly(broker, name, 5)
        assert ids_of(deliveries) == sorted(item.id for item in published), name
        assert {delivery.subscription for delivery in deliveries} == {name}
    assert await published_count(broker, "Orders") == 5


async def test_subscriptions_progress_independently(broker_factory):
    broker = await broker_factory(subscription("billing"), subscription("shipping"))
    await broker.publish(envelopes(5))

    deliveries = await fetch_exactly(broker, "billing", 5)
    await broker.ack("billing", [delivery.tag for delivery in deliveries])
    billing = await subscription_stats(broker, "billing")
    shipping = await subscription_stats(broker, "shipping")

    assert billing["acked"] == 5
    assert billing["pending"] == 0
    assert shipping["delivered"] == 0
    assert shipping["pending"] == 5

    later = await fetch_exactly(broker, "shipping", 5)
    assert ids_of(later) == ids_of(deliveries)


async def test_unfetched_subscription_does_not_block_another(broker_factory):
    broker = await broker_factory(subscription("billing"), subscription("shipping"))
    unacked_shipping = []
    for _ in range(4):
        await broker.publish(envelopes(50))
        # shipping keeps its first 10 deliveries unacked and fetches nothing more.
        if not unacked_shipping:
            unacked_shipping = await fetch_exactly(broker, "shipping", 10)
        deliveries = await fetch_exactly(broker, "billing", 50)
        await broker.ack("billing", [delivery.tag for delivery in deliveries])

    billing = await subscription_stats(broker, "billing")
    shipping = await subscription_stats(broker, "shipping")

    assert billing["acked"] == 200
    assert billing["pending"] == 0
    assert billing["in_flight"] == 0
    assert shipping["in_flight"] == 10
    assert shipping["pending"] == 190


async def test_other_topic_receives_nothing(broker_factory):
    broker = await broker_factory(subscription("billing"), subscription("refunds", topic="Refunds"))
    await broker.publish(envelopes(3))

    stray = await broker.fetch("refunds", 10, timeout=0.2)
    stats = await subscription_stats(broker, "refunds")

    assert stray == []
    assert stats["pending"] == 0
    assert await published_count(broker, "Refunds") == 0
    assert await published_count(broker, "Orders") == 3
