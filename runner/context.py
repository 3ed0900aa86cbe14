"""The context a plugin receives besides its messages: its options and a way to publish."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from flowrun.clock import Clock
from flowrun.errors import UndeclaredTopicError
from flowrun.message import HOPS_HEADER

PublishFunction = Callable[[str, Any, str | None, dict[str, str] | None, str | None], Coroutine[Any, Any, str]]

class HandlerCall:
    """The handler call running in the current task: its message's hops and the publishes it started.

    The runtime waits for those publishes before it acks the message that caused them.
    """

    __slots__ = ("hops", "publishes")

    def __init__(self, hops: int) -> None:
        self.hops = hops
        self.publishes: list[asyncio.Future[str]] = []


# None outside handler calls (in producers).
current_call: contextvars.ContextVar[HandlerCall | None] = contextvars.ContextVar("flowrun_current_call", default=None)


class Context:
    """Options and publishing for one producer or subscriber.

    `publish` checks the topic against the plugin's `publishes` list. Called from the event
    loop it returns an awaitable; awaiting it waits for room in the topic (backpressure).
    Called from a sync handler's worker thread it blocks until the broker accepted the
    message. Either way, under `ack: auto` the triggering message is acked only after every
    publish of its handler call has been accepted.
    """

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        publishes: Iterable[str],
        publish_function: PublishFunction,
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        flow_path: Path,
        flow_name: str,
    ) -> None:
        self.name = name
        self.options = dict(options)
        self.publishes = tuple(publishes)
        self.clock = clock
        self.flow_path = flow_path
        self.flow_name = flow_name
        self.logger = logging.getLogger(f"flowrun.plugin.{name}")
        self.stopping = asyncio.Event()
        self._publish_function = publish_function
        self._loop = loop

    def resolve_path(self, value: str | Path) -> Path:
        """Resolve a path option relative to the flow file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.flow_path.parent / path).resolve()

    def check_topic(self, topic: str) -> None:
        """Raise UndeclaredTopicError unless `topic` is in this plugin's `publishes` list."""
        if topic not in self.publishes:
            allowed = ", ".join(self.publishes) or "none"
            raise UndeclaredTopicError(
                f"'{self.name}' published to topic '{topic}', which is not in its publishes list "
                f"(allowed: {allowed}); add '{topic}' to publishes of '{self.name}' in the flow file"
            )

    def publish(
        self,
        topic: str,
        payload: Any,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        id: str | None = None,
    ) -> Any:
        """Publish `payload` to `topic`; see the class docstring for sync and async use."""
        self.check_topic(topic)

        headers = dict(headers or {})
        call = current_call.get()
        if call is not None:
            headers[HOPS_HEADER] = str(call.hops + 1)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None

        if running is self._loop:
            future = asyncio.ensure_future(self._publish_function(topic, payload, key, headers, id))
            if call is not None:
                call.publishes.append(future)
            return future

        coroutine = self._publish_function(topic, payload, key, headers, id)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
