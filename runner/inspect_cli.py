"""`flowrun status` and `flowrun dlq`: look into a flow's broker without running the flow."""

from __future__ import annotations

import enum
import json
import logging
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from flowrun.broker import Broker
from flowrun.brokers import create_broker
from flowrun.brokers.sqlite import SqliteBroker
from flowrun.errors import FlowrunError
from flowrun.loader import LoadedFlow
from flowrun.runtime import build_topology

logger = logging.getLogger(__name__)

# Heading of the dead-lettered count in `flowrun status`, by backend, because unlike the
# other columns it is not a current count. SQLite and Redis keep a counter that replays
# and purges do not lower. NATS counts the dead letters still archived. RabbitMQ counts
# only those of the process that runs `status`.
DEAD_LETTERED_HEADINGS = {
    "sqlite": "dead-lettered (all time)",
    "redis": "dead-lettered (all time)",
    "nats": "dead letters (archived)",
    "rabbitmq": "dead-lettered (this process)",
}


class DlqAction(str, enum.Enum):
    LIST = "list"
    REPLAY = "replay"
    PURGE = "purge"


async def with_broker(flow: LoadedFlow, work: Callable[[Broker], Awaitable[Any]]) -> Any:
    """Open the flow's broker for inspection, run `work`, close it."""
    broker = create_broker(flow.spec.broker, flow.path, flow.spec.name)
    opener = getattr(broker, "open_for_inspection", None)
    if opener is None:
        raise FlowrunError(
            f"the {broker.backend} backend keeps no state outside the running process, so there is nothing "
            "to inspect; use the sqlite backend (the default) or a server backend"
        )
    _require_broker_file(broker, flow)
    await opener(build_topology(flow))
    try:
        return await work(broker)
    finally:
        await broker.close()


def _require_broker_file(broker: Broker, flow: LoadedFlow) -> None:
    """Raise FlowrunError when the SQLite broker file does not exist, because opening it would create it."""
    if not isinstance(broker, SqliteBroker) or broker.path.exists():
        return
    raise FlowrunError(
        f"no broker file yet at {broker.path}, so there is nothing to inspect; the first run creates it: "
        f"flowrun up {shlex.quote(flow.display_path)}"
    )


def status_table(report: dict[str, Any], backend: str) -> Table:
    table = Table(title="flowrun status", title_justify="left")
    dead_lettered = DEAD_LETTERED_HEADINGS.get(backend, "dead-lettered")
    for column in ("subscription", "topic", "pending", "in flight", "delayed", dead_lettered, "oldest pending"):
        table.add_column(column, justify="left" if column in ("subscription", "topic") else "right")
    for name, counts in report["subscriptions"].items():
        age = counts.get("oldest_pending_age")
        table.add_row(name, counts["topic"], str(counts["pending"]), str(counts["in_flight"]),
                      str(counts.get("delayed", 0)), str(counts["dead_lettered"]),
                      "-" if age is None else f"{age:.1f}s")
    return table


def print_status(report: dict[str, Any], as_json: bool, console: Console, backend: str) -> None:
    if as_json:
        console.print_json(json.dumps(report))
    else:
        console.print(status_table(report, backend))


def print_dead_letters(letters: list[dict[str, Any]], as_json: bool, console: Console) -> None:
    if as_json:
        rows = [{**letter, "body": letter["body"].decode("utf-8", errors="replace")} for letter in letters]
        console.print_json(json.dumps(rows))
        return

    table = Table(title=f"{len(letters)} dead letters", title_justify="left")
    for column in ("#", "subscription", "message id", "deliveries", "error", "last delivery"):
        table.add_column(column)
    for letter in letters:
        headers = letter["headers"]
        error = f"{headers.get('flowrun.error_type', '')}: {headers.get('flowrun.error', '')}"
        table.add_row(str(letter["number"]), letter["subscription"], letter["message_id"],
                      headers.get("flowrun.delivery_count", ""), error, headers.get("flowrun.last_delivered_at", ""))
    console.print(table)
