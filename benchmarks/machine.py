"""Describe the machine and the software versions a benchmark ran on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

PACKAGES = ("flowrun", "orjson", "redis", "hiredis", "faststream", "nats-py", "aio-pika", "persist-queue", "matplotlib")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> dict[str, Any]:
    """Return the commit of the working tree and the files that differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        completed = subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, check=False)
        return completed.stdout.rstrip("\n")

    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "changed": [line[3:] for line in git("status", "--porcelain", "--", "runner").splitlines()]}


def describe() -> dict[str, Any]:
    """Return nproc, CPU model, RAM, OS, Python, package versions and the flowrun commit."""
    import sqlite3

    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "packages": {package: _version(package) for package in PACKAGES},
        "git": _git_state(),
        "load_average": os.getloadavg(),
    }


def summary_line(machine: dict[str, Any]) -> str:
    """Return nproc, CPU model, RAM and the Python and SQLite versions as one line."""
    memory = machine["memory_gib"]
    memory_text = f"{memory:.1f} GiB RAM" if memory else "RAM unknown"
    return (f"{machine['nproc']} CPUs ({machine['cpu_model']}), {memory_text}, Python {machine['python']}, "
            f"SQLite {machine['sqlite']}")


def load_line() -> str:
    """Return the 1, 5 and 15 minute load averages, which show how busy the shared machine was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


# Before each run, the harness waits until the CPUs are at most this busy over one
# QUIET_SAMPLE_SECONDS window, for at most QUIET_MAX_WAIT_SECONDS. A server keeps working
# after its system's run (RabbitMQ deletes quorum queues, NATS compacts its streams), and
# that work would otherwise land on the next system's run.
QUIET_BUSY_SHARE = 0.1
QUIET_SAMPLE_SECONDS = 0.5
QUIET_MAX_WAIT_SECONDS = 15.0


def _cpu_times() -> tuple[int, int] | None:
    """Return (busy, total) jiffies of all CPUs from /proc/stat, or None where it does not exist."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    fields = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(max_wait: float = QUIET_MAX_WAIT_SECONDS) -> float:
    """Wait until the machine is quiet (see QUIET_BUSY_SHARE), at most `max_wait`; return the seconds waited."""
    started = time.monotonic()
    before = _cpu_times()
    if before is None or max_wait <= 0:
        return 0.0
    while time.monotonic() - started < max_wait:
        time.sleep(QUIET_SAMPLE_SECONDS)
        after = _cpu_times()
        assert after is not None
        busy, total = after[0] - before[0], after[1] - before[1]
        if total and busy / total <= QUIET_BUSY_SHARE:
            break
        before = after
    return time.monotonic() - started
