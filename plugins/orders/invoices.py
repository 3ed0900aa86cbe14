"""Group invoice rows into invoices, each invoice exactly once, reading the files as one stream.

An invoice's rows are nearly always one contiguous block. In the UCI Online Retail data the
only exception is invoice 542806, whose rows come as two blocks with invoice C542805 between
them, and no invoice has rows in two files. Grouping must still publish every invoice once,
so `group_invoices` reads the files twice:

1. `find_split_invoices` lists the invoices whose rows form more than one block, with the
   position of their last row. It needs the set of invoice numbers seen so far (about 26,000
   short strings for the full data set), and only the split list outlives the pass.
2. `group_invoices` then streams the rows and completes an invoice when its block ends, or,
   for a split invoice, at its last row. Invoices come out in order of first appearance, so
   an invoice that starts while a split one is open waits for it.

The second pass holds only the open invoices, never a whole file. The same logic covers an
invoice that spans two files, because row positions run across all files.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from flowrun_plugins.orders.sources import SourceRow, read_rows

logger = logging.getLogger(__name__)

# Invalid rows beyond this many are counted but not logged one by one.
MAX_LOGGED_INVALID_ROWS = 20


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One line item: quantity may be negative, and unit_price zero or negative."""

    stock_code: str
    description: str | None
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class Invoice:
    """All valid rows of one invoice, with the file and data row where it first appears."""

    number: str
    customer_id: str | None
    country: str
    placed_at: datetime
    lines: tuple[InvoiceLine, ...]
    file: str
    row: int


@dataclass(slots=True)
class GroupingStats:
    """Counters of one grouping run, updated as invoices are yielded."""

    files: int = 0
    rows: int = 0
    invalid_rows: int = 0
    invoices: int = 0
    invoices_without_valid_rows: int = 0


class InvalidRowError(ValueError):
    """A row with a missing or unparseable value. The message names file, row and value."""

    def __init__(self, row: SourceRow, reason: str) -> None:
        self.file = row.path.name
        self.row = row.number
        self.reason = reason
        super().__init__(f"file {self.file} row {self.row}: {reason}")


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """The typed values of one valid row."""

    line: InvoiceLine
    timestamp: datetime
    customer_id: str | None
    country: str


@dataclass(slots=True)
class _OpenInvoice:
    number: str
    file: str
    row: int
    rows: list[ParsedRow] = field(default_factory=list)
    complete: bool = False


def parse_row(row: SourceRow) -> ParsedRow:
    """Convert one row's text columns to typed values.

    Raises InvalidRowError for an undecodable row, a missing InvoiceNo, or a Quantity,
    UnitPrice or InvoiceDate that does not parse.
    """
    if row.error is not None:
        raise InvalidRowError(row, row.error)
    if not row.invoice_no:
        raise InvalidRowError(row, "missing InvoiceNo")

    columns = row.columns
    line = InvoiceLine(
        stock_code=columns["StockCode"].strip(),
        description=columns["Description"].strip() or None,
        quantity=_parse_quantity(row, columns["Quantity"]),
        unit_price=_parse_price(row, columns["UnitPrice"]),
    )
    return ParsedRow(
        line=line,
        timestamp=_parse_timestamp(row, columns["InvoiceDate"]),
        customer_id=columns["CustomerID"].strip() or None,
        country=columns["Country"].strip(),
    )


