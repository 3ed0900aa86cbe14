"""Product-code rules and the stock units that an invoice moves per product code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowrun_plugins.orders.errors import InvalidPayloadError

# Services and bookkeeping codes of the Online Retail data: postage, dotcom postage, manual
# entries, carriage, discount, samples, bank charges, Amazon fees, charity commission, pads
# and bad-debt adjustments. They move no stock.
NON_PRODUCT_CODES = frozenset(
    {"POST", "DOT", "M", "C2", "D", "S", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS", "B"}
)
# DCGS... are dotcom gift sets and GIFT_0001_10 to _50 gift vouchers.
NON_PRODUCT_PREFIXES = ("DCGS", "GIFT_0001")


@dataclass(frozen=True, slots=True)
class StockMovement:
    """Units per normalised stock code, summed over `lines` product lines of one invoice."""

    units_by_code: dict[str, int]
    lines: int

    @property
    def units(self) -> int:
        return sum(self.units_by_code.values())


def normalise_stock_code(code: str) -> str:
    """Return the code in upper case, as the data spells some both ways (85123a, 85123A)."""
    return code.strip().upper()


def is_product_code(code: str) -> bool:
    """Return whether a normalised code is a product that stock is kept for."""
    if not code or code in NON_PRODUCT_CODES:
        return False
    return not code.startswith(NON_PRODUCT_PREFIXES)


def reservation_demand(lines: Iterable[Mapping[str, Any]]) -> StockMovement:
    """Sum the units an order takes from stock: product lines with a positive quantity."""
    return _movement(lines, keep=lambda quantity: quantity > 0)


def restock_supply(lines: Iterable[Mapping[str, Any]]) -> StockMovement:
    """Sum the units a cancellation puts back: the absolute quantity of every product line."""
    return _movement(lines, keep=lambda quantity: quantity != 0)


def invoice_and_lines(payload: Any) -> tuple[str, list[Mapping[str, Any]]]:
    """Return the invoice number and lines of an invoice event.

    Raises InvalidPayloadError naming the field when the payload is malformed.
    """
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError(
            f"invalid invoice payload: expected an object, found {type(payload).__name__}"
        )

    invoice = payload.get("invoice")
    if not isinstance(invoice, str) or not invoice:
        raise InvalidPayloadError(f"invalid invoice payload: invalid invoice {invoice!r}")

    lines = payload.get("lines")
    if not isinstance(lines, list) or not all(isinstance(line, Mapping) for line in lines):
        raise InvalidPayloadError(
            f"invalid payload of invoice {invoice}: lines is not a list of objects"
        )
    return invoice, lines


def _movement(lines: Iterable[Mapping[str, Any]], keep: Callable[[int], bool]) -> StockMovement:
    units_by_code: dict[str, int] = {}
    line_count = 0

    for index, line in enumerate(lines):
        code = line.get("stock_code")
        quantity = line.get("quantity")
        if not isinstance(code, str):
            raise InvalidPayloadError(
                f"line {index}: invalid stock_code {code!r}: expected a string"
            )
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            raise InvalidPayloadError(
                f"line {index}: invalid quantity {quantity!r}: expected an integer"
            )

        code = normalise_stock_code(code)
        if not is_product_code(code) or not keep(quantity):
            continue

        units_by_code[code] = units_by_code.get(code, 0) + abs(quantity)
        line_count += 1

    return StockMovement(units_by_code, line_count)
