"""In-process broker: the whole contract in memory, for tests and throwaway runs.

Nothing survives the process. Each subscription has its own ready queue, a heap of delayed
redeliveries and a table of in-flight deliveries; one timer task moves due redeliveries
back to the ready queue and expires in-flight deliveries whose ack timeout passed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import operator
from collections import deque
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

from flowrun.broker import (
    NO_ERROR,
    Broker,
    ErrorInfo,
    Nack,
    SubscriptionConfig,
    Topology,
    dead_letter_headers,
)
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.counters import Counters, Gauges
from flowrun.errors import BrokerError, QueueFullError
from flowrun.ids import new_id
from flowrun.message import Delivery, Envelope
from flowrun.brokers.options import MemoryOptions
from flowrun.spec import AckPolicy, BrokerSpec, OnFull
from flowrun.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _InFlight(Delivery):
    """A delivery as handed out, with what the broker needs to settle, expire or retry it.

    A message to be delivered again waits as its last delivery, which carries the delivery
    count and the error that the next delivery or the dead letter reports.
    """

    _: KW_ONLY
    deadline: float | None
    last_error: ErrorInfo | None = None


# Item of a ready queue: a message never delivered, or the last delivery of one to retry.
_Waiting = Envelope | _InFlight


def _envelope_of(item: _Waiting) -> Envelope:
    return item if isinstance(item, Envelope) else item.envelope


_TOPIC_OF = operator.attrgetter("topic")


def _topic_runs(envelopes: Sequence[Envelope]) -> list[tuple[str, list[Envelope]]]:
    """Split envelopes into runs of consecutive envelopes of one topic, in order.

    A producer's batch is usually one run, so queues take it with one `extend`.
    """
    return [(topic, list(run)) for topic, run in itertools.groupby(envelopes, key=_TOPIC_OF)]


class _Queue:
    """One subscription's messages: ready, delayed and in flight."""

    def __init__(self, config: SubscriptionConfig) -> None:
        self.config = config
        self.ready: deque[_Waiting] = deque()
        self.delayed = 0
        self.in_flight: dict[int, _InFlight] = {}
        # Ordered subscriptions: keys with a message in flight or waiting for a retry.
        self.busy_keys: dict[str, int] = {}
        self.not_empty = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    @property
    def size(self) -> int:
        return len(self.ready) + self.delayed + len(self.in_flight)

    def update_room(self) -> None:
        if self.size < self.config.max_pending:
            self.room.set()
        else:
            self.room.clear()


