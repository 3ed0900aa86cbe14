"""Behaviour specific to the Redis Streams backend, against the real server on 127.0.0.1.

The conformance suite covers the contract every backend shares. These tests cover what
only this backend has: settings stored on the server, several processes on one flow, the
dead-letter archive, message-id deduplication, per-key ordering and error translation.
"""

from __future__ import annotations

import dataclasses

import asyncio
import logging
import random
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from flowrun.broker import ErrorInfo, Nack, SubscriptionConfig
from flowrun.brokers.options import RedisOptions
from flowrun.clock import SYSTEM_CLOCK
from flowrun.errors import BrokerError
from flowrun.spec import BrokerSpec, OnFull

from .conftest import SERVER_URLS, make_topology, require_server
from .conformance.helpers import (
    DEAD_LETTER_TOPIC,
    SHORT_ACK_TIMEOUT,
    SUBSCRIPTION,
    TOPIC,
    envelope,
    envelopes,
    fetch_exactly,
    fetch_one,
    is_still_pending,
    published_count,
    subscription,
    subscription_stats,
)
from .processes import handled_by_process, handled_counts, read_report, run_flowrun, start_flowrun, write_recording_flow

redis_asyncio = pytest.importorskip("redis.asyncio")
redis_backend = pytest.importorskip("flowrun.brokers.redis")
RedisBroker = redis_backend.RedisBroker

URL = SERVER_URLS["redis"]
PASSWORD = "s3cret-password"
# A port on 127.0.0.1 where nothing listens, for connection failures.
CLOSED_PORT_URL = f"redis://flowrun:{PASSWORD}@127.0.0.1:1/0"

Opener = Callable[..., Awaitable[RedisBroker]]


@pytest.fixture(autouse=True)
def redis_server() -> None:
    require_server("redis")


@pytest.fixture
async def open_broker() -> AsyncIterator[Opener]:
    """Return `await open_broker(*subscriptions, flow=..., ...)`: a started broker of a fresh flow.

    Brokers opened with the same `flow` share the flow's keys, like processes of one flow.
    At the end every broker is closed and every flow's keys are deleted.
    """
    opened: list[RedisBroker] = []
    flows: set[str] = set()

    async def factory(*subscriptions: SubscriptionConfig, flow: str | None = None, start: bool = True,
                      topics: tuple[str, ...] = (), url: str = URL, max_length: int | None = None) -> RedisBroker:
        name = flow or f"t{uuid.uuid4().hex[:10]}"
        flows.add(name)
        spec = BrokerSpec(backend="redis", url=url)
        options = RedisOptions(max_length=max_length)
        broker = RedisBroker.from_spec(spec, options, Path("flow.yaml"), name, SYSTEM_CLOCK)
        opened.append(broker)
        if start:
            await broker.start(make_topology(*subscriptions, topics=topics, flow_name=name))
        return broker

    yield factory
    for broker in opened:
        await broker.close()
    for name in flows:
        await delete_flow_keys(name)


async def delete_flow_keys(flow_name: str) -> None:
    """Delete every key of a flow with a client of its own, so closed brokers need not take part."""
    client = redis_asyncio.Redis.from_url(URL, socket_timeout=None)
    keys = [key async for key in client.scan_iter(match="{" + flow_name + "}:*")]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


async def flow_keys(broker: RedisBroker) -> list[bytes]:
    client = broker._connected()
    return [key async for key in client.scan_iter(match=broker._names.scan_pattern())]


# Settings kept on the server


async def test_changed_settings_apply_with_warning(open_broker, caplog):
    first = await open_broker(subscription(ack_timeout=5.0, max_deliveries=3))
    await first.close()

    with caplog.at_level(logging.WARNING, logger="flowrun.brokers.redis"):
        second = await open_broker(subscription(ack_timeout=7.0, max_deliveries=4), flow=first.flow_name)
    stored = await second._connected().hget(second._names.subscriptions, SUBSCRIPTION)

    assert "ack_timeout: 5.0 -> 7.0" in caplog.text
    assert "max_deliveries: 3 -> 4" in caplog.text
    assert b'"ack_timeout": 7.0' in stored


