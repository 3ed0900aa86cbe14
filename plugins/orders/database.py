"""SQLite connections shared by the stock and order-status stores."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open `path` in WAL mode, creating its folder, with a busy timeout in seconds.

    The connection is in autocommit mode, so callers group writes with `transaction`. It
    may be used from several threads (sync handlers run in worker threads), but only by
    one at a time, which the caller ensures with a lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    # In WAL mode NORMAL survives a process crash, but a power loss may undo the last commits.
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one write transaction, committed on success and rolled back on any error.

    BEGIN IMMEDIATE takes the write lock up front, so two writers cannot deadlock while
    upgrading read locks. The second writer waits up to the busy timeout instead.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
