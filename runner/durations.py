"""Parse human durations such as `250ms`, `30s`, `2m`, `1h` or `1m30s` into seconds."""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")


def parse_duration(value: object) -> float:
    """Return `value` in seconds; a bare number is taken as seconds.

    Raises ValueError with the accepted forms when `value` is not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {str(value).lower()}: expected a number of seconds or 250ms, 30s, 2m, 1h")

    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        parts = _PART.findall(value.strip())
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:
        raise ValueError(f"invalid duration {value!r}: expected a number of seconds or 250ms, 30s, 2m, 1h")

    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be a finite number")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way a flow file writes them (`250ms`, `30s`, `2m`)."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m"
