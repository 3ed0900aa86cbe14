"""Crash safety and competing consumers with real `flowrun up` subprocesses on SQLite."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.processes import (
    handled_by_process,
    handled_total,
    wait_until,
    handled_counts,
    read_report,
    run_flowrun,
    start_flowrun,
    write_recording_flow,
)

MESSAGES = 1500
KILLS = 4
MAX_IN_FLIGHT = 8

pytestmark = pytest.mark.slow


def test_kill_nine_loses_nothing(tmp_path: Path) -> None:
    write_recording_flow(tmp_path, MESSAGES, pause=0.01, ack_timeout="1s")
    chooser = random.Random(20261204)

    for _ in range(KILLS):
        before = handled_total(tmp_path / "handled.db")
        process = start_flowrun("up", "flow.yaml", "--until-drained", cwd=tmp_path)
        try:
            # Kill only once this run is handling messages, however slow the machine is to start it.
            wait_until(lambda: handled_total(tmp_path / "handled.db") > before, timeout=120)
            time.sleep(chooser.uniform(0.1, 0.6))
        finally:
            process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL

    # The kills must have interrupted the work, or the test proves nothing.
    assert len(handled_counts(tmp_path / "handled.db")) < MESSAGES

    finished = run_flowrun("up", "flow.yaml", "--until-drained", "--report", "report.json", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr

    report = read_report(tmp_path / "report.json")
    work = report["subscriptions"]["work"]
    assert report["topics"]["Work"]["published"] == MESSAGES
    assert work["acked"] + work["dead_lettered"] + work["dropped"] == MESSAGES
    assert work["dead_lettered"] == 0
    assert work["in_flight"] == 0
    assert work["pending"] == 0

    counts = handled_counts(tmp_path / "handled.db")
    assert len(counts) == MESSAGES
    repeats = sum(count - 1 for count in counts.values())
    # Only deliveries in flight at a kill may be handled again.
    assert repeats <= KILLS * MAX_IN_FLIGHT


def test_second_run_handles_nothing_twice(tmp_path: Path) -> None:
    write_recording_flow(tmp_path, 300, pause=0)

    first = run_flowrun("up", "flow.yaml", "--until-drained", cwd=tmp_path)
    second = run_flowrun("up", "flow.yaml", "--until-drained", "--report", "report.json", cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert read_report(tmp_path / "report.json")["topics"]["Work"]["published"] == 300
    assert set(handled_counts(tmp_path / "handled.db").values()) == {1}


def test_two_workers_share_the_work(tmp_path: Path) -> None:
    write_recording_flow(tmp_path, 600, pause=0.003)

    workers = [start_flowrun("up", "flow.yaml", "--only", "work", "--until-drained", cwd=tmp_path) for _ in range(2)]
    producer = run_flowrun("up", "flow.yaml", "--only", "numbers", "--until-drained", cwd=tmp_path)
    outputs = [worker.communicate(timeout=300) for worker in workers]

    assert producer.returncode == 0, producer.stderr
    for worker, (_, error_output) in zip(workers, outputs):
        assert worker.returncode == 0, error_output

    counts = handled_counts(tmp_path / "handled.db")
    assert len(counts) == 600
    assert set(counts.values()) == {1}

    per_process = handled_by_process(tmp_path / "handled.db")
    assert len(per_process) == 2
    assert min(per_process.values()) > 0

    final = run_flowrun("status", "flow.yaml", "--json", cwd=tmp_path)
    assert final.returncode == 0, final.stderr


def test_second_interrupt_stops_at_once(tmp_path: Path) -> None:
    # The handler sleeps 60 s, longer than the shutdown timeout; a first SIGINT waits for
    # it, a second one ends the process at once.
    (tmp_path / "sleepy.py").write_text(
        "import time\n\n"
        "def numbers(context):\n    yield from range(3)\n\n"
        "def handle(message, context):\n    time.sleep(60)\n",
        encoding="utf-8",
    )
    (tmp_path / "flow.yaml").write_text(
        "name: sleepy\nshutdown_timeout: 50s\ntopics:\n  Work:\n"
        "producers:\n  numbers:\n    plugin: sleepy:numbers\n    publishes: [Work]\n"
        "subscribers:\n  work:\n    topic: Work\n    plugin: sleepy:handle\n",
        encoding="utf-8",
    )
    process = start_flowrun("up", "flow.yaml", cwd=tmp_path)
    try:
        wait_until(lambda: (tmp_path / ".flowrun" / "sleepy.db").exists(), timeout=60)
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        time.sleep(1)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, error_output = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 130
    assert time.monotonic() - started < 20
    assert "press Ctrl-C again" in error_output
    assert "stopping now" in error_output


STUCK_PLUGIN = """
import threading

def numbers(context):
    for number in range(10):
        yield {"n": number}

def handle(message, context):
    if message.payload["n"] == 3:
        threading.Event().wait()
"""

STUCK_FLOW = """
name: stuck
broker:
  backend: sqlite
  path: stuck.db
topics:
  Numbers:
producers:
  source:
    plugin: stuckplugin:numbers
    publishes: [Numbers]
subscribers:
  worker:
    topic: Numbers
    plugin: stuckplugin:handle
    handler_timeout: 1s
    max_deliveries: 2
"""


def test_stuck_sync_handler_blocks_nothing(tmp_path: Path) -> None:
    # One call never returns. The other nine messages must still be handled (their
    # calls must not queue behind the stuck thread), and the process must exit.
    (tmp_path / "stuckplugin.py").write_text(STUCK_PLUGIN, encoding="utf-8")
    (tmp_path / "flow.yaml").write_text(STUCK_FLOW, encoding="utf-8")

    result = run_flowrun("up", "flow.yaml", "--until-drained", "--no-progress", "--report", "report.json",
                         cwd=tmp_path, timeout=60)
    worker = read_report(tmp_path / "report.json")["subscriptions"]["worker"]

    assert result.returncode == 0
    assert worker["acked"] == 9
    assert worker["dropped"] == 1
    assert worker["delivered"] == 11
    assert "exiting without waiting for 2 sync handler call(s)" in result.stderr


CLOSE_HANGS_PLUGIN = """
import threading

def numbers(context):
    yield {"n": 1}

class Handler:
    def handle(self, message, context):
        return None

    def close(self):
        threading.Event().wait()
"""


def test_hanging_close_does_not_hold_exit(tmp_path: Path) -> None:
    # close() never returns. The run waits for it at most shutdown_timeout, then exits
    # without waiting for its thread.
    (tmp_path / "closeplugin.py").write_text(CLOSE_HANGS_PLUGIN, encoding="utf-8")
    flow = STUCK_FLOW.replace("stuckplugin:numbers", "closeplugin:numbers").replace(
        "stuckplugin:handle", "closeplugin:Handler").replace("name: stuck\n", "name: stuck\nshutdown_timeout: 1s\n")
    (tmp_path / "flow.yaml").write_text(flow, encoding="utf-8")

    started = time.monotonic()
    result = run_flowrun("up", "flow.yaml", "--until-drained", "--no-progress", cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started

    assert result.returncode == 0
    assert "close() of subscriber 'worker' did not return within shutdown_timeout 1s" in result.stderr
    assert "exiting without waiting for 1 sync handler call(s)" in result.stderr
    assert elapsed < 15
