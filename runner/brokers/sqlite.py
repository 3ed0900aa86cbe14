"""Durable embedded broker on SQLite (WAL mode): the default backend.

The storage is described in `flowrun.brokers.sqlite_store`. All database work runs on
one thread per broker. Publishes, fetches, acks and nacks that arrive in the same
event-loop turn share one transaction (group commit): each is a call of a `SqliteStore`
method by name, queued as a job.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowrun.broker import Broker, Nack, Topology
from flowrun.brokers.options import SqliteOptions
from flowrun.brokers.sqlite_store import SqliteStore, _Tag
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.errors import BrokerError
from flowrun.message import Delivery, Envelope
from flowrun.spec import AckPolicy, BrokerSpec
from flowrun.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# How often a waiting fetch or publish checks for commits made by other processes.
# Commits of this process wake waiters at once.
CROSS_PROCESS_POLL_SECONDS = 0.05

# A SqliteStore method's name and its arguments.
Call = tuple[str, tuple[Any, ...]]


@dataclass
class _Job:
    call: Call
    future: asyncio.Future[Any]
    # Called with the result when the work succeeded but its caller was cancelled meanwhile.
    abandoned: Callable[[Any], None] | None = None


class SqliteBroker(Broker):
    """Durable broker in one SQLite file, shared by the processes of one host."""

    backend = "sqlite"

    def __init__(self, path: Path, clock: Clock = SYSTEM_CLOCK, synchronous: str = "NORMAL",
                 dedup_window: float = 7 * 24 * 3600.0) -> None:
        super().__init__(clock)
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise BrokerError(f"invalid synchronous setting '{synchronous}'; use normal, full or extra")
        self.path = path
        self._store = SqliteStore(path, clock, synchronous.upper(), dedup_window)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="flowrun-sqlite")
        self._jobs: list[_Job] = []
        self._wake_writer = asyncio.Event()
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        # This process's leases per subscription: tag -> when its ack timeout passes.
        self._leases: dict[str, dict[_Tag, float]] = {}
        self._timer_changed = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._arrived: dict[str, asyncio.Event] = {}
        self._room = asyncio.Event()
        self._closed = False

    @classmethod
    def from_spec(cls, spec: BrokerSpec, options: SqliteOptions, flow_path: Path, flow_name: str,
                  clock: Clock) -> SqliteBroker:
        from flowrun.brokers import sqlite_path

        return cls(sqlite_path(spec, flow_path, flow_name), clock, options.synchronous, options.dedup_window)

    # Lifecycle

    async def start(self, topology: Topology) -> None:
        self.topology = topology
        self._arrived = {config.name: asyncio.Event() for config in topology.subscriptions}
        await self._open(topology)
        self._writer = asyncio.create_task(self._run_writer(), name="flowrun-sqlite-writer")
        self._timer_task = asyncio.create_task(self._run_timers(), name="flowrun-sqlite-timers")
        logger.info("sqlite broker opened %s", self.path)

    async def open_for_inspection(self, topology: Topology | None) -> None:
        """Open without starting delivery, for `status` and `dlq`."""
        self.topology = topology
        await self._open(topology)
        self._writer = asyncio.create_task(self._run_writer(), name="flowrun-sqlite-writer")

    async def close(self) -> None:
        """Stop timers, finish the writes already queued, then close the database."""
        self._closed = True
        for event in self._arrived.values():
            event.set()
        self._room.set()

        await cancel_and_wait(self._timer_task)
        self._timer_task = None
        while self._jobs or self._writing:
            await asyncio.sleep(0.001)
        await cancel_and_wait(self._writer)
        self._writer = None

        await self._in_thread(self._store.close)
        self._executor.shutdown(wait=True)

    async def _open(self, topology: Topology | None) -> None:
        try:
            await self._in_thread(lambda: self._store.open(topology))
        except (OSError, sqlite3.Error) as error:
            raise BrokerError(
                f"cannot open the SQLite broker database {self.path}: {error}; make its folder writable, or, "
                "if the file is not a flowrun broker file, set broker.path in the flow to another file"
            ) from None

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # Group commit: jobs queued in one loop turn run in one transaction.

    async def _write(self, name: str, *arguments: Any, abandoned: Callable[[Any], None] | None = None) -> Any:
        """Run a store method in the next group-commit transaction; return its result."""
        if self._writer is None:
            raise BrokerError("the SQLite broker is closed")
        return await self._queue_job((name, arguments), abandoned)

    def _queue_job(self, call: Call, abandoned: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(call, future, abandoned))
        self._wake_writer.set()
        return future

    async def _run_writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            jobs, self._jobs = self._jobs, []
            if not jobs:
                continue
            self._writing = True
            calls = [job.call for job in jobs]
            try:
                results, arrivals = await self._in_thread(lambda: self._run_batch(calls))
            except Exception as error:  # noqa: BLE001 - every waiter gets the failure
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(BrokerError(f"SQLite write to {self.path} failed: {error}"))
                continue
            finally:
                self._writing = False
            self._wake_arrivals(arrivals)
            for job, (ok, value) in zip(jobs, results):
                if job.future.done():
                    if ok and job.abandoned is not None:
                        job.abandoned(value)
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def _run_batch(self, calls: list[Call]) -> tuple[list[tuple[bool, Any]], set[str]]:
        """Run all calls in one transaction; if one fails, roll back and run each on its own.

        Returns each call's (True, result) or (False, error), and the subscriptions that
        got messages. Savepoints per call would isolate failures too, but cost more than
        the calls on a busy broker, and calls fail rarely (a rejected publish, a disk error).
        """
        store = self._store
        results = self._run_together(calls)
        try:
            store.return_free_pages()
        except sqlite3.Error as error:
            # Only the file size suffers; the next batch tries again.
            logger.warning("returning free pages of %s failed: %s", self.path, error)
        arrivals, store.arrivals = store.arrivals, set()
        return results, arrivals

    def _run_together(self, calls: list[Call]) -> list[tuple[bool, Any]]:
        store = self._store
        try:
            with store.transaction():
                together = [(True, getattr(store, name)(*arguments)) for name, arguments in calls]
                store.trim()
                return together
        except Exception as error:  # noqa: BLE001 - retried one by one below
            if len(calls) == 1:
                return [(False, error)]

        results: list[tuple[bool, Any]] = []
        for name, arguments in calls:
            try:
                with store.transaction():
                    results.append((True, getattr(store, name)(*arguments)))
                    store.trim()
            except Exception as error:  # noqa: BLE001 - each caller gets its own failure
                results.append((False, error))
        return results

    # Broker interface

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        remaining = list(envelopes)
        while remaining:
            # Cleared before the attempt, so only a settlement after it wakes the retry.
            self._room.clear()
            stored = await self._write("publish", remaining)
            remaining = remaining[stored:]
            if remaining and not stored:
                await self._wait_for_change(self._room, None)

    def _wake_arrivals(self, arrivals: set[str]) -> None:
        """Wake fetches of subscriptions that the last transaction gave new messages."""
        for name in arrivals:
            event = self._arrived.get(name)
            if event is not None:
                event.set()

    async def fetch(self, subscription: str, max_messages: int, timeout: float) -> list[Delivery]:
        arrived = self._arrived[subscription]
        deadline = self.clock.monotonic() + timeout
        while not self._closed:
            arrived.clear()
            deliveries, next_due, expired = await self._write(
                "fetch", subscription, max_messages,
                abandoned=lambda result: self._unlease_abandoned(subscription, result[0], result[2]),
            )
            self._release(subscription, expired)
            if deliveries:
                self._track_leases(subscription, deliveries)
                self._room.set()
                return deliveries

            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return []
            if next_due is not None:
                remaining = min(remaining, max(next_due - self.clock.wall(), 0.0))
            await self._wait_for_change(arrived, remaining)
        return []

    def _unlease_abandoned(self, subscription: str, deliveries: list[Delivery], expired: list[_Tag]) -> None:
        """Return the leases of a fetch whose caller was cancelled (a consumer stopping).

        No handler received these deliveries, so they become ready at once instead of
        waiting out their ack timeout. The job is queued before the writer goes idle, so
        `close` runs it too.
        """
        self._release(subscription, expired)
        if not deliveries:
            return
        tags = [delivery.tag for delivery in deliveries]
        future = self._queue_job(("unlease", (subscription, tags)))
        future.add_done_callback(lambda done: self._log_unlease(subscription, len(tags), done))

    def _log_unlease(self, subscription: str, count: int, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is None:
            logger.debug("returned %d deliveries of '%s' that a cancelled fetch had leased", count, subscription)
            return
        logger.warning("returning %d deliveries of '%s' that a cancelled fetch had leased failed, so they wait "
                       "for their ack timeout: %s", count, subscription, done.exception())

    async def _wait_for_change(self, event: asyncio.Event, timeout: float | None) -> None:
        """Wait for a local signal, for `timeout`, or for a commit by another process."""
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        while not self._closed:
            remaining = None if deadline is None else deadline - self.clock.monotonic()
            if remaining is not None and remaining <= 0:
                return
            step = CROSS_PROCESS_POLL_SECONDS if remaining is None else min(remaining, CROSS_PROCESS_POLL_SECONDS)
            if await self.clock.wait(event, step):
                return
            # TODO: wake on other processes' commits through a notification channel instead of
            # checking PRAGMA data_version every CROSS_PROCESS_POLL_SECONDS.
            if await self._in_thread(self._store.changed):
                return

    async def ack(self, subscription: str, tags: Sequence[Any]) -> None:
        await self._write("ack", subscription, tags)
        self._release(subscription, tags)
        if self._store.configs[subscription].ordered:
            # The next message of an acked key may be ready now.
            self._arrived[subscription].set()

    async def give_back(self, subscription: str, tags: Sequence[Any]) -> None:
        """Undo deliveries that no handler received: ready again at once, and not counted."""
        await self._write("unlease", subscription, tags)
        self._release(subscription, tags)

    async def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        await self._write("nack", subscription, nacks)
        self._release(subscription, [nack.tag for nack in nacks])
        self._arrived[subscription].set()

    def _release(self, subscription: str, tags: Sequence[Any]) -> None:
        leases = self._leases.get(subscription)
        if leases:
            for tag in tags:
                leases.pop(tag, None)
        self._released_all(subscription, tags)
        self._room.set()

    async def stats(self) -> dict[str, Any]:
        return await self._write("stats")

    async def all_settled(self, subscriptions: Sequence[str]) -> bool:
        return await self._write("all_settled", subscriptions)

    # Leases of this process: expire them on time so push caps and drains see it.

    def _track_leases(self, subscription: str, deliveries: list[Delivery]) -> None:
        config = self._store.configs[subscription]
        if config.ack is AckPolicy.NONE:
            return
        leases = self._leases.setdefault(subscription, {})
        if not leases:
            self._timer_changed.set()
        due = self.clock.monotonic() + config.ack_timeout
        leases.update(dict.fromkeys([delivery.tag for delivery in deliveries], due))

    async def _run_timers(self) -> None:
        # A subscription's ack timeout is fixed, so its lease table (a dict, in fetch order)
        # is in deadline order, and a settled lease leaves no timer behind.
        while True:
            # Cleared first: leases tracked while expiring below must wake the next wait.
            self._timer_changed.clear()
            now = self.clock.monotonic()
            next_due: float | None = None
            for subscription, leases in list(self._leases.items()):
                tags = []
                for tag, due in leases.items():
                    if due > now:
                        next_due = due if next_due is None else min(next_due, due)
                        break
                    tags.append(tag)
                for tag in tags:
                    del leases[tag]
                if tags:
                    expired = await self._write("expire", subscription, tags)
                    self._release(subscription, expired)
                    if expired:
                        self._arrived[subscription].set()

            timeout = None if next_due is None else max(next_due - self.clock.monotonic(), 0.0)
            await self.clock.wait(self._timer_changed, timeout)

    # Producers and dead letters, for the runtime and the CLI

    async def set_producer_state(self, name: str, finished: bool) -> None:
        await self._write("set_producer", name, finished)

    async def producers_finished(self, names: Sequence[str]) -> bool:
        return bool(await self._write("producers_finished", names))

    async def dead_letters(self, subscription: str | None = None) -> list[dict[str, Any]]:
        return list(await self._write("dead_letters", subscription))

    async def replay_dead_letters(self, subscription: str | None = None) -> int:
        count = int(await self._write("replay_dead_letters", subscription))
        for event in self._arrived.values():
            event.set()
        return count

    async def purge_dead_letters(self, subscription: str | None = None) -> int:
        return int(await self._write("purge_dead_letters", subscription))
