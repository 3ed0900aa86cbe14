"""Helpers for tests that run `flowrun up` in real subprocesses."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLOWRUN = [sys.executable, "-m", "flowrun.cli"]


def start_flowrun(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `flowrun ARGS` with its output captured; the caller waits or kills it."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [*FLOWRUN, *args], cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_flowrun(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([*FLOWRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment, input=stdin)


def read_report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def handled_counts(database: Path) -> dict[str, int]:
    """Message id to how many times a recording handler handled it."""
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT message_id, COUNT(*) FROM handled GROUP BY message_id").fetchall())


def handled_total(database: Path) -> int:
    """How many handlings the recording handler stored so far (0 before its table exists)."""
    if not database.exists():
        return 0
    with sqlite3.connect(database, timeout=30) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM handled").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def workers_ready(database: Path) -> int:
    """How many recording handlers finished setup (each process registers once)."""
    if not database.exists():
        return 0
    with sqlite3.connect(database, timeout=30) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM workers").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def wait_for_workers(database: Path, workers: list[subprocess.Popen[str]], timeout: float) -> None:
    """Wait until every worker finished setup; fail at once, with its output, if one exited."""
    wait_until(lambda: workers_ready(database) == len(workers) or any(w.poll() is not None for w in workers),
               timeout)
    for worker in workers:
        if worker.poll() is not None:
            _, error_output = worker.communicate()
            raise AssertionError(f"a worker exited with status {worker.returncode} before it was ready:\n"
                                 f"{error_output[-3000:]}")


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Check `condition` every 20 ms until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def handled_by_process(database: Path) -> dict[int, int]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT pid, COUNT(*) FROM handled GROUP BY pid").fetchall())


# A producer with stable ids and a handler that records each handling in its own SQLite
# file before the ack, so tests can count handlings independently of flowrun.
RECORDING_PLUGIN = '''
import os
import sqlite3
import time

from flowrun import Outgoing


def numbers(context):
    count = int(context.options["count"])
    for number in range(count):
        yield Outgoing("Work", {"n": number}, id=f"work-{number}")


class Recorder:
    def setup(self, context):
        # The test created the file and its tables: two workers switching a new file to WAL
        # at the same moment can fail with "database is locked".
        self.connection = sqlite3.connect(context.resolve_path(context.options["database"]), timeout=30,
                                          isolation_level=None, check_same_thread=False)
        self.connection.execute("INSERT INTO workers VALUES (?)", (os.getpid(),))
        self.pause = float(context.options.get("pause", 0))

    def handle(self, message, context):
        if self.pause:
            time.sleep(self.pause)
        self.connection.execute("INSERT INTO handled VALUES (?, ?)", (message.id, os.getpid()))

    def close(self):
        self.connection.close()
'''


def write_recording_flow(
    folder: Path, count: int, pause: float, ack_timeout: str = "2s", name: str = "recording"
) -> Path:
    (folder / "recording_plugin.py").write_text(RECORDING_PLUGIN, encoding="utf-8")
    with sqlite3.connect(folder / "handled.db") as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS handled (message_id TEXT, pid INTEGER)")
        connection.execute("CREATE TABLE IF NOT EXISTS workers (pid INTEGER)")
    flow = folder / "flow.yaml"
    flow.write_text(
        f"""
name: {name}
topics:
  Work:
    max_pending: 200
producers:
  numbers:
    plugin: recording_plugin:numbers
    publishes: [Work]
    with: {{count: {count}}}
subscribers:
  work:
    topic: Work
    plugin: recording_plugin:Recorder
    concurrency: 4
    max_in_flight: 8
    ack_timeout: {ack_timeout}
    with: {{database: handled.db, pause: {pause}}}
""",
        encoding="utf-8",
    )
    return flow
