"""Builders and waits shared by the conformance tests. They use only the `Broker` interface."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from flowrun.broker import Broker, SubscriptionConfig
from flowrun.message import Delivery, Envelope
from flowrun.spec import RetrySpec

TOPIC = "Orders"
SUBSCRIPTION = "billing"
DEAD_LETTER_TOPIC = "Orders.dead"
# Long enough that a loaded machine never expires a delivery a test still holds.
SAFE_ACK_TIMEOUT = 5.0
SHORT_ACK_TIMEOUT = 0.2
FAST_RETRY = RetrySpec(initial=0.01, multiplier=1.0, max=0.01)
# Upper bound for anything a test waits on that should happen almost at once.
WAIT_SECONDS = 5.0


def subscription(name: str = SUBSCRIPTION, topic: str = TOPIC, **overrides: Any) -> SubscriptionConfig:
    """Build a subscription config with fast retries and a long ack timeout unless overridden."""
    settings: dict[str, Any] = {"ack_timeout": SAFE_ACK_TIMEOUT, "retry": FAST_RETRY}
    settings.update(overrides)
    return SubscriptionConfig(name=name, topic=topic, **settings)


def envelope(
    topic: str = TOPIC, body: bytes = b"{}", key: str | None = None, headers: dict[str, str] | None = None
) -> Envelope:
    """Build an envelope with a fresh id, stamped now."""
    return Envelope(uuid.uuid4().hex, topic, body, key, dict(headers or {}), time.time())


def envelopes(count: int, topic: str = TOPIC) -> list[Envelope]:
    """Build `count` envelopes whose bodies are the JSON numbers 0 to count - 1."""
    return [envelope(topic, str(number).encode()) for number in range(count)]


async def fetch_exactly(broker: Broker, subscription_name: str, count: int) -> list[Delivery]:
    """Fetch until `count` deliveries arrived, failing if they do not arrive within WAIT_SECONDS."""
    deliveries: list[Delivery] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while len(deliveries) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"received {len(deliveries)} of {count} deliveries on '{subscription_name}'"
        deliveries += await broker.fetch(subscription_name, count - len(deliveries), timeout=remaining)
    return deliveries


async def fetch_one(broker: Broker, subscription_name: str = SUBSCRIPTION) -> Delivery:
    """Fetch a single delivery, waiting up to WAIT_SECONDS for it."""
    (delivery,) = await fetch_exactly(broker, subscription_name, 1)
    return delivery


async def subscription_stats(broker: Broker, subscription_name: str = SUBSCRIPTION) -> dict[str, Any]:
    """Return the stats entry of one subscription."""
    report = await broker.stats()
    return dict(report["subscriptions"][subscription_name])


async def published_count(broker: Broker, topic: str) -> int:
    """Return how many messages the broker counted as published to `topic`."""
    report = await broker.stats()
    return int(report["topics"][topic]["published"])


async def is_still_pending(task: asyncio.Task[Any], seconds: float) -> bool:
    """Wait up to `seconds` for `task` and return whether it is still running afterwards.

    A bounded wait is the only way to check that something does not happen.
    """
    await asyncio.wait({task}, timeout=seconds)
    return not task.done()


def ids_of(deliveries: Sequence[Delivery]) -> list[str]:
    """Return the sorted envelope ids of `deliveries`, duplicates kept so that comparisons show them."""
    return sorted(delivery.envelope.id for delivery in deliveries)
