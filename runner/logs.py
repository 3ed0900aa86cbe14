"""Logging set-up for the CLI and a limiter for errors that repeat per message."""

from __future__ import annotations

import logging
from typing import Any

from flowrun.clock import Clock

WINDOW_SECONDS = 10.0
PER_WINDOW = 5


class RepeatLimiter:
    """Logs the first few warnings of each kind per window, then counts the rest."""

    def __init__(self, logger: logging.Logger, clock: Clock) -> None:
        self._logger = logger
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, message: str, *args: Any) -> None:
        now = self._clock.monotonic()
        started, count = self._windows.get(kind, (now, 0))
        if now - started > WINDOW_SECONDS:
            self._report_suppressed(kind, count)
            started, count = now, 0

        count += 1
        self._windows[kind] = (started, count)
        if count <= PER_WINDOW:
            self._logger.warning(message, *args)

    def flush(self) -> None:
        for kind, (_, count) in self._windows.items():
            self._report_suppressed(kind, count)
        self._windows.clear()

    def _report_suppressed(self, kind: str, count: int) -> None:
        if count > PER_WINDOW:
            self._logger.warning("%d more %s errors were not logged in the last %gs", count - PER_WINDOW, kind, WINDOW_SECONDS)


def configure_logging(level: str, use_rich: bool) -> None:
    """Send flowrun's log records to stderr; the library itself installs no handlers."""
    handler: logging.Handler
    if use_rich:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        # aiormq logs every failed connection attempt as an error of its own. flowrun
        # reports the failure once, with the URL's password hidden and what to check.
        logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
