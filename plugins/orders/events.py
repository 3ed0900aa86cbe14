"""Classify invoices and build the event each one becomes: topic, payload, key and id."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowrun.outgoing import Outgoing
from flowrun_plugins.orders.invoices import Invoice


class InvoiceKind(enum.StrEnum):
    """Kind of invoice, set by its InvoiceNo prefix and the sign of its quantities."""

    ORDER = "order"
    CANCELLATION = "cancellation"
    BAD_DEBT = "bad_debt"
    STOCK_WRITE_OFF = "stock_write_off"


@dataclass(frozen=True, slots=True)
class ReplayTopics:
    """Topic names of orders, cancellations and adjustments (bad debt and write-offs)."""

    orders: str = "OrderPlaced"
    cancellations: str = "OrderCancelled"
    adjustments: str = "InvoiceAdjusted"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ReplayTopics:
        """Read `orders_topic`, `cancellations_topic` and `adjustments_topic` options."""
        defaults = cls()
        return cls(
            orders=str(options.get("orders_topic", defaults.orders)),
            cancellations=str(options.get("cancellations_topic", defaults.cancellations)),
            adjustments=str(options.get("adjustments_topic", defaults.adjustments)),
        )

    def topic_for(self, kind: InvoiceKind) -> str:
        if kind is InvoiceKind.ORDER:
            return self.orders
        if kind is InvoiceKind.CANCELLATION:
            return self.cancellations
        return self.adjustments


def classify_invoice(invoice: Invoice) -> InvoiceKind:
    """Return the invoice's kind.

    `C` invoices are cancellations and `A` invoices bad-debt adjustments. A plain invoice
    whose lines all have negative quantities is a stock write-off (damages, losses), and
    anything else is an order.
    """
    prefix = invoice.number[:1].upper()
    if prefix == "C":
        return InvoiceKind.CANCELLATION
    if prefix == "A":
        return InvoiceKind.BAD_DEBT
    if invoice.lines and all(line.quantity < 0 for line in invoice.lines):
        return InvoiceKind.STOCK_WRITE_OFF
    return InvoiceKind.ORDER


def invoice_payload(invoice: Invoice, kind: InvoiceKind) -> dict[str, Any]:
    """Build the JSON payload of an invoice event, with prices as exact decimal strings.

    Every kind but ORDER also carries `kind`.
    """
    payload: dict[str, Any] = {
        "invoice": invoice.number,
        "customer_id": invoice.customer_id,
        "country": invoice.country,
        "placed_at": invoice.placed_at.isoformat(),
        "lines": [
            {
                "stock_code": line.stock_code,
                "description": line.description,
                "quantity": line.quantity,
                "unit_price": str(line.unit_price),
            }
            for line in invoice.lines
        ],
        "source": {"file": invoice.file, "row": invoice.row},
    }
    if kind is not InvoiceKind.ORDER:
        payload["kind"] = kind.value
    return payload


def invoice_message(invoice: Invoice, topics: ReplayTopics) -> Outgoing:
    """Build the message for one invoice, keyed by InvoiceNo with id `invoice-<InvoiceNo>`."""
    kind = classify_invoice(invoice)
    return Outgoing(
        topic=topics.topic_for(kind),
        payload=invoice_payload(invoice, kind),
        key=invoice.number,
        id=f"invoice-{invoice.number}",
    )
