"""`flowrun validate` and `flowrun up` run as real subprocesses on flow files in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Plugins live in handlers.py beside the flow file, so these tests do not depend on plugins/.
HANDLERS_MODULE = """\
def handle(message, context):
    return None


def produce(context):
    return iter(())


def needs_three(message, context, extra):
    return None
"""
VALID_FLOW = """\
name: shop
topics:
  OrderPlaced:
  OrderBilled:
producers:
  replay:
    plugin: handlers:produce
    publishes: [OrderPlaced]
subscribers:
  billing:
    topic: OrderPlaced
    plugin: handlers:handle
    publishes: [OrderBilled]
  audit:
    topic: OrderBilled
    plugin: handlers:handle
"""
# Subscriber 'first' consumes A and publishes B, and 'second' consumes B and publishes A.
CYCLE_FLOW = """\
topics:
  A:
  B:
producers:
  source:
    plugin: handlers:produce
    publishes: [A]
subscribers:
  first:
    topic: A
    plugin: handlers:handle
    publishes: [B]
  second:
    topic: B
    plugin: handlers:handle
    publishes: [A]
"""


def run_flowrun(
    *args: str, cwd: Path, hash_seed: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the flowrun CLI and fail the test if it printed a Python traceback."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("FLOWRUN_TEST_")
    }
    if hash_seed is not None:
        environment["PYTHONHASHSEED"] = hash_seed
    result = subprocess.run(
        [sys.executable, "-m", "flowrun.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result


def write_flow(directory: Path, text: str, name: str = "flow.yaml") -> Path:
    """Write the flow and the handlers.py module it names, and return the flow's path."""
    (directory / "handlers.py").write_text(HANDLERS_MODULE, encoding="utf-8")
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def collapse_panel(text: str) -> str:
    """Join the lines of a rich error panel into one line of words."""
    return " ".join(text.replace("│", " ").split())


# Valid flows


def test_valid_flow_exits_zero(tmp_path: Path) -> None:
    write_flow(tmp_path, VALID_FLOW)
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == "flow.yaml: valid\n"


def test_valid_flow_long_path(tmp_path: Path) -> None:
    # The "valid" line must stay one line when stderr is a pipe, whatever the path length.
    directory = tmp_path / ("a_directory_name_that_makes_the_path_longer_than_eighty_columns" * 2)
    directory.mkdir()
    path = write_flow(directory, VALID_FLOW)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == f"{path}: valid\n"


