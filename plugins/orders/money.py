"""Exact invoice totals in GBP from payload lines, using Decimal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from flowrun_plugins.orders.errors import InvalidPayloadError

PENNY = Decimal("0.01")


def invoice_total(lines: Iterable[Mapping[str, Any]]) -> Decimal:
    """Sum quantity * unit_price over payload lines, rounded half-up to whole pence.

    Raises InvalidPayloadError naming the line when a quantity is not an integer or a unit price is
    not a finite decimal.
    """
    total = Decimal(0)
    for index, line in enumerate(lines):
        total += _line_quantity(index, line) * _line_price(index, line)
    return total.quantize(PENNY, rounding=ROUND_HALF_UP)


def format_amount(amount: Decimal) -> str:
    """Format an amount with exactly two decimals, as payloads carry money: "15.30"."""
    return f"{amount.quantize(PENNY, rounding=ROUND_HALF_UP):f}"


def _line_quantity(index: int, line: Mapping[str, Any]) -> int:
    quantity = line.get("quantity")
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise InvalidPayloadError(
            f"line {index}: invalid quantity {quantity!r}: expected an integer"
        )
    return quantity


def _line_price(index: int, line: Mapping[str, Any]) -> Decimal:
    text = line.get("unit_price")
    try:
        price = Decimal(str(text))
    except InvalidOperation:
        raise InvalidPayloadError(
            f"line {index}: invalid unit_price {text!r}: expected a decimal string"
        ) from None

    if not price.is_finite():
        raise InvalidPayloadError(
            f"line {index}: invalid unit_price {text!r}: expected a decimal string"
        )
    return price
