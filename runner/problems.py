"""Findings of loading and validating a flow, printed one per line for humans and CI."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flowrun.errors import Location


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    # A check that did not run, which --strict does not turn into an error.
    NOTE = "note"


@dataclass(frozen=True)
class Problem:
    """One finding, rendered as `path:line:col: error|warning: message`."""

    location: Location
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.severity.value}: {self.message}"

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    @property
    def is_warning(self) -> bool:
        return self.severity is Severity.WARNING


def error(location: Location, message: str) -> Problem:
    return Problem(location, Severity.ERROR, message)


def warning(location: Location, message: str) -> Problem:
    return Problem(location, Severity.WARNING, message)


def note(location: Location, message: str) -> Problem:
    return Problem(location, Severity.NOTE, message)
