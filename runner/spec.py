"""The flow file format: pydantic models for every YAML key, with defaults and descriptions.

These models are the one place where flow options are documented. Durations accept
`250ms`, `30s`, `2m` or a number of seconds. Unknown keys are errors.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from flowrun.durations import parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
# Push window of a subscriber that sets no max_in_flight (at least 2 x its concurrency),
# as in JetStream's MaxAckPending. The window only reaches it for handlers fast enough to
# finish 1,000 messages within half the ack timeout. Measured on the in-process benchmark,
# 1,000 instead of 100 handles 13-20% more messages per second (two runs each), because
# each fetch, ack batch and wake-up of the producer serves more messages.
DEFAULT_MAX_IN_FLIGHT = 1000


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AckPolicy(str, enum.Enum):
    """When a delivered message counts as done."""

    AUTO = "auto"
    EXPLICIT = "explicit"
    NONE = "none"


class DeliveryMode(str, enum.Enum):
    """Who drives delivery: the broker (push) or the subscriber (pull)."""

    PUSH = "push"
    PULL = "pull"


class OnFull(str, enum.Enum):
    """What `publish` does when a subscription of the topic holds `max_pending` messages."""

    BLOCK = "block"
    REJECT = "reject"


class ErrorAction(str, enum.Enum):
    """What happens to a message whose handler raised a given exception."""

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    DROP = "drop"


class RetrySpec(StrictModel):
    """Backoff between deliveries of a message that failed or timed out."""

    initial: Duration = Field(0.1, description="Delay before the second delivery.")
    multiplier: float = Field(2.0, ge=1.0, description="Factor applied to the delay after each failed delivery.")
    max: Duration = Field(30.0, description="Upper bound of the delay.")
    jitter: float = Field(
        0.0, ge=0.0, le=1.0, description="Random fraction (0 to 1) subtracted from each delay to spread retries."
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetrySpec:
        if self.max < self.initial:
            raise ValueError(f"retry max ({self.max:g}s) is below retry initial ({self.initial:g}s)")
        return self


class BrokerSpec(StrictModel):
    """Which broker carries the flow's messages."""

    backend: str = Field("sqlite", description="Broker backend: sqlite (durable, the default) or memory.")
    url: str | None = Field(
        None, description="Server URL for networked backends; write secrets as ${ENV_VAR} references."
    )
    path: str | None = Field(
        None, description="SQLite database path, relative to the flow file (default .flowrun/NAME.db beside it)."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific options.")


class TopicSpec(StrictModel):
    """A named stream of messages; each subscription of it receives every message."""

    description: str = Field("", description="What the topic's messages mean.")
    max_pending: int = Field(
        10_000, ge=1, description="Per-subscription bound on messages waiting; publish waits or fails beyond it."
    )
    on_full: OnFull = Field(OnFull.BLOCK, description="block: publish waits for room; reject: publish raises.")
    schema_: str | None = Field(
        None,
        alias="schema",
        description="Payload schema: a pydantic model (package.module:Model) or a JSON Schema file "
        "(.json, .yaml or .yml, relative to the flow file). Publishing a payload that does not match fails.",
    )


class ProducerSpec(StrictModel):
    """A plugin that creates messages from outside the flow (files, APIs, timers)."""

    plugin: str = Field(description="Entry point name in group flowrun.plugins, or package.module:attribute.")
    publishes: list[str] = Field(min_length=1, description="Topics the producer may publish to.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="Options passed to the plugin.")


class SubscriberSpec(StrictModel):
    """A handler plugin attached to one topic through its own subscription."""

    topic: str = Field(description="The topic this subscriber consumes.")
    plugin: str = Field(description="Entry point name in group flowrun.plugins, or package.module:attribute.")
    mode: DeliveryMode = Field(DeliveryMode.PUSH, description="push: the broker dispatches; pull: the subscriber fetches.")
    ack: AckPolicy = Field(
        AckPolicy.AUTO,
        description="auto: ack on return, nack on exception; explicit: the handler acks; none: at-most-once.",
    )
    ack_timeout: Duration = Field(30.0, description="A message not acked within this time is delivered again.")
    max_deliveries: int = Field(
        5, ge=1, le=1000, description="Deliveries before a failing message goes to dead_letter or is dropped."
    )
    dead_letter: str | None = Field(None, description="Topic that receives messages that exhausted max_deliveries.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Backoff between deliveries.")
    concurrency: int = Field(1, ge=1, le=10_000, description="Handler calls running at once.")
    max_in_flight: int | None = Field(
        None, ge=1, le=100_000,
        description=f"Push: cap on unacknowledged messages (default: {DEFAULT_MAX_IN_FLIGHT} or 2 x concurrency, "
                    "whichever is larger).",
    )
    batch_size: int = Field(10, ge=1, le=10_000, description="Pull: most messages taken in one fetch.")
    max_wait: Duration = Field(1.0, description="Pull: longest wait of a fetch on an empty queue.")
    handler_timeout: Duration | None = Field(
        None, description="Cancel a handler call after this time and count it as failed."
    )
    errors: dict[str, ErrorAction] = Field(
        default_factory=dict,
        description="Exception class (qualified name, e.g. pydantic.ValidationError) to retry, dead_letter or drop; "
        "the most specific class in the exception's hierarchy wins, unlisted errors retry.",
    )
    ordered: bool = Field(
        False, description="Handle messages of one key in publish order; a retried message holds back only its key."
    )
    publishes: list[str] = Field(default_factory=list, description="Topics the handler may publish to.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="Options passed to the plugin.")

    @field_validator("ack_timeout", "max_wait")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @property
    def effective_max_in_flight(self) -> int:
        return self.max_in_flight or max(DEFAULT_MAX_IN_FLIGHT, 2 * self.concurrency)


class FlowSpec(StrictModel):
    """A whole flow file."""

    name: str = Field(
        "flow", pattern=NAME_PATTERN, description="Flow name; prefixes names on shared brokers."
    )
    description: str = Field("", description="What the flow does.")
    broker: BrokerSpec = Field(default_factory=BrokerSpec, description="Where messages are kept.")
    allow_cycles: bool = Field(False, description="Permit topic cycles; max_hops then stops runaway loops.")
    max_hops: int = Field(32, ge=1, description="Handler hops a message may take before it is dead-lettered.")
    shutdown_timeout: Duration = Field(10.0, description="How long in-flight handlers may run after a stop signal.")
    topics: dict[str, TopicSpec] = Field(description="Topics by name.")
    producers: dict[str, ProducerSpec] = Field(default_factory=dict, description="Producers by name.")
    subscribers: dict[str, SubscriberSpec] = Field(default_factory=dict, description="Subscribers by name.")

    @field_validator("topics", mode="before")
    @classmethod
    def _empty_topics(cls, value: Any) -> Any:
        # `OrderPlaced:` with no body is a topic with default settings.
        if isinstance(value, dict):
            return {name: ({} if spec is None else spec) for name, spec in value.items()}
        return value