def test_valid_path_with_brackets(tmp_path: Path) -> None:
    write_flow(tmp_path, VALID_FLOW, name="flow[bold].yaml")
    result = run_flowrun("validate", "flow[bold].yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == "flow[bold].yaml: valid\n"


def test_valid_path_with_closing_tag(tmp_path: Path) -> None:
    # The relative path `a[/]b.yaml` is the file `]b.yaml` in directory `a[`.
    directory = tmp_path / "a["
    directory.mkdir()
    write_flow(directory, VALID_FLOW, name="]b.yaml")
    result = run_flowrun("validate", "a[/]b.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == "a[/]b.yaml: valid\n"


def test_plugin_beside_flow_found(tmp_path: Path) -> None:
    # The working directory is not the flow's directory, so handlers.py is found through the flow path.
    flow_directory = tmp_path / "flows"
    flow_directory.mkdir()
    path = write_flow(flow_directory, VALID_FLOW)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_flowrun("validate", str(path), cwd=elsewhere)
    assert result.returncode == 0
    assert result.stdout == ""


# Schema and reference errors


def test_misspelled_key_exits_one(tmp_path: Path) -> None:
    text = VALID_FLOW.replace(
        "    publishes: [OrderBilled]\n", "    publishes: [OrderBilled]\n    ack_timout: 5s\n"
    )
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}:14:")
    assert result.stdout == (
        f"{path}:14:5: error: unknown key 'ack_timout' in subscriber 'billing' (did you mean 'ack_timeout'?)\n"
        f"{path}: note: {PARTLY_CHECKED}\n"
    )


# The producer and subscriber 'billing' have errors that the schema finds and errors that only
# the reference checks find. 'audit' lacks its plugin, so nothing of it is checked.
SCHEMA_AND_REFERENCE_ERRORS_FLOW = """\
name: shop
topics:
  OrderPlaced:
    max_pending: lots
  OrderBilled:
producers:
  replay:
    plugin: handlers:missing_attr
    publishes: [OrderPlced]
subscribers:
  billing:
    topic: OrderPlaced
    plugin: nosuch.module:fn
    ack_timout: 5s
    dead_letter: Graveyard
  audit:
    topic: Undeclared
"""
PARTLY_CHECKED = (
    "because of the errors above, only references to topics and plugins were checked (not in entries with an "
    "invalid or missing topic, plugin or publishes); fix the errors to check the rest"
)
NOT_CHECKED = (
    "references to topics and plugins were not checked because of the errors above; "
    "fix them and run flowrun validate again"
)


def test_schema_and_reference_errors_together(tmp_path: Path) -> None:
    write_flow(tmp_path, SCHEMA_AND_REFERENCE_ERRORS_FLOW)
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "flow.yaml:4:18: error: invalid value 'lots' for 'max_pending' in topic 'OrderPlaced': "
        "Input should be a valid integer, unable to parse string as an integer",
        "flow.yaml:8:13: error: plugin 'handlers:missing_attr': 'handlers' has no attribute 'missing_attr'",
        "flow.yaml:9:17: error: producer 'replay' publishes to undeclared topic 'OrderPlced' "
        "(did you mean 'OrderPlaced'?)",
        "flow.yaml:13:13: error: plugin 'nosuch.module:fn': module 'nosuch' not found; install the package "
        "that provides it, or put the module next to the flow file",
        "flow.yaml:14:5: error: unknown key 'ack_timout' in subscriber 'billing' (did you mean 'ack_timeout'?)",
        "flow.yaml:15:18: error: dead_letter of subscriber 'billing' names undeclared topic 'Graveyard'; "
        "declare it under topics",
        "flow.yaml:16:3: error: missing required key 'plugin' in subscriber 'audit'",
        f"flow.yaml: note: {PARTLY_CHECKED}",
    ]


def test_schema_errors_without_import(tmp_path: Path) -> None:
    write_flow(tmp_path, SCHEMA_AND_REFERENCE_ERRORS_FLOW)
    result = run_flowrun("validate", "--no-import", "flow.yaml", cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert len(lines) == 6
    assert lines[1].startswith("flow.yaml:9:17: error: producer 'replay' publishes to undeclared topic 'OrderPlced'")
    assert lines[3].startswith("flow.yaml:15:18: error: dead_letter of subscriber 'billing' names undeclared topic")
    assert lines[5] == f"flow.yaml: note: {PARTLY_CHECKED.replace('topics and plugins', 'topics')}"


def test_missing_topics_not_checked(tmp_path: Path) -> None:
    text = "name: shop\nproducers:\n  replay:\n    plugin: handlers:missing_attr\n    publishes: [Orders]\n"
    write_flow(tmp_path, text)
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "flow.yaml:1:1: error: missing required key 'topics' at the top level of the flow\n"
        f"flow.yaml: note: {NOT_CHECKED}\n"
    )


def test_invalid_yaml_not_checked(tmp_path: Path) -> None:
    write_flow(tmp_path, "topics:\n  Orders: [\n")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert len(lines) == 2
    assert lines[0].startswith("flow.yaml:3:1: error: invalid YAML: ")
    assert lines[1] == f"flow.yaml: note: {NOT_CHECKED}"


TOPICS_MISSING = "missing required key 'topics' at the top level of the flow"


