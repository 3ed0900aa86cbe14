"""Reference: FastStream on Redis Streams, 127.0.0.1:6379.

One publisher and one subscriber per consumer group, each with FastStream's defaults: the
handler takes the body as `dict`, so FastStream decodes the JSON, and FastStream acks with
XACK when the handler returns. FastStream's per-message access log is switched off
(`logger=None`), since a log line per message would dominate the figure.

The producer waits while a subscriber has MAX_PENDING messages it has not handled. The
stream gets a unique name per run and is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as redis
from faststream.redis import RedisBroker, StreamSub

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced

URL = "redis://127.0.0.1:6379/0"


async def run(spec: RunSpec) -> RunResult:
    stream = f"bench:{uuid.uuid4().hex}"
    recorder = Recorder(spec)
    handled = [0] * spec.subscribers
    room = asyncio.Event()
    finished = asyncio.Event()
    broker = RedisBroker(URL, logger=None)

    def add_subscriber(index: int) -> None:
        subscription = StreamSub(stream, group=f"sub-{index + 1}", consumer="consumer-1")

        @broker.subscriber(stream=subscription)
        async def handle(body: dict[str, Any]) -> None:
            recorder.handle(body)
            handled[index] += 1
            room.set()
            if min(handled) >= spec.messages:
                finished.set()

    for index in range(spec.subscribers):
        add_subscriber(index)
    publisher = broker.publisher(stream=stream)
    payloads = Payloads(spec.payload_bytes)

    await broker.start()
    try:
        async for seq in paced(spec.messages, spec.rate):
            recorder.published()
            while seq - min(handled) >= MAX_PENDING:
                room.clear()
                await room.wait()
            await publisher.publish(payloads.make(seq))
        await finished.wait()
        return recorder.result()
    finally:
        await broker.stop()
        client = redis.Redis.from_url(URL)
        await client.delete(stream)
        await client.aclose()
