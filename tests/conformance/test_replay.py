"""Replaying dead letters: a replay links to the id its message was first published under."""

from __future__ import annotations

import pytest

from flowrun.broker import ErrorInfo, Nack
from flowrun.message import REPLAYED_FROM_HEADER, Envelope

from .helpers import DEAD_LETTER_TOPIC, SUBSCRIPTION, envelope, fetch_one, subscription

ERROR = ErrorInfo("ValueError", "amount must be positive")


def skip_without_archive(backend: str) -> None:
    if backend == "memory":
        pytest.skip("the memory backend keeps no dead letters to replay")


async def dead_letter_next(broker) -> str:
    """Fetch the next delivery, send it straight to the dead-letter topic and return its id."""
    delivery = await fetch_one(broker)
    await broker.nack(SUBSCRIPTION, [Nack(delivery.tag, error=ERROR, terminal=True)])
    return delivery.envelope.id


async def publish_and_dead_letter(broker) -> Envelope:
    """Publish a message with a header of its own and send it to the dead-letter topic."""
    sent = envelope(headers={"trace-id": "t-1"})
    await broker.publish([sent])
    await dead_letter_next(broker)
    return sent


async def test_replay_links_to_first_id(backend, broker_factory):
    skip_without_archive(backend)
    broker = await broker_factory(subscription(dead_letter=DEAD_LETTER_TOPIC))
    sent = await publish_and_dead_letter(broker)

    replayed = await broker.replay_dead_letters(SUBSCRIPTION)
    delivery = await fetch_one(broker)

    assert replayed == 1
    assert delivery.delivery_count == 1
    assert delivery.envelope.id != sent.id
    assert delivery.envelope.headers == {"trace-id": "t-1", REPLAYED_FROM_HEADER: sent.id}


async def test_second_replay_keeps_first_id(backend, broker_factory):
    skip_without_archive(backend)
    broker = await broker_factory(subscription(dead_letter=DEAD_LETTER_TOPIC))
    sent = await publish_and_dead_letter(broker)
    await broker.replay_dead_letters(SUBSCRIPTION)
    first_replay_id = await dead_letter_next(broker)

    (letter,) = await broker.dead_letters(SUBSCRIPTION)
    replayed = await broker.replay_dead_letters(SUBSCRIPTION)
    delivery = await fetch_one(broker)

    assert letter["message_id"] == first_replay_id
    assert letter["headers"][REPLAYED_FROM_HEADER] == sent.id
    assert letter["headers"]["flowrun.original_id"] == first_replay_id
    assert replayed == 1
    assert delivery.envelope.id != sent.id
    assert delivery.envelope.id != first_replay_id
    assert delivery.envelope.headers == {"trace-id": "t-1", REPLAYED_FROM_HEADER: sent.id}