class MemoryBroker(Broker):
    """Broker kept in the process's memory."""

    backend = "memory"

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock)
        self.counters = Counters()
        self._queues: dict[str, _Queue] = {}
        self._by_topic: dict[str, list[_Queue]] = {}
        self._timers: list[tuple[float, int, str, int, _InFlight | None]] = []
        self._sequence = itertools.count()
        self._tags = itertools.count(1)
        self._timer_changed = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_spec(cls, spec: BrokerSpec, options: MemoryOptions, flow_path: Path, flow_name: str,
                  clock: Clock) -> MemoryBroker:
        return cls(clock)

    async def start(self, topology: Topology) -> None:
        self.topology = topology
        for topic in topology.topics:
            self._by_topic.setdefault(topic, [])
        for config in topology.subscriptions:
            queue = _Queue(config)
            self._queues[config.name] = queue
            self._by_topic.setdefault(config.topic, []).append(queue)
        self._timer_task = asyncio.create_task(self._run_timers(), name="flowrun-memory-timers")
        logger.info("memory broker started with %d topics and %d subscriptions", len(self._by_topic), len(self._queues))

    async def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            queue.not_empty.set()
            queue.room.set()
        await cancel_and_wait(self._timer_task)
        self._timer_task = None

    # Publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        done = 0
        while done < len(envelopes):
            fitting = self._count_fitting(envelopes, done)
            if fitting:
                self._store(envelopes[done:done + fitting])
                done += fitting
                continue
            # The next envelope does not fit (or its topic is unknown): wait for room or raise.
            await self._publish_one(envelopes[done])
            done += 1

    def _count_fitting(self, envelopes: Sequence[Envelope], start: int) -> int:
        """Count the envelopes from `start` on that every queue they go to has room for."""
        room: dict[int, int] = {}
        count = 0
        for topic, run in _topic_runs(envelopes[start:]):
            queues = self._by_topic.get(topic)
            if queues is None:
                break
            fits = len(run)
            for queue in queues:
                left = room.setdefault(id(queue), queue.config.max_pending - queue.size)
                fits = min(fits, max(left, 0))
            for queue in queues:
                room[id(queue)] -= fits
            count += fits
            if fits < len(run):
                break
        return count

    def _store(self, envelopes: Sequence[Envelope]) -> None:
        touched: dict[int, _Queue] = {}
        published = self.counters.published
        for topic, run in _topic_runs(envelopes):
            for queue in self._by_topic.get(topic, ()):
                queue.ready.extend(run)
                touched[id(queue)] = queue
            published[topic] += len(run)
        for queue in touched.values():
            queue.update_room()
            queue.not_empty.set()

    async def _publish_one(self, envelope: Envelope) -> None:
        queues = self._by_topic.get(envelope.topic)
        if queues is None:
            raise BrokerError(f"topic '{envelope.topic}' is not declared on the broker")

        await self._wait_for_room(envelope.topic, queues)
        self._store([envelope])

    async def _wait_for_room(self, topic: str, queues: list[_Queue]) -> None:
        while True:
            full = [queue for queue in queues if queue.size >= queue.config.max_pending]
            if not full or self._closed:
                return

            queue = full[0]
            if queue.config.on_full is OnFull.REJECT:
                raise QueueFullError(
                    f"subscription '{queue.config.name}' of topic '{topic}' has {queue.size} unsettled messages, "
                    f"its max_pending; retry later or raise max_pending"
                )
            await queue.room.wait()

    # Delivering

    async def fetch(self, subscription: str, max_messages: int, timeout: float) -> list[Delivery]:
        queue = self._queue(subscription)
        deadline = self.clock.monotonic() + timeout

        while True:
            entries = self._take(queue, max_messages)
            if entries:
                return self._deliver(queue, entries)

            remaining = deadline - self.clock.monotonic()
            if self._closed or remaining <= 0:
                return []
            queue.not_empty.clear()
            await self.clock.wait(queue.not_empty, remaining)

    def _take(self, queue: _Queue, max_messages: int) -> list[_Waiting]:
        if not queue.config.ordered:
            return [queue.ready.popleft() for _ in range(min(max_messages, len(queue.ready)))]

        # Skip messages whose key is busy; they keep their place at the front.
        taken: list[_Waiting] = []
        skipped: list[_Waiting] = []
        while queue.ready and len(taken) < max_messages:
            entry = queue.ready.popleft()
            key = _envelope_of(entry).key
            if key is not None and key in queue.busy_keys:
                skipped.append(entry)
                continue
            if key is not None:
                queue.busy_keys[key] = 1
            taken.append(entry)
        queue.ready.extendleft(reversed(skipped))
        return taken

    def _deliver(self, queue: _Queue, entries: list[_Waiting]) -> list[Delivery]:
        config = queue.config
        # Under ack: none the message leaves the queue on delivery: it is never redelivered,
        # so it gets no deadline, and its settlement only decides how it is counted.
        deadline = None if config.ack is AckPolicy.NONE else self.clock.monotonic() + config.ack_timeout
        if deadline is not None and not queue.in_flight:
            # The timer task looks only at the oldest delivery of each queue; a new oldest
            # one may be due before the timer's next wake.
            self._timer_changed.set()

        wall = self.clock.wall()
        in_flight = queue.in_flight
        tags = self._tags
        deliveries: list[Delivery] = []
        redelivered = 0
        for entry in entries:
            tag = next(tags)
            if isinstance(entry, Envelope):
                flight = _InFlight(entry, config.name, 1, tag, wall, deadline=deadline)
            else:
                redelivered += 1
                flight = _InFlight(entry.envelope, config.name, entry.delivery_count + 1, tag,
                                   entry.first_delivered_at, deadline=deadline, last_error=entry.last_error)
            in_flight[tag] = flight
            deliveries.append(flight)

        counters = self.counters.subscriptions[config.name]
        counters.delivered += len(entries)
        counters.redelivered += redelivered
        return deliveries

    # Settling

    async def ack(self, subscription: str, tags: Sequence[Any]) -> None:
        queue = self._queue(subscription)
        in_flight = queue.in_flight
        acked = 0
        for tag in tags:
            flight = in_flight.pop(tag, None)
            if flight is None:
                logger.debug("ignored ack of unknown or expired delivery %s on '%s'", tag, subscription)
                continue
            acked += 1
            if queue.config.ordered:
                self._free_key(queue, flight)
        self.counters.subscriptions[subscription].acked += acked
        self._released_all(subscription, tags)
        queue.update_room()

    async def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        queue = self._queue(subscription)
        for nack in nacks:
            flight = queue.in_flight.pop(nack.tag, None)
            if flight is None:
                logger.debug("ignored nack of unknown or expired delivery %s on '%s'", nack.tag, subscription)
                continue
            flight.last_error = nack.error
            self._released(subscription, nack.tag)
            self._retry_or_give_up(queue, flight, nack.delay, nack.terminal, nack.dead_letter)
        queue.update_room()

    def _retry_or_give_up(
        self, queue: _Queue, flight: _InFlight, delay: float | None, terminal: bool, dead_letter: bool = True
    ) -> None:
        config = queue.config
        exhausted = flight.delivery_count >= config.max_deliveries

        if terminal or exhausted or config.ack is AckPolicy.NONE:
            self._free_key(queue, flight)
            self._give_up(queue, flight, dead_letter)
            return

        wait = config.backoff(flight.delivery_count) if delay is None else max(delay, 0.0)
        if wait <= 0:
            self._requeue(queue, flight)
            return

        queue.delayed += 1
        self._schedule(self.clock.monotonic() + wait, config.name, 0, flight)

    def _give_up(self, queue: _Queue, flight: _InFlight, dead_letter: bool) -> None:
        config = queue.config
        counters = self.counters.subscriptions[config.name]
        error = flight.last_error

        if config.dead_letter is None or config.ack is AckPolicy.NONE or not dead_letter:
            counters.dropped += 1
            logger.warning(
                "dropped message %s of subscription '%s' at delivery %d: %s",
                flight.envelope.id, config.name, flight.delivery_count,
                (error or NO_ERROR).message,
            )
            return

        headers = dead_letter_headers(flight, config, error, self.clock.wall())
        envelope = Envelope(new_id(), config.dead_letter, flight.envelope.body,
                            flight.envelope.key, headers, self.clock.wall())
        counters.dead_lettered += 1
        logger.error(
            "dead-lettered message %s of subscription '%s' to '%s' at delivery %d: %s",
            envelope.headers["flowrun.original_id"], config.name, config.dead_letter,
            flight.delivery_count, headers["flowrun.error"],
        )
        # Dead letters skip the max_pending bound: blocking here could stall every
        # subscription behind a full dead-letter queue.
        self._store([envelope])

    def _requeue(self, queue: _Queue, flight: _InFlight) -> None:
        """Put a message to be retried at the front: it is older than everything waiting."""
        if flight.envelope.key is not None:
            queue.busy_keys.pop(flight.envelope.key, None)
        queue.ready.appendleft(flight)
        queue.not_empty.set()

    def _free_key(self, queue: _Queue, flight: _InFlight) -> None:
        if queue.config.ordered and flight.envelope.key is not None:
            queue.busy_keys.pop(flight.envelope.key, None)
            if queue.ready:
                queue.not_empty.set()

    # Timers

    def _schedule(self, due: float, subscription: str, tag: int, entry: _InFlight | None) -> None:
        earliest = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (due, next(self._sequence), subscription, tag, entry))
        if earliest is None or due < earliest:
            self._timer_changed.set()

    async def _run_timers(self) -> None:
        # Retries wait in a heap. Ack deadlines need none: a queue's ack timeout is fixed, so
        # its in-flight table (a dict, in delivery order) is also in deadline order, and an
        # ack removes its entry at once instead of leaving a timer behind.
        while True:
            # Cleared first: a retry scheduled while expiring below must wake the next wait.
            self._timer_changed.clear()
            now = self.clock.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, subscription, _, entry = heapq.heappop(self._timers)
                if entry is not None:
                    self._retry_now(self._queues[subscription], entry)

            due: float | None = None
            for queue in self._queues.values():
                oldest = self._expire_oldest(queue, now)
                if oldest is not None and (due is None or oldest < due):
                    due = oldest
            if self._timers and (due is None or self._timers[0][0] < due):
                due = self._timers[0][0]

            await self.clock.wait(self._timer_changed, None if due is None else max(due - now, 0.0))

    def _retry_now(self, queue: _Queue, entry: _InFlight) -> None:
        queue.delayed -= 1
        self._requeue(queue, entry)

    def _expire_oldest(self, queue: _Queue, now: float) -> float | None:
        """Expire the deliveries past their ack deadline; return the next deadline, if any."""
        while queue.in_flight:
            tag, flight = next(iter(queue.in_flight.items()))
            if flight.deadline is None:
                return None
            if flight.deadline > now:
                return flight.deadline
            self._expire(queue.config.name, tag)
        return None

    def _expire(self, subscription: str, tag: int) -> None:
        queue = self._queues[subscription]
        flight = queue.in_flight.pop(tag, None)
        if flight is None:
            return
        logger.warning(
            "message %s of subscription '%s' was not acked within %gs (delivery %d); delivering it again",
            flight.envelope.id, subscription, queue.config.ack_timeout, flight.delivery_count,
        )
        flight.last_error = ErrorInfo.timeout(queue.config.ack_timeout)
        self._released(subscription, tag)
        self._retry_or_give_up(queue, flight, None, False)
        queue.update_room()

    # Inspection

    async def all_settled(self, subscriptions: Sequence[str]) -> bool:
        return all(self._queue(name).size == 0 for name in subscriptions)

    async def stats(self) -> dict[str, Any]:
        topics = {name: queue.config.topic for name, queue in self._queues.items()}
        gauges = {name: self._gauges(queue) for name, queue in self._queues.items()}
        return self.counters.snapshot(self._by_topic, topics, gauges)

    def _gauges(self, queue: _Queue) -> Gauges:
        oldest = None
        if queue.ready:
            # Retries go back to the front, so the front is at most a little younger than the oldest.
            oldest = max(self.clock.wall() - _envelope_of(queue.ready[0]).published_at, 0.0)
        return Gauges(len(queue.in_flight), len(queue.ready) + queue.delayed, queue.delayed, oldest)

    def _queue(self, subscription: str) -> _Queue:
        try:
            return self._queues[subscription]
        except KeyError:
            raise BrokerError(f"subscription '{subscription}' is not declared on the broker") from None
