"""OrderStatus: record each invoice's latest state in the SQLite table `orders`.

One OrderStatus subscriber runs per topic, and all of them write the same file. What a
message records depends on its topic, through the `states` option, which maps a topic to
one of the StatusEvent values below. The defaults are:

| topic             | event             | columns set                                        |
|-------------------|-------------------|----------------------------------------------------|
| PaymentSucceeded  | payment_succeeded | payment=succeeded, customer_id, total, kind=order  |
| PaymentFailed     | payment_failed    | payment=failed, customer_id, total, kind=order     |
| StockReserved     | stock_reserved    | stock=reserved, kind=order                         |
| OutOfStock        | out_of_stock      | stock=out_of_stock, kind=order                     |
| OrderCancelled    | order_cancelled   | kind=cancellation and the invoice fields           |
| InvoiceAdjusted   | invoice_adjusted  | kind from the payload and the invoice fields       |
| BillingDeadLetter | dead_letter       | payment=dead_letter, error and the invoice fields  |

The invoice fields are customer_id, country, placed_at and total, read from payloads that
carry a whole invoice. The dead-letter topic is named by `dead_letter_topic`. The event
`order_placed` (invoice fields and kind=order) is available for a subscriber on OrderPlaced
but not mapped by default.

Option `database` names the SQLite file, relative to the flow file. Its default,
`.flowrun/order-status.db`, differs from `.flowrun/orders.db`, where the default broker
keeps the messages of a flow named `orders`.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowrun_plugins.orders.errors import InvalidOptionError, InvalidPayloadError
from flowrun_plugins.orders.money import format_amount, invoice_total
from flowrun_plugins.orders.status_store import OrderStatusStore, format_counts

if TYPE_CHECKING:
    from flowrun import Context, Message

logger = logging.getLogger(__name__)

# OrderStatus instances open per database file in this process, so that only the last one
# to close logs the row counts (a flow runs one instance per status topic).
_open_instances: Counter[Path] = Counter()
_open_instances_lock = threading.Lock()

# Several subscriptions write the same file, so a writer may wait for the others.
BUSY_TIMEOUT_SECONDS = 30.0
ERROR_HEADER = "flowrun.error"
ERROR_TYPE_HEADER = "flowrun.error_type"


class StatusEvent(enum.StrEnum):
    """Effect of a message on a mapped topic on its invoice's row."""

    ORDER_PLACED = "order_placed"
    PAYMENT_SUCCEEDED = "payment_succeeded"
    PAYMENT_FAILED = "payment_failed"
    STOCK_RESERVED = "stock_reserved"
    OUT_OF_STOCK = "out_of_stock"
    ORDER_CANCELLED = "order_cancelled"
    INVOICE_ADJUSTED = "invoice_adjusted"
    DEAD_LETTER = "dead_letter"


DEFAULT_STATES = {
    "PaymentSucceeded": StatusEvent.PAYMENT_SUCCEEDED,
    "PaymentFailed": StatusEvent.PAYMENT_FAILED,
    "StockReserved": StatusEvent.STOCK_RESERVED,
    "OutOfStock": StatusEvent.OUT_OF_STOCK,
    "OrderCancelled": StatusEvent.ORDER_CANCELLED,
    "InvoiceAdjusted": StatusEvent.INVOICE_ADJUSTED,
}
DEFAULT_DEAD_LETTER_TOPIC = "BillingDeadLetter"
DEFAULT_DATABASE = ".flowrun/order-status.db"

