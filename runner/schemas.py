"""Message schemas of topics: pydantic models or JSON Schema files, and checks between them."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import typing
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import yaml
from pydantic import BaseModel, ValidationError

from flowrun.errors import FlowrunError, PayloadError, PluginError
from flowrun.plugins import resolve

logger = logging.getLogger(__name__)

SCHEMA_FILE_SUFFIXES = (".json", ".yaml", ".yml")


class SchemaError(FlowrunError):
    """A topic schema reference that cannot be loaded."""


class TopicSchema:
    """The schema of one topic: validates payloads and exposes its JSON Schema."""

    def __init__(self, topic: str, reference: str, json_schema: dict[str, Any], model: type[BaseModel] | None) -> None:
        self.topic = topic
        self.reference = reference
        self.json_schema = json_schema
        self.model = model
        self._validator = None if model else jsonschema.Draft202012Validator(json_schema)

    def validate(self, body: bytes) -> None:
        """Raise PayloadError naming the topic and the first invalid field.

        The encoded body is checked, because that is what subscribers decode. A model is
        applied in strict JSON mode, so "3" does not pass for an integer field.
        """
        if self.model is not None:
            try:
                self.model.model_validate_json(body, strict=True)
            except ValidationError as error:
                raise PayloadError(f"payload for topic '{self.topic}' does not match {self.reference}: "
                                   f"{describe_validation_error(error)}") from None
            return

        assert self._validator is not None
        mismatch = jsonschema.exceptions.best_match(self._validator.iter_errors(orjson.loads(body)))
        if mismatch is not None:
            field = ".".join(str(part) for part in mismatch.absolute_path) or "(payload)"
            raise PayloadError(f"payload for topic '{self.topic}' does not match {self.reference}: "
                               f"field '{field}': {mismatch.message}")


def describe_validation_error(error: ValidationError) -> str:
    """Format the first three pydantic errors as `field: message`, joined on one line."""
    parts = []
    for item in error.errors()[:3]:
        field = ".".join(str(part) for part in item["loc"]) or "(payload)"
        parts.append(f"field '{field}': {item['msg']}")
    more = len(error.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def load_topic_schema(topic: str, reference: str, flow_folder: Path) -> TopicSchema:
    """Load a model reference or a JSON Schema file named by a topic's `schema` key."""
    if reference.endswith(SCHEMA_FILE_SUFFIXES):
        return TopicSchema(topic, reference, _read_schema_file(reference, flow_folder), None)

    try:
        model = resolve(reference, flow_folder)
    except PluginError as error:
        raise SchemaError(f"schema of topic '{topic}': {error.detail}") from None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise SchemaError(f"schema of topic '{topic}': '{reference}' is not a pydantic model class")
    return TopicSchema(topic, reference, model_schema(model), model)


def _read_schema_file(reference: str, flow_folder: Path) -> dict[str, Any]:
    path = Path(reference).expanduser()
    path = path if path.is_absolute() else flow_folder / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SchemaError(f"cannot read schema file {path}: {error.strerror}") from None

    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise SchemaError(f"schema file {path} is not valid {path.suffix.lstrip('.').upper()}: {error}") from None
    if not isinstance(document, dict):
        raise SchemaError(f"schema file {path} must contain a JSON Schema object")

    try:
        jsonschema.Draft202012Validator.check_schema(document)
    except jsonschema.exceptions.SchemaError as error:
        raise SchemaError(f"schema file {path} is not a valid JSON Schema: {error.message}") from None
    return document


@functools.lru_cache(maxsize=256)
def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(mode="validation")


def input_model(function: Any) -> type[BaseModel] | None:
    """Return the pydantic model that a handler's first parameter is annotated with, or None."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable annotations mean no model
        return None

    try:
        parameters = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return None
    if not parameters:
        return None

    annotation = hints.get(parameters[0].name)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def fit_problems(provided: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """List how data shaped by `provided` could fail `expected`: missing required fields or type clashes.

    Both are JSON Schemas of objects. Only top-level properties are compared.
    """
    provided = _resolve_root(provided)
    expected = _resolve_root(expected)
    provided_properties = provided.get("properties", {})
    expected_properties = expected.get("properties", {})
    problems = []

    for name in expected.get("required", []):
        if name not in provided_properties:
            problems.append(f"field '{name}' is required but not provided")

    for name, expected_property in expected_properties.items():
        if name not in provided_properties:
            continue
        provided_types = _json_types(provided_properties[name])
        expected_types = _json_types(expected_property)
        if provided_types and expected_types and not _types_fit(provided_types, expected_types):
            provided_text = "/".join(sorted(provided_types))
            expected_text = "/".join(sorted(expected_types))
            problems.append(f"field '{name}' is {provided_text} but {expected_text} is expected")
    return problems


def _types_fit(provided: set[str], expected: set[str]) -> bool:
    return all(kind in expected or (kind == "integer" and "number" in expected) for kind in provided)


def _resolve_root(schema: dict[str, Any]) -> dict[str, Any]:
    reference = schema.get("$ref")
    if isinstance(reference, str) and reference.startswith("#/$defs/"):
        return dict(schema.get("$defs", {}).get(reference.removeprefix("#/$defs/"), schema))
    return schema


def _json_types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        types = {kind}
    elif isinstance(kind, list):
        types = set(kind)
    elif "anyOf" in schema:
        types = set()
        for option in schema["anyOf"]:
            option_types = _json_types(option)
            if not option_types:
                return set()
            types |= option_types
    else:
        return set()
    return types
