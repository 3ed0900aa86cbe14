"""Reference: aio-pika on RabbitMQ, 127.0.0.1:5672 (guest/guest).

A fanout exchange with one durable quorum queue per subscriber (quorum is flowrun's
rabbitmq default queue type). The producer publishes persistent messages on a channel with
publisher confirms and waits for the confirms of every `batch` publishes, also when paced. Each
subscriber consumes on its own channel with prefetch `prefetch` and acks each message.

The producer waits while a subscriber has MAX_PENDING messages it has not acked. The
exchange and queues get unique names per run and are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import orjson

from benchmarks.workload import MAX_PENDING, Payloads, Recorder, RunResult, RunSpec, paced

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def run(spec: RunSpec) -> RunResult:
    batch = int(spec.options.get("batch", 100))
    prefetch = int(spec.options.get("prefetch", 100))
    name = f"bench-{uuid.uuid4().hex}"
    recorder = Recorder(spec)
    handled = [0] * spec.subscribers
    room = asyncio.Event()
    finished = asyncio.Event()

    connection = await aio_pika.connect_robust(URL)
    publish_channel = await connection.channel(publisher_confirms=True)
    exchange = await publish_channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    queues = []
    for index in range(spec.subscribers):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(f"{name}.sub-{index + 1}", durable=True,
                                            arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange)
        queues.append(queue)

    def make_callback(index: int):  # noqa: ANN202 - aio-pika's callback type
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            recorder.handle(orjson.loads(message.body))
            await message.ack()
            handled[index] += 1
            room.set()
            if min(handled) >= spec.messages:
                finished.set()

        return on_message

    consumer_tags: list[str] = []
    try:
        for index, queue in enumerate(queues):
            consumer_tags.append(await queue.consume(make_callback(index)))

        payloads = Payloads(spec.payload_bytes)
        confirms = []
        async for seq in paced(spec.messages, spec.rate):
            recorder.published()
            while seq - min(handled) >= MAX_PENDING:
                room.clear()
                await room.wait()
            message = aio_pika.Message(orjson.dumps(payloads.make(seq)), content_type="application/json",
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            confirms.append(asyncio.ensure_future(exchange.publish(message, routing_key="")))
            if len(confirms) >= batch:
                await asyncio.gather(*confirms)
                confirms = []
        await asyncio.gather(*confirms)
        await finished.wait()
        return recorder.result()
    finally:
        for queue, tag in zip(queues, consumer_tags):
            await queue.cancel(tag)
        for queue in queues:
            await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()
