"""Scaling figures of flowrun: subscribers, message size, a 1,000,000-message backlog, processes.

Run through `python -m benchmarks.run --scaling`. Parts:

1. subscribers: throughput with 1, 2, 4, 8 and 16 subscribers (memory, sqlite). Every
   point handles about the same number of messages in total, so it publishes fewer
   messages when it has more subscribers.
2. message size: throughput with 0.3 KB, 4 KB and 64 KB payloads (memory, sqlite).
3. backlog: publish `--pending` messages with no subscriber running (sqlite), then drain
   them. It reports the database size, the WAL size and the RSS of both phases.
4. processes: 1, 2 and 4 `flowrun up FLOW --only sub-1 --until-drained` worker processes
   draining one subscription that was filled beforehand (sqlite, redis, nats).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.runner import Attempt, child_environment, run_child
from benchmarks.systems import System, find
from benchmarks.systems.flowrun_flow import PRODUCER, delete_resources, write_flow
from benchmarks.workload import RunSpec

MIB = 1024 * 1024
SUBSCRIBER_COUNTS = (1, 2, 4, 8, 16)
PAYLOAD_SIZES = (300, 4 * 1024, 64 * 1024)
PROCESS_COUNTS = (1, 2, 4)
PROCESS_BACKENDS = ("sqlite", "redis", "nats")
DEFAULT_PENDING = 1_000_000
# Messages handled in total per point (all subscribers together), at --messages 1,500,000.
HANDLED_PER_POINT = {"memory": 800_000, "sqlite": 200_000}
SIZE_HANDLED = {("memory", 300): 800_000, ("memory", 4096): 400_000, ("memory", 65536): 40_000,
                ("sqlite", 300): 200_000, ("sqlite", 4096): 100_000, ("sqlite", 65536): 20_000}
PROCESS_MESSAGES = {"sqlite": 100_000, "redis": 100_000, "nats": 100_000}
DEFAULT_MESSAGES = 1_500_000
WORKER_TIMEOUT_SECONDS = 600.0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _attempts(system: System, spec: RunSpec, runs: int, timeout: float) -> tuple[list[dict[str, Any]], list[str]]:
    results, errors = [], []
    for _ in range(runs):
        attempt: Attempt = run_child(system, spec, timeout)
        if attempt.data is None:
            errors.append(attempt.error or "unknown error")
        else:
            results.append(attempt.data)
    return results, errors


def _scaled(count: int, factor: float) -> int:
    return max(100, round(count * factor))


def measure_subscribers(console: Console, runs: int, factor: float, timeout: float) -> list[dict[str, Any]]:
    points = []
    for backend in ("memory", "sqlite"):
        system = find(f"flowrun-{backend}")
        for subscribers in SUBSCRIBER_COUNTS:
            messages = _scaled(HANDLED_PER_POINT[backend] // subscribers, factor)
            spec = RunSpec(system.name, messages, subscribers)
            results, errors = _attempts(system, spec, runs, timeout)
            throughput = _median([result["throughput"] for result in results])
            rss = _median([result["peak_rss_bytes"] for result in results])
            points.append({"backend": backend, "subscribers": subscribers, "messages": messages,
                           "throughput": throughput, "peak_rss_bytes": rss, "errors": errors})
            console.print(f"subscribers {backend} x{subscribers}: " + (
                f"{throughput:,.0f} handled/s" if throughput else f"failed: {errors[:1]}"))
    return points


def measure_sizes(console: Console, runs: int, factor: float, timeout: float) -> list[dict[str, Any]]:
    points = []
    for backend in ("memory", "sqlite"):
        system = find(f"flowrun-{backend}")
        for size in PAYLOAD_SIZES:
            messages = _scaled(SIZE_HANDLED[(backend, size)] // 2, factor)
            spec = RunSpec(system.name, messages, 2, payload_bytes=size)
            results, errors = _attempts(system, spec, runs, timeout)
            throughput = _median([result["throughput"] for result in results])
            points.append({
                "backend": backend, "payload_bytes": size, "messages": messages, "throughput": throughput,
                "mib_per_second": throughput * size / MIB if throughput else None,
                "peak_rss_bytes": _median([result["peak_rss_bytes"] for result in results]), "errors": errors,
            })
            console.print(f"size {backend} {size:,} B: " + (
                f"{throughput:,.0f} handled/s, {throughput * size / MIB:,.1f} MiB/s" if throughput
                else f"failed: {errors[:1]}"))
    return points


def measure_backlog(console: Console, pending: int, timeout: float) -> dict[str, Any]:
    """Publish `pending` messages with no subscriber running, then drain them (sqlite)."""
    system = System("flowrun-sqlite-backlog", "flowrun_pending", 1.0)
    phases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flowrun-backlog-") as folder:
        for phase in ("publish", "drain"):
            spec = RunSpec(system.name, pending, 1, options={"phase": phase, "folder": folder})
            attempt = run_child(system, spec, timeout)
            if attempt.data is None:
                phases[phase] = {"error": attempt.error}
                console.print(f"backlog {phase}: failed: {attempt.error}")
                break
            data = attempt.data
            phases[phase] = data
            extra = data["extra"]
            growth = extra["rss_growth_bytes"]
            console.print(
                f"backlog {phase}: {data['handled']:,} messages in {data['seconds']:.0f} s, "
                f"db {extra['db_bytes'] / MIB:,.0f} MiB + wal {extra['wal_bytes'] / MIB:,.0f} MiB, "
                f"freelist {extra['freelist_bytes'] / MIB:,.0f} MiB, peak RSS {data['peak_rss_bytes'] / MIB:,.0f} MiB, "
                f"RSS growth after {extra['rss_baseline_after']:,}: "
                + (f"{growth / MIB:,.1f} MiB" if growth is not None else "-"))
    return {"pending": pending, **phases}


def _flowrun_command() -> list[str]:
    """Return the installed `flowrun` script beside this interpreter, else `python -m flowrun.cli`."""
    script = Path(sys.executable).parent / "flowrun"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "flowrun.cli"]


def _spawn_workers(flow_path: Path, count: int) -> tuple[float, list[int], list[str]]:
    command = [*_flowrun_command(), "up", str(flow_path), "--only", "sub-1", "--until-drained", "--no-progress",
               "--log-level", "error"]
    started = time.perf_counter()
    workers = [subprocess.Popen(command, cwd=flow_path.parent, env=child_environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(count)]
    codes, errors = [], []
    for worker in workers:
        try:
            _, stderr = worker.communicate(timeout=WORKER_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, stderr = worker.communicate()
            errors.append(f"worker timed out after {WORKER_TIMEOUT_SECONDS:g}s")
        codes.append(worker.returncode)
        if worker.returncode != 0 and stderr.strip():
            errors.append(stderr.strip()[-400:])
    return time.perf_counter() - started, codes, errors


async def _publish_only(flow_path: Path) -> dict[str, Any]:
    from flowrun.loader import load_flow
    from flowrun.runtime import run_flow

    result = await run_flow(load_flow(flow_path), until_drained=True, only={PRODUCER})
    return result.report


async def _final_report(flow_path: Path) -> dict[str, Any]:
    from flowrun.brokers import create_broker
    from flowrun.loader import load_flow
    from flowrun.runtime import build_topology

    flow = load_flow(flow_path)
    broker = create_broker(flow.spec.broker, flow.path, flow.spec.name)
    await broker.start(build_topology(flow))
    try:
        return await broker.stats()
    finally:
        await broker.close()


async def _cleanup(flow_path: Path) -> None:
    from flowrun.loader import load_flow

    await delete_resources(load_flow(flow_path))


def _drain_with_workers(backend: str, messages: int, count: int) -> float:
    """Publish `messages` in this process, drain them with `count` workers; return handled/s."""
    with tempfile.TemporaryDirectory(prefix="flowrun-workers-") as folder:
        spec = RunSpec(f"flowrun-{backend}", messages, 1)
        flow_path = write_flow(Path(folder), spec, backend, max_pending=messages + 1)
        try:
            asyncio.run(_publish_only(flow_path))
            seconds, codes, failures = _spawn_workers(flow_path, count)
            report = asyncio.run(_final_report(flow_path))
        finally:
            if backend != "sqlite":
                asyncio.run(_cleanup(flow_path))

    counts = report["subscriptions"]["sub-1"]
    if any(codes) or failures:
        raise RuntimeError(f"worker exit codes {codes}: {failures[:1]}")
    if counts["pending"] or counts["in_flight"]:
        raise RuntimeError(f"{counts['pending']} pending and {counts['in_flight']} in flight after the workers exited")
    return messages / seconds


def measure_processes(console: Console, runs: int, factor: float) -> list[dict[str, Any]]:
    """Fill one subscription, then time 1, 2 and 4 `flowrun up --only sub-1` workers draining it."""
    points = []
    for backend in PROCESS_BACKENDS:
        reason = find(f"flowrun-{backend}").missing()
        if reason is not None:
            console.print(f"processes {backend}: skipped: {reason}")
            points.append({"backend": backend, "skipped": reason})
            continue
        messages = _scaled(PROCESS_MESSAGES[backend], factor)
        for count in PROCESS_COUNTS:
            throughputs, errors = [], []
            for _ in range(runs):
                try:
                    throughputs.append(_drain_with_workers(backend, messages, count))
                except Exception as error:  # noqa: BLE001 - a broken backend fails its point, not the run
                    errors.append(f"{type(error).__name__}: {error}")
            throughput = _median(throughputs)
            points.append({"backend": backend, "processes": count, "messages": messages, "throughput": throughput,
                           "errors": errors})
            console.print(f"processes {backend} x{count}: " + (
                f"{throughput:,.0f} handled/s" if throughput else f"failed: {errors[:1]}"))
    return points


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _figure(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_scaling(console: Console, output: dict[str, Any]) -> None:
    rows = [[point["backend"], str(point["subscribers"]), _figure(point["messages"]), _figure(point["throughput"]),
             _figure(point["peak_rss_bytes"] / MIB if point["peak_rss_bytes"] else None)]
            for point in output["subscribers"]]
    console.print(_table("Subscribers (each handles every message)",
                         ["backend", "subscribers", "messages", "handled/s", "peak RSS MiB"], rows))

    rows = [[point["backend"], f"{point['payload_bytes']:,}", _figure(point["messages"]), _figure(point["throughput"]),
             _figure(point["mib_per_second"], 1)] for point in output["sizes"]]
    console.print(_table("Message size (2 subscribers)", ["backend", "payload bytes", "messages", "handled/s", "MiB/s"],
                         rows))

    backlog = output["backlog"]
    rows = []
    for phase in ("publish", "drain"):
        data = backlog.get(phase)
        if not data or "error" in data:
            rows.append([phase, "failed", "", "", "", "", "", (data or {}).get("error", "not run")[:80]])
            continue
        extra = data["extra"]
        growth = extra["rss_growth_bytes"]
        rows.append([phase, _figure(data["handled"]), _figure(data["seconds"], 1),
                     _figure(extra["db_bytes"] / MIB, 1), _figure(extra["wal_bytes"] / MIB, 1),
                     _figure(extra["freelist_bytes"] / MIB, 1), _figure(data["peak_rss_bytes"] / MIB, 1),
                     _figure(growth / MIB if growth is not None else None, 1)])
    console.print(_table(f"Backlog of {backlog['pending']:,} messages (sqlite, 1 subscription)",
                         ["phase", "messages", "seconds", "db MiB", "wal MiB", "freelist MiB", "peak RSS MiB",
                          "RSS growth MiB"], rows))

    rows = []
    for point in output["processes"]:
        if "skipped" in point:
            rows.append([point["backend"], "-", "-", "skipped: " + point["skipped"]])
        else:
            rows.append([point["backend"], str(point["processes"]), _figure(point["throughput"]),
                         "; ".join(point["errors"])[:100]])
    console.print(_table("Worker processes: flowrun up FLOW --only sub-1 (drain of a filled subscription)",
                         ["backend", "processes", "handled/s", "notes"], rows))


def backlog_target(backlog: dict[str, Any]) -> dict[str, str]:
    """Check RSS flat within 50 MB while the backlog waits, in both phases."""
    goal = "RSS flat within 50 MB while 1,000,000 messages wait (sqlite)"
    growths = {}
    for phase in ("publish", "drain"):
        data = backlog.get(phase) or {}
        growth = (data.get("extra") or {}).get("rss_growth_bytes")
        if growth is None:
            return {"goal": goal, "status": "not measured", "figures": f"{phase} phase has no RSS samples"}
        growths[phase] = growth
    text = ", ".join(f"{phase} RSS growth {growth / 1e6:,.1f} MB" for phase, growth in growths.items())
    text += f" ({backlog['pending']:,} messages)"
    met = all(growth <= 50e6 for growth in growths.values()) and backlog["pending"] >= DEFAULT_PENDING
    status = "met" if met else "not met"
    if backlog["pending"] < DEFAULT_PENDING:
        status = "not measured"
        text += f"; needs --pending {DEFAULT_PENDING:,}"
    return {"goal": goal, "status": status, "figures": text}


def plot_scaling(output: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    subscribers, sizes, backlog, processes = axes[0][0], axes[0][1], axes[1][0], axes[1][1]

    for backend in ("memory", "sqlite"):
        points = [point for point in output["subscribers"] if point["backend"] == backend and point["throughput"]]
        subscribers.plot([point["subscribers"] for point in points], [point["throughput"] for point in points],
                         marker="o", label=backend)
        points = [point for point in output["sizes"] if point["backend"] == backend and point["throughput"]]
        sizes.plot([point["payload_bytes"] / 1024 for point in points], [point["throughput"] for point in points],
                   marker="o", label=backend)
    subscribers.set(xscale="log", yscale="log", xlabel="subscribers", ylabel="messages handled per second",
                    title="Subscribers (each handles every message)")
    subscribers.set_xticks(SUBSCRIBER_COUNTS, [str(count) for count in SUBSCRIBER_COUNTS])
    subscribers.legend()
    sizes.set(xscale="log", yscale="log", xlabel="payload KiB", ylabel="messages handled per second",
              title="Message size (2 subscribers)")
    sizes.legend()

    for phase in ("publish", "drain"):
        data = output["backlog"].get(phase) or {}
        samples = (data.get("extra") or {}).get("rss_samples") or []
        if samples:
            backlog.plot([sample[1] for sample in samples], [sample[2] / MIB for sample in samples], label=phase)
    backlog.set(xlabel="messages published (publish) or handled (drain)", ylabel="RSS MiB",
                title=f"RSS with a backlog of {output['backlog']['pending']:,} (sqlite)")
    backlog.set_ylim(bottom=0)
    backlog.legend()

    for backend in PROCESS_BACKENDS:
        points = [point for point in output["processes"] if point.get("backend") == backend and point.get("throughput")]
        if points:
            processes.plot([point["processes"] for point in points], [point["throughput"] for point in points],
                           marker="o", label=backend)
    processes.set(xlabel="worker processes", ylabel="messages handled per second",
                  title="flowrun up --only sub-1 workers")
    processes.set_xticks(PROCESS_COUNTS, [str(count) for count in PROCESS_COUNTS])
    if processes.get_legend_handles_labels()[0]:
        processes.legend()

    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_scaling(arguments: argparse.Namespace, console: Console, plot: Path | None) -> dict[str, Any]:
    """Measure every scaling part, print its tables and return the figures."""
    from benchmarks import machine

    description = machine.describe()
    console.print(f"machine: {machine.summary_line(description)}; {machine.load_line()}")
    runs = arguments.runs
    factor = arguments.messages / DEFAULT_MESSAGES
    started = time.monotonic()
    output: dict[str, Any] = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "machine": description,
        "settings": {"runs": runs, "messages": arguments.messages, "pending": arguments.pending},
    }
    output["subscribers"] = measure_subscribers(console, runs, factor, arguments.timeout)
    output["sizes"] = measure_sizes(console, runs, factor, arguments.timeout)
    output["backlog"] = measure_backlog(console, arguments.pending, max(arguments.timeout, 1800.0))
    output["processes"] = measure_processes(console, runs, factor)
    output["targets"] = [backlog_target(output["backlog"])]
    output["elapsed_seconds"] = time.monotonic() - started

    console.print()
    print_scaling(console, output)
    target = output["targets"][0]
    console.print(f"target: {target['goal']}: {target['status']}: {target['figures']}")
    output["load_average_at_end"] = machine.load_line()
    console.print(f"scaling run took {output['elapsed_seconds'] / 60:.1f} min, {machine.load_line()} at the end")
    if plot is not None:
        plot_scaling(output, plot, f"flowrun scaling, {runs} run(s) per point; {machine.summary_line(description)}")
        console.print(f"plot written to {plot}")
    return output
