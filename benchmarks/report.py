"""Turn collected figures into the results table, the target checks and the plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.runner import Figures

CEILING = "asyncio-orjson"
# A paced run whose last message was handled later than this share of its schedule plus
# KEPT_UP_SLACK_SECONDS fell behind the rate, so its latency measures a growing backlog
# rather than the system's delivery time.
KEPT_UP_SHARE = 1.05
KEPT_UP_SLACK_SECONDS = 0.1
MIB = 1024 * 1024


@dataclass
class SystemFigures:
    """The throughput and latency runs of one system."""

    name: str
    description: str
    messages: int
    throughput: Figures
    latency: Figures
    rate: float
    subscribers: int
    latency_skipped: str | None = None

    def kept_up(self) -> bool | None:
        """Return whether the paced run kept up with its rate, or None without a paced run."""
        seconds = self.latency.median("seconds")
        handled = self.latency.median("handled")
        if seconds is None or handled is None:
            return None
        schedule = handled / self.subscribers / self.rate
        return seconds <= schedule * KEPT_UP_SHARE + KEPT_UP_SLACK_SECONDS


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _milliseconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}"
    return f"{value:,.1f}"


def results_table(rows: list[SystemFigures], rate: float, subscribers: int) -> Table:
    """Build the main table: throughput, ratio to the asyncio ceiling, latency and RSS."""
    ceiling = next((row.throughput.median("throughput") for row in rows if row.name == CEILING), None)
    table = Table(title=f"{subscribers} subscribers, each handles every message (medians)")
    table.add_column("system")
    table.add_column("messages", justify="right")
    table.add_column("handled/s", justify="right")
    table.add_column(f"x {CEILING}", justify="right")
    table.add_column(f"p50 ms @{rate:g}/s", justify="right")
    table.add_column(f"p99 ms @{rate:g}/s", justify="right")
    table.add_column("peak RSS MiB", justify="right")
    table.add_column("notes")

    for row in rows:
        throughput = row.throughput.median("throughput")
        ratio = throughput / ceiling if throughput is not None and ceiling else None
        notes = []
        if row.throughput.errors or row.latency.errors:
            notes.append("failed: " + (row.throughput.errors + row.latency.errors)[0][:120])
        p99 = _milliseconds(row.latency.median("latency_p99_ms"))
        if row.latency_skipped and not row.latency.runs:
            notes.append(f"no latency run: {row.latency_skipped}")
        if row.kept_up() is False:
            p99 += " *"
            notes.append(f"* fell behind {rate:g}/s")
        rss = row.throughput.median("peak_rss_bytes")
        table.add_row(
            row.name,
            _number(row.messages),
            _number(throughput),
            _number(ratio, 3),
            _milliseconds(row.latency.median("latency_p50_ms")),
            p99,
            _number(rss / MIB if rss else None, 0),
            "; ".join(notes),
        )
    return table


def probes_table(probes: dict[str, tuple[str, Figures]]) -> Table:
    """Build the table of the extra latency runs that some targets need."""
    table = Table(title="Latency probes (medians)")
    table.add_column("probe")
    table.add_column("what it measures")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("notes")
    for name, (purpose, figures) in probes.items():
        table.add_row(name, purpose, _milliseconds(figures.median("latency_p50_ms")),
                      _milliseconds(figures.median("latency_p99_ms")), "; ".join(error[:120] for error in figures.errors[:1]))
    return table


@dataclass
class Target:
    """One performance target and whether this run met it."""

    goal: str
    figures: str
    status: str  # "met", "not met" or "not measured"


def _ratio_target(by_name: dict[str, SystemFigures], goal: str, system: str, reference: str,
                  minimum: float) -> Target:
    mine = by_name.get(system)
    theirs = by_name.get(reference)
    value = mine.throughput.median("throughput") if mine else None
    base = theirs.throughput.median("throughput") if theirs else None
    if value is None or not base:
        missing = system if value is None else reference
        return Target(goal, f"{missing} has no throughput figure in this run", "not measured")
    ratio = value / base
    text = f"{system} {value:,.0f}/s vs {reference} {base:,.0f}/s = {ratio:.3f} x"
    return Target(goal, text, "met" if ratio >= minimum else "not met")


def _latency_target(goal: str, label: str, figures: Figures | None, key: str, maximum: float,
                    kept_up: bool | None = None) -> Target:
    value = figures.median(key) if figures else None
    if value is None:
        return Target(goal, f"{label} has no latency figure in this run", "not measured")
    text = f"{label}: {key.removeprefix('latency_').removesuffix('_ms')} {value:.2f} ms"
    if kept_up is False:
        text += " (fell behind the rate, so this is the delay of a growing backlog)"
    return Target(goal, text, "met" if value <= maximum else "not met")


def evaluate_targets(rows: list[SystemFigures], probes: dict[str, tuple[str, Figures]], rate: float,
                     fast_probe: str, wakeup_probe: str) -> list[Target]:
    """Check the throughput and latency targets against this run's medians."""
    by_name = {row.name: row for row in rows}
    targets = [
        _ratio_target(by_name, "memory backend >= 0.5 x asyncio ceiling (orjson)", "flowrun-memory", CEILING, 0.5),
        _ratio_target(by_name, "sqlite backend >= 0.5 x raw sqlite3 batched", "flowrun-sqlite", "sqlite3-batched", 0.5),
        _ratio_target(by_name, "sqlite backend >= 3 x persist-queue (defaults)", "flowrun-sqlite", "persist-queue", 3.0),
        _ratio_target(by_name, "redis backend >= 0.7 x raw redis-py batched", "flowrun-redis", "redis-py-batched", 0.7),
        _ratio_target(by_name, "redis backend >= 5 x FastStream", "flowrun-redis", "faststream-redis", 5.0),
        _ratio_target(by_name, "nats backend >= 0.7 x raw nats-py batched", "flowrun-nats", "nats-py-batched", 0.7),
    ]
    wakeup = probes.get(wakeup_probe)
    targets.append(_latency_target("pull wake-up on an empty queue <= 2 ms median (memory)", wakeup_probe,
                                   wakeup[1] if wakeup else None, "latency_p50_ms", 2.0))
    fast = probes.get(fast_probe)
    targets.append(_latency_target("publish-to-handle p99 <= 1 ms at 5,000 msg/s (memory)", fast_probe,
                                   fast[1] if fast else None, "latency_p99_ms", 1.0))
    sqlite = by_name.get("flowrun-sqlite")
    sqlite_goal = "publish-to-handle p99 <= 10 ms at 2,000 msg/s (sqlite)"
    if rate != 2000:
        targets.append(Target(sqlite_goal, f"this run paced at {rate:g}/s, not 2,000/s", "not measured"))
    else:
        targets.append(_latency_target(sqlite_goal, "flowrun-sqlite @2000/s", sqlite.latency if sqlite else None,
                                       "latency_p99_ms", 10.0, sqlite.kept_up() if sqlite else None))
    targets.append(Target("RSS flat within 50 MB while 1,000,000 messages wait (sqlite)",
                          "measured by python -m benchmarks.run --scaling", "not measured"))
    return targets