async def test_moved_subscription_is_rejected(open_broker):
    first = await open_broker(subscription(topic="Orders"))
    await first.close()

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(topic="Refunds"), flow=first.flow_name)

    message = str(raised.value)
    assert "consumes topic 'Orders'" in message
    assert "'Refunds'" in message
    assert "XGROUP DESTROY" in message


async def test_removed_subscription_is_reported(open_broker, caplog):
    first = await open_broker(subscription("billing"), subscription("shipping"))
    await first.close()

    with caplog.at_level(logging.WARNING, logger="flowrun.brokers.redis"):
        await open_broker(subscription("billing"), flow=first.flow_name)

    assert "subscription 'shipping'" in caplog.text
    assert "no longer in flow" in caplog.text


async def test_max_length_below_max_pending_rejected(open_broker):
    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(max_pending=100), max_length=50)

    assert "max_length (50)" in str(raised.value)
    assert "'billing' (100)" in str(raised.value)


async def test_max_length_caps_stream(open_broker, monkeypatch):
    # Without the periodic trim of settled entries, only MAXLEN bounds the stream.
    monkeypatch.setattr(redis_backend, "TRIM_INTERVAL_SECONDS", 3600.0)
    broker = await open_broker(subscription(max_pending=100), max_length=100)
    for _ in range(5):
        await broker.publish(envelopes(100))
        deliveries = await fetch_exactly(broker, SUBSCRIPTION, 100)
        await broker.ack(SUBSCRIPTION, [delivery.tag for delivery in deliveries])

    length = await broker._connected().xlen(broker._names.topic(TOPIC))

    # MAXLEN ~ keeps at least max_length entries and trims only whole nodes of 100.
    assert 100 <= length < 300


async def test_settled_entries_are_trimmed(open_broker):
    broker = await open_broker(subscription("billing"), subscription("shipping"))
    await broker.publish(envelopes(300))
    for name in ("billing", "shipping"):
        deliveries = await fetch_exactly(broker, name, 300)
        await broker.ack(name, [delivery.tag for delivery in deliveries])

    length = await wait_for_length_below(broker, 300, seconds=redis_backend.TRIM_INTERVAL_SECONDS + 2)

    # The trim keeps whole nodes of 100 entries that still hold an unsettled entry.
    assert length < 300


async def test_unsettled_entries_are_kept(open_broker):
    broker = await open_broker(subscription("billing"), subscription("shipping"))
    await broker.publish(envelopes(300))
    deliveries = await fetch_exactly(broker, "billing", 300)
    await broker.ack("billing", [delivery.tag for delivery in deliveries])

    length = await wait_for_length_below(broker, 300, seconds=redis_backend.TRIM_INTERVAL_SECONDS + 0.5)

    assert length == 300


async def wait_for_length_below(broker: RedisBroker, limit: int, seconds: float) -> int:
    """Poll the topic stream's length until it drops below `limit` or `seconds` pass; return it."""
    deadline = time.monotonic() + seconds
    while True:
        length = int(await broker._connected().xlen(broker._names.topic(TOPIC)))
        if length < limit or time.monotonic() > deadline:
            return length
        await asyncio.sleep(0.1)


# Errors


async def test_unreachable_server_error_hides_password(open_broker):
    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(), url=CLOSED_PORT_URL)

    message = str(raised.value)
    assert PASSWORD not in message
    assert "redis://flowrun:***@127.0.0.1:1/0" in message
    assert "running and reachable" in message
    assert raised.value.__cause__ is None


async def test_rejected_password_error_hides_password(open_broker):
    # The server has no such user, so it rejects any password.
    url = f"redis://flowrun-no-such-user:{PASSWORD}@127.0.0.1:6379/0"

    with pytest.raises(BrokerError) as raised:
        await open_broker(subscription(), url=url)

    message = str(raised.value)
    assert PASSWORD not in message
    assert "***" in message
    assert "password in the broker URL" in message


