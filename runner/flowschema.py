"""The JSON Schema of the flow file format, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from flowrun.loader import NAME_PATTERN
from flowrun.spec import FlowSpec

SCHEMA_ID = "https://flowrun.dev/schema/flow.json"


def flow_json_schema() -> dict[str, Any]:
    """Return a JSON Schema (2020-12) of the flow file format.

    Durations are numbers or strings such as 250ms; the schema checks the string form with a
    pattern, since the loader's parser is Python code. Rules across keys (retry max not below
    initial, a name used by a producer and a subscriber) are left to `flowrun validate`.
    """
    schema = FlowSpec.model_json_schema(mode="validation", by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "flowrun flow file"
    _relax_durations(schema)
    _allow_null_topics(schema)
    _restrict_names(schema)
    return schema


def _restrict_names(schema: dict[str, Any]) -> None:
    """Section entry names follow the loader's rule."""
    for section in ("topics", "producers", "subscribers"):
        schema["properties"][section]["propertyNames"] = {"pattern": NAME_PATTERN}


DURATION_PATTERN = r"^\s*(\d+(\.\d+)?(ms|s|m|h))+\s*$"
DURATION_FIELDS = {"initial", "max", "ack_timeout", "max_wait", "handler_timeout", "shutdown_timeout"}
# Durations that must be greater than zero; the others may be zero.
POSITIVE_DURATIONS = {"ack_timeout", "max_wait"}
POSITIVE_DURATION_PATTERN = r"^\s*(0*[1-9]\d*(\.\d+)?|0*\.\d*[1-9]\d*)(ms|s|m|h)((\d+(\.\d+)?)(ms|s|m|h))*\s*$"


def _relax_durations(node: Any) -> None:
    """Durations are validated as floats; a file may write them as strings such as 30s."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            for name, prop in properties.items():
                if name in DURATION_FIELDS:
                    _accept_duration_string(prop, positive=name in POSITIVE_DURATIONS)
        for value in node.values():
            _relax_durations(value)
    elif isinstance(node, list):
        for value in node:
            _relax_durations(value)


def _accept_duration_string(prop: dict[str, Any], positive: bool) -> None:
    number = {"type": "number", "exclusiveMinimum": 0} if positive else {"type": "number", "minimum": 0}
    string = {"type": "string", "pattern": POSITIVE_DURATION_PATTERN if positive else DURATION_PATTERN}
    duration = {"anyOf": [number, string]}
    if prop.get("type") == "number":
        prop.pop("type")
        prop.update(duration)
    elif "anyOf" in prop:
        options = [option for option in prop["anyOf"] if option.get("type") != "number"]
        prop["anyOf"] = duration["anyOf"] + options


def _allow_null_topics(schema: dict[str, Any]) -> None:
    topics = schema["properties"]["topics"]
    reference = topics["additionalProperties"]
    topics["additionalProperties"] = {"anyOf": [reference, {"type": "null"}]}
