"""The flowrun exception tree.

    FlowrunError
    ├── FlowFileError            a flow file that cannot be loaded (YAML or schema)
    ├── FlowValidationError      a loaded flow whose references or graph are invalid
    ├── PluginError              a plugin reference that cannot be imported or used
    ├── PluginExit               plugin code raised SystemExit or KeyboardInterrupt
    ├── PublishError             a publish that was rejected
    │   ├── UndeclaredTopicError a handler published to a topic it did not declare
    │   ├── PayloadError         a payload that cannot be encoded
    │   ├── HopLimitError        a message exceeded the flow's max_hops
    │   └── QueueFullError       a subscription is full and its topic rejects on full
    └── BrokerError              a broker backend failed (connection, protocol)

Errors that concern a place in a flow file carry `path`, `line` and `column` and render as
`path:line:col: message`, the format editors and CI annotations understand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class FlowrunError(Exception):
    """Root of every error flowrun raises on purpose."""


# Exceptions outside `Exception` that plugin code may raise and that must not stop flowrun:
# a handler's sys.exit() would otherwise end its worker task and leave its message in flight.
EXITS = (SystemExit, KeyboardInterrupt)


class PluginExit(FlowrunError):
    """Plugin code raised SystemExit or KeyboardInterrupt, which flowrun handles like any error."""

    def __init__(self, raised: BaseException) -> None:
        self.raised = raised
        detail = f"({raised})" if str(raised) else ""
        super().__init__(f"{type(raised).__name__}{detail} raised by plugin code; a plugin cannot stop flowrun "
                         "this way, so raise an exception instead")
        # The exit's traceback names the plugin's file and line, in logs and dead letters.
        self.__cause__ = raised


@dataclass(frozen=True)
class Location:
    """A place in a flow file; line and column count from 1."""

    path: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.path
        return f"{self.path}:{self.line}:{self.column}"


class FlowFileError(FlowrunError):
    """A flow file that cannot be read, parsed or matched to the flow schema."""

    def __init__(self, location: Location, message: str) -> None:
        self.location = location
        self.message = message
        super().__init__(f"{location}: error: {message}")


class FlowValidationError(FlowrunError):
    """A flow with errors found by `validate`; `problems` lists every one."""

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in problems))


class PluginError(FlowrunError):
    """A plugin reference that cannot be resolved, imported or called."""

    def __init__(self, reference: str, message: str, location: Location | None = None) -> None:
        self.reference = reference
        self.detail = message
        self.location = location
        prefix = f"{location}: error: " if location else ""
        super().__init__(f"{prefix}plugin '{reference}': {message}")


class PublishError(FlowrunError):
    """A message that the broker or the flow rejected at publish time."""


class UndeclaredTopicError(PublishError):
    """A producer or handler published to a topic missing from its `publishes` list."""


class PayloadError(PublishError):
    """A payload that cannot be encoded as JSON."""


class HopLimitError(PublishError):
    """A message passed through more handlers than the flow's `max_hops` allows."""


class QueueFullError(PublishError):
    """A subscription reached `max_pending` and its topic is set to `on_full: reject`."""


class BrokerError(FlowrunError):
    """A broker backend failed: connection lost, protocol error, server refused."""
