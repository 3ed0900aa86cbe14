"""The JSON Schema of the flow file format, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from flowrun.spec import FlowSpec

SCHEMA_ID = "https://flowrun.dev/schema/flow.json"


def flow_json_schema() -> dict[str, Any]:
    """Return a JSON Schema (2020-12) that accepts exactly the flow files the loader accepts.

    Durations are numbers or strings such as 250ms; the schema checks the string form with a
    pattern, since the loader's parser is Python code.
    """
    schema = FlowSpec.model_json_schema(mode="validation", by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "flowrun flow file"
    _relax_durations(schema)
    _allow_null_topics(schema)
    return schema


DURATION_PATTERN = r"^\s*(\d+(\.\d+)?(ms|s|m|h))+\s*$"
DURATION_FIELDS = {"initial", "max", "ack_timeout", "max_wait", "handler_timeout", "shutdown_timeout"}


def _relax_durations(node: Any) -> None:
    """Durations are validated as floats; a file may write them as strings such as 30s."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            for name, prop in properties.items():
                if name in DURATION_FIELDS:
                    _accept_duration_string(prop)
        for value in node.values():
            _relax_durations(value)
    elif isinstance(node, list):
        for value in node:
            _relax_durations(value)


def _accept_duration_string(prop: dict[str, Any]) -> None:
    duration = {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": DURATION_PATTERN}]}
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
