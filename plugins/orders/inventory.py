"""Inventory and Restock: keep stock per product code in SQLite as orders and cancellations arrive.

Options shared by both (the flow's `with:`):

- `database`: SQLite file, relative to the flow file (default `.flowrun/inventory.db`).
- `initial_stock`: units a code starts with the first time it is seen (default 2000).

Inventory also reads `reserved_topic` and `out_of_stock_topic` (default StockReserved and
OutOfStock). It publishes {"invoice", "lines", "units"} when every product line was
reserved, or {"invoice", "short": [{"stock_code", "requested", "available"}]} when any
line lacked stock, in which case nothing was reserved.

Non-product codes (postage, fees and vouchers, listed in stock.py) and non-positive
quantities are not reserved.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowrun_plugins.orders.errors import InvalidOptionError, InvalidPayloadError
from flowrun_plugins.orders.stock import invoice_and_lines, reservation_demand, restock_supply
from flowrun_plugins.orders.stock_store import StockStore

if TYPE_CHECKING:
    from flowrun import Context, Message

logger = logging.getLogger(__name__)

# Inventory and Restock write the same file from different subscriptions.
BUSY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class StockOptions:
    """Validated `database` and `initial_stock` options."""

    database: Path
    initial_stock: int

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], resolve: Callable[[str], Path]
    ) -> StockOptions:
        """Validate the options, or raise InvalidOptionError naming the option and its value."""
        initial_stock = options.get("initial_stock", 2000)
        if (
            isinstance(initial_stock, bool)
            or not isinstance(initial_stock, int)
            or initial_stock < 0
        ):
            raise InvalidOptionError(
                f"invalid initial_stock {initial_stock!r}: expected a whole number, 0 or more"
            )

        database = options.get("database", ".flowrun/inventory.db")
        if not isinstance(database, str) or not database:
            raise InvalidOptionError(f"invalid database {database!r}: expected a file path")
        return cls(resolve(database), initial_stock)

    def open_store(self) -> StockStore:
        return StockStore(self.database, self.initial_stock, BUSY_TIMEOUT_SECONDS)


class Inventory:
    """Sync handler for OrderPlaced (pull, explicit ack) that reserves stock for each order.

    The outcome is published before the message is acked, so a crash in between leads to
    a redelivery that publishes the recorded outcome again, with the same message id.
    """

    def __init__(self) -> None:
        self._store: StockStore | None = None
        self._reserved_topic = "StockReserved"
        self._out_of_stock_topic = "OutOfStock"
        self._outcomes: Counter[str] = Counter()

    def setup(self, context: Context) -> None:
        """Open the stock database and read the topic options."""
        options = context.options
        self._reserved_topic = str(options.get("reserved_topic", self._reserved_topic))
        self._out_of_stock_topic = str(options.get("out_of_stock_topic", self._out_of_stock_topic))
        self._store = StockOptions.from_options(options, context.resolve_path).open_store()
        logger.info("inventory stock database: %s", self._store.path)

    def handle(self, message: Message, context: Context) -> None:
        """Reserve one order's stock, publish StockReserved or OutOfStock, then ack."""
        store = _require_store(self._store)
        try:
            invoice, lines = invoice_and_lines(message.payload)
            demand = reservation_demand(lines)
        except InvalidPayloadError as error:
            logger.error("rejected message %s: %s", message.id, error)
            message.reject(error)
            return

        reservation = store.reserve(invoice, demand)
        if reservation.repeated:
            logger.info(
                "invoice %s already has a stock outcome (delivery %d); publishing it again",
                invoice,
                message.delivery_count,
            )

        topic = self._reserved_topic if reservation.reserved else self._out_of_stock_topic
        context.publish(topic, reservation.payload, key=invoice, id=f"stock-{invoice}")
        message.ack()
        self._outcomes[topic] += 1

    def close(self) -> None:
        """Close the database and log how many orders were reserved or short."""
        summary = ", ".join(f"{topic} {count}" for topic, count in sorted(self._outcomes.items()))
        logger.info("inventory outcomes: %s", summary or "none")
        if self._store is not None:
            self._store.close()


class Restock:
    """Sync handler for OrderCancelled that puts the cancelled units back, once per invoice."""

    def __init__(self) -> None:
        self._store: StockStore | None = None
        self._restocked = 0

    def setup(self, context: Context) -> None:
        """Open the stock database."""
        self._store = StockOptions.from_options(context.options, context.resolve_path).open_store()

    def handle(self, message: Message, context: Context) -> None:
        """Add the absolute quantities of the cancellation's product lines back to stock."""
        store = _require_store(self._store)
        try:
            invoice, lines = invoice_and_lines(message.payload)
            supply = restock_supply(lines)
        except InvalidPayloadError as error:
            logger.error("rejected message %s: %s", message.id, error)
            message.reject(error)
            return

        if store.restock(invoice, supply):
            self._restocked += 1
        else:
            logger.info("cancellation %s was already restocked; skipped", invoice)

    def close(self) -> None:
        """Close the database and log how many cancellations were restocked."""
        logger.info("restocked %d cancellations", self._restocked)
        if self._store is not None:
            self._store.close()


def _require_store(store: StockStore | None) -> StockStore:
    if store is None:
        raise RuntimeError("handler called before setup opened the stock database")
    return store
