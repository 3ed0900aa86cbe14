"""OrderStatusStore: the `orders` table in SQLite, one row per invoice with its latest state."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowrun_plugins.orders.database import connect, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    invoice TEXT PRIMARY KEY,
    customer_id TEXT,
    country TEXT,
    placed_at TEXT,
    total TEXT,
    payment TEXT,
    stock TEXT,
    kind TEXT,
    error TEXT,
    updated_at TEXT NOT NULL
);
"""
# Columns an update may set, besides the key `invoice` and the timestamp `updated_at`.
STATE_COLUMNS = (
    "customer_id",
    "country",
    "placed_at",
    "total",
    "payment",
    "stock",
    "kind",
    "error",
)
# Columns summarised by `count_states`.
COUNTED_COLUMNS = ("kind", "payment", "stock")


class OrderStatusStore:
    """The orders table, which several processes and subscriptions may write at once."""

    def __init__(self, path: Path, busy_timeout: float = 30.0) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._connection = connect(path, busy_timeout)
        self._connection.executescript(SCHEMA)

    def upsert(self, invoice: str, fields: Mapping[str, Any], updated_at: str) -> bool:
        """Set `fields` on the invoice's row, creating the row if needed.

        Columns not in `fields` keep their value. Repeating an update changes nothing,
        not even `updated_at`, so redelivered messages are harmless. Returns whether the
        row changed. Raises ValueError for a column that the table does not have.
        """
        unknown = sorted(set(fields) - set(STATE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown orders columns {', '.join(unknown)}")

        with self._lock, transaction(self._connection) as database:
            statement = _upsert_statement(list(fields))
            cursor = database.execute(statement, [invoice, *fields.values(), updated_at])
            return cursor.rowcount > 0

    def row(self, invoice: str) -> dict[str, Any] | None:
        """Return the invoice's row as a dict, or None if there is none."""
        with self._lock:
            cursor = self._connection.execute("SELECT * FROM orders WHERE invoice = ?", (invoice,))
            values = cursor.fetchone()
            names = [description[0] for description in cursor.description]
        return None if values is None else dict(zip(names, values, strict=True))

    def count_states(self) -> dict[str, dict[str | None, int]]:
        """Count rows by each value of kind, payment and stock (None for rows not yet set)."""
        counts: dict[str, dict[str | None, int]] = {}
        with self._lock:
            for column in COUNTED_COLUMNS:
                rows = self._connection.execute(
                    f"SELECT {column}, COUNT(*) FROM orders GROUP BY {column} ORDER BY {column}"
                ).fetchall()
                counts[column] = {value: count for value, count in rows}
        return counts

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _upsert_statement(columns: list[str]) -> str:
    """Build the upsert for `columns`, which the caller has checked against STATE_COLUMNS."""
    names = ", ".join(["invoice", *columns, "updated_at"])
    placeholders = ", ".join("?" for _ in range(len(columns) + 2))
    assignments = ", ".join(f"{column} = excluded.{column}" for column in [*columns, "updated_at"])
    statement = (
        f"INSERT INTO orders ({names}) VALUES ({placeholders}) "
        f"ON CONFLICT (invoice) DO UPDATE SET {assignments}"
    )

    # Update only when a value differs, so a repeated message leaves updated_at alone.
    if columns:
        changed = " OR ".join(f"orders.{column} IS NOT excluded.{column}" for column in columns)
        statement += f" WHERE {changed}"
    else:
        statement += " WHERE 0"
    return statement


def format_counts(counts: Mapping[str, Mapping[str | None, int]]) -> str:
    """Render `count_states` output on one line: "kind: order 3, cancellation 1; payment: ..."."""
    parts = []
    for column, values in counts.items():
        rendered = ", ".join(f"{value or 'unset'} {count}" for value, count in values.items())
        parts.append(f"{column}: {rendered or 'none'}")
    return "; ".join(parts)
