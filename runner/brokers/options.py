"""Options of each backend (`broker.options` in a flow), checked without importing clients."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowrun.spec import Duration, StrictModel


class MemoryOptions(StrictModel):
    """The memory backend takes no options."""


class SqliteOptions(StrictModel):
    """Options of the sqlite backend."""

    synchronous: Literal["normal", "full", "extra"] = Field(
        "normal",
        description="normal survives a killed process; full also survives power loss, at a cost per commit.",
    )
    dedup_window: Duration = Field(7 * 24 * 3600.0, description="How long a published message id is remembered.")


class RedisOptions(StrictModel):
    """Options of the redis backend (Redis Streams)."""

    max_length: int | None = Field(
        None, ge=1, description="Approximate cap on entries kept per topic stream (XADD MAXLEN ~); none keeps all."
    )
    dedup_window: Duration = Field(7 * 24 * 3600.0, description="How long a published message id is remembered.")


class RabbitmqOptions(StrictModel):
    """Options of the rabbitmq backend."""

    queue_type: Literal["quorum", "classic"] = Field(
        "quorum", description="Queue type per subscription; quorum queues enforce the delivery limit."
    )
    confirm_timeout: Duration = Field(30.0, description="Maximum wait for a publisher confirm.")
    prefetch: int = Field(
        100, ge=1, le=10_000,
        description="Messages the server sends ahead to each subscription's consumer, on top of the push "
        "max_in_flight or the pull batch; they wait in a local buffer until fetched.",
    )


class NatsOptions(StrictModel):
    """Options of the nats backend (JetStream)."""

    storage: Literal["file", "memory"] = Field("file", description="JetStream stream storage.")
    replicas: int = Field(1, ge=1, le=5, description="Stream replicas (needs a cluster for more than 1).")
    duplicate_window: Duration = Field(120.0, description="JetStream duplicate window for message ids.")


BACKEND_OPTIONS: dict[str, type[StrictModel]] = {
    "sqlite": SqliteOptions,
    "memory": MemoryOptions,
    "redis": RedisOptions,
    "rabbitmq": RabbitmqOptions,
    "nats": NatsOptions,
}
