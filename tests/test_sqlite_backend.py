"""Behaviour of the SQLite backend beyond the conformance suite: its file on disk."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from flowrun.brokers import sqlite_store
from flowrun.brokers.sqlite import SqliteBroker
from tests.conftest import make_topology
from tests.conformance.helpers import SUBSCRIPTION, TOPIC, envelope, envelopes, fetch_exactly, subscription

MESSAGES = 5_000
BODY = b'"' + b"x" * 2_000 + b'"'


def pragma(path: Path, name: str) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute(f"PRAGMA {name}").fetchone()[0])


def create_incremental_file(path: Path) -> None:
    """Create an empty broker file as flowrun versions before this one did: with auto_vacuum=INCREMENTAL."""
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
        connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@pytest.mark.parametrize("auto_vacuum", [0, 2], ids=["new-file", "incremental-file"])
async def test_drained_backlog_gives_its_pages_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    auto_vacuum: int) -> None:
    # 5,000 messages of 2 KB fill about 2,800 pages of 4 KB. Every 1,000 removals the
    # broker keeps at most 100 free pages, so after the drain only the pages freed since
    # the last return (under 1,000 removals, about 600 pages) may remain free. New files
    # are compacted by VACUUM, files of older versions by incremental_vacuum.
    monkeypatch.setattr(sqlite_store, "VACUUM_EVERY", 1_000)
    monkeypatch.setattr(sqlite_store, "FREE_PAGES_KEPT", 100)
    path = tmp_path / "flow.db"
    if auto_vacuum:
        create_incremental_file(path)
    broker = SqliteBroker(path)
    await broker.start(make_topology(subscription()))
    try:
        await broker.publish([envelope(TOPIC, BODY) for _ in range(MESSAGES)])
        for _ in range(MESSAGES // 500):
            deliveries = await fetch_exactly(broker, SUBSCRIPTION, 500)
            await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
        stats = (await broker.stats())["subscriptions"][SUBSCRIPTION]
    finally:
        await broker.close()

    assert stats["acked"] == MESSAGES
    assert stats["pending"] == 0
    assert pragma(path, "auto_vacuum") == auto_vacuum
    assert pragma(path, "freelist_count") < 1_000
    assert pragma(path, "page_count") < 1_000


async def test_stats_omit_dropped_subscriber(tmp_path: Path) -> None:
    # A subscriber renamed in the flow leaves its old row in the file. The old one keeps
    # no messages any more, so the report must not show it with a backlog.
    path = tmp_path / "flow.db"
    before = SqliteBroker(path)
    await before.start(make_topology(subscription("old-name")))
    await before.publish(envelopes(3))
    await before.close()

    after = SqliteBroker(path)
    await after.start(make_topology(subscription("new-name")))
    try:
        await after.publish(envelopes(2))
        report = await after.stats()
    finally:
        await after.close()

    assert list(report["subscriptions"]) == ["new-name"]
    assert report["subscriptions"]["new-name"]["pending"] == 2
    assert report["topics"][TOPIC]["published"] == 5


async def test_small_drain_shrinks_file_at_close(tmp_path: Path) -> None:
    # 1,000 messages of 10 KB take about 2,600 pages: fewer removals than VACUUM_EVERY, but
    # more free pages than FREE_PAGES_KEPT once drained, so closing the broker compacts the file.
    path = tmp_path / "flow.db"
    body = b'"' + b"x" * 10_000 + b'"'
    broker = SqliteBroker(path)
    await broker.start(make_topology(subscription()))
    try:
        await broker.publish([envelope(TOPIC, body) for _ in range(1_000)])
        pages_full = pragma(path, "page_count")
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 1_000)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
    finally:
        await broker.close()

    assert pages_full > 2_500
    assert pragma(path, "page_count") < 100
    assert pragma(path, "freelist_count") == 0


async def test_running_broker_shrinks_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A broker that keeps running after a drained surge compacts the file once
    # VACUUM_INTERVAL has passed since a removal, and the file on disk shrinks at once.
    monkeypatch.setattr(sqlite_store, "VACUUM_INTERVAL", 0.2)
    path = tmp_path / "flow.db"
    body = b'"' + b"x" * 10_000 + b'"'
    broker = SqliteBroker(path)
    await broker.start(make_topology(subscription()))
    try:
        await broker.publish([envelope(TOPIC, body) for _ in range(1_000)])
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 1_000)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])
        await asyncio.sleep(0.3)
        await broker.publish([envelope(TOPIC, b"1")])
        size_while_running = path.stat().st_size
    finally:
        await broker.close()

    assert size_while_running < 100 * 4096
