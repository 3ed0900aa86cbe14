"""Reference: raw sqlite3 in WAL mode with synchronous=NORMAL, as flowrun's default.

One table of messages and one row of ack offsets per subscriber. The producer thread and
one thread per subscriber each have their own connection.

- `batched`: the producer inserts up to `batch` messages per transaction. A subscriber
  reads up to `batch` messages past its offset and decodes them. One transaction then
  stores its new offset (the ack) and deletes the messages every subscriber has acked.
- `per-message`: one transaction per insert and one per ack.

A threading.Condition wakes waiting subscribers after each commit and bounds each
subscriber's backlog to MAX_PENDING messages. Write transactions take a threading.Lock
first, so writers queue in Python instead of in SQLite's sleeping busy handler.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from pathlib import Path

import orjson

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced_sync, run_threads

SCHEMA = """
CREATE TABLE messages (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE offsets (subscriber INTEGER PRIMARY KEY, acked INTEGER NOT NULL);
"""
WAIT_SECONDS = 0.05


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


class _Log:
    """The shared progress counters: last committed seq and each subscriber's offset."""

    def __init__(self, subscribers: int) -> None:
        self.committed = 0
        self.offsets = [0] * subscribers
        self.changed = threading.Condition()
        self.write_lock = threading.Lock()

    def wait_for_room(self, seq: int) -> None:
        with self.changed:
            while seq - min(self.offsets) > MAX_PENDING:
                self.changed.wait(WAIT_SECONDS)

    def publish(self, seq: int) -> None:
        with self.changed:
            self.committed = seq
            self.changed.notify_all()

    def wait_for_messages(self, offset: int) -> None:
        with self.changed:
            while self.committed <= offset:
                self.changed.wait(WAIT_SECONDS)

    def ack(self, subscriber: int, offset: int) -> int:
        with self.changed:
            self.offsets[subscriber] = offset
            self.changed.notify_all()
            return min(self.offsets)


def _produce(path: Path, spec: RunSpec, log: _Log, recorder: Recorder, batch: int) -> None:
    payloads = Payloads(spec.payload_bytes)
    connection = _connect(path)
    rows: list[tuple[int, bytes]] = []
    for index in paced_sync(spec.messages, spec.rate):
        recorder.published()
        seq = index + 1
        rows.append((seq, orjson.dumps(payloads.make(index))))
        if len(rows) >= batch or seq == spec.messages or spec.rate > 0:
            log.wait_for_room(seq)
            with log.write_lock:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany("INSERT INTO messages VALUES (?, ?)", rows)
                connection.execute("COMMIT")
            log.publish(seq)
            rows = []
    connection.close()


def _consume(path: Path, subscriber: int, spec: RunSpec, log: _Log, recorder: Recorder, batch: int) -> None:
    connection = _connect(path)
    offset = 0
    while offset < spec.messages:
        log.wait_for_messages(offset)
        rows = connection.execute("SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                                  (offset, batch)).fetchall()
        for _, body in rows:
            recorder.handle(orjson.loads(body))
        if not rows:
            continue
        offset = rows[-1][0]
        with log.write_lock:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("UPDATE offsets SET acked = ? WHERE subscriber = ?", (offset, subscriber))
            acked_by_all = log.ack(subscriber, offset)
            connection.execute("DELETE FROM messages WHERE seq <= ?", (acked_by_all,))
            connection.execute("COMMIT")
    connection.close()


def run(spec: RunSpec) -> RunResult:
    batch = 1 if spec.options.get("mode") == "per-message" else int(spec.options.get("batch", 500))
    recorder = Recorder(spec)
    log = _Log(spec.subscribers)
    with tempfile.TemporaryDirectory(prefix="sqlite-bench-") as folder:
        path = Path(folder) / "queue.db"
        connection = _connect(path)
        connection.executescript(SCHEMA)
        connection.executemany("INSERT INTO offsets VALUES (?, 0)", [(index,) for index in range(spec.subscribers)])
        connection.close()

        targets = [(_consume, (path, index, spec, log, recorder, batch)) for index in range(spec.subscribers)]
        targets.append((_produce, (path, spec, log, recorder, batch)))
        run_threads(targets)
    return recorder.result()
