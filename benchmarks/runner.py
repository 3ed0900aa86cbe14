"""Start child processes that run one system once, and collect their results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.child import RESULT_PREFIX
from benchmarks.machine import QUIET_MAX_WAIT_SECONDS, wait_for_quiet
from benchmarks.systems import System
from benchmarks.workload import RunSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
STDERR_TAIL_CHARS = 600


@dataclass
class Attempt:
    """One child run: its figures, or why it failed."""

    data: dict[str, Any] | None
    error: str | None = None


@dataclass
class Figures:
    """Every run of one system in one mode, and their medians."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [run[key] for run in self.runs if run.get(key) is not None]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        keys = ("throughput", "seconds", "handled", "latency_p50_ms", "latency_p99_ms", "peak_rss_bytes")
        return {"runs": self.runs, "errors": self.errors, "median": {key: self.median(key) for key in keys}}


def child_environment() -> dict[str, str]:
    """Return the environment for child processes, with the repository on PYTHONPATH."""
    environment = dict(os.environ)
    paths = [str(REPO_ROOT)] + [part for part in environment.get("PYTHONPATH", "").split(os.pathsep) if part]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def run_child(system: System, spec: RunSpec, timeout: float, settle: float = QUIET_MAX_WAIT_SECONDS) -> Attempt:
    """Run `system` once in a new interpreter and parse the RESULT line it prints.

    First waits up to `settle` seconds for the machine to be quiet (see wait_for_quiet).
    """
    request = asdict(spec)
    request["module"] = system.module
    request["options"] = {**system.options, **spec.options}
    command = [sys.executable, "-m", "benchmarks.child", json.dumps(request)]
    wait_for_quiet(settle)
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=child_environment(), capture_output=True,
                                   text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Attempt(None, f"timed out after {timeout:g}s")

    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return Attempt(json.loads(line[len(RESULT_PREFIX):]))
    # The last line of a traceback names the exception, which is what the table shows.
    lines = [line.strip() for line in (completed.stderr or completed.stdout).splitlines() if line.strip()]
    last = lines[-1][-STDERR_TAIL_CHARS:] if lines else "no output"
    return Attempt(None, f"exit status {completed.returncode}: {last}")