async def test_undeclared_subscription_raises(open_broker):
    broker = await open_broker(subscription())

    with pytest.raises(BrokerError, match="'refunds' is not declared"):
        await broker.fetch("refunds", 1, timeout=0.1)


# Message ids


async def test_republished_id_is_stored_once(open_broker):
    broker = await open_broker(subscription())
    sent = dataclasses.replace(envelope(), dedupe=True)

    await broker.publish([sent])
    await broker.publish([sent])
    deliveries = await broker.fetch(SUBSCRIPTION, 10, timeout=0.3)

    assert [delivery.envelope.id for delivery in deliveries] == [sent.id]
    assert await published_count(broker, TOPIC) == 1


async def test_generated_id_is_not_remembered(open_broker):
    broker = await open_broker(subscription())

    await broker.publish([envelope()])
    keys = await broker._client.keys(f"{broker._names.prefix}:dedup:*")

    assert keys == []


async def test_large_batch_is_stored_whole(open_broker):
    broker = await open_broker(subscription())
    count = redis_backend.PUBLISH_BATCH * 2 + 7

    await broker.publish(envelopes(count))
    stats = await subscription_stats(broker)

    assert await published_count(broker, TOPIC) == count
    assert stats["pending"] == count


async def test_duplicate_skips_full_check(open_broker):
    broker = await open_broker(subscription(max_pending=1, on_full=OnFull.REJECT))
    sent = dataclasses.replace(envelope(), dedupe=True)
    await broker.publish([sent])

    await broker.publish([sent])

    assert await published_count(broker, TOPIC) == 1


# Several processes on one flow


async def test_processes_share_subscription(open_broker):
    first = await open_broker(subscription())
    second = await open_broker(subscription(), flow=first.flow_name)
    await first.publish(envelopes(10))

    from_first = await first.fetch(SUBSCRIPTION, 4, timeout=1.0)
    from_second = await fetch_exactly(second, SUBSCRIPTION, 6)
    leftover = await second.fetch(SUBSCRIPTION, 10, timeout=0.2)

    ids = sorted(delivery.envelope.id for delivery in from_first + from_second)
    assert len(from_first) == 4
    assert len(set(ids)) == 10
    assert leftover == []


async def test_dead_process_delivery_redelivered(open_broker):
    crashed = await open_broker(subscription(ack_timeout=SHORT_ACK_TIMEOUT))
    survivor = await open_broker(subscription(ack_timeout=SHORT_ACK_TIMEOUT), flow=crashed.flow_name)
    sent = envelope()
    await survivor.publish([sent])
    await fetch_one(crashed)
    # The crashed process's timers stop, so only the survivor can expire the delivery.
    await crashed.close()

    again = await fetch_one(survivor)
    stats = await subscription_stats(survivor)

    assert again.envelope.id == sent.id
    assert again.delivery_count == 2
    assert stats["redelivered"] == 1
    assert stats["in_flight"] == 1


async def test_wakes_fetch_of_other_process(open_broker):
    reader = await open_broker(subscription())
    writer = await open_broker(subscription(), flow=reader.flow_name)
    waiting = asyncio.create_task(reader.fetch(SUBSCRIPTION, 10, timeout=5.0))
    await asyncio.sleep(0.1)

    published_at = time.monotonic()
    await writer.publish([envelope()])
    deliveries = await waiting
    latency = time.monotonic() - published_at

    assert len(deliveries) == 1
    # A poll would show up as a delay of up to the fetch timeout; a blocked read wakes at once.
    assert latency < 0.1, f"fetch in the other process returned {latency * 1000:.1f} ms after the publish"


async def test_producer_state_shared_by_processes(open_broker):
    first = await open_broker(subscription())
    second = await open_broker(subscription(), flow=first.flow_name, start=False)
    await second.open_for_inspection(first.topology)

    await first.set_producer_state("replay", True)

    assert await second.producers_finished(["replay"])
    assert not await second.producers_finished(["replay", "other"])


