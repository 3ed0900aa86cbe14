"""Render the run summary: a rich table for people, JSON for tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SUBSCRIPTION_COLUMNS = ("delivered", "acked", "redelivered", "dead_lettered", "dropped", "in_flight", "pending")


def summary_table(report: dict[str, Any], title: str = "flowrun summary") -> Table:
    """Build one table row per subscription, with its topic's published count."""
    table = Table(title=title, title_justify="left")
    table.add_column("subscription")
    table.add_column("topic")
    table.add_column("published", justify="right")
    for column in SUBSCRIPTION_COLUMNS:
        table.add_column(column.replace("_", " "), justify="right")

    topics = report.get("topics", {})
    for name, counts in report.get("subscriptions", {}).items():
        published = topics.get(counts["topic"], {}).get("published", 0)
        table.add_row(name, counts["topic"], str(published), *(str(counts[column]) for column in SUBSCRIPTION_COLUMNS))

    unsubscribed = [name for name in topics if name not in {c["topic"] for c in report.get("subscriptions", {}).values()}]
    for name in unsubscribed:
        table.add_row("-", name, str(topics[name]["published"]), *("-" for _ in SUBSCRIPTION_COLUMNS))
    return table


def print_summary(report: dict[str, Any], console: Console) -> None:
    console.print(summary_table(report))


REPORT_KEYS = ("topic", "delivered", "acked", "redelivered", "dead_lettered", "dropped", "in_flight", "pending")


def report_shape(report: dict[str, Any]) -> dict[str, Any]:
    """Keep the documented report keys, the same on every backend."""
    subscriptions = {
        name: {key: counts[key] for key in REPORT_KEYS} for name, counts in report.get("subscriptions", {}).items()
    }
    return {"topics": report.get("topics", {}), "subscriptions": subscriptions}


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as JSON, atomically, so a reader never sees half a file."""
    report = report_shape(report)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    temporary.replace(path)
