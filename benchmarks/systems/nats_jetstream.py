"""Reference: raw nats-py on JetStream, 127.0.0.1:4222.

One file-storage stream per run and one durable pull consumer per subscriber (explicit
ack). The producer publishes with `publish_async` and waits for the outstanding
publisher acks every `batch` messages. A subscriber fetches up to `batch` messages per
pull request and acks each one. The `single` mode awaits each publish and fetches one
message at a time. Paced latency runs await each publish in both modes.

The producer waits while a subscriber has MAX_PENDING messages it has not acked. The stream
gets a unique name per run and is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import uuid

import nats
import orjson
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced

URL = "nats://127.0.0.1:4222"
FETCH_TIMEOUT_SECONDS = 1.0


async def run(spec: RunSpec) -> RunResult:
    batch = 1 if spec.options.get("mode") == "single" else int(spec.options.get("batch", 100))
    name = f"bench_{uuid.uuid4().hex}"
    subject = f"{name}.orders"
    recorder = Recorder(spec)
    handled = [0] * spec.subscribers
    room = asyncio.Event()

    connection = await nats.connect(URL)
    stream = connection.jetstream()
    await stream.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))

    async def consume(index: int) -> None:
        durable = f"sub-{index + 1}"
        subscription = await stream.pull_subscribe(
            subject, durable=durable, stream=name, config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
        while handled[index] < spec.messages:
            try:
                messages = await subscription.fetch(batch, timeout=FETCH_TIMEOUT_SECONDS)
            except NatsTimeoutError:
                continue
            for message in messages:
                recorder.handle(orjson.loads(message.data))
                await message.ack()
            handled[index] += len(messages)
            room.set()

    async def produce() -> None:
        payloads = Payloads(spec.payload_bytes)
        async for seq in paced(spec.messages, spec.rate):
            recorder.published()
            while seq - min(handled) >= MAX_PENDING:
                room.clear()
                await room.wait()
            body = orjson.dumps(payloads.make(seq))
            if batch == 1 or spec.rate > 0:
                await stream.publish(subject, body)
                continue
            await stream.publish_async(subject, body)
            if (seq + 1) % batch == 0:
                await stream.publish_async_completed()
        await stream.publish_async_completed()

    try:
        async with asyncio.TaskGroup() as tasks:
            for index in range(spec.subscribers):
                tasks.create_task(consume(index))
            tasks.create_task(produce())
        return recorder.result()
    finally:
        await stream.delete_stream(name)
        await connection.close()
