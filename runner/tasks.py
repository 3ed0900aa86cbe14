"""Helpers for the background tasks that brokers and workers own."""

from __future__ import annotations

import asyncio

from flowrun.errors import BrokerError


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait until it ended; a BrokerError it raised while ending is ignored."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, BrokerError):
        pass
