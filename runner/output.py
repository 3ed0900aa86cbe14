"""Helpers of the CLI commands: argument expansion, problem formats, graph rendering, publishing."""

from __future__ import annotations

import asyncio
import enum
import glob
import importlib.metadata
import inspect
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import typer

from flowrun.errors import FlowrunError
from flowrun.loader import LoadedFlow
from flowrun.problems import Problem
from flowrun.runtime import FlowRuntime
from flowrun.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

GRAPHVIZ_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}
# How long `flowrun publish` waits for the broker to store a message before it prints why it waits.
WAIT_NOTICE_SECONDS = 1.0
# How long reading the counts for that notice may take. A SQLite broker whose writer is stuck
# on another process's lock reads them only after the lock is released.
WAIT_STATS_TIMEOUT_SECONDS = 1.0


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
                 "severity": "error" if strict and p.is_warning else p.severity.value, "message": p.message}
                for p in found]
        print(json.dumps(rows, indent=2))
        return

    for problem in found:
        if output_format == "github":
            print(github_annotation(problem, strict))
        else:
            print(problem)


def github_annotation(problem: Problem, strict: bool) -> str:
    """Format a problem as a GitHub Actions workflow command, escaped as the runner expects."""
    if problem.is_error or strict and problem.is_warning:
        level = "error"
    else:
        level = "warning" if problem.is_warning else "notice"
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


@dataclass
class PublishProgress:
    """How far `publish_payloads` got, still readable after Ctrl-C cancelled it."""

    published: int = 0
    # Where the payload being published came from ("stdin line 3"), None between payloads.
    origin: str | None = None
    wait_noticed: bool = False


async def publish_payloads(
    flow: LoadedFlow, topic: str, payloads: Iterable[tuple[str, Any]], key: str | None,
    progress: PublishProgress,
) -> int:
    """Open the flow's broker, publish every payload (schema-checked), and close it."""
    runtime = FlowRuntime(flow, only=set())
    await runtime.start()
    try:
        for origin, payload in _counted(payloads, lambda: progress.published):
            progress.origin = origin
            try:
                await _publish_with_notice(runtime, topic, payload, key, progress)
            except FlowrunError as error:
                earlier = _messages(progress.published)
                raise FlowrunError(f"{origin}: {error}; {earlier} published before it") from None
            progress.published += 1
            progress.origin = None
    finally:
        await runtime.stop()
    return progress.published


def describe_interrupted_publish(progress: PublishProgress, topic: str) -> str:
    """Say what a publish that Ctrl-C stopped left published and what it did not.

    NOTE: a Ctrl-C that lands while the broker stores the message can leave it published
    after all, because cancelling does not stop a write already sent (SQLite runs it on its
    own thread). The summary is then wrong about that message.
    """
    if progress.origin is None:
        noun = "message was" if progress.published == 1 else "messages were"
        return f"stopped: {progress.published} {noun} published to {topic}"
    return (f"stopped: {progress.origin} was not published to {topic}; "
            f"{_messages(progress.published)} published before it")


async def _publish_with_notice(
    runtime: FlowRuntime, topic: str, payload: Any, key: str | None, progress: PublishProgress
) -> None:
    """Publish one payload, and print why it waits if the broker has not stored it in WAIT_NOTICE_SECONDS.

    The notice is printed once per command, so later payloads skip the timer.
    """
    if progress.wait_noticed:
        await runtime.publish(topic, payload, key)
        return
    notice = asyncio.create_task(_print_wait_notice(runtime, topic, progress))
    try:
        await runtime.publish(topic, payload, key)
    finally:
        await cancel_and_wait(notice)


async def _print_wait_notice(runtime: FlowRuntime, topic: str, progress: PublishProgress) -> None:
    await asyncio.sleep(WAIT_NOTICE_SECONDS)
    text = await _describe_wait(runtime, topic)
    progress.wait_noticed = True
    print(text, file=sys.stderr, flush=True)


async def _describe_wait(runtime: FlowRuntime, topic: str) -> str:
    """Build the wait notice, which names the full subscriptions of `topic` when the broker's counts show any."""
    stop_hint = "Press Ctrl-C to stop without publishing this message."
    max_pending = runtime.flow.spec.topics[topic].max_pending
    full = await _full_subscriptions(runtime, topic, max_pending)
    if full:
        # A topic with on_full: reject raises instead of waiting, so this one blocks.
        return (f"topic '{topic}' is full: {_describe_counts(full)} and max_pending is {max_pending}. "
                f"Waiting for room, because the topic has on_full: block. {stop_hint}")
    waited = f"the broker has not stored the message to topic '{topic}' after {WAIT_NOTICE_SECONDS:g}s"
    if full is None:
        return f"{waited}. Still waiting. {stop_hint}"
    return f"{waited}, although no subscription of the topic is full. Still waiting. {stop_hint}"


def _describe_counts(full: dict[str, int]) -> str:
    names = " and ".join(f"'{name}'" for name in full)
    counts = " and ".join(str(count) for count in full.values())
    if len(full) > 1:
        return f"subscriptions {names} have {counts} unsettled messages"
    noun = "message" if counts == "1" else "messages"
    return f"subscription {names} has {counts} unsettled {noun}"


async def _full_subscriptions(runtime: FlowRuntime, topic: str, max_pending: int) -> dict[str, int] | None:
    """Return the unsettled count of each subscription of `topic` that reached max_pending, None if unknown."""
    try:
        report = await asyncio.wait_for(runtime.broker.stats(), WAIT_STATS_TIMEOUT_SECONDS)
    except (FlowrunError, TimeoutError) as error:
        # The notice states that the reason is unknown, so a log line at warning would repeat it.
        logger.info("reading the counts of topic '%s' failed, so the reason of the wait is unknown: %s",
                    topic, str(error) or "timed out")
        return None
    full: dict[str, int] = {}
    for name, counts in report["subscriptions"].items():
        unsettled = int(counts["pending"]) + int(counts["in_flight"])
        if counts["topic"] == topic and unsettled >= max_pending:
            full[name] = unsettled
    return full


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