def test_note_github_notice(tmp_path: Path) -> None:
    write_flow(tmp_path, "name: shop\n")
    result = run_flowrun("validate", "--strict", "--format", "github", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"::error file=flow.yaml,line=1,col=1,title=flowrun::{TOPICS_MISSING}\n"
        f"::notice file=flow.yaml,title=flowrun::{NOT_CHECKED}\n"
    )


def test_note_json_stays_note(tmp_path: Path) -> None:
    # --strict turns warnings into errors, but a note is not a finding about the flow.
    write_flow(tmp_path, "name: shop\n")
    result = run_flowrun("validate", "--strict", "--format", "json", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout) == [
        {"path": "flow.yaml", "line": 1, "column": 1, "severity": "error", "message": TOPICS_MISSING},
        {"path": "flow.yaml", "line": 0, "column": 0, "severity": "note", "message": NOT_CHECKED},
    ]


def test_undeclared_topic_suggested(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("topic: OrderPlaced", "topic: OrderPlcaed")
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert (
        f"{path}:11:12: error: subscriber 'billing' consumes undeclared topic 'OrderPlcaed' (did you mean 'OrderPlaced'?)"
        in result.stdout.splitlines()
    )


def test_unknown_dead_letter(tmp_path: Path) -> None:
    text = VALID_FLOW + "    dead_letter: Graveyard\n"
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"{path}:17:18: error: dead_letter of subscriber 'audit' names undeclared topic 'Graveyard'; "
        "declare it under topics\n"
    )


def test_dead_letter_own_topic(tmp_path: Path) -> None:
    text = VALID_FLOW + "    dead_letter: OrderBilled\n"
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    # The dead-letter edge also closes a cycle, which is reported on its own line.
    assert result.returncode == 1
    assert (
        f"{path}:17:18: error: subscriber 'audit' dead-letters into its own topic 'OrderBilled'; "
        "choose another topic so failed messages stop looping"
    ) in result.stdout.splitlines()


def test_producer_publishes_undeclared(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("publishes: [OrderPlaced]", "publishes: [OrderPlaced, Refunds]")
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"{path}:8:30: error: producer 'replay' publishes to undeclared topic 'Refunds'; declare it under topics\n"
    )


def test_subscriber_publishes_undeclared(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("publishes: [OrderBilled]", "publishes: [OrderBilled, OrderBiled]")
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"{path}:13:30: error: subscriber 'billing' publishes to undeclared topic 'OrderBiled' "
        "(did you mean 'OrderBilled'?)\n"
    )


# Plugin references


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "nosuch.module:fn",
            (
                "plugin 'nosuch.module:fn': module 'nosuch' not found; install the package that provides it, "
                "or put the module next to the flow file"
            ),
        ),
        (
            "handlers:missing_attr",
            "plugin 'handlers:missing_attr': 'handlers' has no attribute 'missing_attr'",
        ),
        ("handlers:", "plugin 'handlers:': expected package.module:attribute"),
        (
            "handlers:needs_three",
            "plugin 'handlers:needs_three': a handler must accept (message, context) or (message)",
        ),
    ],
)
def test_plugin_reference_invalid(tmp_path: Path, reference: str, message: str) -> None:
    text = VALID_FLOW.replace(
        "  audit:\n    topic: OrderBilled\n    plugin: handlers:handle",
        f"  audit:\n    topic: OrderBilled\n    plugin: '{reference}'",
    )
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"{path}:16:13: error: {message}\n"


def test_plugin_entry_point_missing(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("plugin: handlers:produce", "plugin: orders.no-such-plugin")
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    prefix = (
        f"{path}:7:13: error: plugin 'orders.no-such-plugin': no installed entry point of that name "
        "in group 'flowrun.plugins' (installed: "
    )
    assert result.returncode == 1
    assert result.stdout.startswith(prefix)
    assert result.stdout.endswith("); use an installed name or write package.module:attribute\n")


def test_plugin_import_raises(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "raise RuntimeError('database is down')\n", encoding="utf-8"
    )
    text = VALID_FLOW.replace("plugin: handlers:produce", "plugin: broken:produce")
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"{path}:7:13: error: plugin 'broken:produce': importing 'broken' failed: RuntimeError: database is down\n"
    )


