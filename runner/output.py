"""Helpers of the CLI commands: argument expansion, problem formats, graph rendering, publishing."""

from __future__ import annotations

import enum
import glob
import importlib.metadata
import inspect
import json
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import typer

from flowrun.errors import FlowrunError
from flowrun.loader import LoadedFlow
from flowrun.problems import Problem
from flowrun.runtime import FlowRuntime

GRAPHVIZ_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}


class GraphFormat(str, enum.Enum):
    MERMAID = "mermaid"
    DOT = "dot"


def expand_flow_arguments(arguments: Iterable[str]) -> list[str]:
    """Expand glob patterns (the shell may not have); a pattern that matches nothing is a usage error."""
    paths: list[str] = []
    for argument in arguments:
        if glob.has_magic(argument) and not Path(argument).exists():
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise typer.BadParameter(f"no file matches '{argument}'", param_hint="FLOWS")
            paths += matches
        else:
            paths.append(argument)
    return paths


def print_problems(found: list[Problem], output_format: str, strict: bool) -> None:
    if output_format == "json":
        rows = [{"path": p.location.path, "line": p.location.line, "column": p.location.column,
                 "severity": "error" if strict else p.severity.value, "message": p.message} for p in found]
        print(json.dumps(rows, indent=2))
        return

    for problem in found:
        if output_format == "github":
            print(github_annotation(problem, strict))
        else:
            print(problem)


def github_annotation(problem: Problem, strict: bool) -> str:
    """Format a problem as a GitHub Actions workflow command, escaped as the runner expects."""
    level = "error" if problem.is_error or strict else "warning"
    location = problem.location
    properties = f"file={_escape_property(location.path)}"
    if location.line > 0:
        properties += f",line={location.line},col={location.column}"
    return f"::{level} {properties},title=flowrun::{_escape_data(problem.message)}"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def describe_plugin_kind(point: importlib.metadata.EntryPoint) -> str:
    """Load an entry point and return its plugin shape, or the error that stopped it loading."""
    try:
        target = point.load()
    except Exception as error:  # noqa: BLE001 - a broken plugin is listed, not fatal
        return f"broken: {type(error).__name__}: {error}"

    if inspect.isclass(target):
        if hasattr(target, "run"):
            return "producer class"
        if hasattr(target, "handle"):
            return "handler class"
        return "class"
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        return "producer function"
    if inspect.iscoroutinefunction(target):
        return "async function"
    if callable(target):
        return "function"
    return type(target).__name__


def render_with_graphviz(dot_source: str, output: Path) -> None:
    """Render DOT to an image with the `dot` program."""
    kind = GRAPHVIZ_FORMATS.get(output.suffix.lower())
    if kind is None:
        raise FlowrunError(f"cannot render '{output}': use a .svg, .png or .pdf file name, or omit --output")
    executable = shutil.which("dot")
    if executable is None:
        raise FlowrunError(
            "rendering needs Graphviz's 'dot' program, which is not installed; install it "
            "(apt-get install graphviz, brew install graphviz) or print DOT with --format dot"
        )
    result = subprocess.run([executable, f"-T{kind}", "-o", str(output)], input=dot_source, text=True,
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise FlowrunError(f"Graphviz failed to render {output}: {result.stderr.strip()}")


def read_payloads(inline: str | None, payload_file: Path | None, stdin: IO[str]) -> Iterator[tuple[str, Any]]:
    """Yield (origin, payload) pairs from an inline argument, a file, or JSON Lines on stdin."""
    if inline is not None and payload_file is not None:
        raise typer.BadParameter("give a payload argument or --file, not both")

    if inline is not None:
        yield "argument", _parse_json(inline, "the payload argument")
        return
    if payload_file is not None:
        try:
            text = payload_file.read_text(encoding="utf-8")
        except OSError as error:
            raise typer.BadParameter(f"cannot read {payload_file}: {error.strerror}", param_hint="--file") from None
        yield str(payload_file), _parse_json(text, str(payload_file))
        return

    for number, line in enumerate(stdin, start=1):
        if line.strip():
            yield f"stdin line {number}", _parse_json(line.strip(), f"stdin line {number}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(text: str, origin: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        if not isinstance(error, json.JSONDecodeError):
            raise typer.BadParameter(f"{origin} is not valid JSON: {error}") from None
        raise typer.BadParameter(
            f"{origin} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None


async def publish_payloads(
    flow: LoadedFlow, topic: str, payloads: Iterable[tuple[str, Any]], key: str | None
) -> int:
    """Open the flow's broker, publish every payload (schema-checked), and close it."""
    runtime = FlowRuntime(flow, only=set())
    await runtime.start()
    count = 0
    try:
        for origin, payload in _counted(payloads, lambda: count):
            try:
                await runtime.publish(topic, payload, key)
            except FlowrunError as error:
                raise FlowrunError(f"{origin}: {error}; {_messages(count)} published before it") from None
            count += 1
    finally:
        await runtime.stop()
    return count


def _counted(payloads: Iterable[tuple[str, Any]], published: Any) -> Iterator[tuple[str, Any]]:
    """Pass payloads through, adding to a parse error how many were already published."""
    iterator = iter(payloads)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except typer.BadParameter as error:
            raise typer.BadParameter(f"{error.message}; {_messages(published())} published before it") from None
        yield item


def _messages(count: int) -> str:
    return "1 earlier message was" if count == 1 else f"{count} earlier messages were"
