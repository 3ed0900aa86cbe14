"""flowrun's SQLite backend with a large backlog: publish with no subscriber, then drain.

Two phases, each in its own child process so each has its own peak RSS:

- `publish`: runs only the producer (`only={"orders"}`), so every message stays pending;
- `drain`: runs only the subscribers on the same database until it is empty.

A thread samples VmRSS every RSS_SAMPLE_SECONDS with the count of messages published or
handled so far. Each phase reports the database size as it ends; `drain` also reports the
bytes on SQLite's freelist, which the file keeps (until VACUUM) and reuses.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import workload
from benchmarks.systems.flowrun_flow import PRODUCER, subscriber_names, write_flow
from benchmarks.workload import RunResult, RunSpec

RSS_SAMPLE_SECONDS = 0.5
DATABASE = "bench.db"


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples (seconds, progress count, RSS bytes) on a thread until stopped."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._start, self.progress(), current_rss_bytes()))
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._start, self.progress(), current_rss_bytes()))


def database_sizes(folder: Path) -> dict[str, int]:
    """Return the sizes in bytes of the database, its WAL and the database's freelist."""
    path = folder / DATABASE
    sizes = {"db_bytes": path.stat().st_size}
    wal = folder / f"{DATABASE}-wal"
    sizes["wal_bytes"] = wal.stat().st_size if wal.exists() else 0
    connection = sqlite3.connect(path)
    try:
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
        (free_pages,) = connection.execute("PRAGMA freelist_count").fetchone()
    finally:
        connection.close()
    sizes["freelist_bytes"] = page_size * free_pages
    return sizes


def rss_growth(samples: list[tuple[float, int, int]], after: int) -> int | None:
    """Return peak RSS minus the RSS of the first sample whose progress reached `after`."""
    baseline = next((rss for _, progress, rss in samples if progress >= after), None)
    if baseline is None:
        return None
    return max(rss for _, _, rss in samples) - baseline


async def _run_phase(path: Path, only: set[str]) -> dict[str, Any]:
    from flowrun.loader import load_flow
    from flowrun.runtime import run_flow

    result = await run_flow(load_flow(path), until_drained=True, only=only)
    if result.failures:
        raise RuntimeError("flowrun reported failures: " + "; ".join(result.failures))
    return result.report


def run(spec: RunSpec) -> RunResult:
    folder = Path(spec.options["folder"])
    phase = spec.options["phase"]
    recorder = workload.Recorder(spec)
    workload.set_recorder(recorder)
    # The baseline of the growth figure: RSS once this many messages went through.
    baseline_after = min(spec.messages, int(spec.options.get("baseline_after", 50_000)))

    if phase == "publish":
        path = write_flow(folder, spec, "sqlite", flow_name="pending",
                          subscriber_settings={"mode": "pull", "batch_size": 100}, max_pending=spec.messages + 1)
        only = {PRODUCER}
        progress = lambda: recorder.published_count  # noqa: E731 - sampled on a thread
    else:
        path = folder / "bench.yaml"
        only = set(subscriber_names(spec.subscribers))
        progress = lambda: recorder.handled  # noqa: E731 - sampled on a thread

    started = time.perf_counter()
    with RssSampler(progress) as sampler:
        report = asyncio.run(_run_phase(path, only))
    seconds = time.perf_counter() - started
    workload.set_recorder(None)

    counts = report["subscriptions"]
    done = recorder.published_count if phase == "publish" else recorder.handled
    extra: dict[str, Any] = {
        "phase": phase,
        "pending_after": sum(counts[name]["pending"] for name in counts),
        "acked_after": sum(counts[name]["acked"] for name in counts),
        "rss_samples": sampler.samples,
        "rss_growth_bytes": rss_growth(sampler.samples, baseline_after),
        "rss_baseline_after": baseline_after,
        **database_sizes(folder),
    }
    return RunResult(done, seconds, [], extra)
