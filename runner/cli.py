"""The `flowrun` command line."""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from flowrun.brokers import effective_spec
from flowrun.errors import FlowrunError, FlowValidationError
from flowrun.explain import describe_worst_case, explain_flow
from flowrun.flowschema import flow_json_schema
from flowrun.graph import build_graph, to_dot, to_mermaid
from flowrun.loader import read_flow
from flowrun.output import (
    GraphFormat,
    PublishProgress,
    describe_interrupted_publish,
    describe_plugin_kind,
    expand_flow_arguments,
    print_problems,
    publish_payloads,
    read_payloads,
    render_with_graphviz,
)
from flowrun.problems import Problem
from flowrun.inspect_cli import DlqAction, print_dead_letters, print_status, with_broker
from flowrun.loader import load_flow
from flowrun.logs import configure_logging
from flowrun.plugins import abandoned_calls, installed_plugins
from flowrun.report import print_summary, summary_table, write_report
from flowrun.runtime import FlowRuntime, RunResult
from flowrun.validate import check_flow, validate_file

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="flowrun",
    help="Run declarative event pipelines: topics, producers and subscribers described in YAML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# A pipe gets a wide table instead of rich's 80-column default.
stdout = Console() if sys.stdout.isatty() else Console(width=160)
stderr = Console(stderr=True)
PROGRESS_SECONDS = 0.5
# Exit status after a second interrupt: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130
# How long the process waits at exit for sync handler calls that were given up on.
STUCK_CALL_GRACE_SECONDS = 1.0

LogLevel = Annotated[str, typer.Option("--log-level", help="Log level: debug, info, warning or error.")]


def _check_log_level(value: str) -> str:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(f"invalid log level '{value}'; use debug, info, warning or error")
    return value


class OutputFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"
    GITHUB = "github"


@app.command()
def validate(
    flows: Annotated[list[str], typer.Argument(help="Flow files or glob patterns (quote them: 'flows/*.yaml').")],
    output_format: Annotated[OutputFormat, typer.Option("--format", help="text, json, or github (Actions annotations).")] = OutputFormat.TEXT,
    no_import: Annotated[bool, typer.Option("--no-import", help="Check without importing plugins or schema models.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as errors.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Also print each subscription's effective guarantees.")] = False,
) -> None:
    """Check flow files: schema, references, plugins, schemas and graph. Exit 0 if valid, 1 if not."""
    paths = expand_flow_arguments(flows)
    found: list[Problem] = []
    for path in paths:
        problems_of_file = validate_file(path, import_plugins=not no_import)
        found += problems_of_file
        if not problems_of_file and output_format is OutputFormat.TEXT:
            print(f"{path}: valid", file=sys.stderr)

    print_problems(found, output_format.value, strict)
    if explain:
        for path in paths:
            _explain(path)
    failed = any(problem.is_error or strict and problem.is_warning for problem in found)
    raise typer.Exit(1 if failed else 0)


def _explain(path: str) -> None:
    flow, _ = read_flow(path)
    if flow is None:
        return
    try:
        guarantees = explain_flow(flow)
    except FlowrunError as error:
        _print_error(str(error))
        return
    table = Table(title=f"{path}: effective guarantees", title_justify="left")
    for column in ("subscription", "backend", "delivery", "ordering", "attempts", "worst case to give up", "then"):
        table.add_column(column)
    for item in guarantees:
        table.add_row(item.subscription, item.backend, item.delivery, item.ordering, str(item.max_attempts),
                      describe_worst_case(item.worst_case_to_dead_letter), item.after_last_attempt)
    stdout.print(table)


@app.command()
def up(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow file to run.")],
    until_drained: Annotated[bool, typer.Option("--until-drained", help="Exit once producers finished and every subscription is empty.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the final counts as JSON to this file.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only these producers and subscribers: comma-separated names or patterns such as 'status-*'.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show live counts when attached to a terminal.")] = True,
    log_level: Annotated[str, typer.Option("--log-level", callback=_check_log_level, help="Log level: debug, info, warning or error.")] = "warning",
) -> None:
    """Run a flow until Ctrl-C or SIGTERM, or with --until-drained until all work is done."""
    interactive = stderr.is_terminal
    configure_logging(log_level, use_rich=interactive)
    _check_report_path(report)

    flow = _load_or_exit(flow_path)
    selected = _parse_only(only, flow)
    try:
        result = asyncio.run(_run(flow, until_drained, selected, progress and interactive))
    except FlowrunError as error:
        _print_error(str(error))
        raise typer.Exit(1) from None

    print_summary(result.report, stdout)
    if report is not None:
        write_report(result.report, report)
    for failure in result.failures:
        _print_error(failure)
    _exit_without_stuck_threads(1 if result.failures else 0)
    raise typer.Exit(1 if result.failures else 0)