def targets_table(targets: list[Target]) -> Table:
    table = Table(title="Targets")
    table.add_column("target")
    table.add_column("status")
    table.add_column("figures")
    styles = {"met": "green", "not met": "red", "not measured": "yellow"}
    for target in targets:
        table.add_row(target.goal, f"[{styles[target.status]}]{target.status}[/]", target.figures)
    return table


def plot_results(rows: list[SystemFigures], rate: float, path: Path, title: str) -> None:
    """Save a PNG with throughput and p99 latency per system (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [row for row in rows if row.throughput.median("throughput")]
    names = [row.name for row in plotted]
    colours = ["tab:orange" if name.startswith("flowrun-") else "tab:blue" for name in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(plotted) + 1.8), sharey=True)

    throughputs = [row.throughput.median("throughput") or 0 for row in plotted]
    left.barh(names, throughputs, color=colours)
    left.set_xscale("log")
    left.set_xlabel("messages handled per second (log scale)")
    left.invert_yaxis()
    for index, value in enumerate(throughputs):
        left.text(value, index, f" {value:,.0f}", va="center", fontsize=8)

    latencies = [row.latency.median("latency_p99_ms") or 0 for row in plotted]
    hatches = ["//" if row.kept_up() is False else "" for row in plotted]
    right.barh(names, latencies, color=colours, hatch=hatches)
    right.set_xscale("log")
    right.set_xlabel(f"p99 publish-to-handle latency at {rate:g} msg/s, ms (log scale; hatched: fell behind the rate)")
    smallest = min((value for value in latencies if value), default=1.0)
    for index, (row, value) in enumerate(zip(plotted, latencies)):
        if value:
            label = f" {value:.2f}" + (" (fell behind)" if row.kept_up() is False else "")
            right.text(value, index, label, va="center", fontsize=8)
        elif row.latency_skipped:
            right.text(smallest, index, " not run: below the paced rate", va="center", fontsize=8)

    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_tables(console: Console, *tables: Table) -> None:
    for table in tables:
        console.print(table)


def to_json(rows: list[SystemFigures]) -> dict[str, Any]:
    return {
        row.name: {
            "description": row.description,
            "messages": row.messages,
            "throughput": row.throughput.to_json(),
            "latency": row.latency.to_json() | {"rate": row.rate, "kept_up": row.kept_up(),
                                                "skipped": row.latency_skipped},
        }
        for row in rows
    }