async def test_inspection_reads_running_flow_stats(open_broker):
    running = await open_broker(subscription())
    await running.publish(envelopes(3))
    await fetch_one(running)
    inspector = await open_broker(flow=running.flow_name, start=False)
    await inspector.open_for_inspection(running.topology)

    stats = await subscription_stats(inspector)

    assert stats["delivered"] == 1
    assert stats["in_flight"] == 1
    assert stats["pending"] == 2


async def test_blocked_publish_sees_other_process_ack(open_broker):
    writer = await open_broker(subscription(max_pending=1))
    reader = await open_broker(subscription(max_pending=1), flow=writer.flow_name)
    await writer.publish([envelope()])
    blocked = asyncio.create_task(writer.publish([envelope()]))
    try:
        still_blocked = await is_still_pending(blocked, 0.2)
        delivery = await fetch_one(reader)
        await reader.ack(SUBSCRIPTION, [delivery.tag])
        await asyncio.wait_for(blocked, 2.0)
    finally:
        blocked.cancel()

    assert still_blocked
    assert await published_count(writer, TOPIC) == 2


# Closing


async def test_close_ends_blocked_fetch(open_broker):
    broker = await open_broker(subscription())
    waiting = asyncio.create_task(broker.fetch(SUBSCRIPTION, 10, timeout=30.0))
    await asyncio.sleep(0.1)

    started = time.monotonic()
    await broker.close()
    deliveries = await asyncio.wait_for(waiting, 2.0)

    assert deliveries == []
    assert time.monotonic() - started < 1.0


async def test_close_fails_blocked_publish(open_broker):
    broker = await open_broker(subscription(max_pending=1))
    await broker.publish([envelope()])
    blocked = asyncio.create_task(broker.publish([envelope()]))
    await asyncio.sleep(0.1)

    await broker.close()

    with pytest.raises(BrokerError, match="closed"):
        await asyncio.wait_for(blocked, 2.0)


async def test_close_removes_idle_consumer(open_broker):
    broker = await open_broker(subscription())
    await broker.publish([envelope()])
    delivery = await fetch_one(broker)
    await broker.ack(SUBSCRIPTION, [delivery.tag])
    inspector = await open_broker(flow=broker.flow_name, start=False)
    await inspector.open_for_inspection(broker.topology)

    await broker.close()
    consumers = await inspector._connected().xinfo_consumers(inspector._names.topic(TOPIC), SUBSCRIPTION)

    assert consumers == []


async def test_delete_flow_resources_leaves_no_keys(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC, max_deliveries=1, ordered=True),
                               subscription("dead-reader", topic=DEAD_LETTER_TOPIC))
    await broker.publish([envelope(key="k"), envelope(key="k")])
    delivery = await fetch_one(broker)
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ErrorInfo("ValueError", "bad"))])
    assert await flow_keys(broker)

    await broker.delete_flow_resources()

    assert await flow_keys(broker) == []


# Dead-letter archive


async def dead_letter_one(broker: RedisBroker) -> str:
    sent = envelope(body=b'{"amount": -3}', key="customer-7", headers={"trace-id": "t-1"})
    await broker.publish([sent])
    delivery = await fetch_one(broker)
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ErrorInfo("ValueError", "bad amount"), terminal=True)])
    return sent.id


async def test_dead_letters_lists_archive(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC))
    message_id = await dead_letter_one(broker)

    (letter,) = await broker.dead_letters()

    assert set(letter) == {"number", "subscription", "topic", "message_id", "body", "key", "headers",
                           "dead_lettered_at"}
    assert letter["number"] == 1
    assert letter["subscription"] == SUBSCRIPTION
    assert letter["topic"] == TOPIC
    assert letter["message_id"] == message_id
    assert letter["body"] == b'{"amount": -3}'
    assert letter["key"] == "customer-7"
    assert letter["headers"]["flowrun.error"] == "bad amount"
    assert letter["headers"]["trace-id"] == "t-1"
    assert abs(letter["dead_lettered_at"] - time.time()) < 60
    assert await broker.dead_letters("shipping") == []


