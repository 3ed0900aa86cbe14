"""Broker backends, one module each, chosen by name."""

from __future__ import annotations

from pathlib import Path

from flowrun.broker import Broker
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.errors import FlowrunError
from flowrun.spec import BrokerSpec

BACKENDS = ("sqlite", "memory")
STATE_FOLDER = ".flowrun"


def create_broker(spec: BrokerSpec, flow_path: Path, flow_name: str, clock: Clock = SYSTEM_CLOCK) -> Broker:
    """Build the backend a flow's broker section names."""
    if spec.backend == "memory":
        from flowrun.brokers.memory import MemoryBroker

        return MemoryBroker(clock=clock)

    if spec.backend == "sqlite":
        from flowrun.brokers.sqlite import SqliteBroker

        return SqliteBroker(sqlite_path(spec, flow_path, flow_name), clock=clock, **spec.options)

    raise FlowrunError(f"unknown broker backend '{spec.backend}'; available: {', '.join(BACKENDS)}")


def sqlite_path(spec: BrokerSpec, flow_path: Path, flow_name: str) -> Path:
    """The database file: `path` relative to the flow file, else .flowrun/NAME.db beside it."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return path if path.is_absolute() else flow_path.parent / path
    return flow_path.parent / STATE_FOLDER / f"{flow_name}.db"
