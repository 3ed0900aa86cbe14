"""flowrun: declarative event pipelines on message-queue semantics.

Plugin authors import what they need from here:

    from flowrun import Context, Message

A handler is `handler(message, context)`, sync or async, or a class with
`setup(context)`, `handle(message, context)` and `close()`. A producer is a callable given a
context that returns an iterator of payloads (sync or async) or publishes through
`context.publish` itself.
"""

from flowrun.context import Context
from flowrun.errors import (
    BrokerError,
    FlowFileError,
    FlowrunError,
    FlowValidationError,
    HopLimitError,
    PayloadError,
    PluginError,
    PublishError,
    QueueFullError,
    UndeclaredTopicError,
)
from flowrun.message import Message
from flowrun.outgoing import Outgoing

__all__ = [
    "BrokerError",
    "Context",
    "FlowFileError",
    "FlowValidationError",
    "FlowrunError",
    "HopLimitError",
    "Message",
    "Outgoing",
    "PayloadError",
    "PluginError",
    "PublishError",
    "QueueFullError",
    "UndeclaredTopicError",
]

__version__ = "0.1.0"
