"""Redis backend: what travels in batches, against the real server on 127.0.0.1.

A publish sends a whole batch of envelopes as one packed script argument, and one lease
timer covers each fetched batch. These tests check that both keep every message exact:
unusual content survives packing, dedup keys stay matched to their envelopes when a
blocked publish resumes mid-batch, and a partly acked batch expires only the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from flowrun.spec import OnFull

from .conftest import require_server
from .conformance.helpers import (
    SHORT_ACK_TIMEOUT,
    SUBSCRIPTION,
    TOPIC,
    envelope,
    fetch_exactly,
    published_count,
    subscription,
    subscription_stats,
)

redis_backend = pytest.importorskip("flowrun.brokers.redis")


@pytest.fixture
def backend() -> str:
    """Run the shared broker_factory fixture on the Redis backend only."""
    require_server("redis")
    return "redis"


async def test_packed_batch_round_trips(broker_factory):
    broker = await broker_factory(subscription())
    sent = [
        envelope(body=bytes(range(256))),
        dataclasses.replace(envelope(body=b"", key="kunde-\u00e4-\u2713", headers={"trace": "t-\u00fc", "n": "1"}),
                            id="id-\u00e9-1", published_at=1_700_000_000.123456),
        dataclasses.replace(envelope(body=b'{"total": 3}', key=""), dedupe=True),
        envelope(body=b"x" * 70_000, headers={"flowrun.hops": "2"}),
    ]

    await broker.publish(sent)
    received = await fetch_exactly(broker, SUBSCRIPTION, len(sent))

    for original, delivery in zip(sent, received):
        got = delivery.envelope
        assert got.id == original.id
        assert got.topic == original.topic
        assert got.body == original.body
        assert got.key == original.key
        assert got.headers == original.headers
        assert got.published_at == original.published_at


async def test_packed_entry_keeps_stream_fields(broker_factory):
    broker = await broker_factory(subscription())
    sent = envelope(body=b"{}", key="customer-7", headers={"trace-id": "t-1"})

    await broker.publish([sent])
    entries = await broker._connected().xrange(broker._names.topic(TOPIC))

    (_, fields), = entries
    assert fields == {b"id": sent.id.encode(), b"body": b"{}", b"headers": b'{"trace-id": "t-1"}',
                      b"published_at": repr(sent.published_at).encode(), b"key": b"customer-7"}


async def test_resumed_publish_keeps_dedup_keys(broker_factory):
    broker = await broker_factory(subscription(max_pending=2, on_full=OnFull.BLOCK))
    earlier = dataclasses.replace(envelope(), dedupe=True)
    await broker.publish([earlier])
    await fetch_and_ack(broker, 1)

    chosen = [dataclasses.replace(envelope(), dedupe=True) for _ in range(3)]
    batch = [chosen[0], envelope(), chosen[1], envelope(), dataclasses.replace(earlier), chosen[2], envelope()]
    publishing = asyncio.create_task(broker.publish(batch))
    handled = await fetch_and_ack(broker, len(batch) - 1)
    await asyncio.wait_for(publishing, 5.0)

    expected = [item.id for item in batch if item is not batch[4]]
    assert [delivery.envelope.id for delivery in handled] == expected
    assert await published_count(broker, TOPIC) == len(batch)
    keys = await broker._connected().keys(f"{broker._names.prefix}:dedup:*")
    assert sorted(key.decode() for key in keys) == sorted(broker._names.dedup(item.id) for item in [earlier, *chosen])


async def test_partly_acked_batch_expires_rest(broker_factory):
    broker = await broker_factory(subscription(ack_timeout=SHORT_ACK_TIMEOUT))
    await broker.publish([envelope(body=str(number).encode()) for number in range(4)])
    first = await fetch_exactly(broker, SUBSCRIPTION, 4)

    await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in first[:2]])
    # No fetch runs meanwhile, so the lease timer of the batch alone must expire the rest.
    await asyncio.sleep(SHORT_ACK_TIMEOUT * 3)
    stats = await subscription_stats(broker)
    again = await fetch_exactly(broker, SUBSCRIPTION, 2)

    assert stats["in_flight"] == 0
    assert stats["pending"] == 2
    assert stats["acked"] == 2
    assert sorted(delivery.envelope.body for delivery in again) == [b"2", b"3"]
    assert [delivery.delivery_count for delivery in again] == [2, 2]


async def fetch_and_ack(broker, count: int) -> list:
    """Fetch and ack one delivery at a time until `count` arrived, within ten seconds."""
    handled = []
    deadline = time.monotonic() + 10.0
    while len(handled) < count:
        assert time.monotonic() < deadline, f"handled {len(handled)} of {count} deliveries"
        deliveries = await broker.fetch(SUBSCRIPTION, 1, timeout=0.5)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
        handled += deliveries
    return handled
