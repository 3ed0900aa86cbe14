"""The SQLite side of the embedded broker: one file in WAL mode, used from one thread.

A message is on disk once its publish transaction commits. Each topic is a range of seqs
in `messages`, stored once however many subscriptions it has. A subscription reads its
topic's range in order through a cursor. Each fetch from the range is one row in
`leases`, held until the ack timeout, so after a crash the leases of the dead process
expire. Its messages are then delivered again, and nothing else is. A message that needs
its own state (a retry, a message of an ordered subscription) gets a row in `deliveries`.
A topic's messages are deleted once every subscription is past them. Several processes
may open the same file: each fetch is one write transaction, so they compete for
messages and each delivery goes to one of them.

`SqliteStore` is synchronous; `flowrun.brokers.sqlite.SqliteBroker` runs it on its database
thread and batches its calls into transactions.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import operator
import secrets
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from flowrun.broker import (
    NO_ERROR,
    ErrorInfo,
    Nack,
    SubscriptionConfig,
    Topology,
    dead_letter_headers,
    replay_headers,
)
from flowrun.clock import Clock
from flowrun.errors import BrokerError, QueueFullError
from flowrun.ids import new_id
from flowrun.message import Delivery, Envelope
from flowrun.spec import AckPolicy, OnFull

logger = logging.getLogger(__name__)


SCHEMA_VERSION = 2
# A topic's messages have the seqs after its number << TOPIC_SHIFT. Seqs up to TOPIC_BASE
# are messages that only delivery rows refer to.
TOPIC_SHIFT = 40
TOPIC_BASE = 1 << TOPIC_SHIFT
BUSY_TIMEOUT_MS = 30_000
SEEN_ID_PURGE_EVERY = 1000
# Bounds of the recently published messages kept in memory for fetches (see _take_range).
# Subscriptions that keep up fetch right behind the producer, so a few publish batches
# suffice. Measured on the benchmark flow: 1,024 messages gave the same throughput as
# 20,000, and 20,000 raised its peak RSS from 46 to 128 MiB (probably because the
# long-lived envelopes keep many of Python's memory arenas from being freed).
RECENT_MESSAGES = 1024
RECENT_BYTES = 4 * 1024 * 1024
# Every VACUUM_EVERY removed messages, VACUUM_INTERVAL seconds after a removal, and when
# the broker opens and closes the file, free pages beyond FREE_PAGES_KEPT are released. In
# files of older flowrun versions (auto_vacuum=INCREMENTAL) that happens at once, in newer
# ones by a VACUUM once the pages in use are at most VACUUM_MAX_PAGES (10 MiB), so that it
# copies little data and needs little temporary memory.
VACUUM_EVERY = 10_000
VACUUM_INTERVAL = 30.0
FREE_PAGES_KEPT = 2_000
VACUUM_MAX_PAGES = 2_500
# The value of PRAGMA auto_vacuum for INCREMENTAL.
INCREMENTAL_VACUUM = 2


SQL_CHUNK = 400
# Values per message in _insert_messages, and messages per INSERT statement at most
# (128 x 7 stays under the 999 variables of SQLite before 3.32).
MESSAGE_COLUMNS = 7
MESSAGE_CHUNK = 128
# DELETE ... RETURNING needs SQLite 3.35 (2021). Python links the system's SQLite, so older
# libraries take a SELECT and a DELETE instead.
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
# Start of the statement that leases rows. The caller appends the WHERE clause. The rows of one fetch share the lease
# number and the deadline, and SQL adds the delivery that the fetched deliveries already count.
LEASE_UPDATE = (
    "UPDATE deliveries SET leased = 1, lease = ?, visible_at = ?, delivery_count = delivery_count + 1, "
    "first_delivered_at = CASE first_delivered_at WHEN 0 THEN ? ELSE first_delivered_at END "
)


class _PublishBatch:
    """Rows of one publish call, written with one statement per table and subscription.

    Each topic's messages get the seqs after the topic's head, so the batch's messages of
    one topic are the seqs from `first[topic]` to `last[topic]`.
    """

    def __init__(self, now: float, head_of: Callable[[str], int]) -> None:
        self.now = now
        self.head_of = head_of
        self.seen_rows: list[tuple[str, float]] = []
        # The values of every stored message, MESSAGE_COLUMNS per message, one after another.
        self.message_values: list[Any] = []
        self.published: dict[str, int] = {}
        # The stored envelopes of each topic, in seq order from first[topic], and their body bytes.
        self.stored: dict[str, list[Envelope]] = {}
        self.stored_bytes: dict[str, int] = {}
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}

    def add(self, topic: str, run: list[Envelope], holders: list[SubscriptionConfig] | None) -> None:
        """Add consecutive envelopes of one topic."""
        self.seen_rows += [(envelope.id, envelope.published_at) for envelope in run if envelope.dedupe]
        self.published[topic] = self.published.get(topic, 0) + len(run)
        if not holders or not run:
            return

        last = self.last.get(topic)
        if last is None:
            last = self.head_of(topic)
            self.first[topic] = last + 1
            self.stored[topic] = []
            self.stored_bytes[topic] = 0
        self.last[topic] = last + len(run)
        self.stored[topic] += run
        values = self.message_values
        for seq, envelope in enumerate(run, last + 1):
            self.stored_bytes[topic] += len(envelope.body)
            values += (seq, envelope.id, topic, envelope.body, envelope.key,
                       _headers_text(envelope.headers) if envelope.headers else "{}", envelope.published_at)


class _Repeats:
    """Positions, in one publish call, of envelopes skipped because their id was published already."""

    def __init__(self, positions: set[int]) -> None:
        self.positions = positions

    def skipped_before(self, stored: int) -> int:
        """Return how many repeats come before the envelope that follows the first `stored` stored ones.

        Together with `stored`, that is the position where the call stopped.
        """
        skipped = 0
        for position in sorted(self.positions):
            if position - skipped >= stored:
                break
            skipped += 1
        return skipped


def _topic_runs(envelopes: Sequence[Envelope], repeats: _Repeats) -> list[tuple[str, list[Envelope]]]:
    """Split the envelopes that are not repeats into runs of consecutive envelopes of one topic."""
    if repeats.positions:
        envelopes = [envelope for position, envelope in enumerate(envelopes) if position not in repeats.positions]
    return [(topic, list(run)) for topic, run in itertools.groupby(envelopes, key=_TOPIC_OF)]


_TOPIC_OF = operator.attrgetter("topic")


class _Tag(NamedTuple):
    """One delivery: the message's seq and the lease number of the fetch that leased it.

    A tuple, because tags are hashed several times per delivery and a tuple hashes in C.
    All rows of one fetch share a lease number, and the seq distinguishes them. Fetches
    from a topic's range build plain `(seq, lease)` tuples, which equal these and cost a
    third of a NamedTuple to create.
    """

    seq: int
    lease: int


class _RangeDelivery(NamedTuple):
    """A delivery taken out of its range lease while the lease still had it pending."""

    seq: int
    lease: int
    fetched_at: float


class SqliteStore:
    """The synchronous SQLite side of one broker; every method runs on one thread."""

    def __init__(self, path: Path, clock: Clock, synchronous: str, dedup_window: float) -> None:
        self.path = path
        self.clock = clock
        self.synchronous = synchronous
        self.dedup_window = dedup_window
        self.connection: sqlite3.Connection | None = None
        self.configs: dict[str, SubscriptionConfig] = {}
        self.by_topic: dict[str, list[SubscriptionConfig]] = {}
        # The seq before each declared topic's range.
        self.bases: dict[str, int] = {}
        # Topics whose subscriptions settled messages in this transaction, so older messages
        # may be deleted at its end.
        self.trimmable: set[str] = set()
        # Lease numbers start at a random point, so a late ack from another process that
        # once leased the same row with the same number is all but impossible.
        self.leases = secrets.randbits(48)
        self.publishes_since_purge = 0
        self.removed_since_vacuum = 0
        self.last_free_pages_check = 0.0
        self.incremental_vacuum = False
        self.data_version = -1
        # Messages this process published, so that a fetch soon after the publish takes
        # them from memory instead of reading them back; see _take_range. Per topic, runs
        # of consecutive seqs (first seq, envelopes), oldest first, as publish calls stored them.
        self.recent: dict[str, deque[tuple[int, list[Envelope]]]] = {}
        # Every run in `recent` as (topic, messages, bytes), oldest first, for eviction.
        self.recent_runs: deque[tuple[str, int, int]] = deque()
        self.recent_messages = 0
        self.recent_bytes = 0
        # Runs published in the open transaction as (topic, first seq, envelopes, bytes),
        # kept in `recent` once it commits.
        self.staged: list[tuple[str, int, list[Envelope], int]] = []
        # Subscriptions that received messages since the broker last took this set.
        self.arrivals: set[str] = set()
        # Deliveries under ack: none that are not settled yet; they have no row any more.
        self.unsettled: set[tuple[str, _Tag]] = set()

    # Opening

    def open(self, topology: Topology | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                     check_same_thread=False)
        try:
            self._check_broker_file(connection)
        except BaseException:
            connection.close()
            raise
        # New files get no auto_vacuum: its pointer map cost 6% of the benchmark's CPU time
        # per delivery. Files that older versions created with it keep it.
        (auto_vacuum,) = connection.execute("PRAGMA auto_vacuum").fetchone()
        self.incremental_vacuum = auto_vacuum == INCREMENTAL_VACUUM
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA temp_store=MEMORY")
        self.connection = connection

        # Every statement of the schema is idempotent, so processes opening the file at
        # the same time may both run it.
        schema = resources.files("flowrun.brokers").joinpath("sqlite_schema.sql").read_text(encoding="utf-8")
        connection.executescript(schema)
        with self.transaction():
            self._upgrade()
        if topology is not None:
            self.declare(topology)
        self._compact_quietly()

    def close(self) -> None:
        if self.connection is not None:
            self._compact_quietly()
            self.connection.close()
            self.connection = None

    def _compact_quietly(self) -> None:
        """Return free pages now, logging a failure (another process may hold the file) instead of raising it."""
        try:
            self.return_free_pages(now=True)
        except sqlite3.Error as error:
            logger.warning("returning free pages of %s failed, so the file stays larger until a later "
                           "check: %s", self.path, error)

    def _check_broker_file(self, connection: sqlite3.Connection) -> None:
        """Raise BrokerError, before writing anything, for a database that another program created.

        A flowrun broker file starts with its `meta` table, so tables without it are some
        other program's data.
        """
        names = sorted(row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        if names and "meta" not in names:
            raise BrokerError(
                f"{self.path} is a SQLite database that flowrun did not create (its tables include "
                f"{', '.join(names[:5])}), so it is left unchanged; set broker.path in the flow to another file"
            )

    def _upgrade(self) -> None:
        """Bring a file of an older flowrun to this schema, in the caller's transaction.

        Schema 1 kept one delivery row per message and subscription. Those rows and their
        messages (all below TOPIC_BASE) stay as they are. Declaring the topics then places
        every cursor at the start of its topic's empty range, so later messages take the
        range path.
        """
        connection = self._db
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise BrokerError(f"{self.path} has schema version {version}, written by a newer flowrun; this one "
                              f"reads version {SCHEMA_VERSION} and older, so upgrade flowrun or use another file")
        if version == 1:
            for table, column in (("topics", "number"), ("topics", "head"), ("subscriptions", "cursor")):
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER")
            logger.info("upgraded %s from schema version 1 to %d", self.path, SCHEMA_VERSION)

        connection.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._reject_older_flowrun()

    def _reject_older_flowrun(self) -> None:
        """Make flowrun versions of schema 1 fail to open this file instead of losing messages.

        They never read the version, but every one of them inserts it, OR IGNORE, as it
        opens the file. They would deliver no message of a topic's range.
        """
        self._db.execute(
            "CREATE TRIGGER IF NOT EXISTS meta_rejects_schema_1 BEFORE INSERT ON meta "
            "WHEN NEW.key = 'schema_version' AND NEW.value = '1' BEGIN SELECT RAISE(ABORT, "
            "'this flowrun broker file has schema version 2; open it with flowrun of the same or a newer version'); END"
        )

    def declare(self, topology: Topology) -> None:
        connection = self._db
        for config in topology.subscriptions:
            self.configs[config.name] = config
            self.by_topic.setdefault(config.topic, []).append(config)

        with self.transaction():
            for topic in topology.topics:
                self.bases[topic] = self._declare_topic(topic)
            for config in topology.subscriptions:
                settings = json.dumps(_config_json(config), sort_keys=True)
                connection.execute(
                    "INSERT INTO subscriptions (name, topic, config) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET config = excluded.config",
                    (config.name, config.topic, settings),
                )
                self._check_topic_unchanged(config)
                self._place_cursor(config)
            if any(config.ordered for config in topology.subscriptions):
                # Only ordered subscriptions look up earlier messages of a key; the index
                # costs every other publish a B-tree insert.
                connection.execute("CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries (subscription, key, seq)")

    def _declare_topic(self, topic: str) -> int:
        """Give a new topic the next free range of seqs; return the seq before its range."""
        connection = self._db
        connection.execute("INSERT OR IGNORE INTO topics (name) VALUES (?)", (topic,))
        (number,) = connection.execute("SELECT number FROM topics WHERE name = ?", (topic,)).fetchone()
        if number is None:
            (number,) = connection.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM topics").fetchone()
            connection.execute("UPDATE topics SET number = ?, head = ? WHERE name = ?",
                               (number, number << TOPIC_SHIFT, topic))
        return int(number) << TOPIC_SHIFT

    def _place_cursor(self, config: SubscriptionConfig) -> None:
        """Set a subscription's cursor and size as this process's flow declares it.

        A new subscription starts at its topic's head: it receives what is published from
        now on. One that the flow left out for a while may find older messages deleted, and
        skips to the first one still stored. An ordered subscription takes every message of
        its range as a delivery row, since only rows can wait for an earlier message of
        their key.
        """
        connection = self._db
        base = self.bases[config.topic]
        (head,) = connection.execute("SELECT head FROM topics WHERE name = ?", (config.topic,)).fetchone()
        (cursor, first_stored) = connection.execute(
            "SELECT cursor, (SELECT MIN(seq) FROM messages WHERE seq > ?2 AND seq < ?3) FROM subscriptions "
            "WHERE name = ?1", (config.name, base, base + TOPIC_BASE),
        ).fetchone()
        cursor = head if cursor is None else max(cursor, (first_stored or head + 1) - 1)
        if config.ordered and cursor < head:
            connection.execute(
                "INSERT OR IGNORE INTO deliveries (subscription, seq, key, visible_at) SELECT ?, seq, key, ? "
                "FROM messages WHERE seq > ? AND seq <= ?", (config.name, self.clock.wall(), cursor, head),
            )
            cursor = head

        in_ranges = sum(_pending_seqs_count(pending) for (pending,) in connection.execute(
            "SELECT pending FROM leases WHERE subscription = ?", (config.name,)))
        (rows,) = connection.execute("SELECT COUNT(*) FROM deliveries WHERE subscription = ?",
                                     (config.name,)).fetchone()
        connection.execute("UPDATE subscriptions SET cursor = ?, size = ? WHERE name = ?",
                           (cursor, head - cursor + in_ranges + rows, config.name))

    def _check_topic_unchanged(self, config: SubscriptionConfig) -> None:
        row = self._db.execute("SELECT topic FROM subscriptions WHERE name = ?", (config.name,)).fetchone()
        if row and row[0] != config.topic:
            raise BrokerError(
                f"subscription '{config.name}' in {self.path} consumes topic '{row[0]}', but the flow now says "
                f"'{config.topic}'; rename the subscriber or run 'flowrun dlq' / delete the database to start over"
            )

    @property
    def _db(self) -> sqlite3.Connection:
        if self.connection is None:
            raise BrokerError("the SQLite broker is not open")
        return self.connection

    def transaction(self) -> _Transaction:
        return _Transaction(self._db, self._keep_staged, self.staged.clear)

    def _keep_staged(self) -> None:
        """Keep the runs of the committed transaction in `recent`, dropping the oldest beyond its bounds."""
        for topic, first, run, size in self.staged:
            self.recent.setdefault(topic, deque()).append((first, run))
            self.recent_runs.append((topic, len(run), size))
            self.recent_messages += len(run)
            self.recent_bytes += size
        self.staged.clear()

        while self.recent_messages > RECENT_MESSAGES or self.recent_bytes > RECENT_BYTES:
            topic, messages, size = self.recent_runs.popleft()
            self.recent[topic].popleft()
            self.recent_messages -= messages
            self.recent_bytes -= size


    # Publishing

    def publish(self, envelopes: Sequence[Envelope], bounded: bool = True) -> int:
        """Store envelopes in order; return how many were stored (or skipped as repeats).

        Stops at the first envelope that would overfill a subscription, and the caller
        publishes the rest once there is room. A full subscription whose topic rejects on
        full raises only for the first envelope, so the envelopes before it are stored.
        Ids already seen within the dedup window are skipped.
        """
        repeats = self._repeats(envelopes)
        # Messages each topic's subscriptions still take in this call.
        room: dict[str, int] = {}
        batch = _PublishBatch(self.clock.wall(), self._head)
        by_topic = self.by_topic
        stored = 0

        for topic, run in _topic_runs(envelopes, repeats):
            holders = by_topic.get(topic)
            fits = len(run)
            if holders and bounded:
                left = room.get(topic)
                if left is None:
                    left = self._room(holders)
                if left <= 0 and stored == 0:
                    self._reject_if_full(topic, holders)
                fits = max(min(left, fits), 0)
                room[topic] = left - fits
            batch.add(topic, run[:fits], holders)
            stored += fits
            if fits < len(run):
                self._write_batch(batch)
                return stored + repeats.skipped_before(stored)

        self._write_batch(batch)
        return len(envelopes)

    def _repeats(self, envelopes: Sequence[Envelope]) -> _Repeats:
        """Find the envelopes whose ids were published within the dedup window, or earlier in this call."""
        ids = [envelope.id for envelope in envelopes if envelope.dedupe]
        if not ids:
            return _Repeats(set())
        seen = self._seen_ids(ids)
        positions: set[int] = set()
        for position, envelope in enumerate(envelopes):
            if not envelope.dedupe:
                continue
            if envelope.id in seen:
                logger.debug("skipped message %s: its id was already published", envelope.id)
                positions.add(position)
            seen.add(envelope.id)
        return _Repeats(positions)

    def _seen_ids(self, ids: list[str]) -> set[str]:
        seen: set[str] = set()
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            seen.update(row[0] for row in self._db.execute(f"SELECT id FROM seen_ids WHERE id IN ({marks})", chunk))
        return seen

    def _head(self, topic: str) -> int:
        """Return the seq of the topic's last stored message (the seq before its range if none)."""
        (head,) = self._db.execute("SELECT head FROM topics WHERE name = ?", (topic,)).fetchone()
        return int(head)

    def _room(self, holders: list[SubscriptionConfig]) -> int:
        """Return how many more messages every one of these subscriptions takes before max_pending."""
        return min(config.max_pending - self._size(config.name) for config in holders)

    def _size(self, subscription: str) -> int:
        (size,) = self._db.execute("SELECT size FROM subscriptions WHERE name = ?", (subscription,)).fetchone()
        return int(size)

    def _reject_if_full(self, topic: str, holders: list[SubscriptionConfig]) -> None:
        """Raise QueueFullError when the first full subscription of the topic rejects on full."""
        for config in holders:
            if config.max_pending - self._size(config.name) > 0:
                continue
            if config.on_full is OnFull.REJECT:
                raise QueueFullError(
                    f"subscription '{config.name}' of topic '{topic}' has {config.max_pending} unsettled messages, "
                    "its max_pending; retry later or raise max_pending"
                )
            return

    def _write_batch(self, batch: _PublishBatch) -> None:
        connection = self._db
        if batch.seen_rows:
            connection.executemany("INSERT INTO seen_ids VALUES (?, ?)", batch.seen_rows)
        if batch.published:
            connection.executemany("UPDATE topics SET published = published + ?, head = COALESCE(?, head) "
                                   "WHERE name = ?",
                                   [(count, batch.last.get(topic), topic) for topic, count in batch.published.items()])
        if batch.message_values:
            self._insert_messages(batch.message_values)
            self._count_arrivals(batch)
            self.staged += [(topic, batch.first[topic], stored, batch.stored_bytes[topic])
                            for topic, stored in batch.stored.items()]

        self.publishes_since_purge += len(batch.seen_rows)
        if self.publishes_since_purge >= SEEN_ID_PURGE_EVERY:
            self.publishes_since_purge = 0
            cutoff = self.clock.wall() - self.dedup_window
            connection.execute("DELETE FROM seen_ids WHERE published_at < ?", (cutoff,))

    def _insert_messages(self, values: list[Any]) -> None:
        """Insert messages with statements of many rows each.

        The sqlite3 module releases and takes back the GIL around every statement step,
        and executemany steps once per row. With the event loop busy, each of those GIL
        hand-overs costs more than inserting the row, so rows go in chunks of up to
        MESSAGE_CHUNK, split into powers of two so that few statement texts are compiled.
        """
        connection = self._db
        start = 0
        while start < len(values):
            rows = min((len(values) - start) // MESSAGE_COLUMNS, MESSAGE_CHUNK)
            rows = 1 << (rows.bit_length() - 1)
            end = start + rows * MESSAGE_COLUMNS
            connection.execute(_insert_messages_sql(rows), values[start:end])
            start = end

    def _count_arrivals(self, batch: _PublishBatch) -> None:
        """Grow every subscription of the batch's topics; ordered ones take the messages as delivery rows."""
        connection = self._db
        for topic, first in batch.first.items():
            last = batch.last[topic]
            for config in self.by_topic[topic]:
                connection.execute("UPDATE subscriptions SET size = size + ? WHERE name = ?",
                                   (last - first + 1, config.name))
                self.arrivals.add(config.name)
                if config.ordered:
                    connection.execute(
                        "INSERT INTO deliveries (subscription, seq, key, visible_at) SELECT ?, seq, key, ? "
                        "FROM messages WHERE seq BETWEEN ? AND ?", (config.name, batch.now, first, last),
                    )
                    connection.execute("UPDATE subscriptions SET cursor = ? WHERE name = ?", (last, config.name))

    def _insert_for(self, envelope: Envelope, config: SubscriptionConfig) -> None:
        """Store a message for one subscription alone, as a delivery row with a seq below TOPIC_BASE."""
        connection = self._db
        (seq,) = connection.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE seq <= ?",
                                    (TOPIC_BASE,)).fetchone()
        connection.execute(
            "INSERT INTO messages (seq, id, topic, body, key, headers, published_at, holders) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            (seq, envelope.id, envelope.topic, envelope.body, envelope.key, _headers_text(envelope.headers),
             envelope.published_at),
        )
        connection.execute("INSERT INTO deliveries (subscription, seq, key, visible_at) VALUES (?, ?, ?, ?)",
                           (config.name, seq, envelope.key, self.clock.wall()))
        connection.execute("UPDATE subscriptions SET size = size + 1 WHERE name = ?", (config.name,))
        self.arrivals.add(config.name)

    # Fetching

    def fetch(self, subscription: str, max_messages: int) -> tuple[list[Delivery], float | None, list[_Tag]]:
        """Lease up to `max_messages` deliveries: ready delivery rows first, then the topic's range.

        Also returns when the next delayed row is due and which leases expired on the way.
        """
        config = self.configs[subscription]
        now = self.clock.wall()
        expired = self._expire_leases(config, now)

        rows = self._ready_rows(config, now, max_messages)
        deliveries = self._lease_rows(config, rows, now)
        self._write_leases(config, deliveries, now)
        if len(deliveries) < max_messages and not config.ordered:
            deliveries += self._take_range(config, max_messages - len(deliveries), now)
        if deliveries:
            self._db.execute(
                "UPDATE subscriptions SET delivered = delivered + ?, redelivered = redelivered + ? WHERE name = ?",
                (len(deliveries), sum(1 for row in rows if row[1]), subscription),
            )

        next_due = self._db.execute(
            "SELECT MIN(visible_at) FROM deliveries WHERE subscription = ? AND leased = 0 AND visible_at > ?",
            (subscription, now),
        ).fetchone()[0]
        return deliveries, next_due, expired

    def _take_range(self, config: SubscriptionConfig, limit: int, now: float) -> list[Delivery]:
        """Lease the next messages of the topic's range after the subscription's cursor, as one lease row."""
        connection = self._db
        name = config.name
        topic = config.topic
        (cursor,) = connection.execute("SELECT cursor FROM subscriptions WHERE name = ?", (name,)).fetchone()
        # A topic's messages are deleted oldest first, so from the first one after the
        # cursor they are stored without a gap up to the head.
        first, head = connection.execute(
            "SELECT MIN(seq), (SELECT head FROM topics WHERE name = ?) FROM messages WHERE seq > ? AND seq < ?",
            (topic, cursor, self.bases[topic] + TOPIC_BASE),
        ).fetchone()
        if first is None:
            return []

        last = min(first + limit - 1, head)
        self.leases += 1
        lease = self.leases
        deliveries = self._recent_deliveries(config, first, last, lease, now)
        if deliveries is None:
            deliveries = self._read_deliveries(config, first, last, lease, now)

        # Messages deleted past the cursor left the subscription's size; see _place_cursor.
        skipped = first - cursor - 1
        if skipped:
            logger.warning("subscription '%s' skipped %d messages of topic '%s' that a process running a flow "
                           "without this subscription deleted", name, skipped, topic)
        if config.ack is AckPolicy.NONE:
            # At-most-once: the messages leave the queue as they are delivered.
            connection.execute("UPDATE subscriptions SET cursor = ?, size = size - ? WHERE name = ?",
                               (last, skipped + len(deliveries), name))
            self.unsettled.update((name, delivery.tag) for delivery in deliveries)
            self.trimmable.add(topic)
            return deliveries

        connection.execute("UPDATE subscriptions SET cursor = ?, size = size - ? WHERE name = ?", (last, skipped, name))
        connection.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (name, lease, first, last, _mask_bytes((1 << (last - first + 1)) - 1), first,
                            now + config.ack_timeout, now))
        return deliveries

    def _recent_deliveries(self, config: SubscriptionConfig, first: int, last: int, lease: int,
                           now: float) -> list[Delivery] | None:
        """Deliveries of seqs `first` to `last` from `recent`, or None if one of them is not there."""
        envelopes: list[Envelope] = []
        seq = first
        for start, run in self.recent.get(config.topic, ()):
            if start + len(run) <= seq:
                continue
            if start > seq:
                return None
            envelopes += run[seq - start:last + 1 - start]
            seq = first + len(envelopes)
            if seq > last:
                break
        if seq <= last:
            return None
        name = config.name
        return [Delivery(envelope, name, 1, (number, lease), now)
                for number, envelope in enumerate(envelopes, first)]

    def _read_deliveries(self, config: SubscriptionConfig, first: int, last: int, lease: int,
                         now: float) -> list[Delivery]:
        """Deliveries of seqs `first` to `last`, read from the database."""
        name = config.name
        topic = config.topic
        rows = self._db.execute("SELECT seq, id, body, key, headers, published_at FROM messages "
                                "WHERE seq BETWEEN ? AND ?", (first, last)).fetchall()
        if len(rows) != last - first + 1:
            raise BrokerError(f"messages {first} to {last} of topic '{topic}' in {self.path} have gaps; the "
                              "database was changed by something other than flowrun")
        return [
            Delivery(Envelope(message_id, topic, body, key, orjson.loads(headers) if headers != "{}" else {},
                              published_at), name, 1, (seq, lease), now)
            for seq, message_id, body, key, headers, published_at in rows
        ]

    def _ready_rows(self, config: SubscriptionConfig, now: float, limit: int) -> list[tuple[Any, ...]]:
        # A delivery's topic is its subscription's topic, so the query does not read it.
        query = (
            "SELECT d.seq, d.delivery_count, d.first_delivered_at, m.id, m.body, m.key, m.headers, "
            "m.published_at FROM deliveries d JOIN messages m ON m.seq = d.seq "
            "WHERE d.subscription = ? AND d.leased = 0 AND d.visible_at <= ? "
        )
        if config.ordered:
            # A key's next message waits while an earlier one of the same key is unsettled.
            query += (
                "AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.subscription = d.subscription "
                "AND e.key = d.key AND e.seq < d.seq)) "
            )
        query += "ORDER BY d.seq LIMIT ?"
        return self._db.execute(query, (config.name, now, limit)).fetchall()

    def _lease_rows(self, config: SubscriptionConfig, rows: list[tuple[Any, ...]], now: float) -> list[Delivery]:
        """Build the deliveries of one fetch, which share one new lease number."""
        if not rows:
            return []
        self.leases += 1
        lease = self.leases
        name = config.name
        topic = config.topic
        return [
            Delivery(Envelope(message_id, topic, body, key, orjson.loads(headers) if headers != "{}" else {},
                              published_at),
                     name, count + 1, _Tag(seq, lease), first_delivered_at or now)
            for seq, count, first_delivered_at, message_id, body, key, headers, published_at in rows
        ]

    def _write_leases(self, config: SubscriptionConfig, deliveries: list[Delivery], now: float) -> None:
        if not deliveries:
            return
        if config.ack is AckPolicy.NONE:
            # At-most-once: the messages leave the queue as they are delivered.
            self._remove_many(config.name, [delivery.tag.seq for delivery in deliveries])
            self.unsettled.update((config.name, delivery.tag) for delivery in deliveries)
            return

        lease = deliveries[0].tag.lease
        values = [lease, now + config.ack_timeout, now, config.name]
        if config.ordered:
            self._lease_listed(values, [delivery.tag.seq for delivery in deliveries])
            return
        # The fetched rows are the first ready rows by seq, so the ready rows between the
        # first and the last fetched seq are exactly them. The unary plus keeps SQLite on the
        # primary key instead of scanning every ready row in deliveries_ready.
        cursor = self._db.execute(
            LEASE_UPDATE + "WHERE subscription = ? AND seq BETWEEN ? AND ? AND +leased = 0 AND +visible_at <= ?",
            [*values, deliveries[0].tag.seq, deliveries[-1].tag.seq, now],
        )
        if cursor.rowcount != len(deliveries):
            raise BrokerError(f"lease update failed: it matched {cursor.rowcount} rows of subscription "
                              f"'{config.name}' for {len(deliveries)} fetched messages, so the fetch was rolled back")

    def _lease_listed(self, values: list[Any], seqs: list[int]) -> None:
        """Lease the rows of these seqs: the ready rows between them may be waiting for their key."""
        for start in range(0, len(seqs), SQL_CHUNK):
            chunk = seqs[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._db.execute(LEASE_UPDATE + f"WHERE subscription = ? AND seq IN ({marks})", [*values, *chunk])

    def _expire_leases(self, config: SubscriptionConfig, now: float) -> list[_Tag]:
        """Return expired leases of this subscription to the queue (or give them up)."""
        self._expire_ranges(config.name, now)
        rows = self._db.execute(
            "SELECT d.seq, d.lease, m.id FROM deliveries d JOIN messages m ON m.seq = d.seq "
            "WHERE d.subscription = ? AND d.leased = 1 AND d.visible_at <= ?",
            (config.name, now),
        ).fetchall()
        expired = []
        for seq, lease, message_id in rows:
            tag = _Tag(seq, lease)
            error = ErrorInfo.timeout(config.ack_timeout)
            logger.warning("message %s of subscription '%s' was not acked within %gs; delivering it again",
                           message_id, config.name, config.ack_timeout)
            self._settle_failure(config, tag, None, error, terminal=False)
            expired.append(tag)
        return expired

    def expire(self, subscription: str, tags: Sequence[_Tag]) -> list[_Tag]:
        """Expire the given leases if they are still held and past their deadline."""
        config = self.configs[subscription]
        now = self.clock.wall()
        self._expire_ranges(subscription, now)
        expired = []
        for tag in map(_Tag._make, tags):
            row = self._db.execute(
                "SELECT d.visible_at, m.id FROM deliveries d JOIN messages m ON m.seq = d.seq "
                "WHERE d.subscription = ? AND d.seq = ? AND d.leased = 1 AND d.lease = ?",
                (subscription, tag.seq, tag.lease),
            ).fetchone()
            if row is None or row[0] > now:
                continue
            logger.warning("message %s of subscription '%s' was not acked within %gs; delivering it again",
                           row[1], subscription, config.ack_timeout)
            self._settle_failure(config, tag, None, ErrorInfo.timeout(config.ack_timeout), terminal=False)
            expired.append(tag)
        return expired

    def _expire_ranges(self, subscription: str, now: float) -> None:
        """Turn range leases past their deadline into leased delivery rows, which then expire as rows do."""
        connection = self._db
        for lease, first, pending, fetched_at, deadline in connection.execute(
            "SELECT lease, first_seq, pending, fetched_at, deadline FROM leases WHERE subscription = ? "
            "AND deadline <= ?", (subscription, now),
        ).fetchall():
            expired = [_RangeDelivery(seq, lease, fetched_at) for seq in _pending_seqs(first, pending)]
            self._rows_from_range(subscription, expired, deadline)
            connection.execute("DELETE FROM leases WHERE subscription = ? AND lease = ?", (subscription, lease))

    def _take_from_ranges(self, subscription: str, tags: Sequence[_Tag],
                          collect: bool = True) -> tuple[int, list[_RangeDelivery], list[_Tag]]:
        """Remove these deliveries from their range leases.

        Returns how many of them the range leases still had pending, and those deliveries
        when `collect` is set. Also returns the tags of other leases: row leases, or range
        leases that expired and became rows.
        """
        connection = self._db
        by_lease: dict[int, list[int]] = {}
        for seq, lease in tags:
            by_lease.setdefault(lease, []).append(seq)

        count = 0
        taken_out: list[_RangeDelivery] = []
        others: list[_Tag] = []
        for lease, seqs in by_lease.items():
            row = connection.execute("SELECT first_seq, pending, fetched_at FROM leases WHERE subscription = ? "
                                     "AND lease = ?", (subscription, lease)).fetchone()
            if row is None:
                others += [_Tag(seq, lease) for seq in seqs]
                continue
            first, pending, fetched_at = row
            mask = int.from_bytes(pending, "little")
            cleared = 0
            for seq in seqs:
                cleared |= 1 << (seq - first)
            cleared &= mask
            if not cleared:
                continue

            count += cleared.bit_count()
            if collect:
                taken_out += [_RangeDelivery(seq, lease, fetched_at)
                              for seq in _pending_seqs(first, _mask_bytes(cleared))]
            mask ^= cleared
            if mask:
                connection.execute("UPDATE leases SET pending = ?, low = ? WHERE subscription = ? AND lease = ?",
                                   (_mask_bytes(mask), first + (mask & -mask).bit_length() - 1, subscription, lease))
            else:
                connection.execute("DELETE FROM leases WHERE subscription = ? AND lease = ?", (subscription, lease))
        return count, taken_out, others

    def _rows_from_range(self, subscription: str, taken_out: Sequence[_RangeDelivery], visible_at: float) -> None:
        """Give deliveries taken out of range leases leased rows, so they record retries like any row."""
        self._db.executemany(
            "INSERT INTO deliveries (subscription, seq, key, leased, lease, visible_at, delivery_count, "
            "first_delivered_at) SELECT ?, seq, key, 1, ?, ?, 1, ? FROM messages WHERE seq = ?",
            [(subscription, lease, visible_at, fetched_at, seq) for seq, lease, fetched_at in taken_out],
        )

    # Settling

    def ack(self, subscription: str, tags: Sequence[_Tag]) -> int:
        config = self.configs[subscription]
        acked = 0
        if config.ack is AckPolicy.NONE:
            for tag in tags:
                if (subscription, tag) in self.unsettled:
                    self.unsettled.discard((subscription, tag))
                    acked += 1
        in_ranges = 0
        if config.ack is not AckPolicy.NONE:
            in_ranges, _, others = self._take_from_ranges(subscription, tags, collect=False)
            if in_ranges:
                self.trimmable.add(config.topic)
            seqs = self._delete_leased(subscription, others) if others else []
            self._release_messages(subscription, seqs)
            acked += in_ranges + len(seqs)
        if acked:
            self._db.execute("UPDATE subscriptions SET acked = acked + ?, size = size - ? WHERE name = ?",
                             (acked, in_ranges, subscription))
        return acked

    def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        config = self.configs[subscription]
        for nack in nacks:
            tag = _Tag._make(nack.tag)
            if config.ack is AckPolicy.NONE:
                if (subscription, tag) not in self.unsettled:
                    continue
                self.unsettled.discard((subscription, tag))
                self._count(subscription, "dropped")
                logger.warning("dropped message seq %d of subscription '%s' (ack: none): %s", tag.seq,
                               subscription, (nack.error or NO_ERROR).message)
                continue
            if self._claim(subscription, tag):
                self._settle_failure(config, tag, nack.delay, nack.error, nack.terminal, nack.dead_letter)

    def _claim(self, subscription: str, tag: _Tag) -> bool:
        """Return whether the tag's lease still has its delivery, which is then a leased row.

        A delivery taken out of a range lease becomes a row, which records its retries.
        """
        _, taken_out, others = self._take_from_ranges(subscription, [tag])
        if taken_out:
            self._rows_from_range(subscription, taken_out, self.clock.wall())
            return True
        if not others:
            return False
        row = self._db.execute(
            "SELECT 1 FROM deliveries WHERE subscription = ? AND seq = ? AND leased = 1 AND lease = ?",
            (subscription, tag.seq, tag.lease),
        ).fetchone()
        return row is not None

    def _settle_failure(
        self, config: SubscriptionConfig, tag: _Tag, delay: float | None, error: ErrorInfo | None, terminal: bool,
        dead_letter: bool = True,
    ) -> None:
        (count,) = self._db.execute(
            "SELECT delivery_count FROM deliveries WHERE subscription = ? AND seq = ?", (config.name, tag.seq)
        ).fetchone()
        error_text = json.dumps(asdict(error)) if error else None

        if terminal or count >= config.max_deliveries:
            self._give_up(config, tag.seq, count, error, dead_letter)
            return

        wait = config.backoff(count) if delay is None else max(delay, 0.0)
        self._db.execute(
            "UPDATE deliveries SET leased = 0, visible_at = ?, last_error = ? WHERE subscription = ? AND seq = ?",
            (self.clock.wall() + wait, error_text, config.name, tag.seq),
        )

    def _give_up(
        self, config: SubscriptionConfig, seq: int, count: int, error: ErrorInfo | None, dead_letter: bool
    ) -> None:
        row = self._db.execute(
            "SELECT m.id, m.topic, m.body, m.key, m.headers, m.published_at, d.first_delivered_at "
            "FROM deliveries d JOIN messages m ON m.seq = d.seq WHERE d.subscription = ? AND d.seq = ?",
            (config.name, seq),
        ).fetchone()
        message_id, topic, body, key, headers, published_at, first_delivered_at = row
        envelope = Envelope(message_id, topic, body, key, _headers_of(headers), published_at)
        self._remove(config.name, seq)

        if config.dead_letter is None or not dead_letter:
            self._count(config.name, "dropped")
            logger.warning("dropped message %s of subscription '%s' at delivery %d: %s", message_id,
                           config.name, count, (error or NO_ERROR).message)
            return

        delivery = Delivery(envelope, config.name, count, None, first_delivered_at)
        now = self.clock.wall()
        letter_headers = dead_letter_headers(delivery, config, error, now)
        letter = Envelope(new_id(), config.dead_letter, body, key, letter_headers, now)
        self._count(config.name, "dead_lettered")
        self._db.execute(
            "INSERT INTO dead_letters (subscription, topic, message_id, body, key, headers, dead_lettered_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (config.name, topic, message_id, body, key, json.dumps(letter_headers), now),
        )
        logger.error("dead-lettered message %s of subscription '%s' to '%s' at delivery %d: %s", message_id,
                     config.name, config.dead_letter, count, letter_headers["flowrun.error"])
        # Dead letters skip max_pending: blocking here would stall the subscription that failed.
        self.publish([letter], bounded=False)

    def _remove(self, subscription: str, seq: int) -> None:
        self._remove_many(subscription, [seq])

    def _remove_many(self, subscription: str, seqs: list[int]) -> None:
        for start in range(0, len(seqs), SQL_CHUNK):
            chunk = seqs[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"DELETE FROM deliveries WHERE subscription = ? AND seq IN ({marks})", [subscription, *chunk])
        self._release_messages(subscription, seqs)

    def _delete_leased(self, subscription: str, tags: Sequence[_Tag]) -> list[int]:
        """Delete the rows these leases still hold; return their seqs (stale leases delete nothing)."""
        # Tags of one fetch share a lease number, so an ack of a batch is one statement per
        # lease and chunk: primary-key lookups by seq, each row's lease checked as it goes.
        by_lease: dict[int, list[int]] = {}
        for seq, lease in tags:
            by_lease.setdefault(lease, []).append(seq)
        seqs: list[int] = []
        for lease, leased_seqs in by_lease.items():
            for start in range(0, len(leased_seqs), SQL_CHUNK):
                seqs += self._delete_chunk(subscription, lease, leased_seqs[start:start + SQL_CHUNK])
        return seqs

    def _delete_chunk(self, subscription: str, lease: int, chunk: list[int]) -> list[int]:
        marks = ",".join("?" * len(chunk))
        still_leased = f"subscription = ? AND seq IN ({marks}) AND leased = 1 AND lease = ?"
        if HAS_RETURNING:
            return [row[0] for row in self._db.execute(f"DELETE FROM deliveries WHERE {still_leased} RETURNING seq",
                                                       [subscription, *chunk, lease])]

        seqs = [row[0] for row in self._db.execute(f"SELECT seq FROM deliveries WHERE {still_leased}",
                                                   [subscription, *chunk, lease])]
        if seqs:
            marks = ",".join("?" * len(seqs))
            self._db.execute(f"DELETE FROM deliveries WHERE subscription = ? AND seq IN ({marks})", [subscription, *seqs])
        return seqs

    def _release_messages(self, subscription: str, seqs: list[int]) -> None:
        """Shrink the subscription after deleting its delivery rows, and drop messages no subscription still needs."""
        if not seqs:
            return
        connection = self._db
        connection.execute("UPDATE subscriptions SET size = size - ? WHERE name = ?", (len(seqs), subscription))
        single = [seq for seq in seqs if seq <= TOPIC_BASE]
        if len(single) < len(seqs):
            self.trimmable.add(self.configs[subscription].topic)
        self.removed_since_vacuum += len(single)
        for start in range(0, len(single), SQL_CHUNK):
            chunk = single[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            # Deleting the last holder's messages first spares them an update.
            connection.execute(f"DELETE FROM messages WHERE seq IN ({marks}) AND holders <= 1", chunk)
            connection.execute(f"UPDATE messages SET holders = holders - 1 WHERE seq IN ({marks})", chunk)

    def trim(self) -> None:
        """Delete the messages of trimmable topics that every subscription of the topic is past.

        Only the subscriptions this process's flow declares count: a subscription the flow
        dropped does not keep its topic's messages forever.
        """
        connection = self._db
        for topic in self.trimmable:
            base = self.bases[topic]
            low = min(self._lowest_needed(config, base) for config in self.by_topic[topic])
            removed = connection.execute("DELETE FROM messages WHERE seq > ? AND seq < ?", (base, low)).rowcount
            self.removed_since_vacuum += removed
        self.trimmable.clear()

    def _lowest_needed(self, config: SubscriptionConfig, base: int) -> int:
        """Return the lowest seq of the topic's range that the subscription has not settled."""
        cursor, in_ranges, in_rows = self._db.execute(
            "SELECT cursor, (SELECT MIN(low) FROM leases WHERE subscription = ?1), "
            "(SELECT MIN(seq) FROM deliveries WHERE subscription = ?1 AND seq > ?2) FROM subscriptions WHERE name = ?1",
            (config.name, base),
        ).fetchone()
        return min(value for value in (cursor + 1, in_ranges, in_rows) if value is not None)

    def return_free_pages(self, now: bool = False) -> None:
        """Give free pages back to the file system, so the file shrinks after a surge.

        Checks every VACUUM_EVERY removals, VACUUM_INTERVAL seconds after a removal, and
        whenever `now` is set (as the broker opens and closes the file). Runs outside the
        group-commit transaction, which VACUUM cannot run in. `incremental_vacuum` frees
        one page per step, and only `executescript` steps it to the end (`execute` frees a
        single page). `executescript` would commit an open transaction first.
        """
        wall = self.clock.wall()
        removed = self.removed_since_vacuum
        due = removed >= VACUUM_EVERY or (removed and wall - self.last_free_pages_check >= VACUUM_INTERVAL)
        if not (now or due):
            return
        self.removed_since_vacuum = 0
        self.last_free_pages_check = wall
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        if free <= FREE_PAGES_KEPT:
            return
        if self.incremental_vacuum:
            self._db.executescript(f"PRAGMA incremental_vacuum({free - FREE_PAGES_KEPT});")
            return
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        if pages - free <= VACUUM_MAX_PAGES:
            logger.info("compacting %s: %d of its %d pages are free", self.path, free, pages)
            self._db.execute("VACUUM")
            # VACUUM writes the compacted pages to the WAL. The file shrinks only with a
            # checkpoint that copies all of them, which the automatic ones may never finish
            # while the flow keeps writing.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def unlease(self, subscription: str, tags: Sequence[_Tag]) -> None:
        """Undo a fetch whose deliveries reached no handler: the rows are ready again, uncounted.

        Under ack: none the rows are gone already, so those messages count as dropped.
        """
        config = self.configs[subscription]
        if config.ack is AckPolicy.NONE:
            lost = [tag for tag in tags if (subscription, tag) in self.unsettled]
            self.unsettled.difference_update((subscription, tag) for tag in lost)
            if lost:
                self._db.execute("UPDATE subscriptions SET dropped = dropped + ? WHERE name = ?", (len(lost), subscription))
                logger.warning("dropped %d messages of subscription '%s' (ack: none): fetched, but their consumer "
                               "stopped before a handler took them", len(lost), subscription)
            return

        # Deliveries of range leases become ready rows, as if never fetched.
        _, taken_out, others = self._take_from_ranges(subscription, tags)
        now = self.clock.wall()
        self._db.executemany("INSERT INTO deliveries (subscription, seq, key, visible_at) SELECT ?, seq, key, ? "
                             "FROM messages WHERE seq = ?", [(subscription, now, seq) for seq, _, _ in taken_out])

        # Only rows these leases still hold; a lease that expired meanwhile changes nothing.
        rows = [row for tag in others for row in self._db.execute(
            "SELECT seq, delivery_count FROM deliveries WHERE subscription = ? AND seq = ? AND leased = 1 AND lease = ?",
            (subscription, tag.seq, tag.lease))]
        self._db.executemany(
            "UPDATE deliveries SET leased = 0, lease = 0, visible_at = ?, delivery_count = delivery_count - 1, "
            "first_delivered_at = CASE delivery_count WHEN 1 THEN 0 ELSE first_delivered_at END "
            "WHERE subscription = ? AND seq = ?",
            [(now, subscription, seq) for seq, _ in rows],
        )

        redelivered = sum(1 for _, count in rows if count > 1)
        self._db.execute("UPDATE subscriptions SET delivered = delivered - ?, redelivered = redelivered - ? "
                         "WHERE name = ?", (len(taken_out) + len(rows), redelivered, subscription))
        self.arrivals.add(subscription)

    def _count(self, subscription: str, column: str) -> None:
        self._db.execute(f"UPDATE subscriptions SET {column} = {column} + 1 WHERE name = ?", (subscription,))

    # Producers and inspection

    def set_producer(self, name: str, finished: bool) -> None:
        self._db.execute("INSERT INTO producers VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                         "finished = excluded.finished, updated_at = excluded.updated_at",
                         (name, int(finished), self.clock.wall()))

    def producers_finished(self, names: Sequence[str]) -> bool:
        rows = dict(self._db.execute("SELECT name, finished FROM producers").fetchall())
        return all(rows.get(name) == 1 for name in names)

    def changed(self) -> bool:
        """Return whether any connection committed since the last call."""
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        changed = version != self.data_version
        self.data_version = version
        return changed

    def all_settled(self, subscriptions: Sequence[str]) -> bool:
        # `size` counts a subscription's unsettled rows; it changes with every publish and settle.
        marks = ",".join("?" * len(subscriptions))
        query = f"SELECT COUNT(*) FROM subscriptions WHERE name IN ({marks}) AND size > 0"
        return self._db.execute(query, list(subscriptions)).fetchone()[0] == 0

    def stats(self) -> dict[str, Any]:
        """Report counts per topic and per subscription that the flow declares.

        A subscription that the flow no longer declares keeps its row in the file, but
        keeps no messages (trim ignores it), so its backlog would be wrong; it is left out.
        Without a declared flow (`open_for_inspection(None)`) every subscription is reported.
        """
        connection = self._db
        report: dict[str, Any] = {"topics": {}, "subscriptions": {}}
        for name, published in connection.execute("SELECT name, published FROM topics ORDER BY name"):
            report["topics"][name] = {"published": published}

        now = self.clock.wall()
        gauges = self._gauges(now)

        for row in connection.execute(
            "SELECT name, topic, delivered, acked, redelivered, dead_lettered, dropped FROM subscriptions ORDER BY name"
        ):
            name, topic, delivered, acked, redelivered, dead_lettered, dropped = row
            if self.configs and name not in self.configs:
                continue
            gauge = gauges.get(name, {"pending": 0, "in_flight": 0, "delayed": 0, "oldest": None})
            report["subscriptions"][name] = {
                "topic": topic, "delivered": delivered, "acked": acked, "redelivered": redelivered,
                "dead_lettered": dead_lettered, "dropped": dropped, "in_flight": gauge["in_flight"],
                "pending": gauge["pending"], "delayed": gauge["delayed"],
                "oldest_pending_age": None if gauge["oldest"] is None else max(now - gauge["oldest"], 0.0),
            }
        return report

    def _gauges(self, now: float) -> dict[str, dict[str, Any]]:
        """Count each subscription's pending, delayed and in-flight messages, and find its oldest pending one."""
        connection = self._db
        gauges: dict[str, dict[str, Any]] = {}

        def gauge(subscription: str) -> dict[str, Any]:
            return gauges.setdefault(subscription, {"pending": 0, "in_flight": 0, "delayed": 0, "oldest": None})

        def note_oldest(subscription: str, published_at: float | None) -> None:
            oldest = gauge(subscription)["oldest"]
            if published_at is not None and (oldest is None or published_at < oldest):
                gauge(subscription)["oldest"] = published_at

        for subscription, leased, count, oldest, delayed in connection.execute(
            "SELECT d.subscription, d.leased, COUNT(*), MIN(m.published_at), SUM(d.visible_at > ?) "
            "FROM deliveries d JOIN messages m ON m.seq = d.seq GROUP BY d.subscription, d.leased",
            (now,),
        ):
            if leased:
                gauge(subscription)["in_flight"] += count
                continue
            gauge(subscription)["pending"] += count
            gauge(subscription)["delayed"] = delayed or 0
            note_oldest(subscription, oldest)

        for subscription, pending in connection.execute("SELECT subscription, pending FROM leases"):
            gauge(subscription)["in_flight"] += _pending_seqs_count(pending)

        for subscription, backlog, oldest in connection.execute(
            "SELECT s.name, t.head - s.cursor, (SELECT m.published_at FROM messages m WHERE m.seq > s.cursor "
            "AND m.seq <= t.head ORDER BY m.seq LIMIT 1) FROM subscriptions s JOIN topics t ON t.name = s.topic "
            "WHERE s.cursor < t.head"
        ):
            gauge(subscription)["pending"] += backlog
            note_oldest(subscription, oldest)
        return gauges

    # Dead letters

    def dead_letters(self, subscription: str | None) -> list[dict[str, Any]]:
        query = "SELECT number, subscription, topic, message_id, body, key, headers, dead_lettered_at FROM dead_letters"
        parameters: tuple[Any, ...] = ()
        if subscription:
            query += " WHERE subscription = ?"
            parameters = (subscription,)
        letters = []
        for number, sub, topic, message_id, body, key, headers, at in self._db.execute(query + " ORDER BY number", parameters):
            letters.append({"number": number, "subscription": sub, "topic": topic, "message_id": message_id,
                            "body": body, "key": key, "headers": _headers_of(headers), "dead_lettered_at": at})
        return letters

    def replay_dead_letters(self, subscription: str | None) -> int:
        """Put dead letters back on their original subscription as new first deliveries."""
        letters = self.dead_letters(subscription)
        for letter in letters:
            config = self.configs.get(letter["subscription"])
            if config is None:
                raise BrokerError(f"dead letter {letter['number']} belongs to subscription '{letter['subscription']}', "
                                  "which the flow no longer declares")
            headers = replay_headers(letter)
            envelope = Envelope(new_id(), letter["topic"], letter["body"], letter["key"], headers,
                                self.clock.wall())
            self._insert_for(envelope, config)
            self._db.execute("DELETE FROM dead_letters WHERE number = ?", (letter["number"],))
        return len(letters)

    def purge_dead_letters(self, subscription: str | None) -> int:
        if subscription:
            cursor = self._db.execute("DELETE FROM dead_letters WHERE subscription = ?", (subscription,))
        else:
            cursor = self._db.execute("DELETE FROM dead_letters")
        return cursor.rowcount



class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error; nested uses join the outer one.

    The outer one calls `committed` after its COMMIT and `rolled_back` after a rollback.
    """

    def __init__(self, connection: sqlite3.Connection, committed: Callable[[], None],
                 rolled_back: Callable[[], None]) -> None:
        self.connection = connection
        self.committed = committed
        self.rolled_back = rolled_back
        self.outer = False

    def __enter__(self) -> _Transaction:
        self.outer = not self.connection.in_transaction
        if self.outer:
            self.connection.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if not self.outer:
            return
        if kind is not None:
            self._roll_back()
            return
        try:
            self.connection.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed may leave the transaction open (SQLITE_BUSY does).
            self._roll_back()
            raise
        self.committed()

    def _roll_back(self) -> None:
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")
        self.rolled_back()


@functools.cache
def _insert_messages_sql(rows: int) -> str:
    return ("INSERT INTO messages (seq, id, topic, body, key, headers, published_at, holders) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?, ?, 0)"] * rows))


def _mask_bytes(mask: int) -> bytes:
    return mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def _pending_seqs(first: int, pending: bytes) -> list[int]:
    mask = int.from_bytes(pending, "little")
    return [first + index for index in range(mask.bit_length()) if mask >> index & 1]


def _pending_seqs_count(pending: bytes) -> int:
    return int.from_bytes(pending, "little").bit_count()


def _headers_text(headers: dict[str, str]) -> str:
    return orjson.dumps(headers).decode() if headers else "{}"


def _headers_of(text: str) -> dict[str, str]:
    return orjson.loads(text) if text != "{}" else {}


def _config_json(config: SubscriptionConfig) -> dict[str, Any]:
    data = asdict(config)
    data["ack"] = config.ack.value
    data["on_full"] = config.on_full.value
    data["retry"] = config.retry.model_dump()
    return data
