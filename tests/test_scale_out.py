"""Several `flowrun up --only` workers on Redis, RabbitMQ and NATS share one subscription.

Each backend uses its engine's own consumer groups and redelivery; these tests check with
real subprocesses that the work is split, nothing is handled twice without a crash, and a
worker killed mid-run loses nothing.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowrun.brokers import create_broker, effective_spec
from flowrun.loader import load_flow
from flowrun.runtime import build_topology

from tests.conftest import SERVER_URLS, require_server
from tests.processes import (
    handled_by_process,
    handled_counts,
    handled_total,
    run_flowrun,
    start_flowrun,
    wait_for_workers,
    wait_until,
    write_recording_flow,
)

NETWORK_BACKENDS = ["redis", "rabbitmq", "nats"]
MESSAGES = 400

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(params=NETWORK_BACKENDS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The backend's URL; afterwards the flow's streams, queues or keys are deleted."""
    require_server(request.param)
    yield SERVER_URLS[request.param]
    asyncio.run(delete_flow(tmp_path / "flow.yaml", SERVER_URLS[request.param]))


async def delete_flow(flow_path: Path, url: str) -> None:
    if not flow_path.exists():
        return
    flow = load_flow(flow_path)
    spec = effective_spec(flow.spec.broker, {"FLOWRUN_BROKER_URL": url})
    broker = create_broker(spec, flow.path, flow.spec.name)
    await broker.open_for_inspection(build_topology(flow))  # type: ignore[attr-defined]
    try:
        await broker.delete_flow_resources()  # type: ignore[attr-defined]
    finally:
        await broker.close()


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def start_workers(folder: Path, environment: dict[str, str], count: int, started: list) -> list:
    new = [
        start_flowrun("up", "flow.yaml", "--only", "work", "--until-drained", cwd=folder, env=environment)
        for _ in range(count)
    ]
    started.extend(new)
    return new


def test_workers_split_the_work(tmp_path: Path, broker_url: str, workers: list) -> None:
    write_recording_flow(tmp_path, MESSAGES, pause=0.005, name=f"scale{uuid.uuid4().hex[:8]}")
    environment = {"FLOWRUN_BROKER_URL": broker_url}

    # Workers first: they declare the subscription before the producer publishes.
    pair = start_workers(tmp_path, environment, 2, workers)
    wait_for_workers(tmp_path / "handled.db", pair, timeout=180)
    producer = run_flowrun("up", "flow.yaml", "--only", "numbers", "--until-drained", cwd=tmp_path, env=environment)
    outputs = [worker.communicate(timeout=300) for worker in pair]

    assert producer.returncode == 0, producer.stderr
    for worker, (_, error_output) in zip(pair, outputs):
        assert worker.returncode == 0, error_output

    counts = handled_counts(tmp_path / "handled.db")
    assert len(counts) == MESSAGES
    assert set(counts.values()) == {1}
    per_process = handled_by_process(tmp_path / "handled.db")
    assert len(per_process) == 2
    assert min(per_process.values()) > 0


def test_killed_worker_loses_nothing(tmp_path: Path, broker_url: str, workers: list) -> None:
    write_recording_flow(tmp_path, MESSAGES, pause=0.01, ack_timeout="2s", name=f"kill{uuid.uuid4().hex[:8]}")
    environment = {"FLOWRUN_BROKER_URL": broker_url}

    victim, survivor = start_workers(tmp_path, environment, 2, workers)
    wait_for_workers(tmp_path / "handled.db", [victim, survivor], timeout=180)
    producer = run_flowrun("up", "flow.yaml", "--only", "numbers", "--until-drained", cwd=tmp_path, env=environment)
    wait_until(lambda: handled_total(tmp_path / "handled.db") >= MESSAGES // 4, timeout=120)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    started = time.monotonic()
    _, error_output = survivor.communicate(timeout=300)

    assert producer.returncode == 0, producer.stderr
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 0, error_output
    assert time.monotonic() - started < 240

    counts = handled_counts(tmp_path / "handled.db")
    # Every message was handled; only those the victim held when it died may repeat.
    assert len(counts) == MESSAGES
    assert sum(count - 1 for count in counts.values()) <= 8
