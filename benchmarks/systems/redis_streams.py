"""Reference: raw redis-py asyncio on Redis Streams, 127.0.0.1:6379.

One stream and one consumer group per subscriber; a group's consumer reads with
XREADGROUP and acks with XACK.

- `batched`: the producer sends `batch` XADDs per pipeline round trip. A consumer reads up
  to `batch` entries per XREADGROUP COUNT and acks them with one XACK.
- `single`: one awaited command at a time (XADD, XREADGROUP COUNT 1, XACK).

Paced latency runs send one awaited XADD per message in both modes, because messages
arrive one at a time. Consumers still read up to `batch` entries.

The producer waits while a group has MAX_PENDING entries it has not acked. The stream gets
a unique name per run and is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import redis.asyncio as redis

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced

URL = "redis://127.0.0.1:6379/0"
BLOCK_MS = 1000


class _Backlog:
    def __init__(self, subscribers: int) -> None:
        self.published = 0
        self.handled = [0] * subscribers
        self.room = asyncio.Event()
        self.room.set()

    async def wait_for_room(self, count: int) -> None:
        while self.published + count - min(self.handled) > MAX_PENDING:
            self.room.clear()
            await self.room.wait()
        self.published += count

    def handle(self, subscriber: int, count: int) -> None:
        self.handled[subscriber] += count
        self.room.set()


async def _produce(client: redis.Redis, stream: str, spec: RunSpec, batch: int, backlog: _Backlog,
                   recorder: Recorder) -> None:
    payloads = Payloads(spec.payload_bytes)
    if batch == 1 or spec.rate > 0:
        async for seq in paced(spec.messages, spec.rate):
            recorder.published()
            await backlog.wait_for_room(1)
            await client.xadd(stream, {"body": orjson.dumps(payloads.make(seq))})
        return

    for start in range(0, spec.messages, batch):
        recorder.published()
        count = min(batch, spec.messages - start)
        await backlog.wait_for_room(count)
        pipeline = client.pipeline(transaction=False)
        for seq in range(start, start + count):
            pipeline.xadd(stream, {"body": orjson.dumps(payloads.make(seq))})
        await pipeline.execute()


async def _consume(client: redis.Redis, stream: str, group: str, subscriber: int, spec: RunSpec, batch: int,
                   backlog: _Backlog, recorder: Recorder) -> None:
    handled = 0
    while handled < spec.messages:
        response = await client.xreadgroup(group, "consumer-1", {stream: ">"}, count=batch, block=BLOCK_MS)
        if not response:
            continue
        entries = response[0][1]
        ids = []
        for entry_id, fields in entries:
            recorder.handle(orjson.loads(fields[b"body"]))
            ids.append(entry_id)
        if batch == 1:
            for entry_id in ids:
                await client.xack(stream, group, entry_id)
        else:
            await client.xack(stream, group, *ids)
        handled += len(ids)
        backlog.handle(subscriber, len(ids))


async def run(spec: RunSpec) -> RunResult:
    batch = 1 if spec.options.get("mode") == "single" else int(spec.options.get("batch", 100))
    stream = f"bench:{uuid.uuid4().hex}"
    groups = [f"sub-{index + 1}" for index in range(spec.subscribers)]
    recorder = Recorder(spec)
    backlog = _Backlog(spec.subscribers)
    client = redis.Redis.from_url(URL)
    try:
        for group in groups:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        async with asyncio.TaskGroup() as tasks:
            for index, group in enumerate(groups):
                tasks.create_task(_consume(client, stream, group, index, spec, batch, backlog, recorder))
            tasks.create_task(_produce(client, stream, spec, batch, backlog, recorder))
        return recorder.result()
    finally:
        await client.delete(stream)
        await client.aclose()