async def test_replay_redelivers_as_first_delivery(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC))
    message_id = await dead_letter_one(broker)

    replayed = await broker.replay_dead_letters(SUBSCRIPTION)
    delivery = await fetch_one(broker)

    assert replayed == 1
    assert delivery.delivery_count == 1
    assert delivery.envelope.body == b'{"amount": -3}'
    assert delivery.envelope.key == "customer-7"
    assert delivery.envelope.headers == {"trace-id": "t-1", "flowrun.replayed_from": message_id}
    assert await broker.dead_letters() == []
    assert (await subscription_stats(broker))["in_flight"] == 1


async def test_purge_deletes_dead_letters(open_broker):
    broker = await open_broker(subscription(dead_letter=DEAD_LETTER_TOPIC), subscription("shipping"))
    await dead_letter_one(broker)
    await dead_letter_one(broker)

    purged_other = await broker.purge_dead_letters("shipping")
    purged = await broker.purge_dead_letters(SUBSCRIPTION)

    assert purged_other == 0
    assert purged == 2
    assert await broker.dead_letters() == []


# Ordered subscriptions


async def test_ordered_holds_back_key_until_ack(open_broker):
    broker = await open_broker(subscription(ordered=True))
    first, second, other = envelope(key="k1"), envelope(key="k1"), envelope(key="k2")
    await broker.publish([first, second, other])

    batch = await broker.fetch(SUBSCRIPTION, 10, timeout=1.0)
    held_back = await broker.fetch(SUBSCRIPTION, 10, timeout=0.2)
    pending = (await subscription_stats(broker))["pending"]
    await broker.ack(SUBSCRIPTION, [batch[0].tag])
    released = await fetch_one(broker)

    assert [delivery.envelope.id for delivery in batch] == [first.id, other.id]
    assert held_back == []
    assert pending == 1
    assert released.envelope.id == second.id
    assert released.delivery_count == 1


async def test_ordered_retry_keeps_key(open_broker):
    broker = await open_broker(subscription(ordered=True))
    first, second = envelope(key="k1"), envelope(key="k1")
    await broker.publish([first, second])

    delivery = await fetch_one(broker)
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, delay=0.05)])
    retried = await fetch_one(broker)
    await broker.ack(SUBSCRIPTION, [retried.tag])
    following = await fetch_one(broker)

    assert retried.envelope.id == first.id
    assert retried.delivery_count == 2
    assert following.envelope.id == second.id


async def test_ordered_dead_letter_releases_key(open_broker):
    broker = await open_broker(subscription(ordered=True, dead_letter=DEAD_LETTER_TOPIC, max_deliveries=1))
    first, second = envelope(key="k1"), envelope(key="k1")
    await broker.publish([first, second])

    delivery = await fetch_one(broker)
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ErrorInfo("ValueError", "bad"))])
    following = await fetch_one(broker)

    assert following.envelope.id == second.id


# Reads from both streams at once


async def test_blocking_read_surplus_kept(open_broker):
    broker = await open_broker(subscription())
    await broker.publish(envelopes(2))
    first = await fetch_one(broker)
    await broker.nack(SUBSCRIPTION, [Nack(first.tag, delay=0.0)])
    config = broker._config(SUBSCRIPTION)

    # The retry stream and the topic stream both hold an entry, so one read returns two.
    read = await broker._read_blocking(config, 1, 0.1)
    surplus = await broker.fetch(SUBSCRIPTION, 10, timeout=0.1)
    stats = await subscription_stats(broker)

    assert len(read) == 1
    assert len(surplus) == 1
    assert read[0].envelope.id != surplus[0].envelope.id
    assert stats["in_flight"] == 2
    assert stats["pending"] == 0


# Real `flowrun up` processes

KILLS = 4
MAX_IN_FLIGHT = 8


