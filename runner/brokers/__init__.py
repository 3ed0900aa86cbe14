"""Broker backends, one module each, chosen by name."""

from __future__ import annotations

from pathlib import Path

from flowrun.broker import Broker
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.errors import FlowrunError
from flowrun.spec import BrokerSpec

BACKENDS = ("memory",)


def create_broker(spec: BrokerSpec, flow_path: Path, clock: Clock = SYSTEM_CLOCK) -> Broker:
    """Build the backend a flow's broker section names."""
    if spec.backend == "memory":
        from flowrun.brokers.memory import MemoryBroker

        return MemoryBroker(clock=clock)

    raise FlowrunError(f"unknown broker backend '{spec.backend}'; available: {', '.join(BACKENDS)}")