def _parse_quantity(row: SourceRow, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidRowError(row, f"invalid Quantity {text!r}: expected an integer") from None


def _parse_price(row: SourceRow, text: str) -> Decimal:
    try:
        price = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidRowError(
            row, f"invalid UnitPrice {text!r}: expected a decimal number"
        ) from None

    if not price.is_finite():
        raise InvalidRowError(row, f"invalid UnitPrice {text!r}: expected a finite number")
    return price


def _parse_timestamp(row: SourceRow, text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRowError(
            row, f"invalid InvoiceDate {text!r}: expected YYYY-MM-DD HH:MM:SS"
        ) from None


def iter_rows(paths: Iterable[Path]) -> Iterator[SourceRow]:
    """Yield the rows of every file in the given order, as one stream."""
    for path in paths:
        yield from read_rows(path)


def find_split_invoices(paths: Sequence[Path]) -> dict[str, int]:
    """Return the invoices whose rows form more than one block, with their last row's position.

    A position counts the rows that carry an InvoiceNo, from 0, across all files in order.
    """
    seen: set[str] = set()
    last_positions: dict[str, int] = {}
    previous: str | None = None
    position = -1

    for row in iter_rows(paths):
        number = row.invoice_no
        if not number:
            continue

        position += 1
        starts_another_block = number != previous and number in seen
        if starts_another_block or number in last_positions:
            last_positions[number] = position

        seen.add(number)
        previous = number

    return last_positions


def group_invoices(paths: Sequence[Path], stats: GroupingStats | None = None) -> Iterator[Invoice]:
    """Yield one Invoice per distinct InvoiceNo, in order of first appearance.

    Invalid rows are logged with their file and row, counted in `stats` and left out of
    their invoice. An invoice with no valid row is logged and not yielded.
    """
    stats = stats if stats is not None else GroupingStats()
    split_last_positions = find_split_invoices(paths)
    if split_last_positions:
        logger.info("invoices with rows in separate blocks: %s", ", ".join(split_last_positions))

    open_invoices: OrderedDict[str, _OpenInvoice] = OrderedDict()
    previous: _OpenInvoice | None = None
    position = -1
    stats.files += len(paths)

    for row in iter_rows(paths):
        stats.rows += 1

        number = row.invoice_no
        if not number:
            _record_invalid_row(stats, InvalidRowError(row, row.error or "missing InvoiceNo"))
            continue
        position += 1

        # A contiguous invoice is complete once a row of another invoice follows it.
        if (
            previous is not None
            and previous.number != number
            and previous.number not in split_last_positions
        ):
            previous.complete = True

        invoice = open_invoices.get(number)
        if invoice is None:
            invoice = _OpenInvoice(number, row.path.name, row.number)
            open_invoices[number] = invoice
        _add_row(invoice, row, stats)

        if split_last_positions.get(number) == position:
            invoice.complete = True
        previous = invoice

        yield from _pop_complete(open_invoices, stats)

    for invoice in open_invoices.values():
        invoice.complete = True
    yield from _pop_complete(open_invoices, stats)


def _add_row(invoice: _OpenInvoice, row: SourceRow, stats: GroupingStats) -> None:
    try:
        invoice.rows.append(parse_row(row))
    except InvalidRowError as error:
        _record_invalid_row(stats, error)


def _record_invalid_row(stats: GroupingStats, error: InvalidRowError) -> None:
    stats.invalid_rows += 1
    if stats.invalid_rows <= MAX_LOGGED_INVALID_ROWS:
        logger.warning("%s; row skipped", error)
    if stats.invalid_rows == MAX_LOGGED_INVALID_ROWS:
        logger.warning("further invalid rows are counted but not logged")


def _pop_complete(
    open_invoices: OrderedDict[str, _OpenInvoice], stats: GroupingStats
) -> Iterator[Invoice]:
    """Yield complete invoices from the front, stopping at the first one still open."""
    while open_invoices:
        first = next(iter(open_invoices.values()))
        if not first.complete:
            return

        open_invoices.popitem(last=False)
        invoice = _finish(first)
        if invoice is None:
            stats.invoices_without_valid_rows += 1
            logger.warning(
                "invoice %s (file %s row %d) has no valid rows and is skipped",
                first.number,
                first.file,
                first.row,
            )
            continue

        stats.invoices += 1
        yield invoice


def _finish(invoice: _OpenInvoice) -> Invoice | None:
    if not invoice.rows:
        return None

    first = invoice.rows[0]
    return Invoice(
        number=invoice.number,
        customer_id=first.customer_id,
        country=first.country,
        placed_at=min(row.timestamp for row in invoice.rows),
        lines=tuple(row.line for row in invoice.rows),
        file=invoice.file,
        row=invoice.row,
    )
