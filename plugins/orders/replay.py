"""FileReplay: a producer that publishes one event per invoice read from retail data files.

Options (the flow's `with:`):

- `paths`: a glob or a list of globs, relative to the flow file. Files ending in `.csv`,
  `.csv.gz`, `.jsonl` or `.jsonl.gz` are read in file-name order.
- `rate`: maximum invoices per second. 0, the default, means no limit.
- `limit`: maximum number of invoices to publish. Unset means all.
- `orders_topic`, `cancellations_topic`, `adjustments_topic`: topic names, by default
  OrderPlaced, OrderCancelled and InvoiceAdjusted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowrun.outgoing import Outgoing
from flowrun_plugins.orders.errors import InvalidOptionError
from flowrun_plugins.orders.events import ReplayTopics, invoice_message
from flowrun_plugins.orders.invoices import GroupingStats, Invoice, group_invoices
from flowrun_plugins.orders.sources import expand_paths

if TYPE_CHECKING:
    from flowrun import Context
    from flowrun.clock import Clock

logger = logging.getLogger(__name__)

# Invoices grouped per call on a worker thread, which reads the files off the event loop.
READ_BATCH_SIZE = 200


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """Validated FileReplay options."""

    paths: list[Path]
    rate: float
    limit: int | None
    topics: ReplayTopics

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], resolve: Callable[[str], Path]
    ) -> ReplayOptions:
        """Validate the options, or raise InvalidOptionError naming the option and its value."""
        if "paths" not in options:
            raise InvalidOptionError(
                "missing option 'paths': set it to a glob such as data/*.csv.gz"
            )

        rate = options.get("rate", 0)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
            raise InvalidOptionError(
                f"invalid rate {rate!r}: expected invoices per second, 0 or more"
            )

        limit = options.get("limit")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InvalidOptionError(
                f"invalid limit {limit!r}: expected a whole number of invoices, 1 or more"
            )

        return cls(
            paths=expand_paths(options["paths"], resolve),
            rate=float(rate),
            limit=limit,
            topics=ReplayTopics.from_options(options),
        )


def invoice_messages(
    paths: Sequence[Path], topics: ReplayTopics, stats: GroupingStats | None = None
) -> Iterator[Outgoing]:
    """Yield the message of every invoice in the files, each invoice exactly once."""
    for invoice in group_invoices(paths, stats):
        yield invoice_message(invoice, topics)


class Pacer:
    """Spaces calls to `wait` at least `1 / rate` seconds apart. Rate 0 never waits.

    A caller that falls behind, for example because publish waited for room, gets no
    burst to catch up, because the next slot counts from the later of schedule and now.
    """

    def __init__(self, rate: float, clock: Clock) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._clock = clock
        self._next_at: float | None = None

    async def wait(self) -> None:
        if not self._interval:
            return

        now = self._clock.monotonic()
        if self._next_at is not None and self._next_at > now:
            await self._clock.sleep(self._next_at - now)
            now = self._next_at
        self._next_at = now + self._interval


class FileReplay:
    """Producer that replays invoice files as OrderPlaced, OrderCancelled and InvoiceAdjusted."""

    def __init__(self) -> None:
        self._options: ReplayOptions | None = None
        self._stats = GroupingStats()
        self._published: Counter[str] = Counter()

    def setup(self, context: Context) -> None:
        """Validate the options and find the files, so a bad glob fails before the flow runs."""
        self._options = ReplayOptions.from_options(context.options, context.resolve_path)
        names = ", ".join(path.name for path in self._options.paths)
        logger.info("replaying %d files: %s", len(self._options.paths), names)

    async def run(self, context: Context) -> AsyncIterator[Outgoing]:
        """Yield one message per invoice until the files end, `limit` is hit or the flow stops."""
        options = self._require_options()
        pacer = Pacer(options.rate, context.clock)
        invoices = group_invoices(options.paths, self._stats)

        try:
            while not context.stopping.is_set():
                batch = await asyncio.to_thread(_take, invoices, READ_BATCH_SIZE)
                if not batch:
                    return

                for invoice in batch:
                    if self._limit_reached(options) or context.stopping.is_set():
                        return

                    message = invoice_message(invoice, options.topics)
                    await pacer.wait()
                    yield message
                    self._published[message.topic] += 1
        finally:
            _close_reader(invoices)

    def close(self) -> None:
        """Log what the replay published and skipped."""
        by_topic = ", ".join(f"{topic} {count}" for topic, count in sorted(self._published.items()))
        logger.info(
            "replay published %d invoices (%s) from %d rows; skipped %d invalid rows and "
            "%d invoices without valid rows",
            sum(self._published.values()),
            by_topic or "none",
            self._stats.rows,
            self._stats.invalid_rows,
            self._stats.invoices_without_valid_rows,
        )

    def _require_options(self) -> ReplayOptions:
        if self._options is None:
            raise RuntimeError("FileReplay.run called before setup")
        return self._options

    def _limit_reached(self, options: ReplayOptions) -> bool:
        return options.limit is not None and sum(self._published.values()) >= options.limit


def _take(invoices: Iterator[Invoice], count: int) -> list[Invoice]:
    return list(itertools.islice(invoices, count))


def _close_reader(invoices: Iterator[Invoice]) -> None:
    close = getattr(invoices, "close", None)
    if close is None:
        return

    try:
        close()
    except ValueError:
        # A read cancelled mid-batch is still running in its worker thread. The generator
        # closes its file when garbage-collected after that read returns.
        logger.debug("invoice reader still running in a worker thread; not closed")
