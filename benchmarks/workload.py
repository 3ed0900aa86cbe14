"""The workload every system runs: OrderPlaced payloads, pacing, and what a run measures.

Payloads are built from the real invoice lines of data/orders/sample.csv, cycled. Each has
a sequence number and `published_at` (Unix seconds, set when the producer builds it), so a
handler can compute its publish-to-handle latency.
"""

from __future__ import annotations

import asyncio
import csv
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

SAMPLE_CSV = Path(__file__).resolve().parent.parent / "data" / "orders" / "sample.csv"
TOPIC = "OrderPlaced"
# Per-subscriber bound on waiting messages, the default `max_pending` of a flowrun topic.
# References that can bound their backlog use it too, so no system buffers the whole run.
MAX_PENDING = 10_000
# Latency runs ignore this share of the first messages, while connections and caches warm up.
WARMUP_SHARE = 0.05


@dataclass
class RunSpec:
    """One run of one system, as the harness passes it to the child process."""

    system: str
    messages: int
    subscribers: int = 2
    payload_bytes: int = 300
    # Messages per second in latency mode; 0 publishes as fast as the system accepts them.
    rate: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_mode(self) -> bool:
        return self.rate > 0


@dataclass
class RunResult:
    """The figures of one run: messages handled by all subscribers and the seconds they took."""

    handled: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["latencies"]
        data["throughput"] = self.handled / self.seconds if self.seconds > 0 else 0.0
        data.update(latency_percentiles(self.latencies))
        return data


def latency_percentiles(latencies: list[float]) -> dict[str, float | None]:
    """Return p50 and p99 in milliseconds (nearest rank), or None without samples."""
    if not latencies:
        return {"latency_p50_ms": None, "latency_p99_ms": None, "latency_samples": 0}
    ordered = sorted(latencies)

    def rank(share: float) -> float:
        index = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
        return ordered[index] * 1000.0

    return {"latency_p50_ms": rank(0.50), "latency_p99_ms": rank(0.99), "latency_samples": len(ordered)}


def _read_lines() -> list[dict[str, Any]]:
    with SAMPLE_CSV.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return rows


class Payloads:
    """Builds OrderPlaced payloads of about `size` bytes of JSON from the sample invoices.

    The 300-byte payload has one invoice line. Larger sizes carry the following lines of the
    file, cycled, until the encoded payload reaches the size.
    """

    def __init__(self, size: int = 300) -> None:
        rows = _read_lines()
        self.size = size
        self.templates = [self._template(rows, start, size) for start in range(len(rows))]

    @staticmethod
    def _template(rows: list[dict[str, Any]], start: int, size: int) -> dict[str, Any]:
        first = rows[start]
        payload: dict[str, Any] = {
            "event": TOPIC,
            "seq": 0,
            "invoice": first["InvoiceNo"],
            "placed_at": first["InvoiceDate"].replace(" ", "T"),
            "customer_id": first["CustomerID"] or None,
            "country": first["Country"],
            "currency": "GBP",
            "lines": [],
            "published_at": 0.0,
        }
        index = start
        while True:
            row = rows[index % len(rows)]
            payload["lines"].append({
                "stock_code": row["StockCode"],
                "description": row["Description"],
                "quantity": int(row["Quantity"]),
                "unit_price": row["UnitPrice"],
            })
            index += 1
            # 24 bytes leave room for the real seq and published_at values.
            if len(orjson.dumps(payload)) + 24 >= size:
                return payload

    def make(self, seq: int) -> dict[str, Any]:
        """Return payload number `seq`, stamped with the current time as `published_at`."""
        payload = dict(self.templates[seq % len(self.templates)])
        payload["seq"] = seq
        payload["published_at"] = time.time()
        return payload


def average_size(payloads: Payloads, count: int = 200) -> float:
    """Return the mean encoded size in bytes of the first `count` payloads."""
    return sum(len(orjson.dumps(payloads.make(i))) for i in range(count)) / count


async def paced(count: int, rate: float) -> AsyncIterator[int]:
    """Yield 0..count-1, each no earlier than start + i / rate; rate 0 yields without waiting.

    asyncio timers wake with about 1 ms resolution, so above 1,000 per second the
    messages leave in small bursts of rate / 1,000.
    """
    if rate <= 0:
        for seq in range(count):
            yield seq
        return
    start = time.perf_counter()
    for seq in range(count):
        delay = start + seq / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield seq


def paced_sync(count: int, rate: float) -> Iterator[int]:
    """Yield 0..count-1 like `paced`, sleeping the calling thread."""
    start = time.perf_counter()
    for seq in range(count):
        if rate > 0:
            delay = start + seq / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        yield seq


class Recorder:
    """Counts handled messages per run and, in latency mode, their publish-to-handle times.

    Thread-safe, because the sqlite3 and persist-queue references consume on threads.
    """

    def __init__(self, spec: RunSpec) -> None:
        self.expected = spec.messages * spec.subscribers
        self.record_latency = spec.latency_mode
        self.warmup = int(spec.messages * WARMUP_SHARE)
        self.published_count = 0
        self.handled = 0
        self.latencies: list[float] = []
        self.first_publish: float | None = None
        self.last_handled: float | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def published(self) -> None:
        """Count one message about to be published; the first one starts the run's clock."""
        self.published_count += 1
        if self.first_publish is None:
            self.first_publish = time.perf_counter()

    def handle(self, payload: dict[str, Any]) -> None:
        """Count one decoded message and record its latency."""
        now = time.time()
        with self._lock:
            self.handled += 1
            if self.record_latency and payload["seq"] >= self.warmup:
                self.latencies.append(now - payload["published_at"])
            if self.handled >= self.expected:
                self.last_handled = time.perf_counter()
                self.done.set()

    def result(self, end: float | None = None, **extra: Any) -> RunResult:
        """Build the result: seconds from the first publish to `end` (default: last handled)."""
        if self.first_publish is None:
            raise RuntimeError("nothing was published")
        finish = end if end is not None else self.last_handled
        if finish is None:
            raise RuntimeError(f"only {self.handled} of {self.expected} messages were handled")
        return RunResult(self.handled, finish - self.first_publish, self.latencies, extra)


# The recorder of the run in progress, for plugins that the harness loads by name (flowrun's).
_current_recorder: Recorder | None = None


def set_recorder(recorder: Recorder | None) -> None:
    global _current_recorder
    _current_recorder = recorder


def current_recorder() -> Recorder | None:
    return _current_recorder


def run_threads(targets: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
    """Run each (function, args) on its own thread, wait for all, and re-raise the first error."""
    errors: list[BaseException] = []

    def guarded(function: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
