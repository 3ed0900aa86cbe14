"""Find invoice files by glob and read their rows: CSV or JSON Lines, plain or gzip-compressed."""

from __future__ import annotations

import csv
import glob
import gzip
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
CSV_SUFFIXES = (".csv", ".csv.gz")
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz")


class SourceError(ValueError):
    """A file that cannot be used at all: unsupported name, missing columns, unreadable data."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One data row of a file, with every column as text ("" when missing).

    `number` counts data rows from 1: the CSV header is not counted, and in JSON Lines it is
    the line number. `error` is set, and `columns` empty, when the row cannot be decoded.
    """

    path: Path
    number: int
    columns: dict[str, str]
    error: str | None = None

    @property
    def invoice_no(self) -> str:
        return self.columns.get("InvoiceNo", "").strip()


def expand_paths(patterns: str | Sequence[str], resolve: Callable[[str], Path]) -> list[Path]:
    """Expand glob patterns into the files they match, sorted by file name.

    `resolve` turns a pattern into an absolute path (the flow's `resolve_path`). Raises
    SourceError when a pattern matches nothing or a file has an unsupported suffix.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns or not all(isinstance(pattern, str) for pattern in patterns):
        raise SourceError(f"invalid paths {patterns!r}: expected a glob string or a list of them")

    found: set[Path] = set()
    for pattern in patterns:
        resolved = resolve(pattern)
        matches = [Path(match) for match in glob.glob(str(resolved)) if Path(match).is_file()]
        if not matches:
            raise SourceError(f"no files match {pattern!r} (resolved to {resolved})")
        found.update(matches)

    for path in found:
        if not path.name.endswith(CSV_SUFFIXES + JSON_LINES_SUFFIXES):
            supported = ", ".join(CSV_SUFFIXES + JSON_LINES_SUFFIXES)
            raise SourceError(f"unsupported file {path}: expected a name ending in {supported}")

    # Name order first, so monthly files from several folders still replay in time order.
    return sorted(found, key=lambda path: (path.name, str(path)))


def read_rows(path: Path) -> Iterator[SourceRow]:
    """Yield the data rows of one file in file order.

    Raises SourceError, naming the file and the last row read, when the file cannot be
    opened or decoded (for example truncated gzip data or invalid UTF-8).
    """
    last_row = 0
    try:
        with _open_text(path) as stream:
            rows = (
                _read_json_lines(path, stream) if _is_json_lines(path) else _read_csv(path, stream)
            )
            for row in rows:
                last_row = row.number
                yield row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"failed to read {path} after data row {last_row}: {error}") from error


def _is_json_lines(path: Path) -> bool:
    return path.name.endswith(JSON_LINES_SUFFIXES)


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig also accepts files that start with a byte order mark, as spreadsheet exports do.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open("r", encoding="utf-8-sig", newline="")


def _read_csv(path: Path, stream: IO[str]) -> Iterator[SourceRow]:
    reader = csv.DictReader(stream)
    missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(f"{path}: missing columns in the header: {', '.join(missing)}")

    for number, record in enumerate(reader, start=1):
        if None in record:
            extra = len(record[None])
            yield SourceRow(path, number, {}, f"{extra} more fields than the header")
            continue

        columns = {column: record[column] or "" for column in COLUMNS}
        yield SourceRow(path, number, columns)


def _read_json_lines(path: Path, stream: IO[str]) -> Iterator[SourceRow]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue

        try:
            record = json.loads(line, parse_float=Decimal)
        except ValueError as error:
            yield SourceRow(path, number, {}, f"invalid JSON ({error})")
            continue

        if not isinstance(record, dict):
            yield SourceRow(
                path, number, {}, f"expected a JSON object, found {type(record).__name__}"
            )
            continue

        yield SourceRow(
            path, number, {column: _json_text(record.get(column)) for column in COLUMNS}
        )


def _json_text(value: Any) -> str:
    """Render a JSON value the way the CSV files write it: 17850.0 becomes "17850"."""
    if value is None:
        return ""
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return str(int(value))
    return str(value)
