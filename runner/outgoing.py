"""A message a producer yields when it needs to choose the topic, key, headers or id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A payload with its routing: yield it from a producer that publishes to several topics."""

    topic: str
    payload: Any
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    id: str | None = None
