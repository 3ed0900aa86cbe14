"""The SQLite backend's topic ranges: one lease row per fetch, messages deleted once every subscription is past them."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from flowrun.broker import Nack
from flowrun.brokers import sqlite_store
from flowrun.brokers.sqlite import SqliteBroker
from flowrun.errors import BrokerError
from flowrun.message import Envelope
from tests.conftest import make_topology
from tests.conformance.helpers import (
    DEAD_LETTER_TOPIC,
    SUBSCRIPTION,
    TOPIC,
    envelope,
    envelopes,
    fetch_exactly,
    subscription,
    subscription_stats,
)
from tests.test_sqlite_batches import started_broker

SCHEMA_1_FILE = Path(__file__).parent / "data" / "sqlite_schema1.db"


def stored_messages(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def bodies(deliveries: list) -> list[bytes]:
    return [delivery.envelope.body for delivery in deliveries]


async def start_error(path: Path) -> str:
    """Start a broker on `path`, expecting it to fail, and return the error message."""
    broker = SqliteBroker(path)
    with pytest.raises(BrokerError) as caught:
        await broker.start(make_topology(subscription()))
    await broker.close()
    return str(caught.value)


async def test_expired_range_lease_redelivers_only_unacked(tmp_path: Path) -> None:
    async with started_broker(tmp_path, subscription(ack_timeout=0.2)) as broker:
        await broker.publish(envelopes(3))
        first, middle, last = await fetch_exactly(broker, SUBSCRIPTION, 3)
        await broker.ack(SUBSCRIPTION, [first.tag, last.tag])

        again = await fetch_exactly(broker, SUBSCRIPTION, 1)
        await broker.ack(SUBSCRIPTION, [again[0].tag, first.tag])
        stats = await subscription_stats(broker)

    assert bodies(again) == [b"1"]
    assert again[0].delivery_count == 2
    assert again[0].first_delivered_at == middle.first_delivered_at
    assert (stats["acked"], stats["redelivered"], stats["in_flight"], stats["pending"]) == (3, 1, 0, 0)
    assert stored_messages(tmp_path / "flow.db") == 0


async def test_nack_takes_one_delivery_out_of_its_range(tmp_path: Path) -> None:
    async with started_broker(tmp_path, subscription()) as broker:
        await broker.publish(envelopes(4))
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 4)
        await broker.nack(SUBSCRIPTION, [Nack(deliveries[2].tag, delay=0.0)])
        await broker.nack(SUBSCRIPTION, [Nack(deliveries[2].tag, delay=0.0)])
        await broker.ack(SUBSCRIPTION, [deliveries[0].tag, deliveries[1].tag, deliveries[3].tag])
        held = await subscription_stats(broker)

        again = await fetch_exactly(broker, SUBSCRIPTION, 1)
        await broker.ack(SUBSCRIPTION, [again[0].tag])
        stats = await subscription_stats(broker)

    assert (held["acked"], held["in_flight"], held["pending"]) == (3, 0, 1)
    assert bodies(again) == [b"2"]
    assert again[0].delivery_count == 2
    assert (stats["acked"], stats["delivered"], stats["redelivered"]) == (4, 5, 1)
    assert stored_messages(tmp_path / "flow.db") == 0


async def test_messages_stay_until_the_slowest_subscription_settles(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    async with started_broker(tmp_path, subscription(), subscription("audit")) as broker:
        await broker.publish(envelopes(5))
        billing = await fetch_exactly(broker, SUBSCRIPTION, 5)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in billing])
        after_billing = stored_messages(path)

        audit = await fetch_exactly(broker, "audit", 5)
        await broker.ack("audit", [delivery.tag for delivery in audit[:2]])
        after_two = stored_messages(path)
        await broker.ack("audit", [delivery.tag for delivery in audit[3:]])
        out_of_order = stored_messages(path)
        await broker.ack("audit", [audit[2].tag])
        after_all = stored_messages(path)

    assert (after_billing, after_two, out_of_order, after_all) == (5, 3, 3, 0)


async def test_dropped_subscription_keeps_no_messages(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    async with started_broker(tmp_path, subscription(), subscription("audit")) as broker:
        await broker.publish(envelopes(3))

    async with started_broker(tmp_path, subscription()) as broker:
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 3)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
    without_audit = stored_messages(path)

    async with started_broker(tmp_path, subscription(), subscription("audit")) as broker:
        gone = await subscription_stats(broker, "audit")
        await broker.publish(envelopes(1))
        audit = await fetch_exactly(broker, "audit", 1)
        await broker.ack("audit", [audit[0].tag])
        settled = await broker.all_settled(["audit"])

    assert without_audit == 0
    assert (gone["pending"], gone["in_flight"]) == (0, 0)
    assert bodies(audit) == [b"0"]
    assert settled


async def test_ordered_beside_range_subscription(tmp_path: Path) -> None:
    async with started_broker(tmp_path, subscription(ordered=True), subscription("audit")) as broker:
        await broker.publish(envelopes(2))
        first = await fetch_exactly(broker, SUBSCRIPTION, 1)
        audit = await fetch_exactly(broker, "audit", 2)
        await broker.ack("audit", [delivery.tag for delivery in audit])
        await broker.ack(SUBSCRIPTION, [first[0].tag])
        second = await fetch_exactly(broker, SUBSCRIPTION, 1)
        await broker.ack(SUBSCRIPTION, [second[0].tag])
        settled = await broker.all_settled([SUBSCRIPTION, "audit"])

    assert bodies(first) + bodies(second) == [b"0", b"1"]
    assert settled
    assert stored_messages(tmp_path / "flow.db") == 0


async def test_schema_1_file_upgraded_in_place(tmp_path: Path) -> None:
    # The schema-1 broker wrote this file with six messages on Orders. Billing acked "0",
    # dead-lettered "3", holds "2" under a lease that expired long ago, and waits to
    # redeliver "1". Audit has fetched nothing.
    path = tmp_path / "flow.db"
    shutil.copy(SCHEMA_1_FILE, path)
    topology = make_topology(subscription(dead_letter=DEAD_LETTER_TOPIC), subscription("audit"))
    broker = SqliteBroker(path)
    await broker.start(topology)
    try:
        billing = await fetch_exactly(broker, SUBSCRIPTION, 4)
        await broker.publish([envelope(body=b"6"), envelope(body=b"7")])
        billing += await fetch_exactly(broker, SUBSCRIPTION, 2)
        audit = await fetch_exactly(broker, "audit", 8)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in billing])
        await broker.ack("audit", [delivery.tag for delivery in audit])
        stats = (await broker.stats())["subscriptions"]
        letters = await broker.dead_letters()
    finally:
        await broker.close()

    counts = {delivery.envelope.body: delivery.delivery_count for delivery in billing}
    assert counts == {b"1": 2, b"2": 2, b"4": 1, b"5": 1, b"6": 1, b"7": 1}
    assert len(billing) == 6
    assert bodies(audit) == [b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"]
    assert (stats[SUBSCRIPTION]["acked"], stats[SUBSCRIPTION]["dead_lettered"]) == (7, 1)
    assert (stats["audit"]["acked"], stats["audit"]["pending"], stats["audit"]["in_flight"]) == (8, 0, 0)
    assert [letter["body"] for letter in letters] == [b"3"]
    assert stored_messages(path) == 0
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)


async def test_newer_schema_rejected(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    async with started_broker(tmp_path, subscription()):
        pass
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")

    error = await start_error(path)

    assert f"{path} has schema version 3, written by a newer flowrun" in error


async def test_range_continues_after_full_drain(tmp_path: Path) -> None:
    async with started_broker(tmp_path, subscription()) as broker:
        for _ in range(3):
            await broker.publish(envelopes(2))
            deliveries = await fetch_exactly(broker, SUBSCRIPTION, 2)
            await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
            await asyncio.sleep(0)
        stats = await subscription_stats(broker)

    assert (stats["acked"], stats["delivered"], stats["pending"]) == (6, 6, 0)


async def test_fetch_reads_what_memory_lacks(tmp_path: Path, monkeypatch) -> None:
    # A fetch takes the messages its own process published from memory, and reads the
    # rest: another process's messages, and its own once evicted from memory.
    monkeypatch.setattr(sqlite_store, "RECENT_MESSAGES", 5)
    topology = make_topology(subscription())
    first = SqliteBroker(tmp_path / "flow.db")
    second = SqliteBroker(tmp_path / "flow.db")
    await first.start(topology)
    await second.start(topology)
    reads: list[tuple[int, int]] = []
    read = first._store._read_deliveries

    def counted_read(config, low, high, lease, now):
        reads.append((low, high))
        return read(config, low, high, lease, now)

    monkeypatch.setattr(first._store, "_read_deliveries", counted_read)
    try:
        await first.publish([envelope(body=b"1"), envelope(body=b"2")])
        await second.publish([envelope(body=b"3")])
        await first.publish([envelope(body=str(number).encode()) for number in range(4, 9)])
        deliveries = await fetch_exactly(first, SUBSCRIPTION, 3)
        deliveries += await fetch_exactly(first, SUBSCRIPTION, 5)
        await first.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
        stats = await subscription_stats(first)
    finally:
        await first.close()
        await second.close()

    assert bodies(deliveries) == [b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8"]
    assert len(reads) == 1
    assert reads[0][1] - reads[0][0] == 2
    assert (stats["acked"], stats["pending"], stats["in_flight"]) == (8, 0, 0)


async def test_publish_cut_counts_skipped_repeats(tmp_path: Path) -> None:
    def dedupe(message_id: str) -> Envelope:
        return Envelope(message_id, TOPIC, message_id.encode(), None, {}, time.time(), dedupe=True)

    async with started_broker(tmp_path, subscription(max_pending=3)) as broker:
        first_call = [dedupe("a"), dedupe("a"), dedupe("b"), dedupe("c"), dedupe("d"), dedupe("b")]
        dealt_with = await broker._write("publish", first_call)
        repeats_only = await broker._write("publish", [dedupe("a"), dedupe("c")])
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 3)

    assert dealt_with == 4
    assert repeats_only == 2
    assert bodies(deliveries) == [b"a", b"b", b"c"]


async def test_schema_1_code_fails_on_schema_2(tmp_path: Path) -> None:
    # Every schema-1 flowrun runs this statement as it opens its file. It must fail,
    # because that flowrun would not see the messages of topic ranges.
    path = tmp_path / "flow.db"
    async with started_broker(tmp_path, subscription()):
        pass

    with sqlite3.connect(path) as connection, pytest.raises(sqlite3.DatabaseError) as caught:
        connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", ("1",))

    assert "has schema version 2" in str(caught.value)


async def test_foreign_database_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (number INTEGER)")

    error = await start_error(path)

    assert f"{path} is a SQLite database that flowrun did not create" in error
    with sqlite3.connect(path) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
        journal_mode = connection.execute("PRAGMA journal_mode").fetchone()
    assert tables == [("invoices",)]
    assert journal_mode == ("delete",)
