"""Delivery counters, kept in one place per broker so reports, status and metrics agree."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class SubscriptionCounters:
    """Cumulative counts for one subscription."""

    delivered: int = 0
    acked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    dropped: int = 0


class Counters:
    """Published counts per topic and delivery counts per subscription."""

    def __init__(self) -> None:
        self.published: defaultdict[str, int] = defaultdict(int)
        self.subscriptions: defaultdict[str, SubscriptionCounters] = defaultdict(SubscriptionCounters)

    def snapshot(
        self, topics: dict[str, str], gauges: dict[str, tuple[int, int]]
    ) -> dict[str, Any]:
        """Build the report shape from counters plus (pending, in_flight) gauges per subscription.

        `topics` maps each subscription to its topic.
        """
        report: dict[str, Any] = {"topics": {}, "subscriptions": {}}
        for topic in sorted(set(self.published) | set(topics.values())):
            report["topics"][topic] = {"published": self.published.get(topic, 0)}

        for name, topic in sorted(topics.items()):
            pending, in_flight = gauges.get(name, (0, 0))
            counts = asdict(self.subscriptions[name])
            report["subscriptions"][name] = {"topic": topic, **counts, "in_flight": in_flight, "pending": pending}
        return report
