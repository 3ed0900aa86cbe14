"""Broker backends, one module each, chosen by name."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from flowrun.broker import Broker
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.errors import FlowrunError
from pydantic import Field

from flowrun.spec import BrokerSpec, Duration, StrictModel


class SqliteOptions(StrictModel):
    """Options of the sqlite backend (`broker.options`)."""

    synchronous: Literal["normal", "full", "extra"] = Field(
        "normal",
        description="normal survives a killed process; full also survives power loss, at a cost per commit.",
    )
    dedup_window: Duration = Field(7 * 24 * 3600.0, description="How long a published message id is remembered.")


class NoOptions(StrictModel):
    """The memory backend takes no options."""


BACKEND_OPTIONS: dict[str, type[StrictModel]] = {"sqlite": SqliteOptions, "memory": NoOptions}

BACKENDS = ("sqlite", "memory")
STATE_FOLDER = ".flowrun"


def create_broker(spec: BrokerSpec, flow_path: Path, flow_name: str, clock: Clock = SYSTEM_CLOCK) -> Broker:
    """Build the backend a flow's broker section names."""
    if spec.backend == "memory":
        from flowrun.brokers.memory import MemoryBroker

        return MemoryBroker(clock=clock)

    if spec.backend == "sqlite":
        from flowrun.brokers.sqlite import SqliteBroker

        options = SqliteOptions.model_validate(spec.options)
        return SqliteBroker(sqlite_path(spec, flow_path, flow_name), clock=clock, synchronous=options.synchronous,
                            dedup_window=options.dedup_window)

    raise FlowrunError(f"unknown broker backend '{spec.backend}'; available: {', '.join(BACKENDS)}")


def sqlite_path(spec: BrokerSpec, flow_path: Path, flow_name: str) -> Path:
    """The database file: `path` relative to the flow file, else .flowrun/NAME.db beside it."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return path if path.is_absolute() else flow_path.parent / path
    return flow_path.parent / STATE_FOLDER / f"{flow_name}.db"
