"""Run the workload on flowrun and its references, and print throughput, latency and RSS.

    python -m benchmarks.run [--messages N] [--runs R] [--only NAME,...] [--json out.json]
    python -m benchmarks.run --scaling [--json scaling.json]

Each run of each system is a fresh child process. Systems run in rounds (every system
once per round), so slow drift of a shared machine spreads over all of them. Every figure
is the median of the rounds. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import machine, report
from benchmarks.machine import QUIET_MAX_WAIT_SECONDS
from benchmarks.runner import REPO_ROOT, Attempt, Figures, run_child
from benchmarks.scaling import DEFAULT_PENDING
from benchmarks.systems import SYSTEMS, System, find
from benchmarks.workload import RunSpec

DEFAULT_MESSAGES = 1_500_000
DEFAULT_RUNS = 3
DEFAULT_RATE = 2000.0
DEFAULT_LATENCY_SECONDS = 2.0
DEFAULT_TIMEOUT_SECONDS = 300.0
SUBSCRIBERS = 2
DEFAULT_PLOT = REPO_ROOT / "docs" / "benchmarks.png"


@dataclass(frozen=True)
class Probe:
    """An extra paced run of one system, for a latency target."""

    name: str
    system: str
    rate: float
    purpose: str
    options: dict[str, Any] = field(default_factory=dict)
    subscribers: int = SUBSCRIBERS


FAST_PROBE = Probe("flowrun-memory @5000/s", "flowrun-memory", 5000.0, "push delivery at 5,000 msg/s")
# At 50 msg/s each message arrives at an empty queue, with the pull subscriber waiting in fetch.
WAKEUP_PROBE = Probe("flowrun-memory pull wake-up", "flowrun-memory", 50.0,
                     "pull subscriber waiting on an empty queue, one message every 20 ms",
                     {"subscriber": {"mode": "pull"}})
SQLITE_PROBE = Probe("flowrun-sqlite @2000/s, 1 subscriber", "flowrun-sqlite", 2000.0,
                     "2,000 deliveries/s instead of 4,000", subscribers=1)
PROBES = (FAST_PROBE, WAKEUP_PROBE, SQLITE_PROBE)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES,
                        help="messages of the fastest system (asyncio-orjson); every other system runs its "
                             f"own share of it, at least 100 (default {DEFAULT_MESSAGES:,}); with --scaling, "
                             f"every point runs N / {DEFAULT_MESSAGES:,} of its usual message count")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"runs per system and mode; figures are their medians (default {DEFAULT_RUNS}, "
                             "with --scaling 1)")
    parser.add_argument("--only", default=None,
                        help="comma-separated system names to run (default: all); see --list")
    parser.add_argument("--json", type=Path, default=None, help="also write every run and median to this JSON file")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"messages per second of the paced latency runs (default {DEFAULT_RATE:g})")
    parser.add_argument("--latency-seconds", type=float, default=DEFAULT_LATENCY_SECONDS,
                        help=f"duration in seconds of each paced latency run (default {DEFAULT_LATENCY_SECONDS:g})")
    parser.add_argument("--no-latency", action="store_true", help="skip the paced latency runs and probes")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT,
                        help="PNG file for the plot (default docs/benchmarks.png; docs/scaling.png with --scaling)")
    parser.add_argument("--no-plot", action="store_true", help="do not write a plot")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help=f"seconds after which one child run counts as failed (default {DEFAULT_TIMEOUT_SECONDS:g})")
    parser.add_argument("--settle", type=float, default=QUIET_MAX_WAIT_SECONDS,
                        help="before each run, wait up to this many seconds for the CPUs to be at most 10%% busy "
                             f"(default {QUIET_MAX_WAIT_SECONDS:g}; 0 does not wait)")
    parser.add_argument("--scaling", action="store_true",
                        help="run the scaling figures instead (subscribers, message size, 1M pending, processes)")
    parser.add_argument("--pending", type=int, default=DEFAULT_PENDING,
                        help=f"--scaling: messages of the backlog published with no subscriber (default {DEFAULT_PENDING:,})")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="print the tables and write the plot of an earlier --json file instead of running")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    arguments = parser.parse_args(argv)

    if arguments.runs is None:
        arguments.runs = 1 if arguments.scaling else DEFAULT_RUNS
    if arguments.messages < 1:
        parser.error(f"--messages must be at least 1, got {arguments.messages}")
    if arguments.runs < 1:
        parser.error(f"--runs must be at least 1, got {arguments.runs}")
    if arguments.pending < 1:
        parser.error(f"--pending must be at least 1, got {arguments.pending}")
    if arguments.rate <= 0:
        parser.error(f"--rate must be positive, got {arguments.rate:g}")
    return arguments


def select_systems(only: str | None) -> list[System]:
    if only is None:
        return list(SYSTEMS)
    selected = []
    for name in (part.strip() for part in only.split(",")):
        if not name:
            continue
        try:
            selected.append(find(name))
        except KeyError:
            known = ", ".join(system.name for system in SYSTEMS)
            raise SystemExit(f"error: unknown system '{name}' in --only; choose from {known}") from None
    return selected


def _describe_attempt(attempt: Attempt, latency: bool) -> str:
    if attempt.data is None:
        return f"[red]failed[/]: {attempt.error}"
    data = attempt.data
    if latency:
        return (f"p50 {data['latency_p50_ms']:.2f} ms, p99 {data['latency_p99_ms']:.2f} ms "
                f"({data['handled']:,} handled in {data['seconds']:.1f} s)")
    return f"{data['throughput']:,.0f} handled/s ({data['handled']:,} in {data['seconds']:.1f} s)"


def _record(figures: Figures, attempt: Attempt) -> None:
    if attempt.data is None:
        figures.errors.append(attempt.error or "unknown error")
    else:
        figures.runs.append(attempt.data)


def _run_system_once(system: System, row: report.SystemFigures, arguments: argparse.Namespace, console: Console,
                     prefix: str) -> None:
    """Run one throughput run of `system` and, unless skipped, one paced latency run."""
    attempt = run_child(system, RunSpec(system.name, row.messages, SUBSCRIBERS), arguments.timeout, arguments.settle)
    _record(row.throughput, attempt)
    console.print(f"{prefix} {system.name} throughput: {_describe_attempt(attempt, False)}")
    if arguments.no_latency:
        return

    # A system slower than the paced rate only builds a backlog, so its latency run
    # would measure that backlog. Such a reference is skipped and noted instead.
    # flowrun's own rows always run, because their targets need the figure.
    capacity = row.throughput.median("throughput")
    needed = arguments.rate * SUBSCRIBERS
    if capacity is not None and capacity < needed and not system.name.startswith("flowrun-"):
        row.latency_skipped = f"{capacity:,.0f} handled/s is below the paced {needed:,.0f}/s"
        return
    row.latency_skipped = None

    latency_messages = max(1, round(arguments.rate * arguments.latency_seconds))
    spec = RunSpec(system.name, latency_messages, SUBSCRIBERS, rate=arguments.rate)
    attempt = run_child(system, spec, arguments.timeout, arguments.settle)
    _record(row.latency, attempt)
    console.print(f"{prefix} {system.name} latency @{arguments.rate:g}/s: {_describe_attempt(attempt, True)}")


def run_main(arguments: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Run every selected system and probe for `--runs` rounds; print and return the figures."""
    systems = select_systems(arguments.only)
    description = machine.describe()
    console.print(f"machine: {machine.summary_line(description)}; {machine.load_line()}")

    available: list[System] = []
    skipped: dict[str, str] = {}
    for system in systems:
        reason = system.missing()
        if reason is None:
            available.append(system)
        else:
            skipped[system.name] = reason
            console.print(f"skipped {system.name}: {reason}")

    rows = [report.SystemFigures(system.name, system.description, system.messages(arguments.messages), Figures(),
                                 Figures(), arguments.rate, SUBSCRIBERS) for system in available]
    names = {system.name for system in available}
    probes = [probe for probe in PROBES if probe.system in names and not arguments.no_latency]
    probe_figures = {probe.name: (probe.purpose, Figures()) for probe in probes}

    started = time.monotonic()
    for round_number in range(1, arguments.runs + 1):
        prefix = f"[{round_number}/{arguments.runs}]"
        for system, row in zip(available, rows):
            _run_system_once(system, row, arguments, console, prefix)
        for probe in probes:
            messages = max(1, round(probe.rate * arguments.latency_seconds))
            spec = RunSpec(probe.system, messages, probe.subscribers, rate=probe.rate, options=probe.options)
            attempt = run_child(find(probe.system), spec, arguments.timeout, arguments.settle)
            _record(probe_figures[probe.name][1], attempt)
            console.print(f"{prefix} {probe.name}: {_describe_attempt(attempt, True)}")
    elapsed = time.monotonic() - started

    targets = report.evaluate_targets(rows, probe_figures, arguments.rate, FAST_PROBE.name, WAKEUP_PROBE.name)
    console.print()
    report.print_tables(console, report.results_table(rows, arguments.rate, SUBSCRIBERS))
    if probe_figures:
        report.print_tables(console, report.probes_table(probe_figures))
    report.print_tables(console, report.targets_table(targets))
    console.print(f"{arguments.runs} rounds in {elapsed / 60:.1f} min, {machine.load_line()} at the end; "
                  "ratios compare systems of this run only.")

    if not arguments.no_plot and rows:
        title = (f"{SUBSCRIBERS} subscribers, medians of {arguments.runs} runs; "
                 f"{machine.summary_line(description)}")
        report.plot_results(rows, arguments.rate, arguments.plot, title)
        console.print(f"plot written to {arguments.plot}")

    return {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "machine": description,
        "settings": {"messages": arguments.messages, "runs": arguments.runs, "rate": arguments.rate,
                     "latency_seconds": arguments.latency_seconds, "subscribers": SUBSCRIBERS},
        "elapsed_seconds": elapsed,
        "load_average_at_end": machine.load_line(),
        "systems": report.to_json(rows),
        "skipped": skipped,
        "probes": {name: {"purpose": purpose, **figures.to_json()} for name, (purpose, figures) in probe_figures.items()},
        "targets": [target.__dict__ for target in targets],
    }


