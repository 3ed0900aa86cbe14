"""The `flowrun` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live

from flowrun.errors import FlowrunError, FlowValidationError
from flowrun.inspect_cli import DlqAction, print_dead_letters, print_status, with_broker
from flowrun.loader import load_flow
from flowrun.logs import configure_logging
from flowrun.plugins import installed_plugins
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

LogLevel = Annotated[str, typer.Option("--log-level", help="Log level: debug, info, warning or error.")]


def _check_log_level(value: str) -> str:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(f"invalid log level '{value}'; use debug, info, warning or error")
    return value


@app.command()
def validate(
    flows: Annotated[list[str], typer.Argument(help="Flow files to check.")],
    no_import: Annotated[bool, typer.Option("--no-import", help="Check without importing plugins.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as errors.")] = False,
) -> None:
    """Check flow files: schema, references, plugins and graph. Exit 0 if valid, 1 if not."""
    failed = False
    for path in flows:
        found = validate_file(path, import_plugins=not no_import)
        for problem in found:
            print(problem)
            if problem.is_error or strict:
                failed = True
        if not found:
            print(f"{path}: valid", file=sys.stderr)
    raise typer.Exit(1 if failed else 0)


@app.command()
def up(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow file to run.")],
    until_drained: Annotated[bool, typer.Option("--until-drained", help="Exit once producers finished and every subscription is empty.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the final counts as JSON to this file.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only these producers and subscribers (comma-separated names).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show live counts when attached to a terminal.")] = True,
    log_level: Annotated[str, typer.Option("--log-level", callback=_check_log_level, help="Log level: debug, info, warning or error.")] = "warning",
) -> None:
    """Run a flow until Ctrl-C or SIGTERM, or with --until-drained until all work is done."""
    interactive = stderr.is_terminal
    configure_logging(log_level, use_rich=interactive)

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
    raise typer.Exit(1 if result.failures else 0)


@app.command()
def status(
    flow_path: Annotated[str, typer.Argument(metavar="FLOW", help="The flow file whose broker to inspect.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show per subscription: pending, in flight, delayed, dead-lettered, oldest pending age."""
    flow = _load_or_exit(flow_path, check_plugins=False)
    report = _inspect(flow, lambda broker: broker.stats())
    print_status(report, as_json, stdout)


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
    """List the plugins installed in the flowrun.plugins entry point group."""
    for point in installed_plugins():
        print(f"{point.name}\t{point.value}")


def _print_error(text: str) -> None:
    """Print an error line without rich markup, since it may quote user text with brackets."""
    stderr.print(f"[red]error:[/red] ", end="")
    stderr.print(text, markup=False, highlight=False, soft_wrap=True)


def _load_or_exit(flow_path: str, check_plugins: bool = True) -> Any:
    try:
        flow = load_flow(flow_path)
    except FlowValidationError as error:
        for problem in error.problems:
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
    names = {name.strip() for name in only.split(",") if name.strip()}
    known = set(flow.spec.producers) | set(flow.spec.subscribers)
    unknown = sorted(names - known)
    if unknown or not names:
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
        return
    stderr.print("stopping: finishing in-flight messages (press Ctrl-C again is not needed)", highlight=False)
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
