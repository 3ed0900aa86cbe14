"""Read a flow file into a `FlowSpec`, turning every mistake into a positioned problem."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from flowrun import problems
from flowrun.errors import FlowFileError, FlowValidationError, Location
from flowrun.problems import Problem
from flowrun.spec import BrokerSpec, FlowSpec, ProducerSpec, RetrySpec, SubscriberSpec, TopicSpec
from flowrun.yamlsource import PositionedDict, load_yaml, locate, locate_value

logger = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
_NAME = re.compile(NAME_PATTERN)
_SECTION_NOUNS = {"topics": "topic", "producers": "producer", "subscribers": "subscriber"}
_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "topics": TopicSpec,
    "producers": ProducerSpec,
    "subscribers": SubscriberSpec,
}
MAX_FILE_BYTES = 4 * 1024 * 1024
# Rounds of removing what failed the schema before a flow is given up as too broken to
# check its references. A removal can expose one more error (an invalid `topic` removed
# is then missing), so one round is not always enough.
MAX_REMOVAL_ROUNDS = 5


@dataclass
class LoadedFlow:
    """A parsed flow: its spec, where it came from, and the YAML tree for positions."""

    path: Path
    display_path: str
    spec: FlowSpec
    document: Any = field(repr=False)

    def locate(self, *keys: Any) -> Location:
        return locate(self.document, keys, self.display_path)

    def locate_value(self, *keys: Any) -> Location:
        return locate_value(self.document, keys, self.display_path)


@dataclass(frozen=True)
class FlowReading:
    """The result of reading a flow file, with the parsed YAML for checks beyond the schema."""

    path: Path
    display_path: str
    flow: LoadedFlow | None
    problems: list[Problem]
    # False when the file could not be read at all (missing, a directory, not UTF-8).
    file_read: bool = True
    # The parsed YAML, or None when the file is empty or could not be read or parsed.
    document: Any = field(default=None, repr=False)

    def partial_flow(self) -> LoadedFlow | None:
        """Return the flow without what failed the schema, so its references can still be checked.

        Invalid settings are removed, so they take their defaults. A producer or subscriber
        that lacks a required key is left out, but a topic is never left out, so no
        reference to it turns undeclared. Returns None when there is no `topics` mapping
        to check references against.
        """
        if not isinstance(self.document, dict):
            return None
        spec = _spec_without_invalid(self.document)
        if spec is None:
            return None
        return LoadedFlow(self.path.resolve(), self.display_path, spec, self.document)


def read_flow(path: str | Path) -> tuple[LoadedFlow | None, list[Problem]]:
    """Load and schema-check a flow file; return the flow (None on errors) and every problem."""
    reading = read_flow_file(path)
    return reading.flow, reading.problems


def read_flow_file(path: str | Path) -> FlowReading:
    """Load and schema-check a flow file, keeping its YAML for a partial check on errors."""
    display_path = str(path)
    file_path = Path(path)

    try:
        text = _read_text(file_path, display_path)
    except FlowFileError as error:
        return FlowReading(file_path, display_path, None, [problems.error(error.location, error.message)],
                           file_read=False)
    try:
        document = load_yaml(text, display_path)
    except FlowFileError as error:
        return FlowReading(file_path, display_path, None, [problems.error(error.location, error.message)])

    flow, found = _flow_from_document(document, file_path, display_path)
    return FlowReading(file_path, display_path, flow, found, document=document)


def _flow_from_document(
    document: Any, file_path: Path, display_path: str
) -> tuple[LoadedFlow | None, list[Problem]]:
    if not isinstance(document, dict):
        kind = "an empty file" if document is None else _kind_of(document)
        location = Location(display_path, 1, 1)
        return None, [problems.error(location, f"a flow file must be a YAML mapping with a 'topics' key, found {kind}")]

    found = _check_names(document, display_path)
    try:
        spec = FlowSpec.model_validate(document)
    except ValidationError as error:
        found += [_problem_from_pydantic(item, document, display_path) for item in error.errors()]
        return None, found

    if found:
        return None, found
    return LoadedFlow(file_path.resolve(), display_path, spec, document), []


def load_flow(path: str | Path) -> LoadedFlow:
    """Load a flow file or raise FlowValidationError listing every problem."""
    flow, found = read_flow(path)
    if flow is None:
        raise FlowValidationError(found)
    return flow


def _spec_without_invalid(document: dict[Any, Any]) -> FlowSpec | None:
    """Validate a copy of the document, removing what fails until the rest passes."""
    remaining = _plain_copy(document)
    for _ in range(MAX_REMOVAL_ROUNDS):
        try:
            return FlowSpec.model_validate(remaining)
        except ValidationError as error:
            for item in error.errors():
                if not _remove_invalid(remaining, tuple(item["loc"]), item["type"]):
                    return None
    return None


def _plain_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_copy(item) for item in value]
    return value


def _remove_invalid(document: dict[Any, Any], loc: tuple[Any, ...], kind: str) -> bool:
    """Remove what a schema error points at; return False when no topics would be left to check against.

    `loc` and `kind` are the error's location and type as pydantic reports them. An error
    inside an entry of topics, producers or subscribers removes the entry's key that
    contains it, so a whole `retry` goes for an error in `retry.initial`. A producer or
    subscriber that lacks a required key is removed whole, and a topic that is not a
    mapping takes the defaults.
    """
    if not loc:
        return False
    section = loc[0]
    if section not in _SECTION_NOUNS:
        document.pop(section, None)
        return True
    entries = document.get(section)
    if len(loc) == 1 or not isinstance(entries, dict):
        if section == "topics":
            return False
        document.pop(section, None)
        return True

    name = loc[1]
    entry = entries.get(name)
    key = loc[2] if len(loc) > 2 else None
    if section == "topics" and key == "[key]":
        return False
    if isinstance(entry, dict) and key not in (None, "[key]") and kind != "missing":
        entry.pop(key, None)
    elif section == "topics":
        entries[name] = {}
    else:
        entries.pop(name, None)
    return True


def _read_text(file_path: Path, display_path: str) -> str:
    try:
        if file_path.stat().st_size > MAX_FILE_BYTES:
            raise FlowFileError(Location(display_path), f"flow file is larger than {MAX_FILE_BYTES} bytes")
        return file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlowFileError(Location(display_path), "flow file not found; check the path") from None
    except IsADirectoryError:
        raise FlowFileError(Location(display_path), "is a directory; pass a flow file (.yaml)") from None
    except UnicodeDecodeError as error:
        raise FlowFileError(Location(display_path), f"flow file is not valid UTF-8 (byte {error.start})") from None
    except OSError as error:
        raise FlowFileError(Location(display_path), f"cannot read flow file: {error.strerror}") from None


def _check_names(document: dict[str, Any], display_path: str) -> list[Problem]:
    """Check section entry names and that no name is both a producer and a subscriber."""
    found: list[Problem] = []

    for section, noun in _SECTION_NOUNS.items():
        entries = document.get(section)
        if not isinstance(entries, dict):
            continue
        for name in entries:
            if isinstance(name, bool) or name is None:
                location = locate(document, (section, name), display_path)
                message = f"invalid {noun} name: YAML reads an unquoted yes, no, on, off, true, false or null as {_show_value(name)}; quote the name"
                found.append(problems.error(location, message))
            elif not isinstance(name, str) or not _NAME.match(name):
                location = locate(document, (section, name), display_path)
                message = f"invalid {noun} name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
                found.append(problems.error(location, message))

    producers = document.get("producers") if isinstance(document.get("producers"), dict) else {}
    subscribers = document.get("subscribers") if isinstance(document.get("subscribers"), dict) else {}
    for name in set(producers or {}) & set(subscribers or {}):
        location = locate(document, ("subscribers", name), display_path)
        found.append(problems.error(location, f"name '{name}' is used by a producer and a subscriber; rename one"))
    return found


def _problem_from_pydantic(item: Any, document: Any, display_path: str) -> Problem:
    loc = tuple(item["loc"])
    kind = item["type"]
    where = _describe_place(loc[:-1] if loc else loc)

    if kind == "extra_forbidden":
        key = loc[-1]
        return problems.error(locate(document, loc, display_path), f"unknown key '{key}' {where}{_suggest(key, loc[:-1])}")

    if kind == "missing":
        location = locate(document, loc[:-1], display_path)
        return problems.error(location, f"missing required key '{loc[-1]}' {where}")

    location = locate_value(document, loc, display_path)
    message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        return problems.error(location, message)

    value = item.get("input")
    shown = _show_value(value)
    return problems.error(location, f"invalid value {shown} for '{loc[-1]}' {where}: {message}")


def _describe_place(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "at the top level of the flow"

    section = loc[0]
    if section in _SECTION_NOUNS and len(loc) >= 2:
        place = f"in {_SECTION_NOUNS[section]} '{loc[1]}'"
        if len(loc) >= 3:
            place = f"in '{'.'.join(str(part) for part in loc[2:])}' of {_SECTION_NOUNS[section]} '{loc[1]}'"
        return place
    return f"in '{'.'.join(str(part) for part in loc)}'"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    if not loc:
        return FlowSpec
    if loc == ("broker",):
        return BrokerSpec
    if len(loc) == 2 and loc[0] in _SECTION_MODELS:
        return _SECTION_MODELS[loc[0]]
    if len(loc) == 3 and loc[0] == "subscribers" and loc[2] == "retry":
        return RetrySpec
    return None


def _suggest(key: Any, parent: tuple[Any, ...]) -> str:
    model = _model_at(parent)
    if model is None:
        return ""

    allowed = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f"; allowed keys: {', '.join(sorted(allowed))}"


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, PositionedDict | dict):
        return "(a mapping)"
    if isinstance(value, list):
        return "(a list)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
