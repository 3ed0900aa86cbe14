"""The one source of time for flowrun.

Every timer, deadline and timestamp goes through a `Clock`, so a test can swap in a clock
it controls. `monotonic()` measures intervals; `wall()` stamps messages for humans.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Time source used by brokers, the runtime and counters."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for `seconds`."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Wait for `event` up to `timeout` seconds; return whether it was set."""
        ...


class SystemClock:
    """The real clock: `time.monotonic`, `time.time` and the event loop's timers."""

    # The C functions themselves, not methods wrapping them: the runtime reads the clock
    # several times per delivery, and a Python call frame each time is measurable.
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True

        if timeout is not None and timeout <= 0:
            return False

        # asyncio.timeout rather than wait_for: wait_for in Python 3.11 can swallow a
        # cancellation that arrives while it waits, which left broker timer tasks running.
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True


SYSTEM_CLOCK = SystemClock()
