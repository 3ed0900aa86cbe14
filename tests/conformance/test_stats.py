"""`Broker.stats`: the report shape and exact counts."""

from __future__ import annotations

from flowrun.broker import Nack

from .helpers import (
    DEAD_LETTER_TOPIC,
    TOPIC,
    envelopes,
    fetch_exactly,
    fetch_one,
    subscription,
)

SUBSCRIPTION_KEYS = {
    "topic", "delivered", "acked", "redelivered", "dead_lettered", "dropped", "in_flight", "pending", "delayed",
    "oldest_pending_age",
}
COUNT_KEYS = SUBSCRIPTION_KEYS - {"topic", "oldest_pending_age"}
UNSUBSCRIBED_TOPIC = "Audit"


async def start_orders_broker(broker_factory):
    return await broker_factory(
        subscription("billing", max_deliveries=2, dead_letter=DEAD_LETTER_TOPIC),
        subscription("shipping"),
        topics=(UNSUBSCRIBED_TOPIC,),
    )


async def test_fresh_broker_reports_zeros(broker_factory):
    broker = await start_orders_broker(broker_factory)

    report = await broker.stats()

    assert set(report) == {"topics", "subscriptions"}
    assert set(report["subscriptions"]) == {"billing", "shipping"}
    for name, counts in report["subscriptions"].items():
        for key in SUBSCRIPTION_KEYS:
            assert key in counts, f"{name} lacks {key}"
        assert counts["topic"] == TOPIC, name
        for key in COUNT_KEYS:
            assert counts[key] == 0, f"{name}.{key}"
        assert counts["oldest_pending_age"] is None, name


async def test_stats_lists_every_declared_topic(broker_factory):
    broker = await start_orders_broker(broker_factory)

    topics = (await broker.stats())["topics"]

    # Orders.dead and Audit have no subscription and nothing published yet.
    assert set(topics) == {TOPIC, DEAD_LETTER_TOPIC, UNSUBSCRIBED_TOPIC}
    for name in topics:
        assert topics[name] == {"published": 0}, name


async def test_stats_exact_counts(broker_factory):
    broker = await start_orders_broker(broker_factory)
    await broker.publish(envelopes(4))
    await broker.publish(envelopes(2, topic=UNSUBSCRIBED_TOPIC))

    first, second, retried, rejected = await fetch_exactly(broker, "billing", 4)
    await broker.ack("billing", [first.tag, second.tag])
    await broker.nack("billing", [Nack(retried.tag, delay=0.0), Nack(rejected.tag, terminal=True)])
    redelivery = await fetch_one(broker, "billing")
    await fetch_one(broker, "shipping")
    report = await broker.stats()
    billing = dict(report["subscriptions"]["billing"])
    shipping = dict(report["subscriptions"]["shipping"])
    billing_age = billing.pop("oldest_pending_age")
    shipping_age = shipping.pop("oldest_pending_age")

    assert redelivery.envelope.id == retried.envelope.id
    assert report["topics"][TOPIC]["published"] == 4
    assert report["topics"][DEAD_LETTER_TOPIC]["published"] == 1
    assert report["topics"][UNSUBSCRIBED_TOPIC]["published"] == 2
    assert billing == {
        "topic": TOPIC,
        "delivered": 5,
        "acked": 2,
        "redelivered": 1,
        "dead_lettered": 1,
        "dropped": 0,
        "in_flight": 1,
        "pending": 0,
        "delayed": 0,
    }
    assert billing_age is None
    assert shipping == {
        "topic": TOPIC,
        "delivered": 1,
        "acked": 0,
        "redelivered": 0,
        "dead_lettered": 0,
        "dropped": 0,
        "in_flight": 1,
        "pending": 3,
        "delayed": 0,
    }
    assert shipping_age is not None
    assert 0 <= shipping_age < 60


async def test_pending_includes_delayed_retry(broker_factory):
    broker = await start_orders_broker(broker_factory)
    await broker.publish(envelopes(1))
    delivery = await fetch_one(broker, "billing")

    await broker.nack("billing", [Nack(delivery.tag, delay=30.0)])
    billing = (await broker.stats())["subscriptions"]["billing"]

    # The runtime treats a subscription as drained only when pending and in_flight are 0,
    # so a scheduled retry must count as pending.
    assert billing["pending"] == 1
    assert billing["delayed"] == 1
    assert billing["in_flight"] == 0
