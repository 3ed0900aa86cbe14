"""StockStore: available units per stock code in SQLite, with reservations and restocks per invoice.

Tables:

- `stock(stock_code, available)`: a code gets `initial_stock` units the first time it is seen.
- `reservations(invoice, reserved, payload)`: the outcome of each order, so a redelivered
  order gets the same outcome back instead of reserving twice.
- `restocks(invoice, units)`: cancellations already put back, so a redelivery adds nothing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowrun_plugins.orders.database import connect, transaction
from flowrun_plugins.orders.stock import StockMovement

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    stock_code TEXT PRIMARY KEY,
    available INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    invoice TEXT PRIMARY KEY,
    reserved INTEGER NOT NULL,
    payload TEXT NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS restocks (
    invoice TEXT PRIMARY KEY,
    units INTEGER NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """Outcome of reserving one order. `repeated` is True when an earlier delivery recorded it.

    `payload` is the StockReserved payload when `reserved`, else the OutOfStock payload.
    """

    invoice: str
    reserved: bool
    payload: dict[str, Any]
    repeated: bool


class StockStore:
    """Stock levels in one SQLite file, safe to share between threads and processes."""

    def __init__(self, path: Path, initial_stock: int, busy_timeout: float = 30.0) -> None:
        if initial_stock < 0:
            raise ValueError(f"invalid initial_stock {initial_stock}: expected 0 or more units")

        self.path = path
        self.initial_stock = initial_stock
        self._lock = threading.Lock()
        self._connection = connect(path, busy_timeout)
        self._connection.executescript(SCHEMA)

    def reserve(self, invoice: str, demand: StockMovement) -> Reservation:
        """Reserve every unit of `demand` in one transaction, or none of them.

        If `invoice` was already reserved or found short, nothing changes and the recorded
        outcome is returned with `repeated` set.
        """
        with self._lock, transaction(self._connection) as database:
            recorded = database.execute(
                "SELECT reserved, payload FROM reservations WHERE invoice = ?", (invoice,)
            ).fetchone()
            if recorded is not None:
                return Reservation(
                    invoice, bool(recorded[0]), json.loads(recorded[1]), repeated=True
                )

            self._seed(database, demand.units_by_code)
            available = self._available_units(database, demand.units_by_code)
            short = [
                {"stock_code": code, "requested": units, "available": available[code]}
                for code, units in demand.units_by_code.items()
                if units > available[code]
            ]

            if short:
                payload: dict[str, Any] = {"invoice": invoice, "short": short}
            else:
                database.executemany(
                    "UPDATE stock SET available = available - ? WHERE stock_code = ?",
                    [(units, code) for code, units in demand.units_by_code.items()],
                )
                payload = {"invoice": invoice, "lines": demand.lines, "units": demand.units}

            database.execute(
                "INSERT INTO reservations (invoice, reserved, payload) VALUES (?, ?, ?)",
                (invoice, not short, json.dumps(payload)),
            )
            return Reservation(invoice, not short, payload, repeated=False)

    def restock(self, invoice: str, supply: StockMovement) -> bool:
        """Add the units of a cancellation back to stock, or return False if already restocked."""
        with self._lock, transaction(self._connection) as database:
            recorded = database.execute(
                "SELECT 1 FROM restocks WHERE invoice = ?", (invoice,)
            ).fetchone()
            if recorded is not None:
                return False

            self._seed(database, supply.units_by_code)
            database.executemany(
                "UPDATE stock SET available = available + ? WHERE stock_code = ?",
                [(units, code) for code, units in supply.units_by_code.items()],
            )
            database.execute(
                "INSERT INTO restocks (invoice, units) VALUES (?, ?)", (invoice, supply.units)
            )
            return True

    def available(self, stock_code: str) -> int | None:
        """Return the units available for a normalised code, or None if it was never seen."""
        with self._lock:
            row = self._connection.execute(
                "SELECT available FROM stock WHERE stock_code = ?", (stock_code,)
            ).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _seed(self, database: sqlite3.Connection, codes: dict[str, int]) -> None:
        database.executemany(
            "INSERT OR IGNORE INTO stock (stock_code, available) VALUES (?, ?)",
            [(code, self.initial_stock) for code in codes],
        )

    def _available_units(
        self, database: sqlite3.Connection, codes: dict[str, int]
    ) -> dict[str, int]:
        available: dict[str, int] = {}
        for code in codes:
            row = database.execute(
                "SELECT available FROM stock WHERE stock_code = ?", (code,)
            ).fetchone()
            available[code] = int(row[0])
        return available
