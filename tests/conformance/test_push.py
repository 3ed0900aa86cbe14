"""Push delivery through `Broker.consume`: the in-flight cap, and delivery of everything."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowrun.broker import Nack
from flowrun.message import Delivery

from .helpers import (
    SUBSCRIPTION,
    WAIT_SECONDS,
    envelope,
    envelopes,
    fetch_exactly,
    subscription,
    subscription_stats,
)

MESSAGES = 30
MAX_IN_FLIGHT = 3


class DelayedAcker:
    """A consume callback that acks each delivery a few milliseconds later.

    It tracks the tags it has not acked yet and their peak count. A tag leaves `unacked` just
    before its ack is sent, so the peak can only undercount what the broker sees.
    """

    def __init__(self, broker: Any, subscription_name: str, expected: int) -> None:
        self.broker = broker
        self.subscription_name = subscription_name
        self.expected = expected
        self.unacked: set[Any] = set()
        self.peak_unacked = 0
        self.received: list[str] = []
        self.delivery_counts: list[int] = []
        self.all_received = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()

    async def __call__(self, delivery: Delivery) -> None:
        self.unacked.add(delivery.tag)
        self.peak_unacked = max(self.peak_unacked, len(self.unacked))
        self.received.append(delivery.envelope.id)
        self.delivery_counts.append(delivery.delivery_count)
        # Vary the hold time so acks complete out of delivery order.
        hold = 0.005 * (len(self.received) % 4 + 1)
        task = asyncio.create_task(self._ack_later(delivery.tag, hold))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        if len(self.received) >= self.expected:
            self.all_received.set()

    async def _ack_later(self, tag: Any, hold: float) -> None:
        await asyncio.sleep(hold)
        self.unacked.discard(tag)
        await self.broker.ack(self.subscription_name, [tag])

    async def wait_all_acked(self) -> None:
        await asyncio.wait_for(self.all_received.wait(), WAIT_SECONDS * 2)
        while self._acks:
            await asyncio.gather(*self._acks)


async def test_consume_never_exceeds_max_in_flight(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish(envelopes(MESSAGES))
    acker = DelayedAcker(broker, SUBSCRIPTION, MESSAGES)

    consumer = broker.consume(SUBSCRIPTION, acker, MAX_IN_FLIGHT)
    try:
        await acker.wait_all_acked()
    finally:
        await consumer.stop()
    stats = await subscription_stats(broker)

    assert acker.peak_unacked == MAX_IN_FLIGHT, f"peak of unacked deliveries was {acker.peak_unacked}"
    assert len(acker.received) == MESSAGES
    assert len(set(acker.received)) == MESSAGES
    assert stats["acked"] == MESSAGES
    assert stats["delivered"] == MESSAGES
    assert stats["in_flight"] == 0
    assert stats["pending"] == 0


async def test_consume_delivers_later_publishes(broker_factory):
    broker = await broker_factory(subscription())
    acker = DelayedAcker(broker, SUBSCRIPTION, 12)

    consumer = broker.consume(SUBSCRIPTION, acker, MAX_IN_FLIGHT)
    try:
        for _ in range(4):
            await broker.publish(envelopes(3))
            await asyncio.sleep(0.02)
        await acker.wait_all_acked()
    finally:
        await consumer.stop()
    stats = await subscription_stats(broker)

    assert len(set(acker.received)) == 12
    assert acker.peak_unacked <= MAX_IN_FLIGHT
    assert stats["acked"] == 12
    assert stats["pending"] == 0


async def test_consume_redelivers_nacked_message(broker_factory):
    broker = await broker_factory(subscription())
    await broker.publish(envelopes(1))
    counts: list[int] = []
    acked = asyncio.Event()

    async def nack_first_delivery(delivery: Delivery) -> None:
        counts.append(delivery.delivery_count)
        if delivery.delivery_count == 1:
            await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, delay=0.01)])
        else:
            await broker.ack(SUBSCRIPTION, [delivery.tag])
            acked.set()

    consumer = broker.consume(SUBSCRIPTION, nack_first_delivery, MAX_IN_FLIGHT)
    try:
        await asyncio.wait_for(acked.wait(), WAIT_SECONDS)
    finally:
        await consumer.stop()
    stats = await subscription_stats(broker)

    assert counts == [1, 2]
    assert stats["redelivered"] == 1
    assert stats["acked"] == 1
    assert stats["in_flight"] == 0


async def test_consume_ignores_other_subscription_backlog(broker_factory):
    broker = await broker_factory(subscription("billing"), subscription("shipping"))
    await broker.publish(envelopes(MESSAGES))
    unacked_shipping = await fetch_exactly(broker, "shipping", 5)
    acker = DelayedAcker(broker, "billing", MESSAGES)

    consumer = broker.consume("billing", acker, MAX_IN_FLIGHT)
    try:
        await acker.wait_all_acked()
    finally:
        await consumer.stop()
    billing = await subscription_stats(broker, "billing")
    shipping = await subscription_stats(broker, "shipping")

    assert len(unacked_shipping) == 5
    assert billing["acked"] == MESSAGES
    assert shipping["in_flight"] == 5
    assert shipping["pending"] == MESSAGES - 5


async def test_consume_window_bounded_by_bytes(backend, broker_factory):
    # 64 bodies of 256 KiB fill WINDOW_BYTES (16 MiB). The first fetch takes one message,
    # which gives the body size; a window of 1,000 then still leaves only 63 more in flight.
    if backend == "rabbitmq":
        pytest.skip("RabbitMQ's prefetch counts messages only; it has no byte limit")
    body = b'"' + b"x" * (256 * 1024 - 2) + b'"'
    broker = await broker_factory(subscription())
    await broker.publish([envelope(body=body) for _ in range(80)])
    received: list[Delivery] = []
    enough = asyncio.Event()

    def hold(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) >= 64:
            enough.set()

    consumer = broker.consume(SUBSCRIPTION, hold, 1000)
    consumer.set_limit(1)
    while not received:
        await asyncio.sleep(0.01)
    consumer.set_limit(1000)
    await asyncio.wait_for(enough.wait(), WAIT_SECONDS)
    await asyncio.sleep(0.3)
    unacked = len(received)
    await consumer.stop()

    assert consumer.byte_limit == 64
    assert unacked == 64
