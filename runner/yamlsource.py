"""Safe YAML loading that remembers where every key and value sits in the file.

The loader builds on `yaml.SafeLoader`, so only plain data is constructed. Mappings come
back as `PositionedDict` and sequences as `PositionedList`, which record the 1-based line
and column of each key and value. `${NAME}` and `${NAME:default}` in string values are
replaced from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from flowrun.errors import FlowFileError, Location

Position = tuple[int, int]
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


class PositionedDict(dict[Any, Any]):
    """A YAML mapping with the position of each key and each value."""

    def __init__(self) -> None:
        super().__init__()
        self.position: Position = (0, 0)
        self.key_positions: dict[Any, Position] = {}
        self.value_positions: dict[Any, Position] = {}


class PositionedList(list[Any]):
    """A YAML sequence with the position of each item."""

    def __init__(self) -> None:
        super().__init__()
        self.position: Position = (0, 0)
        self.item_positions: list[Position] = []


def _position(node: yaml.Node) -> Position:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _PositionLoader(yaml.SafeLoader):
    """SafeLoader that records positions, rejects duplicate keys and expands ${ENV}."""

    path = "<flow>"
    environment: Mapping[str, str] = os.environ

    def construct_positioned_mapping(self, node: yaml.MappingNode) -> PositionedDict:
        self.flatten_mapping(node)
        result = PositionedDict()
        result.position = _position(node)

        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                line, column = _position(key_node)
                raise FlowFileError(Location(self.path, line, column), "mapping keys must be plain strings")

            if key in result:
                line, column = _position(key_node)
                first_line = result.key_positions[key][0]
                raise FlowFileError(
                    Location(self.path, line, column),
                    f"duplicate key '{key}' (first defined on line {first_line}); remove one of them",
                )

            result[key] = self.construct_object(value_node, deep=True)
            result.key_positions[key] = _position(key_node)
            result.value_positions[key] = _position(value_node)
        return result

    def construct_positioned_sequence(self, node: yaml.SequenceNode) -> PositionedList:
        result = PositionedList()
        result.position = _position(node)
        for item_node in node.value:
            result.append(self.construct_object(item_node, deep=True))
            result.item_positions.append(_position(item_node))
        return result

    def construct_expanded_string(self, node: yaml.ScalarNode) -> str:
        value = self.construct_scalar(node)
        if "${" not in value:
            return value
        return _ENV_REFERENCE.sub(lambda match: self._expand(match, node), value)

    def _expand(self, match: re.Match[str], node: yaml.Node) -> str:
        name, default = match.group(1), match.group(2)
        if name in self.environment:
            return self.environment[name]
        if default is not None:
            return default

        line, column = _position(node)
        raise FlowFileError(
            Location(self.path, line, column),
            f"environment variable '{name}' is not set; set it or write ${{{name}:default}}",
        )


_PositionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _PositionLoader.construct_positioned_mapping)
_PositionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _PositionLoader.construct_positioned_sequence)
_PositionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG, _PositionLoader.construct_expanded_string)


# Advice for PyYAML's most common problems, each found by a part of PyYAML's wording.
_YAML_HINTS = (
    ("mapping values are not allowed", "quote a value that contains ': ', or indent the line under its key"),
    ("expected <block end>", "indent the keys of one mapping, or the items of one list, by the same number of spaces"),
    ("expected ',' or ']'", "close the '[' list opened earlier, or put each item on its own '- ' line"),
    ("expected ',' or '}'", "close the '{' mapping opened earlier, or put each key on its own line"),
    ("could not find expected ':'", "write each line of a mapping as 'key: value', or fix its indentation"),
    ("'\\t' that cannot start any token", "YAML indents with spaces only, so replace the tab with spaces"),
    ("found another document", "a flow file is one YAML document, so remove the '---' line and what follows it"),
    ("recursive node", "an alias cannot refer to the mapping or list that contains it, so write the values out"),
    ("found undefined alias", "define the anchor ('&name') before the alias ('*name') that uses it"),
    ("could not determine a constructor", "flow files are plain YAML, so remove the tag"),
    ("found unexpected end of stream", "close the quoted string"),
)


def _with_hint(problem: str) -> str:
    for wording, hint in _YAML_HINTS:
        if wording in problem:
            return f"{problem}; {hint}"
    return problem


def load_yaml(text: str, path: str, environment: Mapping[str, str] | None = None) -> Any:
    """Parse one YAML document, raising FlowFileError with the file position on any problem."""
    loader_class = type("FlowLoader", (_PositionLoader,), {"path": path, "environment": environment or os.environ})
    loader = None
    try:
        # The constructor already rejects control characters, so it belongs in the try.
        loader = loader_class(text)
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = error.problem or error.context or "invalid YAML"
        raise FlowFileError(Location(path, line, column), f"invalid YAML: {_with_hint(problem)}") from None
    except yaml.YAMLError as error:
        raise FlowFileError(Location(path), f"invalid YAML: {error}") from None
    except RecursionError:
        raise FlowFileError(Location(path), "invalid YAML: nesting is too deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def locate(document: Any, path: tuple[Any, ...], file_path: str) -> Location:
    """Return the position of the key or item at `path`, or of its closest existing parent."""
    line, column = getattr(document, "position", (1, 1))
    node = document

    for step in path:
        if isinstance(node, PositionedDict) and step in node:
            line, column = node.key_positions[step]
            node = node[step]
        elif isinstance(node, PositionedList) and isinstance(step, int) and 0 <= step < len(node):
            line, column = node.item_positions[step]
            node = node[step]
        else:
            break
    return Location(file_path, line, column)


def locate_value(document: Any, path: tuple[Any, ...], file_path: str) -> Location:
    """Like `locate`, but for the value at `path` rather than its key."""
    if not path:
        return locate(document, path, file_path)

    parent = document
    for step in path[:-1]:
        try:
            parent = parent[step]
        except (KeyError, IndexError, TypeError):
            return locate(document, path, file_path)

    last = path[-1]
    if isinstance(parent, PositionedDict) and last in parent.value_positions:
        line, column = parent.value_positions[last]
        return Location(file_path, line, column)
    return locate(document, path, file_path)
