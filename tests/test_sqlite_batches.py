"""The SQLite backend's batched statements: a fetch leases exactly the rows it returns."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowrun.broker import Nack, SubscriptionConfig
from flowrun.brokers import sqlite_store
from flowrun.brokers.sqlite import SqliteBroker
from tests.conftest import make_topology
from tests.conformance.helpers import SUBSCRIPTION, TOPIC, envelopes, fetch_exactly, subscription, subscription_stats


@contextlib.asynccontextmanager
async def started_broker(tmp_path: Path, *subscriptions: SubscriptionConfig) -> AsyncIterator[SqliteBroker]:
    """Start a SQLite broker in `tmp_path` with these subscriptions, and close it afterwards."""
    broker = SqliteBroker(tmp_path / "flow.db")
    await broker.start(make_topology(*subscriptions))
    try:
        yield broker
    finally:
        await broker.close()


async def test_fetch_skips_delayed_middle_row(tmp_path: Path) -> None:
    # A fetch leases the ready rows between its first and last seq. A row delayed by a
    # nack sits among them and must stay delayed.
    async with started_broker(tmp_path, subscription()) as broker:
        await broker.publish(envelopes(3))
        first, middle, last = await fetch_exactly(broker, SUBSCRIPTION, 3)
        await broker.nack(SUBSCRIPTION, [Nack(middle.tag, delay=60.0)])
        await broker.nack(SUBSCRIPTION, [Nack(first.tag, delay=0.0), Nack(last.tag, delay=0.0)])

        again = await fetch_exactly(broker, SUBSCRIPTION, 2)
        assert [delivery.envelope.body for delivery in again] == [b"0", b"2"]
        assert [delivery.delivery_count for delivery in again] == [2, 2]
        assert [delivery.first_delivered_at for delivery in again] == [first.first_delivered_at,
                                                                       last.first_delivered_at]
        assert await broker.fetch(SUBSCRIPTION, 10, timeout=0.05) == []

        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in again])
        stats = await subscription_stats(broker)

    assert stats["acked"] == 2
    assert stats["delayed"] == 1
    assert stats["in_flight"] == 0
    assert stats["redelivered"] == 2


async def test_ack_counts_repeated_tag_once(tmp_path: Path) -> None:
    async with started_broker(tmp_path, subscription(), subscription("audit")) as broker:
        await broker.publish(envelopes(4))
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 4)
        tags = [delivery.tag for delivery in deliveries]
        await broker.ack(SUBSCRIPTION, [*tags, tags[0]])
        await broker.ack(SUBSCRIPTION, tags)
        stats = await subscription_stats(broker)
        audit = await fetch_exactly(broker, "audit", 4)
        await broker.ack("audit", [delivery.tag for delivery in audit])
        settled = await broker.all_settled([SUBSCRIPTION, "audit"])

    assert stats["acked"] == 4
    assert stats["pending"] == 0
    assert settled
    assert [delivery.envelope.topic for delivery in audit] == [TOPIC] * 4


async def test_ack_without_returning_clause(tmp_path: Path, monkeypatch) -> None:
    # SQLite before 3.35 has no DELETE ... RETURNING, so acks select, then delete.
    monkeypatch.setattr(sqlite_store, "HAS_RETURNING", False)
    async with started_broker(tmp_path, subscription()) as broker:
        await broker.publish(envelopes(3))
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 3)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries[:2]])
        stats = await subscription_stats(broker)

    assert stats["acked"] == 2
    assert stats["in_flight"] == 1
    assert stats["pending"] == 0


async def test_cancelled_fetch_returns_its_leases(tmp_path: Path, monkeypatch) -> None:
    # A consumer that stops cancels its fetch. When the database thread has leased rows
    # by then, they must be ready again at once, not after the ack timeout.
    async with started_broker(tmp_path, subscription(ack_timeout=60.0)) as broker:
        await broker.publish(envelopes(3))
        real_fetch = broker._store.fetch
        leased = threading.Event()

        def slow_fetch(*args):
            result = real_fetch(*args)
            leased.set()
            time.sleep(0.2)
            return result

        monkeypatch.setattr(broker._store, "fetch", slow_fetch)
        fetching = asyncio.create_task(broker.fetch(SUBSCRIPTION, 10, timeout=5.0))
        await asyncio.to_thread(leased.wait, 5.0)
        fetching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetching
        monkeypatch.setattr(broker._store, "fetch", real_fetch)

        again = await broker.fetch(SUBSCRIPTION, 10, timeout=2.0)
        stats = await subscription_stats(broker)

    assert [delivery.envelope.body for delivery in again] == [b"0", b"1", b"2"]
    assert [delivery.delivery_count for delivery in again] == [1, 1, 1]
    assert stats["delivered"] == 3
    assert stats["redelivered"] == 0
    assert stats["in_flight"] == 3
