"""JSON encoding of payloads, shared by every backend so they agree on the wire format."""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable
from typing import Any

import orjson

from flowrun.errors import PayloadError


def _encode_extra(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"type {type(value).__name__} is not JSON serializable")


def encode(payload: Any, topic: str) -> bytes:
    """Encode `payload` as JSON; Decimal becomes a string, pydantic models their JSON form."""
    try:
        return orjson.dumps(payload, default=_encode_extra)
    except TypeError as error:
        raise PayloadError(
            f"payload for topic '{topic}' cannot be encoded as JSON: {error}; "
            "publish dicts, lists, tuples, sets, strings, numbers, booleans, None, Decimal, datetime "
            "or pydantic models"
        ) from None


# Decodes a JSON body published by `encode`: orjson's own function, called once per
# delivery, so no wrapper adds a Python call.
decode: Callable[[bytes | bytearray | memoryview | str], Any] = orjson.loads


def iso_time(timestamp: float) -> str:
    """Format a Unix timestamp as an ISO 8601 UTC string for headers."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")
