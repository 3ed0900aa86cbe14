"""Reference: plain asyncio, the in-process ceiling.

One bounded asyncio.Queue per subscriber. The producer encodes each payload once and puts
it on every queue. A consumer records the message id in its dict of unacked ids when it
takes the message, decodes it, and removes the id to ack it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import orjson

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced

CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "orjson": (orjson.dumps, orjson.loads),
    "json": (lambda payload: json.dumps(payload).encode(), json.loads),
}


async def _consume(queue: asyncio.Queue[tuple[int, bytes]], count: int, decode: Callable[[bytes], Any],
                   recorder: Recorder) -> None:
    unacked: dict[int, bytes] = {}
    for _ in range(count):
        message_id, body = await queue.get()
        unacked[message_id] = body
        recorder.handle(decode(body))
        del unacked[message_id]
    if unacked:
        raise RuntimeError(f"{len(unacked)} messages were not acked")


async def run(spec: RunSpec) -> RunResult:
    encode, decode = CODECS[spec.options.get("codec", "orjson")]
    payloads = Payloads(spec.payload_bytes)
    recorder = Recorder(spec)
    queues: list[asyncio.Queue[tuple[int, bytes]]] = [asyncio.Queue(MAX_PENDING) for _ in range(spec.subscribers)]

    async def produce() -> None:
        async for seq in paced(spec.messages, spec.rate):
            recorder.published()
            body = encode(payloads.make(seq))
            for queue in queues:
                await queue.put((seq, body))

    async with asyncio.TaskGroup() as tasks:
        for queue in queues:
            tasks.create_task(_consume(queue, spec.messages, decode, recorder))
        tasks.create_task(produce())
    return recorder.result()
