"""Publishing of an async producer's items in batches, without holding any item back.

One publish runs at a time, in a background task. Items that arrive while it runs form
the next batch, which the same task publishes as soon as the previous one is stored. A
generator that yields without waiting therefore fills whole batches, and an item of a
paced generator is published at once, because nothing else is in flight.
"""

from __future__ import annotations

import asyncio
import logging

from flowrun.broker import Broker
from flowrun.message import Envelope
from flowrun.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


# Body bytes that may wait for the publish in flight, at most about: with megabyte payloads
# a batch of `limit` messages would otherwise hold hundreds of megabytes.
WAITING_BYTES = 16 * 1024 * 1024


class BatchPublisher:
    """Publishes envelopes in order through one background task, at most `limit` (or WAITING_BYTES) waiting."""

    def __init__(self, broker: Broker, name: str, limit: int) -> None:
        self._broker = broker
        self._name = name
        self._limit = limit
        self._waiting: list[Envelope] = []
        self._waiting_bytes = 0
        self._task: asyncio.Task[None] | None = None

    def put(self, envelope: Envelope) -> bool:
        """Queue `envelope`; return True when `limit` envelopes wait, so the caller must `flush`.

        Not a coroutine, because it runs once per produced item and rarely has to wait.
        Raises the error of an earlier batch that failed to publish.
        """
        self._check_task()
        self._waiting.append(envelope)
        self._waiting_bytes += len(envelope.body)
        if self._task is None:
            self._task = asyncio.create_task(self._publish_waiting(), name=f"flowrun-publish-{self._name}")
            return False
        return len(self._waiting) >= self._limit or self._waiting_bytes >= WAITING_BYTES

    async def flush(self) -> None:
        """Wait until every queued envelope is stored; raise the error of a failed batch."""
        if self._task is not None:
            await asyncio.wait({self._task})
        self._check_task()

    async def close(self, timeout: float) -> None:
        """Publish what waits within `timeout` seconds, then stop; log what was dropped."""
        task = self._task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
        if task is not None and not task.done():
            logger.warning("producer '%s' stopped with %d messages not published: the broker did not take "
                           "them within %gs", self._name, len(self._waiting), timeout)
        elif task is not None and not task.cancelled() and task.exception() is not None:
            logger.warning("producer '%s' stopped with %d messages not published: %s", self._name,
                           len(self._waiting), task.exception())
        await cancel_and_wait(task)
        self._task = None
        self._waiting = []
        self._waiting_bytes = 0

    async def _publish_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            self._waiting_bytes = 0
            await self._broker.publish(batch)

    def _check_task(self) -> None:
        """Forget a finished publish task; raise its error if it failed."""
        task = self._task
        if task is None or not task.done():
            return
        self._task = None
        error = task.exception()
        if error is None:
            return
        if self._waiting:
            logger.warning("producer '%s': %d messages after a failed publish were not published",
                           self._name, len(self._waiting))
            self._waiting = []
            self._waiting_bytes = 0
        raise error