# Builds the columns an event sets from the message payload and headers.
FieldBuilder = Callable[[Mapping[str, Any], Mapping[str, str]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """The columns one message sets on its invoice's row."""

    invoice: str
    fields: dict[str, Any]


def topic_states(options: Mapping[str, Any]) -> dict[str, StatusEvent]:
    """Return the topic-to-event mapping: the defaults, the dead-letter topic, then `states`.

    Raises InvalidOptionError naming a `states` entry whose event is not a StatusEvent value.
    """
    states = dict(DEFAULT_STATES)
    states[str(options.get("dead_letter_topic", DEFAULT_DEAD_LETTER_TOPIC))] = (
        StatusEvent.DEAD_LETTER
    )

    configured = options.get("states") or {}
    if not isinstance(configured, Mapping):
        raise InvalidOptionError(
            f"invalid states {configured!r}: expected a mapping of topic to event"
        )

    for topic, event in configured.items():
        try:
            states[str(topic)] = StatusEvent(event)
        except ValueError:
            allowed = ", ".join(member.value for member in StatusEvent)
            raise InvalidOptionError(
                f"invalid event {event!r} for topic {topic!r} in states: expected one of {allowed}"
            ) from None
    return states


def status_update(event: StatusEvent, payload: Any, headers: Mapping[str, str]) -> StatusUpdate:
    """Decide which columns a message sets, or raise InvalidPayloadError naming the field."""
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError(
            f"invalid {event} payload: expected an object, found {type(payload).__name__}"
        )

    invoice = payload.get("invoice")
    if not isinstance(invoice, str) or not invoice:
        raise InvalidPayloadError(f"invalid {event} payload: invalid invoice {invoice!r}")

    try:
        fields = _FIELD_BUILDERS[event](payload, headers)
    except InvalidPayloadError as error:
        raise InvalidPayloadError(
            f"invalid {event} payload for invoice {invoice}: {error}"
        ) from None
    return StatusUpdate(invoice, fields)


def _payment_fields(payment: str) -> FieldBuilder:
    def build(payload: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
        return {
            "payment": payment,
            "customer_id": payload.get("customer_id"),
            "total": payload.get("amount"),
            "kind": "order",
        }

    return build


def _stock_fields(stock: str) -> FieldBuilder:
    def build(payload: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
        return {"stock": stock, "kind": "order"}

    return build


def _invoice_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Read the columns of a payload that carries a whole invoice, such as OrderPlaced."""
    lines = payload.get("lines")
    total = format_amount(invoice_total(lines)) if isinstance(lines, list) else None
    return {
        "customer_id": payload.get("customer_id"),
        "country": payload.get("country"),
        "placed_at": payload.get("placed_at"),
        "total": total,
    }


def _order_placed_fields(payload: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    return {**_invoice_fields(payload), "kind": "order"}


def _cancelled_fields(payload: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    return {**_invoice_fields(payload), "kind": str(payload.get("kind") or "cancellation")}


def _adjusted_fields(payload: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    kind = payload.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InvalidPayloadError(f"missing kind, found {kind!r}")
    return {**_invoice_fields(payload), "kind": kind}


def _dead_letter_fields(payload: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    error = headers.get(ERROR_HEADER, "unknown error")
    error_type = headers.get(ERROR_TYPE_HEADER)
    return {
        **_invoice_fields(payload),
        "payment": "dead_letter",
        "kind": "order",
        "error": f"{error_type}: {error}" if error_type else error,
    }


_FIELD_BUILDERS: dict[StatusEvent, FieldBuilder] = {
    StatusEvent.ORDER_PLACED: _order_placed_fields,
    StatusEvent.PAYMENT_SUCCEEDED: _payment_fields("succeeded"),
    StatusEvent.PAYMENT_FAILED: _payment_fields("failed"),
    StatusEvent.STOCK_RESERVED: _stock_fields("reserved"),
    StatusEvent.OUT_OF_STOCK: _stock_fields("out_of_stock"),
    StatusEvent.ORDER_CANCELLED: _cancelled_fields,
    StatusEvent.INVOICE_ADJUSTED: _adjusted_fields,
    StatusEvent.DEAD_LETTER: _dead_letter_fields,
}


class OrderStatus:
    """Sync handler that upserts one row per invoice for every message on a mapped topic."""

    def __init__(self) -> None:
        self._store: OrderStatusStore | None = None
        self._states: dict[str, StatusEvent] = {}
        self._unmapped_topics: set[str] = set()

    def setup(self, context: Context) -> None:
        """Read the `states` mapping and open the orders database."""
        self._states = topic_states(context.options)
        database = context.options.get("database", DEFAULT_DATABASE)
        if not isinstance(database, str) or not database:
            raise InvalidOptionError(f"invalid database {database!r}: expected a file path")
        self._store = OrderStatusStore(context.resolve_path(database), BUSY_TIMEOUT_SECONDS)
        with _open_instances_lock:
            _open_instances[self._store.path] += 1

    def handle(self, message: Message, context: Context) -> None:
        """Record the message's effect on its invoice's row. Unmapped topics are rejected."""
        store = self._require_store()
        event = self._states.get(message.topic)
        if event is None:
            self._reject_unmapped(message)
            return

        try:
            update = status_update(event, message.payload, message.headers)
        except InvalidPayloadError as error:
            logger.error("rejected message %s on %s: %s", message.id, message.topic, error)
            message.reject(error)
            return

        updated_at = datetime.fromtimestamp(context.clock.wall(), UTC).isoformat(
            timespec="milliseconds"
        )
        store.upsert(update.invoice, update.fields, updated_at)

    def close(self) -> None:
        """Close the database. The last instance on a file logs its row counts by state."""
        if self._store is None:
            return

        with _open_instances_lock:
            _open_instances[self._store.path] -= 1
            last = _open_instances[self._store.path] <= 0
            if last:
                del _open_instances[self._store.path]

        if last:
            counts = format_counts(self._store.count_states())
            logger.info("orders table %s: %s", self._store.path, counts)
        self._store.close()
        self._store = None

    def _require_store(self) -> OrderStatusStore:
        if self._store is None:
            raise RuntimeError("OrderStatus.handle called before setup opened the orders database")
        return self._store

    def _reject_unmapped(self, message: Message) -> None:
        error = InvalidOptionError(
            f"topic {message.topic!r} has no entry in the states option; map it to one of "
            f"{', '.join(member.value for member in StatusEvent)}"
        )
        if message.topic not in self._unmapped_topics:
            self._unmapped_topics.add(message.topic)
            logger.error("rejecting messages on %s: %s", message.topic, error)
        message.reject(error)