def _exit_without_stuck_threads(code: int) -> None:
    """Exit at once when sync handler calls still run on threads that were given up on.

    Python waits for every thread pool's threads at exit, so one stuck handler call
    would keep the process alive forever after the flow stopped.
    """
    stuck = abandoned_calls(wait=STUCK_CALL_GRACE_SECONDS)
    if not stuck:
        return
    stderr.print(f"exiting without waiting for {stuck} sync handler call(s) still running past their "
                 "handler_timeout or the shutdown_timeout; what they return is ignored",
                 highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
def status(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow file whose broker to inspect.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show per subscription: pending, in flight, delayed, dead-lettered, oldest pending age.

    Unlike the other columns, dead-lettered (all time) counts the dead letters of every run, replayed and purged ones too.

    On NATS the column counts the dead letters still archived, and on RabbitMQ those of this process only (0).

    Exit 0, or 1 when the broker cannot be inspected, for example before the flow's first run.
    """
    flow = _load_or_exit(flow_path, check_plugins=False)
    report = _inspect(flow, lambda broker: broker.stats())
    print_status(report, as_json, stdout, _backend_of(flow))


@app.command()
def dlq(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow file whose dead letters to manage.")],
    action: Annotated[DlqAction, typer.Argument(help="list, replay (back to their subscription) or purge.")],
    subscription: Annotated[str | None, typer.Option("--subscription", help="Only this subscription's dead letters.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="list: print JSON.")] = False,
) -> None:
    """List dead letters with their error headers, replay them, or purge them."""
    flow = _load_or_exit(flow_path, check_plugins=False)
    if subscription is not None and subscription not in flow.spec.subscribers:
        raise typer.BadParameter(
            f"unknown subscription '{subscription}'; choose from {', '.join(flow.spec.subscribers)}",
            param_hint="--subscription",
        )

    if action is DlqAction.LIST:
        letters = _inspect(flow, lambda broker: broker.dead_letters(subscription))
        print_dead_letters(letters, as_json, stdout)
    elif action is DlqAction.REPLAY:
        count = _inspect(flow, lambda broker: broker.replay_dead_letters(subscription))
        stdout.print(f"replayed {count} dead letters")
    else:
        count = _inspect(flow, lambda broker: broker.purge_dead_letters(subscription))
        stdout.print(f"purged {count} dead letters")


def _inspect(flow: Any, work: Any) -> Any:
    try:
        return asyncio.run(with_broker(flow, work))
    except FlowrunError as error:
        _print_error(str(error))
        raise typer.Exit(1) from None


@app.command()
def plugins() -> None:
    """List the plugins installed in the flowrun.plugins entry point group, with their kind."""
    table = Table(title="installed plugins", title_justify="left")
    for column in ("name", "reference", "kind", "package"):
        table.add_column(column)
    for point in installed_plugins():
        package = point.dist.name if point.dist is not None else "-"
        table.add_row(point.name, point.value, describe_plugin_kind(point), package)
    stdout.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the flow file format (for yaml-language-server and CI)."""
    print(json.dumps(flow_json_schema(), indent=2))


@app.command()
def graph(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow file to draw.")],
    output_format: Annotated[GraphFormat, typer.Option("--format", help="mermaid or dot.")] = GraphFormat.MERMAID,
    output: Annotated[Path | None, typer.Option("--output", help="Render to FILE.svg or FILE.png with Graphviz.")] = None,
) -> None:
    """Draw producers, topics, subscribers and dead-letter edges of a flow."""
    flow = _load_or_exit(flow_path, check_plugins=False)
    drawing = build_graph(flow.spec)
    if output is None:
        print(to_mermaid(drawing) if output_format is GraphFormat.MERMAID else to_dot(drawing), end="")
        return
    try:
        render_with_graphviz(to_dot(drawing), output)
    except FlowrunError as error:
        _print_error(str(error))
        raise typer.Exit(1) from None
    print(f"wrote {output}", file=sys.stderr)


@app.command()
def publish(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow whose broker receives the messages.")],
    topic: Annotated[str, typer.Argument(help="The topic to publish to.")],
    payload: Annotated[str | None, typer.Argument(help="A JSON payload; omit it to read JSON Lines from stdin.")] = None,
    payload_file: Annotated[Path | None, typer.Option("--file", help="Read one JSON payload from this file.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Message key (ordering and partitioning).")] = None,
) -> None:
    """Publish JSON payloads to a topic, checked against the topic's schema."""
    flow = _load_or_exit(flow_path, check_plugins=False)
    if _backend_of(flow) == "memory":
        _print_error("the memory backend keeps messages only inside a running 'flowrun up', so a separate "
                     "publish would be lost; use the sqlite backend (the default) or a server backend")
        raise typer.Exit(1)
    if topic not in flow.spec.topics:
        raise typer.BadParameter(f"unknown topic '{topic}'; choose from {', '.join(flow.spec.topics)}",
                                 param_hint="TOPIC")
    payloads = read_payloads(payload, payload_file, sys.stdin)
    progress = PublishProgress()
    try:
        count = asyncio.run(publish_payloads(flow, topic, payloads, key, progress))
    except FlowrunError as error:
        _print_error(str(error))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # asyncio.run cancelled the publish, which closed the broker, before it raised this.
        print(describe_interrupted_publish(progress, topic), file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    noun = "message" if count == 1 else "messages"
    print(f"published {count} {noun} to {topic}", file=sys.stderr)


def _backend_of(flow: Any) -> str:
    try:
        return effective_spec(flow.spec.broker).backend
    except FlowrunError as error:
        _print_error(str(error))
        raise typer.Exit(1) from None


def _check_report_path(report: Path | None) -> None:
    """Fail before the run, not after it, when the report cannot be written."""
    if report is None:
        return
    if report.is_dir() or not report.name:
        raise typer.BadParameter(f"'{report}' is a directory; give a file name such as report.json",
                                 param_hint="--report")
    folder = report.parent if str(report.parent) else Path(".")
    if not folder.is_dir():
        raise typer.BadParameter(f"folder '{folder}' does not exist; create it or choose another path",
                                 param_hint="--report")
    if not os.access(folder, os.W_OK):
        raise typer.BadParameter(f"folder '{folder}' is not writable", param_hint="--report")


def _print_error(text: str) -> None:
    """Print an error line without rich markup, since it may quote user text with brackets."""
    stderr.print("[red]error:[/red] ", end="")
    stderr.print(text, markup=False, highlight=False, soft_wrap=True)


def _load_or_exit(flow_path: str, check_plugins: bool = True) -> Any:
    try:
        flow = load_flow(flow_path)
    except FlowValidationError:
        # The same problems as `flowrun validate`: by position, with the references that
        # could still be checked and a note on those that could not.
        for problem in validate_file(flow_path, import_plugins=check_plugins):
            if not problem.is_warning:
                print(problem, file=sys.stderr)
        raise typer.Exit(1) from None

    found = [problem for problem in check_flow(flow, import_plugins=check_plugins) if problem.is_error]
    if found:
        for problem in found:
            print(problem, file=sys.stderr)
        raise typer.Exit(1)
    return flow


def _parse_only(only: str | None, flow: Any) -> set[str] | None:
    if only is None:
        return None
    patterns = {name.strip() for name in only.split(",") if name.strip()}
    known = set(flow.spec.producers) | set(flow.spec.subscribers)
    names = {name for name in known if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}
    unknown = sorted(pattern for pattern in patterns
                     if not any(fnmatch.fnmatchcase(name, pattern) for name in known))
    if unknown or not patterns:
        raise typer.BadParameter(
            f"unknown name(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(sorted(known))}",
            param_hint="--only",
        )
    return names


async def _run(flow: Any, until_drained: bool, only: set[str] | None, show_progress: bool) -> RunResult:
    runtime = FlowRuntime(flow, only=only)
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, _request_stop, runtime)

    try:
        await runtime.start()
        if show_progress:
            await _wait_with_progress(runtime, until_drained)
        else:
            await runtime.wait(until_drained)
    finally:
        result = await runtime.stop()
    return result


def _request_stop(runtime: FlowRuntime) -> None:
    if runtime.stop_requested.is_set():
        # A second signal: the user does not want to wait for running handlers.
        stderr.print("stopping now: messages not yet acked are delivered again after their ack timeout",
                     highlight=False, soft_wrap=True)
        os._exit(EXIT_INTERRUPTED)
    stderr.print(f"stopping: letting in-flight messages finish (up to shutdown_timeout "
                 f"{runtime.flow.spec.shutdown_timeout:g}s; press Ctrl-C again to stop at once)",
                 highlight=False, soft_wrap=True)
    runtime.stop_requested.set()


async def _wait_with_progress(runtime: FlowRuntime, until_drained: bool) -> None:
    waiter = asyncio.create_task(runtime.wait(until_drained))
    with Live(console=stderr, refresh_per_second=4, transient=True) as live:
        while not waiter.done():
            live.update(summary_table(await runtime.broker.stats(), title="flowrun: running"))
            await asyncio.wait({waiter}, timeout=PROGRESS_SECONDS)
    await waiter


def main() -> None:
    app()


if __name__ == "__main__":
    main()