@pytest.fixture
def process_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[Path, str]]]:
    """Return `write(count, pause, ack_timeout)`, which writes the recording flow for Redis.

    `write` returns the flow's folder and its name, which is fresh for each test.
    FLOWRUN_BROKER_URL points the flow's processes at the test server, and the flow's keys
    are deleted afterwards.
    """
    monkeypatch.setenv("FLOWRUN_BROKER_URL", URL)
    flow_name = f"t{uuid.uuid4().hex[:10]}"

    def write(count: int, pause: float, ack_timeout: str = "2s") -> tuple[Path, str]:
        flow = write_recording_flow(tmp_path, count, pause, ack_timeout)
        flow.write_text(flow.read_text(encoding="utf-8").replace("name: recording", f"name: {flow_name}"),
                        encoding="utf-8")
        return tmp_path, flow_name

    yield write
    asyncio.run(delete_flow_keys(flow_name))


async def connected_processes(flow_name: str) -> int:
    """Return how many processes of a flow are connected, by the client names the backend sets."""
    client = redis_asyncio.Redis.from_url(URL, socket_timeout=None)
    clients = await client.client_list()
    await client.aclose()
    prefix = f"flowrun:{flow_name}:"
    return len({entry["name"] for entry in clients if entry.get("name", "").startswith(prefix)})


def handled_total(database: Path) -> int:
    """Return how many handlings the recording handler stored, 0 before its table exists."""
    if not database.exists():
        return 0
    try:
        return sum(handled_counts(database).values())
    except sqlite3.OperationalError:
        return 0


def wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {seconds:g} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_nine_loses_nothing(process_flow):
    folder, _ = process_flow(1500, pause=0.01, ack_timeout="1s")
    chooser = random.Random(20261204)

    for _ in range(KILLS):
        handled_before = handled_total(folder / "handled.db")
        process = start_flowrun("up", "flow.yaml", "--until-drained", cwd=folder)
        # Kill mid-work: start-up alone can take seconds on a loaded machine.
        wait_until(lambda: handled_total(folder / "handled.db") > handled_before, seconds=60)
        time.sleep(chooser.uniform(0.1, 0.5))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL

    # The kills must have interrupted the work, or the test proves nothing.
    assert len(handled_counts(folder / "handled.db")) < 1500

    finished = run_flowrun("up", "flow.yaml", "--until-drained", "--report", "report.json", cwd=folder)
    assert finished.returncode == 0, finished.stderr

    report = read_report(folder / "report.json")
    work = report["subscriptions"]["work"]
    assert report["topics"]["Work"]["published"] == 1500
    assert work["acked"] + work["dead_lettered"] + work["dropped"] == 1500
    assert work["dead_lettered"] == 0
    assert work["in_flight"] == 0
    assert work["pending"] == 0

    counts = handled_counts(folder / "handled.db")
    assert len(counts) == 1500
    repeats = sum(count - 1 for count in counts.values())
    # Only deliveries in flight at a kill may be handled again.
    assert repeats <= KILLS * MAX_IN_FLIGHT


@pytest.mark.slow
def test_two_workers_share_the_work(process_flow):
    folder, flow_name = process_flow(600, pause=0.003)

    workers = [start_flowrun("up", "flow.yaml", "--only", "work", "--until-drained", cwd=folder) for _ in range(2)]
    # Start the producer once both workers are connected, or the first one up could take everything.
    wait_until(lambda: asyncio.run(connected_processes(flow_name)) >= 2, seconds=60)
    producer = run_flowrun("up", "flow.yaml", "--only", "numbers", "--until-drained", cwd=folder)
    outputs = [worker.communicate(timeout=300) for worker in workers]

    assert producer.returncode == 0, producer.stderr
    for worker, (_, error_output) in zip(workers, outputs):
        assert worker.returncode == 0, error_output

    counts = handled_counts(folder / "handled.db")
    assert len(counts) == 600
    assert set(counts.values()) == {1}

    per_process = handled_by_process(folder / "handled.db")
    assert len(per_process) == 2
    assert min(per_process.values()) > 0

    status = run_flowrun("status", "flow.yaml", "--json", cwd=folder)
    assert status.returncode == 0, status.stderr
    assert '"pending": 0' in status.stdout
