"""Messages as the broker carries them (`Envelope`, `Delivery`) and as handlers see them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowrun import codec

HEADER_PREFIX = "flowrun."
HOPS_HEADER = "flowrun.hops"
# The id a replayed message had before its first replay, added by `flowrun dlq replay`.
REPLAYED_FROM_HEADER = "flowrun.replayed_from"


@dataclass(slots=True)
class Envelope:
    """One published message: immutable once the broker accepted it."""

    id: str
    topic: str
    body: bytes
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    published_at: float = 0.0
    dedupe: bool = False
    """Whether the publisher chose the id, so a repeat within the dedup window is skipped."""


@dataclass(slots=True)
class Delivery:
    """One delivery of an envelope to a subscription; `tag` identifies it to the broker."""

    envelope: Envelope
    subscription: str
    delivery_count: int
    tag: Any
    first_delivered_at: float = 0.0


class Outcome:
    """Settlement of a delivery by its handler: ack, or nack with an optional delay and error."""

    __slots__ = ("acked", "delay", "error", "terminal", "dead_letter")

    def __init__(
        self, acked: bool, delay: float | None = None, error: BaseException | None = None, terminal: bool = False,
        dead_letter: bool = True,
    ) -> None:
        self.acked = acked
        self.delay = delay
        self.error = error
        self.terminal = terminal
        self.dead_letter = dead_letter


ACKED = Outcome(acked=True)
_SETTLE_LOCK = threading.Lock()


class Message:
    """A delivered message as a handler sees it.

    `ack()` and `nack()` are plain calls that work from async handlers and from sync handlers
    running in worker threads. Under `ack: auto` the runtime settles the message when the
    handler returns unless the handler already did.
    """

    __slots__ = ("_delivery", "_payload", "_decoded", "_on_settle", "_outcome")

    def __init__(self, delivery: Delivery, on_settle: Callable[[Message, Outcome], None]) -> None:
        self._delivery = delivery
        self._payload: Any = None
        self._decoded = False
        self._on_settle = on_settle
        self._outcome: Outcome | None = None

    @property
    def id(self) -> str:
        return self._delivery.envelope.id

    @property
    def topic(self) -> str:
        return self._delivery.envelope.topic

    @property
    def key(self) -> str | None:
        return self._delivery.envelope.key

    @property
    def headers(self) -> dict[str, str]:
        return self._delivery.envelope.headers

    @property
    def delivery_count(self) -> int:
        """1 on the first delivery, 2 on the first redelivery, and so on."""
        return self._delivery.delivery_count

    @property
    def published_at(self) -> float:
        return self._delivery.envelope.published_at

    @property
    def body(self) -> bytes:
        return self._delivery.envelope.body

    @property
    def payload(self) -> Any:
        """The decoded JSON payload; decoded once, on first access."""
        if not self._decoded:
            self._payload = codec.decode(self._delivery.envelope.body)
            self._decoded = True
        return self._payload

    @property
    def settled(self) -> bool:
        return self._outcome is not None

    @property
    def delivery(self) -> Delivery:
        return self._delivery

    def ack(self) -> None:
        """Mark the message done; later ack or nack calls are ignored."""
        self._settle(ACKED)

    def nack(self, delay: float | None = None, error: BaseException | None = None) -> None:
        """Return the message for redelivery after `delay` seconds (default: the retry backoff)."""
        self._settle(Outcome(acked=False, delay=delay, error=error))

    def reject(self, error: BaseException | None = None) -> None:
        """Send the message straight to its dead-letter topic (or drop it) without retrying."""
        self._settle(Outcome(acked=False, error=error, terminal=True))

    def drop(self, error: BaseException | None = None) -> None:
        """Discard the message without retrying or dead-lettering it; it counts as dropped."""
        self._settle(Outcome(acked=False, error=error, terminal=True, dead_letter=False))

    def claim(self, outcome: Outcome) -> bool:
        """Record `outcome` unless the message is settled; return whether it was recorded.

        The runtime uses this to settle on a handler's behalf without the settle callback.
        """
        # One lock shared by all messages; only a sync handler settling from its thread contends.
        with _SETTLE_LOCK:
            if self._outcome is not None:
                return False
            self._outcome = outcome
            return True

    def _settle(self, outcome: Outcome) -> None:
        if self.claim(outcome):
            self._on_settle(self, outcome)

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, topic={self.topic!r}, delivery_count={self.delivery_count})"


def loop_call(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run `callback` on `loop` now if called from the loop's thread, else schedule it there."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None

    if running is loop:
        callback()
    else:
        loop.call_soon_threadsafe(callback)
