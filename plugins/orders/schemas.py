"""Payload schemas of the order flow's topics, referenced by `schema:` in flows/orders.yaml.

Money is an exact decimal string and times are ISO 8601 without a time zone, as in the
data set (UK local time).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrderLine(Payload):
    """One invoice line; quantity is negative on cancellations and write-offs."""

    stock_code: str
    description: str | None
    quantity: int
    unit_price: str


class Source(Payload):
    """Where the invoice was read: file name and first data row (1-based)."""

    file: str
    row: int


class OrderPlaced(Payload):
    """A placed order: an invoice without a prefix. A guest order has no customer_id."""

    invoice: str
    customer_id: str | None
    country: str
    placed_at: str
    lines: list[OrderLine]
    source: Source


class OrderCancelled(OrderPlaced):
    """A cancellation invoice (InvoiceNo starting with C)."""

    kind: Literal["cancellation"]


class InvoiceAdjusted(OrderPlaced):
    """A bad-debt adjustment (A...) or a stock write-off (all quantities negative)."""

    kind: Literal["bad_debt", "stock_write_off"]


class StockReserved(Payload):
    invoice: str
    lines: int
    units: int


class Shortage(Payload):
    stock_code: str
    requested: int
    available: int


class OutOfStock(Payload):
    invoice: str
    short: list[Shortage]


class PaymentSucceeded(Payload):
    """`charged` is false, with amount 0.00, when the order had nothing to charge."""

    invoice: str
    customer_id: str | None
    amount: str
    currency: Literal["GBP"]
    charged: bool


class PaymentFailed(Payload):
    invoice: str
    customer_id: str | None
    amount: str
    reason: str