def replay_json(arguments: argparse.Namespace, console: Console) -> None:
    """Print the tables and write the plot of a main-run JSON file written by --json."""
    data = json.loads(arguments.from_json.read_text(encoding="utf-8"))
    settings = data["settings"]
    rows = []
    for name, figures in data["systems"].items():
        latency = figures["latency"]
        rows.append(report.SystemFigures(
            name, figures["description"], figures["messages"],
            Figures(figures["throughput"]["runs"], figures["throughput"]["errors"]),
            Figures(latency["runs"], latency["errors"]), settings["rate"], settings["subscribers"],
            latency.get("skipped")))
    probe_figures = {name: (probe["purpose"], Figures(probe["runs"], probe["errors"]))
                     for name, probe in data["probes"].items()}
    targets = report.evaluate_targets(rows, probe_figures, settings["rate"], FAST_PROBE.name, WAKEUP_PROBE.name)
    console.print(f"{data['command']}: machine {machine.summary_line(data['machine'])}")
    report.print_tables(console, report.results_table(rows, settings["rate"], settings["subscribers"]))
    if probe_figures:
        report.print_tables(console, report.probes_table(probe_figures))
    report.print_tables(console, report.targets_table(targets))
    if not arguments.no_plot and rows:
        title = (f"{settings['subscribers']} subscribers, medians of {settings['runs']} runs; "
                 f"{machine.summary_line(data['machine'])}")
        report.plot_results(rows, settings["rate"], arguments.plot, title)
        console.print(f"plot written to {arguments.plot}")


def _interrupt(signal_number: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    # subprocess.run kills its child on KeyboardInterrupt, so SIGTERM stops the current
    # child too. A killed child leaves its stream or queue on the server.
    signal.signal(signal.SIGTERM, _interrupt)
    # A pipe gets a wide table instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=180)

    if arguments.list:
        for system in SYSTEMS:
            console.print(f"{system.name:24} {system.description}")
        return 0

    if arguments.from_json is not None:
        try:
            replay_json(arguments, console)
        except (OSError, ValueError, KeyError) as error:
            console.print(f"error: cannot replay {arguments.from_json}: {type(error).__name__}: {error}; "
                          "pass a file written by python -m benchmarks.run --json")
            return 1
        return 0

    if arguments.scaling:
        from benchmarks import scaling

        plot = arguments.plot if arguments.plot != DEFAULT_PLOT else REPO_ROOT / "docs" / "scaling.png"
        output = scaling.run_scaling(arguments, console, None if arguments.no_plot else plot)
    else:
        output = run_main(arguments, console)

    if arguments.json is not None:
        arguments.json.write_text(json.dumps(output, indent=2), encoding="utf-8")
        console.print(f"figures written to {arguments.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
