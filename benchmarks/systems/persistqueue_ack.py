"""Reference: persist-queue's SQLiteAckQueue, one queue per subscriber in one SQLite file.

The producer thread puts each encoded payload on every queue; one thread per subscriber
gets, decodes and acks. persist-queue keeps acked rows until `clear_acked_data`, and its
`get` scans past them, so each consumer clears its acked rows every CLEAR_EVERY acks.

persist-queue 1.1.0 has no option for SQLite's `synchronous` setting, and SQLite's default
in WAL mode is FULL. The `normal` variant sets `PRAGMA synchronous=NORMAL` on the queue's
private connections (`_conn`, `_putter`) to show what flowrun's default setting would give.
"""

from __future__ import annotations

import tempfile
import threading

import orjson
from persistqueue import SQLiteAckQueue

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced_sync, run_threads

CLEAR_EVERY = 1000
GET_TIMEOUT_SECONDS = 60.0


class _Backlog:
    """Bounds each queue's unhandled messages to MAX_PENDING, as flowrun's topics do."""

    def __init__(self, subscribers: int) -> None:
        self.published = 0
        self.handled = [0] * subscribers
        self.changed = threading.Condition()

    def wait_for_room(self) -> None:
        with self.changed:
            while self.published - min(self.handled) >= MAX_PENDING:
                self.changed.wait(0.05)
            self.published += 1

    def handle(self, subscriber: int) -> None:
        with self.changed:
            self.handled[subscriber] += 1
            self.changed.notify_all()


def _produce(queues: list[SQLiteAckQueue], spec: RunSpec, backlog: _Backlog, recorder: Recorder) -> None:
    payloads = Payloads(spec.payload_bytes)
    for seq in paced_sync(spec.messages, spec.rate):
        recorder.published()
        backlog.wait_for_room()
        body = orjson.dumps(payloads.make(seq))
        for queue in queues:
            queue.put(body)


def _consume(queue: SQLiteAckQueue, subscriber: int, spec: RunSpec, backlog: _Backlog, recorder: Recorder) -> None:
    for count in range(1, spec.messages + 1):
        item = queue.get(block=True, timeout=GET_TIMEOUT_SECONDS, raw=True)
        recorder.handle(orjson.loads(item["data"]))
        queue.ack(item)
        backlog.handle(subscriber)
        if count % CLEAR_EVERY == 0:
            queue.clear_acked_data(max_delete=None, keep_latest=0)


def run(spec: RunSpec) -> RunResult:
    recorder = Recorder(spec)
    backlog = _Backlog(spec.subscribers)
    with tempfile.TemporaryDirectory(prefix="persistqueue-bench-") as folder:
        queues = [SQLiteAckQueue(folder, name=f"sub{index + 1}", multithreading=True, auto_resume=False)
                  for index in range(spec.subscribers)]
        if spec.options.get("synchronous") == "normal":
            for queue in queues:
                queue._conn.execute("PRAGMA synchronous=NORMAL")
                queue._putter.execute("PRAGMA synchronous=NORMAL")

        targets = [(_consume, (queue, index, spec, backlog, recorder)) for index, queue in enumerate(queues)]
        targets.append((_produce, (queues, spec, backlog, recorder)))
        try:
            run_threads(targets)
        finally:
            for queue in queues:
                queue.close()
    return recorder.result()
