"""Shared fixtures: brokers of every backend, started on a given topology."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from flowrun.broker import Broker, SubscriptionConfig, Topology
from flowrun.brokers.memory import MemoryBroker
from flowrun.brokers.sqlite import SqliteBroker

BrokerFactory = Callable[..., Awaitable[Broker]]
BACKENDS = ["memory", "sqlite"]
IN_CI = os.environ.get("CI", "").lower() == "true"


def make_topology(*subscriptions: SubscriptionConfig, topics: tuple[str, ...] = ()) -> Topology:
    """A topology with the given subscriptions; their topics are declared automatically."""
    names = list(topics)
    for config in subscriptions:
        for name in (config.topic, config.dead_letter):
            if name and name not in names:
                names.append(name)
    return Topology("test", tuple(names), tuple(subscriptions))


def _create(backend: str, tmp_path: Path) -> Broker:
    if backend == "memory":
        return MemoryBroker()
    if backend == "sqlite":
        return SqliteBroker(tmp_path / f"broker-{uuid.uuid4().hex[:8]}.db")
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def broker_factory(backend: str, tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    """Return `await factory(*subscriptions, topics=...)`: a started broker of the current backend."""
    started: list[Broker] = []

    async def factory(*subscriptions: SubscriptionConfig, topics: tuple[str, ...] = ()) -> Broker:
        broker = _create(backend, tmp_path)
        await broker.start(make_topology(*subscriptions, topics=topics))
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        await broker.close()