def test_no_import_skips_plugins(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("plugin: handlers:produce", "plugin: nosuch.module:fn")
    write_flow(tmp_path, text)
    result = run_flowrun("validate", "--no-import", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == "flow.yaml: valid\n"


# Graph checks


def test_self_cycle_is_error(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("publishes: [OrderBilled]", "publishes: [OrderPlaced, OrderBilled]")
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:10:3: error: cycle ")
    assert "subscriber 'billing' -> topic 'OrderPlaced'" in lines[0]
    assert lines[0].endswith(
        "; if the loop is intended set 'allow_cycles: true' "
        "(max_hops, now 32, then stops runaway messages)"
    )


def test_two_step_cycle_is_error(tmp_path: Path) -> None:
    path = write_flow(tmp_path, CYCLE_FLOW)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert len(lines) == 1
    assert lines[0].startswith((f"{path}:9:3: error: cycle ", f"{path}:13:3: error: cycle "))
    assert "allow_cycles: true" in lines[0]


def test_cycle_report_stable(tmp_path: Path) -> None:
    # The cycle networkx reports first depends on set order, which PYTHONHASHSEED changes.
    write_flow(tmp_path, CYCLE_FLOW)
    outputs = {
        run_flowrun("validate", "flow.yaml", cwd=tmp_path, hash_seed=seed).stdout
        for seed in ("1", "3", "4")
    }
    assert len(outputs) == 1


def test_cycle_allowed(tmp_path: Path) -> None:
    write_flow(tmp_path, "allow_cycles: true\n" + CYCLE_FLOW)
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == ""


def test_unconsumed_topic_warns(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("  OrderBilled:\n", "  OrderBilled:\n  Refunds:\n").replace(
        "publishes: [OrderPlaced]", "publishes: [OrderPlaced, Refunds]"
    )
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", str(path), cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == (
        f"{path}:5:3: warning: topic 'Refunds' has no subscribers, so its messages are counted and discarded\n"
    )


def test_strict_fails_on_warning(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("  OrderBilled:\n", "  OrderBilled:\n  Refunds:\n").replace(
        "publishes: [OrderPlaced]", "publishes: [OrderPlaced, Refunds]"
    )
    path = write_flow(tmp_path, text)
    result = run_flowrun("validate", "--strict", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}:5:3: warning: topic 'Refunds' has no subscribers")


# Usage and file errors


def test_no_arguments_usage(tmp_path: Path) -> None:
    result = run_flowrun(cwd=tmp_path)
    assert result.returncode == 2
    assert "Usage: " in result.stdout + result.stderr


def test_validate_without_files(tmp_path: Path) -> None:
    result = run_flowrun("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert "Missing argument" in result.stderr


def test_validate_unknown_option(tmp_path: Path) -> None:
    write_flow(tmp_path, VALID_FLOW)
    result = run_flowrun("validate", "--bogus", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr


def test_missing_file_exits_one(tmp_path: Path) -> None:
    result = run_flowrun("validate", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "absent.yaml: error: flow file not found; check the path\n"


def test_non_utf8_file_exits_one(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_bytes(b"topics:\n  Caf\xe9:\n")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "flow.yaml: error: flow file is not valid UTF-8 (byte 13)\n"


def test_control_character_exits_one(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text("topics:\n  Orders:\x00\n", encoding="utf-8")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("flow.yaml:")


def test_several_files(tmp_path: Path) -> None:
    write_flow(tmp_path, VALID_FLOW, name="good.yaml")
    write_flow(tmp_path, VALID_FLOW.replace("topic: OrderBilled", "topic: Billed"), name="bad.yaml")
    result = run_flowrun("validate", "good.yaml", "bad.yaml", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "good.yaml: valid\n"
    assert result.stdout.splitlines() == [
        "bad.yaml:4:3: warning: topic 'OrderBilled' has no subscribers, so its messages are counted and discarded",
        "bad.yaml:15:12: error: subscriber 'audit' consumes undeclared topic 'Billed' (did you mean 'OrderBilled'?)",
        "absent.yaml: error: flow file not found; check the path",
    ]


def test_several_files_after_crash(tmp_path: Path) -> None:
    # A file that fails to parse must not stop the check of the files after it.
    (tmp_path / "control.yaml").write_text("topics:\n  Orders:\x00\n", encoding="utf-8")
    write_flow(tmp_path, VALID_FLOW, name="good.yaml")
    result = run_flowrun("validate", "control.yaml", "good.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.endswith("good.yaml: valid\n")


# flowrun up


def test_up_invalid_flow(tmp_path: Path) -> None:
    text = VALID_FLOW.replace(
        "    publishes: [OrderBilled]\n", "    publishes: [OrderBilled]\n    ack_timout: 5s\n"
    )
    path = write_flow(tmp_path, text)
    result = run_flowrun("up", str(path), "--until-drained", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}:14:5: error: unknown key 'ack_timout' in subscriber 'billing' (did you mean 'ack_timeout'?)\n"
        f"{path}: note: {PARTLY_CHECKED}\n"
    )


def test_up_reports_schema_and_reference_errors(tmp_path: Path) -> None:
    # `up` lists what `validate` lists: by position, references included.
    text = VALID_FLOW.replace(
        "    publishes: [OrderBilled]\n", "    publishes: [OrderBilled]\n    ack_timout: 5s\n"
    ).replace("plugin: handlers:produce", "plugin: handlers:missing_attr")
    path = write_flow(tmp_path, text)
    result = run_flowrun("up", str(path), "--until-drained", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"{path}:7:13: error: plugin 'handlers:missing_attr': 'handlers' has no attribute 'missing_attr'\n"
        f"{path}:14:5: error: unknown key 'ack_timout' in subscriber 'billing' (did you mean 'ack_timeout'?)\n"
        f"{path}: note: {PARTLY_CHECKED}\n"
    )


def test_up_missing_plugin(tmp_path: Path) -> None:
    text = VALID_FLOW.replace("plugin: handlers:produce", "plugin: handlers:missing_attr")
    path = write_flow(tmp_path, text)
    result = run_flowrun("up", str(path), "--until-drained", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"{path}:7:13: error: plugin 'handlers:missing_attr': 'handlers' has no attribute 'missing_attr'\n"
    )


def test_up_missing_file(tmp_path: Path) -> None:
    result = run_flowrun("up", "absent.yaml", "--until-drained", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "absent.yaml: error: flow file not found; check the path\n"


def test_up_control_character(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text("topics:\n  Orders:\x00\n", encoding="utf-8")
    result = run_flowrun("up", "flow.yaml", "--until-drained", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("flow.yaml:")


def test_up_only_unknown_name(tmp_path: Path) -> None:
    write_flow(tmp_path, VALID_FLOW)
    result = run_flowrun("up", "flow.yaml", "--until-drained", "--only", "nosuchname", cwd=tmp_path)
    message = collapse_panel(result.stderr)
    assert result.returncode == 2
    assert "unknown name(s) nosuchname; choose from audit, billing, replay" in message


def test_up_only_empty_list(tmp_path: Path) -> None:
    write_flow(tmp_path, VALID_FLOW)
    result = run_flowrun("up", "flow.yaml", "--until-drained", "--only", " , ", cwd=tmp_path)
    message = collapse_panel(result.stderr)
    assert result.returncode == 2
    assert "unknown name(s) (none given); choose from audit, billing, replay" in message
