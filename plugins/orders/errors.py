"""Errors raised by the orders plugins for bad input, as opposed to failures of the flow."""

from __future__ import annotations


class InvalidOptionError(ValueError):
    """A plugin option (the flow's `with:`) with a missing or invalid value."""


class InvalidPayloadError(ValueError):
    """A message payload with a missing or invalid field, which retrying cannot fix."""
