"""A sync iterator read on a worker thread and turned into an async iterator.

Producers written as plain generators may block (files, sockets, `time.sleep`), so they
run on a thread. Each item is handed to the event loop as soon as the generator yields
it, so an item never waits for the next one. At most `limit` items wait to be taken; the
thread blocks after that (backpressure).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from flowrun.errors import EXITS, PluginExit


class SyncPump:
    """Moves items of a sync iterator from a worker thread to the event loop."""

    def __init__(self, items: Iterator[Any], loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._items = items
        self._loop = loop
        self._limit = limit
        self._waiting: list[Any] = []
        self._room = threading.Condition()
        self._arrived = asyncio.Event()
        self._ended = False
        self._stopped = False
        self._error: BaseException | None = None

    def run(self) -> None:
        """Read the iterator to its end, an error or `stop()`; runs on the worker thread."""
        try:
            for item in self._items:
                if not self._hand_over(item):
                    return
        except Exception as error:  # noqa: BLE001 - raised again on the event loop, after earlier items
            self._error = error
        except EXITS as raised:
            # Raised on this thread's task, it would escape the event loop and end the run.
            self._error = PluginExit(raised)
        finally:
            with self._room:
                self._ended = True
            self._loop.call_soon_threadsafe(self._arrived.set)

    def _hand_over(self, item: Any) -> bool:
        with self._room:
            while len(self._waiting) >= self._limit and not self._stopped:
                self._room.wait()
            if self._stopped:
                return False
            first = not self._waiting
            self._waiting.append(item)
        if first:
            self._loop.call_soon_threadsafe(self._arrived.set)
        return True

    def stop(self) -> None:
        """Make the thread stop at its next item; an item it is reading now is dropped."""
        with self._room:
            self._stopped = True
            self._room.notify_all()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            with self._room:
                batch, self._waiting = self._waiting, []
                ended = self._ended
                self._room.notify_all()
            for item in batch:
                yield item
            if ended:
                if self._error is not None:
                    raise self._error
                return
