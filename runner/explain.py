"""Effective delivery guarantees of each subscription, from its settings and the chosen backend."""

from __future__ import annotations

from dataclasses import dataclass

from flowrun.brokers import effective_spec
from flowrun.durations import format_duration
from flowrun.loader import LoadedFlow
from flowrun.spec import AckPolicy, SubscriberSpec


@dataclass(frozen=True)
class Guarantee:
    """The effective delivery contract of one subscription."""

    subscription: str
    topic: str
    backend: str
    delivery: str
    ordering: str
    max_attempts: int
    worst_case_to_dead_letter: float | None
    after_last_attempt: str


def worst_case_to_dead_letter(sub: SubscriberSpec) -> float | None:
    """Longest time from first delivery to giving up: every attempt times out, every backoff is full."""
    if sub.ack is AckPolicy.NONE:
        return None

    total = sub.max_deliveries * sub.ack_timeout
    delay = sub.retry.initial
    for _ in range(sub.max_deliveries - 1):
        total += min(delay, sub.retry.max)
        delay *= sub.retry.multiplier
    return total


def explain_flow(flow: LoadedFlow) -> list[Guarantee]:
    backend = effective_spec(flow.spec.broker).backend
    guarantees = []
    for name, sub in flow.spec.subscribers.items():
        if sub.ack is AckPolicy.NONE:
            delivery = "at-most-once (removed on delivery; a failed handler loses the message)"
        else:
            durable = "survives a crash" if backend != "memory" else "lost if the process exits"
            delivery = f"at-least-once ({durable}; handlers may see a repeat)"

        if sub.ordered:
            ordering = "per key (one message of a key in flight at a time)"
        elif sub.concurrency == 1 and (sub.mode.value == "pull" or sub.effective_max_in_flight == 1):
            ordering = "publish order until a retry reorders"
        else:
            calls = "call" if sub.concurrency == 1 else "calls"
            ordering = f"none ({sub.concurrency} concurrent handler {calls})"

        if sub.dead_letter:
            after = f"dead-lettered to '{sub.dead_letter}'"
        elif sub.ack is AckPolicy.NONE:
            after = "dropped (no retries under ack: none)"
        else:
            after = "dropped and counted (no dead_letter topic)"

        attempts = 1 if sub.ack is AckPolicy.NONE else sub.max_deliveries
        guarantees.append(Guarantee(name, sub.topic, backend, delivery, ordering, attempts,
                                    worst_case_to_dead_letter(sub), after))
    return guarantees


def describe_worst_case(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(round(seconds, 3))
