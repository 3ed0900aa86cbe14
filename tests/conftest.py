"""Shared fixtures: brokers of every backend, started on a given topology.

Network backends run against real servers on 127.0.0.1. A missing server skips their
tests with the reason, except under CI=true, where it fails them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from flowrun.broker import Broker, SubscriptionConfig, Topology
from flowrun.brokers import BACKEND_CLASSES
from flowrun.brokers.options import BACKEND_OPTIONS
from flowrun.clock import SYSTEM_CLOCK
from flowrun.spec import BrokerSpec

BrokerFactory = Callable[..., Awaitable[Broker]]
BACKENDS = ["memory", "sqlite", "redis", "rabbitmq", "nats"]
IN_CI = os.environ.get("CI", "").lower() == "true"
SERVER_URLS = {
    "redis": os.environ.get("FLOWRUN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "rabbitmq": os.environ.get("FLOWRUN_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": os.environ.get("FLOWRUN_TEST_NATS_URL", "nats://127.0.0.1:4222"),
}
SERVER_PORTS = {"redis": 6379, "rabbitmq": 5672, "nats": 4222}


def make_topology(*subscriptions: SubscriptionConfig, topics: tuple[str, ...] = (), flow_name: str = "test") -> Topology:
    """A topology with the given subscriptions; their topics are declared automatically."""
    names = list(topics)
    for config in subscriptions:
        for name in (config.topic, config.dead_letter):
            if name and name not in names:
                names.append(name)
    return Topology(flow_name, tuple(names), tuple(subscriptions))


def server_reachable(backend: str) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", SERVER_PORTS[backend])) == 0


def require_server(backend: str) -> None:
    """Skip (or, in CI, fail) when a network backend's server or client library is missing."""
    if backend not in SERVER_PORTS:
        return

    module_name, _ = BACKEND_CLASSES[backend]
    try:
        __import__(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            reason = f"the {backend} backend module {module_name} is missing from this checkout"
        else:
            reason = f"the {backend} backend needs the package '{error.name}' (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)

    if not server_reachable(backend):
        reason = f"no {backend} server on 127.0.0.1:{SERVER_PORTS[backend]}"
        if IN_CI:
            pytest.fail(f"{reason}; CI must start it (.ci/start-services)")
        pytest.skip(reason)


def create_test_broker(backend: str, tmp_path: Path, flow_name: str) -> Broker:
    """Build a broker of `backend` the way `flowrun up` does, isolated under `flow_name`."""
    spec = BrokerSpec(backend=backend, url=SERVER_URLS.get(backend), path=str(tmp_path / f"{flow_name}.db"))
    options = BACKEND_OPTIONS[backend]()
    module_name, class_name = BACKEND_CLASSES[backend]
    module = __import__(module_name, fromlist=[class_name])
    broker: Broker = getattr(module, class_name).from_spec(spec, options, tmp_path / "flow.yaml", flow_name,
                                                          SYSTEM_CLOCK)
    return broker


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    require_server(name)
    return name


@pytest.fixture
async def broker_factory(backend: str, tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    """Return `await factory(*subscriptions, topics=...)`: a started broker of the current backend.

    Each broker gets its own flow name, so tests never share names on a server; network
    brokers delete what they created when the test ends.
    """
    started: list[Broker] = []

    async def factory(*subscriptions: SubscriptionConfig, topics: tuple[str, ...] = ()) -> Broker:
        flow_name = f"t{uuid.uuid4().hex[:10]}"
        broker = create_test_broker(backend, tmp_path, flow_name)
        await broker.start(make_topology(*subscriptions, topics=topics, flow_name=flow_name))
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        delete = getattr(broker, "delete_flow_resources", None)
        if delete is not None:
            await delete()
        await broker.close()
