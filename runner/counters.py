"""Delivery counters, kept in one place per broker so reports, status and metrics agree."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from collections.abc import Iterable
from typing import Any


@dataclass
class SubscriptionCounters:
    """Cumulative counts for one subscription."""

    delivered: int = 0
    acked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    dropped: int = 0


@dataclass
class Gauges:
    """A subscription's backlog now: waiting (of which delayed for a retry) and in flight."""

    in_flight: int = 0
    pending: int = 0
    delayed: int = 0
    oldest_pending_age: float | None = None


class Counters:
    """Published counts per topic and delivery counts per subscription."""

    def __init__(self) -> None:
        self.published: defaultdict[str, int] = defaultdict(int)
        self.subscriptions: defaultdict[str, SubscriptionCounters] = defaultdict(SubscriptionCounters)

    def snapshot(
        self, declared: Iterable[str], topics: dict[str, str], gauges: dict[str, Gauges]
    ) -> dict[str, Any]:
        """Build the stats shape every backend returns.

        `declared` lists the topics, `topics` maps each subscription to its topic, and
        `gauges` holds each subscription's current backlog.
        """
        report: dict[str, Any] = {"topics": {}, "subscriptions": {}}
        for topic in sorted(set(self.published) | set(declared) | set(topics.values())):
            report["topics"][topic] = {"published": self.published.get(topic, 0)}

        for name, topic in sorted(topics.items()):
            counts = asdict(self.subscriptions[name])
            report["subscriptions"][name] = {"topic": topic, **counts, **asdict(gauges.get(name, Gauges()))}
        return report
