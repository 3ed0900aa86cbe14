"""The inspection and tooling commands run as real subprocesses: schema, graph, validate
output formats, publish, plugins, status and dlq.

Commands that only read the repository run in its root. The others work on flow files
written to tmp_path, whose default SQLite broker is in tmp_path/.flowrun.
"""

from __future__ import annotations

import copy
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_FLOWS = ["flows/orders.yaml", "flows/orders-sample.yaml"]
SUBPROCESS_TIMEOUT = 60
BROKER_URL_VARIABLE = "FLOWRUN_BROKER_URL"


def run_flowrun(
    *args: str,
    cwd: Path,
    stdin: str | None = None,
    path_variable: str | None = None,
    traceback_in_stdout: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the flowrun CLI and fail the test if it printed a Python traceback.

    `traceback_in_stdout` allows one in stdout, where `dlq list --json` prints the
    `flowrun.traceback` header of each dead letter.
    """
    environment = {name: value for name, value in os.environ.items() if name != BROKER_URL_VARIABLE}
    if path_variable is not None:
        environment["PATH"] = path_variable
    result = subprocess.run(
        [sys.executable, "-m", "flowrun.cli", *args],
        cwd=cwd,
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert "Traceback" not in result.stderr
    if not traceback_in_stdout:
        assert "Traceback" not in result.stdout
    return result


def collapse_panel(text: str) -> str:
    """Join the lines of a rich error panel into one line of words."""
    return " ".join(text.replace("│", " ").split())


def table_rows(text: str) -> list[list[str]]:
    """Read the body rows of a rich table, joining the parts of a wrapped cell with spaces.

    A line whose first cell is not empty starts a row, and the lines after it continue it.
    """
    rows: list[list[list[str]]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[0] or not rows:
            rows.append([[cell] if cell else [] for cell in cells])
        else:
            for parts, cell in zip(rows[-1], cells):
                if cell:
                    parts.append(cell)
    return [[" ".join(parts) for parts in row] for row in rows]


def table_headings(text: str) -> list[str]:
    """Read the column headings of a rich table whose headings fit on one line."""
    for line in text.splitlines():
        if line.startswith("┃"):
            return [cell.strip() for cell in line.strip().strip("┃").split("┃")]
    raise AssertionError(f"no table heading in:\n{text}")


def load_example(relative: str) -> dict[str, Any]:
    return yaml.safe_load((REPOSITORY / relative).read_text(encoding="utf-8"))


# Plugins of the flows that tests write, referenced as handlers:handle and handlers:produce.
HANDLERS = """\
def handle(message, context):
    return None


def produce(context):
    return iter(())
"""


def write_flow(folder: Path, text: str) -> Path:
    (folder / "handlers.py").write_text(HANDLERS, encoding="utf-8")
    path = folder / "flow.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# flowrun schema


@pytest.fixture(scope="module")
def flow_schema_text() -> str:
    result = run_flowrun("schema", cwd=REPOSITORY)
    assert result.returncode == 0
    return result.stdout


@pytest.fixture(scope="module")
def flow_validator(flow_schema_text: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(flow_schema_text))


def test_schema_is_json_schema(flow_schema_text: str) -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(flow_schema_text))


def test_committed_schema_current(flow_schema_text: str) -> None:
    committed = (REPOSITORY / "flowrun.schema.json").read_text(encoding="utf-8")
    assert committed == flow_schema_text


@pytest.mark.parametrize("relative", EXAMPLE_FLOWS)
def test_schema_accepts_examples(flow_validator: jsonschema.Draft202012Validator, relative: str) -> None:
    errors = [error.message for error in flow_validator.iter_errors(load_example(relative))]
    assert errors == []


def set_billing(key: str, value: Any) -> Any:
    def change(document: dict[str, Any]) -> None:
        document["subscribers"]["billing"][key] = value

    return change


def rename_topic(document: dict[str, Any]) -> None:
    document["topics"]["Order Placed"] = document["topics"].pop("OrderPlaced")


SCHEMA_REJECTS = {
    "unknown-key": set_billing("ack_timout", "5s"),
    "wrong-enum": set_billing("mode", "poll"),
    "bad-duration": set_billing("ack_timeout", "5 sec"),
    "duration-without-unit": set_billing("ack_timeout", "30"),
}


@pytest.mark.parametrize("case", list(SCHEMA_REJECTS))
def test_schema_rejects_invalid_copy(flow_validator: jsonschema.Draft202012Validator, case: str) -> None:
    document = copy.deepcopy(load_example("flows/orders.yaml"))
    SCHEMA_REJECTS[case](document)
    assert not flow_validator.is_valid(document)


# Values `flowrun validate` rejects and that a JSON Schema can express, so the schema that
# editors use should reject them too.
LOADER_REJECTS = {
    "zero-ack-timeout": set_billing("ack_timeout", 0),
    "zero-max-wait": set_billing("max_wait", "0s"),
    "topic-name-with-space": rename_topic,
}


@pytest.mark.parametrize("case", list(LOADER_REJECTS))
def test_schema_rejects_loader_errors(
    flow_validator: jsonschema.Draft202012Validator, tmp_path: Path, case: str
) -> None:
    document = copy.deepcopy(load_example("flows/orders.yaml"))
    LOADER_REJECTS[case](document)
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    loader = run_flowrun("validate", "--no-import", str(path), cwd=tmp_path)
    assert loader.returncode == 1
    assert not flow_validator.is_valid(document)


# flowrun graph


def expected_graph(document: dict[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    """Nodes as (kind, name) and edges as (source, target, label), computed from a flow document."""
    nodes = {("topic", name) for name in document["topics"]}
    edges = set()
    for name, producer in document.get("producers", {}).items():
        nodes.add(("producer", name))
        for target in producer["publishes"]:
            edges.add((f"producer:{name}", f"topic:{target}", ""))
    for name, subscriber in document.get("subscribers", {}).items():
        nodes.add(("subscriber", name))
        mode = subscriber.get("mode", "push")
        ack = subscriber.get("ack", "auto")
        edges.add((f"topic:{subscriber['topic']}", f"subscriber:{name}", f"{mode}, ack {ack}"))
        for target in subscriber.get("publishes", []):
            edges.add((f"subscriber:{name}", f"topic:{target}", ""))
        if subscriber.get("dead_letter"):
            edges.add((f"subscriber:{name}", f"topic:{subscriber['dead_letter']}", "dead letter"))
    return nodes, edges


MERMAID_NODE_PATTERNS = {
    "producer": re.compile(r'^    (\S+)\[/"(.+)"/\]$'),
    "topic": re.compile(r'^    (\S+)\(\["(.+)"\]\)$'),
    "subscriber": re.compile(r'^    (\S+)\["(.+?)<br/><small>.*</small>"\]$'),
}
MERMAID_EDGE = re.compile(r"^    (\S+) (?:-->|-\.->)(?:\|(.+)\|)? (\S+)$")


def parse_mermaid(text: str) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]], list[str]]:
    """Return the nodes, the edges and the lines that are neither."""
    ids: dict[str, tuple[str, str]] = {}
    edges = set()
    other = []
    for line in text.splitlines()[1:]:
        node = next(((kind, pattern.match(line)) for kind, pattern in MERMAID_NODE_PATTERNS.items()
                     if pattern.match(line)), None)
        if node is not None:
            kind, match = node
            ids[match.group(1)] = (kind, match.group(2))
            continue
        edge = MERMAID_EDGE.match(line)
        if edge is None:
            other.append(line)
            continue
        source, target = ids[edge.group(1)], ids[edge.group(3)]
        edges.add((":".join(source), ":".join(target), edge.group(2) or ""))
    return set(ids.values()), edges, other


DOT_NODE = re.compile(r'^    (\S+) \[label="(.+)", shape=(\w+)\];$')
DOT_EDGE = re.compile(r'^    (\S+) -> (\S+)(?: \[label="([^"]+)"(.*)\])?;$')
DOT_SHAPES = {"parallelogram": "producer", "cylinder": "topic", "box": "subscriber"}


def parse_dot(text: str) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]], dict[str, str]]:
    """Return the nodes, the edges and the extra attributes of each dead-letter edge."""
    ids: dict[str, tuple[str, str]] = {}
    edges = set()
    dead_letter_styles = {}
    for line in text.splitlines():
        node = DOT_NODE.match(line)
        if node is not None:
            name = node.group(2).split("\\n")[0]
            ids[node.group(1)] = (DOT_SHAPES[node.group(3)], name)
            continue
        edge = DOT_EDGE.match(line)
        if edge is None:
            continue
        source, target = ":".join(ids[edge.group(1)]), ":".join(ids[edge.group(2)])
        edges.add((source, target, edge.group(3) or ""))
        if edge.group(3) == "dead letter":
            dead_letter_styles[source] = edge.group(4)
    return set(ids.values()), edges, dead_letter_styles


def test_graph_mermaid_complete() -> None:
    result = run_flowrun("graph", "flows/orders.yaml", "--format", "mermaid", cwd=REPOSITORY)
    nodes, edges, other = parse_mermaid(result.stdout)
    expected_nodes, expected_edges = expected_graph(load_example("flows/orders.yaml"))
    assert result.returncode == 0
    assert result.stdout.startswith("flowchart LR\n")
    assert other == []
    assert nodes == expected_nodes
    assert edges == expected_edges
    assert ("subscriber:billing", "topic:BillingDeadLetter", "dead letter") in edges
    assert ("topic:OrderPlaced", "subscriber:inventory", "pull, ack explicit") in edges
    assert ("topic:OrderPlaced", "subscriber:billing", "push, ack auto") in edges
    assert ("topic:StockReserved", "subscriber:status-stock-reserved", "push, ack none") in edges


def test_graph_mermaid_dead_letter_dashed() -> None:
    result = run_flowrun("graph", "flows/orders.yaml", cwd=REPOSITORY)
    dashed = [line for line in result.stdout.splitlines() if "-.->" in line]
    assert dashed == ["    subscriber_billing -.->|dead letter| topic_BillingDeadLetter"]


def test_graph_dot_complete() -> None:
    result = run_flowrun("graph", "flows/orders.yaml", "--format", "dot", cwd=REPOSITORY)
    nodes, edges, dead_letter_styles = parse_dot(result.stdout)
    expected_nodes, expected_edges = expected_graph(load_example("flows/orders.yaml"))
    assert result.returncode == 0
    assert result.stdout.startswith('digraph "orders" {\n')
    assert result.stdout.endswith("}\n")
    assert nodes == expected_nodes
    assert edges == expected_edges
    assert dead_letter_styles == {"subscriber:billing": ", style=dashed, color=red"}
    assert ("topic:OrderPlaced", "subscriber:inventory", "pull, ack explicit") in edges


# Both topic names map to the identifier characters `Order_Placed`.
PUNCTUATION_FLOW = """\
name: shop
topics:
  Order-Placed:
  Order.Placed:
producers:
  source:
    plugin: handlers:produce
    publishes: [Order-Placed, Order.Placed]
subscribers:
  billing:
    topic: Order-Placed
    plugin: handlers:handle
    dead_letter: Order.Placed
  audit:
    topic: Order.Placed
    plugin: handlers:handle
    mode: pull
"""


@pytest.mark.parametrize("output_format", ["mermaid", "dot"])
def test_graph_punctuation_names_distinct(tmp_path: Path, output_format: str) -> None:
    path = write_flow(tmp_path, PUNCTUATION_FLOW)
    result = run_flowrun("graph", "flow.yaml", "--format", output_format, cwd=tmp_path)
    parse = parse_mermaid if output_format == "mermaid" else parse_dot
    nodes, edges, _ = parse(result.stdout)
    expected_nodes, expected_edges = expected_graph(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert result.returncode == 0
    assert nodes == expected_nodes
    assert edges == expected_edges


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_graph_dot_parses() -> None:
    result = run_flowrun("graph", "flows/orders.yaml", "--format", "dot", cwd=REPOSITORY)
    parsed = subprocess.run(["dot", "-Tcanon"], input=result.stdout, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT, check=False)
    assert parsed.returncode == 0
    assert parsed.stderr == ""


def test_graph_svg_without_graphviz(tmp_path: Path) -> None:
    # PATH contains only an empty folder, so the `dot` program cannot be found even where it is installed.
    empty = tmp_path / "bin"
    empty.mkdir()
    output = tmp_path / "flow.svg"
    result = run_flowrun("graph", "flows/orders.yaml", "--output", str(output), cwd=REPOSITORY,
                         path_variable=str(empty))
    assert result.returncode == 1
    assert result.stderr == (
        "error: rendering needs Graphviz's 'dot' program, which is not installed; install it "
        "(apt-get install graphviz, brew install graphviz) or print DOT with --format dot\n"
    )
    assert not output.exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_graph_svg_written(tmp_path: Path) -> None:
    output = tmp_path / "flow.svg"
    result = run_flowrun("graph", "flows/orders.yaml", "--output", str(output), cwd=REPOSITORY)
    assert result.returncode == 0
    assert result.stderr == f"wrote {output}\n"
    assert "<svg" in output.read_text(encoding="utf-8")


def test_graph_output_suffix_invalid(tmp_path: Path) -> None:
    output = tmp_path / "flow.txt"
    result = run_flowrun("graph", "flows/orders.yaml", "--output", str(output), cwd=REPOSITORY)
    assert result.returncode == 1
    assert result.stderr == f"error: cannot render '{output}': use a .svg, .png or .pdf file name, or omit --output\n"


# flowrun validate: output formats, globs, --strict and --explain

MISSPELLED_LINE = "    ack_timeout: 30s\n"


@pytest.fixture
def flows_folder(tmp_path: Path) -> tuple[Path, int, int]:
    """tmp_path/flows with a valid copy of the sample flow and a copy with a misspelled key.

    Returns the folder and the line and column of the misspelled key in bad.yaml.
    """
    folder = tmp_path / "flows"
    folder.mkdir()
    text = (REPOSITORY / "flows/orders-sample.yaml").read_text(encoding="utf-8")
    (folder / "good.yaml").write_text(text, encoding="utf-8")
    lines = text.splitlines(keepends=True)
    index = lines.index(MISSPELLED_LINE)
    lines[index] = MISSPELLED_LINE.replace("ack_timeout", "ack_timout")
    (folder / "bad.yaml").write_text("".join(lines), encoding="utf-8")
    column = len(MISSPELLED_LINE) - len(MISSPELLED_LINE.lstrip()) + 1
    return folder, index + 1, column


MISSPELLED_MESSAGE = "unknown key 'ack_timout' in subscriber 'inventory' (did you mean 'ack_timeout'?)"
# The note that follows a flow's schema errors once its references were checked anyway.
PARTLY_CHECKED = (
    "because of the errors above, only references to topics and plugins were checked (not in entries with an "
    "invalid or missing topic, plugin or publishes); fix the errors to check the rest"
)


def test_validate_github_annotation(tmp_path: Path, flows_folder: tuple[Path, int, int]) -> None:
    _, line, column = flows_folder
    result = run_flowrun("validate", "flows/*.yaml", "--format", "github", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"::error file=flows/bad.yaml,line={line},col={column},title=flowrun::{MISSPELLED_MESSAGE}\n"
        f"::notice file=flows/bad.yaml,title=flowrun::{PARTLY_CHECKED}\n"
    )


def test_validate_json_problems(tmp_path: Path, flows_folder: tuple[Path, int, int]) -> None:
    _, line, column = flows_folder
    result = run_flowrun("validate", "flows/*.yaml", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout) == [
        {"path": "flows/bad.yaml", "line": line, "column": column, "severity": "error",
         "message": MISSPELLED_MESSAGE},
        {"path": "flows/bad.yaml", "line": 0, "column": 0, "severity": "note", "message": PARTLY_CHECKED},
    ]


def test_validate_text_format(tmp_path: Path, flows_folder: tuple[Path, int, int]) -> None:
    _, line, column = flows_folder
    result = run_flowrun("validate", "flows/*.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        f"flows/bad.yaml:{line}:{column}: error: {MISSPELLED_MESSAGE}\n"
        f"flows/bad.yaml: note: {PARTLY_CHECKED}\n"
    )
    assert result.stderr == "flows/good.yaml: valid\n"


def test_validate_glob_matches_nothing(tmp_path: Path) -> None:
    result = run_flowrun("validate", "flows/*.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Invalid value for FLOWS: no file matches 'flows/*.yaml'" in collapse_panel(result.stderr)


# Refunds has a producer but no subscriber, which is a warning.
WARNING_FLOW = """\
name: shop
topics:
  Orders:
  Refunds:
producers:
  source:
    plugin: handlers:produce
    publishes: [Orders, Refunds]
subscribers:
  billing:
    topic: Orders
    plugin: handlers:handle
"""
REFUNDS_WARNING = "topic 'Refunds' has no subscribers, so its messages are counted and discarded"


def test_validate_warning_exits_zero(tmp_path: Path) -> None:
    write_flow(tmp_path, WARNING_FLOW)
    result = run_flowrun("validate", "flow.yaml", "--format", "github", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"::warning file=flow.yaml,line=4,col=3,title=flowrun::{REFUNDS_WARNING}\n"


def test_validate_strict_fails_warning(tmp_path: Path) -> None:
    write_flow(tmp_path, WARNING_FLOW)
    result = run_flowrun("validate", "flow.yaml", "--strict", "--format", "github", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"::error file=flow.yaml,line=4,col=3,title=flowrun::{REFUNDS_WARNING}\n"


@pytest.mark.parametrize(("strict", "severity"), [(False, "warning"), (True, "error")])
def test_validate_json_severity(tmp_path: Path, strict: bool, severity: str) -> None:
    write_flow(tmp_path, WARNING_FLOW)
    options = ["--strict"] if strict else []
    result = run_flowrun("validate", "flow.yaml", "--format", "json", *options, cwd=tmp_path)
    assert result.returncode == (1 if strict else 0)
    assert json.loads(result.stdout) == [
        {"path": "flow.yaml", "line": 4, "column": 3, "severity": severity, "message": REFUNDS_WARNING}
    ]


# The worst case to give up is max_deliveries x ack_timeout plus every backoff before a redelivery.
# For billing that is 3 x 10s + min(1s, 1.5s) + min(2s, 1.5s) = 32.5s, and for ledger 1 x 2m = 2m.
EXPLAIN_FLOW = """\
name: shop
topics:
  Orders:
  Failed:
producers:
  source:
    plugin: handlers:produce
    publishes: [Orders]
subscribers:
  billing:
    topic: Orders
    plugin: handlers:handle
    ack_timeout: 10s
    max_deliveries: 3
    retry: {initial: 1s, multiplier: 2, max: 1500ms}
    dead_letter: Failed
  audit:
    topic: Orders
    plugin: handlers:handle
    ack: none
  ledger:
    topic: Orders
    plugin: handlers:handle
    mode: pull
    ack: explicit
    ack_timeout: 2m
    max_deliveries: 1
  failures:
    topic: Failed
    plugin: handlers:handle
"""


def test_validate_explain_rows(tmp_path: Path) -> None:
    write_flow(tmp_path, EXPLAIN_FLOW)
    result = run_flowrun("validate", "flow.yaml", "--explain", cwd=tmp_path)
    rows = table_rows(result.stdout)
    by_name = {row[0]: row for row in rows}
    assert result.returncode == 0
    assert "flow.yaml: effective guarantees" in result.stdout
    assert [row[0] for row in rows] == ["billing", "audit", "ledger", "failures"]
    assert by_name["billing"][2] == "at-least-once (survives a crash; handlers may see a repeat)"
    assert by_name["audit"][2] == "at-most-once (removed on delivery; a failed handler loses the message)"
    assert by_name["ledger"][2] == "at-least-once (survives a crash; handlers may see a repeat)"
    assert by_name["billing"][4] == "3"
    assert by_name["audit"][4] == "1"
    assert by_name["billing"][5] == "32.5s"
    assert by_name["audit"][5] == "-"
    assert by_name["ledger"][5] == "2m"
    assert by_name["billing"][6] == "dead-lettered to 'Failed'"
    assert by_name["ledger"][6] == "dropped and counted (no dead_letter topic)"


@pytest.mark.parametrize("output_format", ["text", "json"])
def test_validate_explain_valid_once(tmp_path: Path, output_format: str) -> None:
    # The "valid" line is the check's result, so the table that --explain adds must not repeat it.
    write_flow(tmp_path, EXPLAIN_FLOW)
    result = run_flowrun("validate", "flow.yaml", "--explain", "--format", output_format, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == ("flow.yaml: valid\n" if output_format == "text" else "")
    assert result.stdout.count("flow.yaml: effective guarantees") == 1


def test_explain_memory_backend(tmp_path: Path) -> None:
    write_flow(tmp_path, EXPLAIN_FLOW.replace("name: shop\n", "name: shop\nbroker: {backend: memory}\n"))
    result = run_flowrun("validate", "flow.yaml", "--explain", cwd=tmp_path)
    by_name = {row[0]: row for row in table_rows(result.stdout)}
    assert result.returncode == 0
    assert by_name["billing"][1] == "memory"
    assert by_name["billing"][2] == "at-least-once (lost if the process exits; handlers may see a repeat)"


# flowrun publish

ORDER_MODEL = """\
from pydantic import BaseModel


class Order(BaseModel):
    invoice: str
    amount: int
"""
PUBLISH_FLOW = """\
name: shop
topics:
  Orders:
    schema: models:Order
  Refunds:
subscribers:
  billing:
    topic: Orders
    plugin: handlers:handle
  refunds:
    topic: Refunds
    plugin: handlers:handle
"""
AMOUNT_ERROR = (
    "payload for topic 'Orders' does not match models:Order: field 'amount': "
    "Input should be a valid integer"
)


@pytest.fixture
def publish_folder(tmp_path: Path) -> Path:
    (tmp_path / "models.py").write_text(ORDER_MODEL, encoding="utf-8")
    write_flow(tmp_path, PUBLISH_FLOW)
    return tmp_path


def status_of(folder: Path) -> dict[str, Any]:
    result = run_flowrun("status", "flow.yaml", "--json", cwd=folder)
    assert result.returncode == 0
    return json.loads(result.stdout)


def pending(folder: Path, subscription: str) -> int:
    return int(status_of(folder)["subscriptions"][subscription]["pending"])


def order_line(number: int) -> str:
    return json.dumps({"invoice": str(number), "amount": number})


def test_publish_argument(publish_folder: Path) -> None:
    result = run_flowrun("publish", "flow.yaml", "Orders", order_line(1), cwd=publish_folder)
    assert result.returncode == 0
    assert result.stderr == "published 1 message to Orders\n"
    assert pending(publish_folder, "billing") == 1
    assert pending(publish_folder, "refunds") == 0


def test_publish_file(publish_folder: Path) -> None:
    (publish_folder / "order.json").write_text(json.dumps({"invoice": "1", "amount": 1}, indent=2),
                                               encoding="utf-8")
    result = run_flowrun("publish", "flow.yaml", "Orders", "--file", "order.json", cwd=publish_folder)
    assert result.returncode == 0
    assert result.stderr == "published 1 message to Orders\n"
    assert pending(publish_folder, "billing") == 1


def test_publish_json_lines(publish_folder: Path) -> None:
    lines = f"{order_line(1)}\n\n{order_line(2)}\n{order_line(3)}\n"
    result = run_flowrun("publish", "flow.yaml", "Orders", cwd=publish_folder, stdin=lines)
    assert result.returncode == 0
    assert result.stderr == "published 3 messages to Orders\n"
    assert pending(publish_folder, "billing") == 3


def test_publish_twice_adds_up(publish_folder: Path) -> None:
    run_flowrun("publish", "flow.yaml", "Orders", order_line(1), cwd=publish_folder)
    run_flowrun("publish", "flow.yaml", "Orders", cwd=publish_folder, stdin=f"{order_line(2)}\n{order_line(3)}\n")
    assert pending(publish_folder, "billing") == 3
    assert status_of(publish_folder)["topics"]["Orders"]["published"] == 3


def test_publish_invalid_json_line(publish_folder: Path) -> None:
    # Lines 1 and 2 are valid, line 3 is not JSON, and line 4 must not be published.
    lines = f"{order_line(1)}\n{order_line(2)}\n{{\"invoice\": \n{order_line(4)}\n"
    result = run_flowrun("publish", "flow.yaml", "Orders", cwd=publish_folder, stdin=lines)
    message = collapse_panel(result.stderr)
    assert result.returncode == 2
    assert "stdin line 3 is not valid JSON" in message
    assert pending(publish_folder, "billing") == 2
    # The lines before the invalid one are stored, so the message must state how many.
    assert "2 earlier messages were published before it" in message


def test_publish_json_error_position(publish_folder: Path) -> None:
    # A one-line payload has no line 2; the trailing newline must not move the reported position.
    result = run_flowrun("publish", "flow.yaml", "Orders", cwd=publish_folder, stdin='{"invoice": \n')
    message = collapse_panel(result.stderr)
    assert result.returncode == 2
    assert "stdin line 1 is not valid JSON" in message
    assert "at line 2" not in message


def test_publish_invalid_argument_json(publish_folder: Path) -> None:
    result = run_flowrun("publish", "flow.yaml", "Orders", "{invoice: 1}", cwd=publish_folder)
    assert result.returncode == 2
    assert "the payload argument is not valid JSON" in collapse_panel(result.stderr)
    assert pending(publish_folder, "billing") == 0


def test_publish_schema_mismatch_line(publish_folder: Path) -> None:
    lines = f"{order_line(1)}\n" + '{"invoice": "2", "amount": "lots"}\n' + f"{order_line(3)}\n"
    result = run_flowrun("publish", "flow.yaml", "Orders", cwd=publish_folder, stdin=lines)
    assert result.returncode == 1
    assert result.stderr == f"error: stdin line 2: {AMOUNT_ERROR}; 1 earlier message was published before it\n"
    assert pending(publish_folder, "billing") == 1


def test_publish_schema_mismatch_argument(publish_folder: Path) -> None:
    payload = '{"invoice": "1", "amount": "lots"}'
    result = run_flowrun("publish", "flow.yaml", "Orders", payload, cwd=publish_folder)
    assert result.returncode == 1
    assert result.stderr == f"error: argument: {AMOUNT_ERROR}; 0 earlier messages were published before it\n"
    assert pending(publish_folder, "billing") == 0


def test_publish_unknown_topic(publish_folder: Path) -> None:
    result = run_flowrun("publish", "flow.yaml", "Ordres", order_line(1), cwd=publish_folder)
    assert result.returncode == 2
    assert "unknown topic 'Ordres'; choose from Orders, Refunds" in collapse_panel(result.stderr)
    # The topic is checked before the broker is opened, so not even the broker file exists.
    assert not (publish_folder / ".flowrun").exists()


# Orders takes two unsettled messages, and nothing consumes them, so a third publish waits.
FULL_FLOW = """\
name: shop
topics:
  Orders:
    max_pending: 2
subscribers:
  billing:
    topic: Orders
    plugin: handlers:handle
"""
FULL_NOTICE = (
    "topic 'Orders' is full: subscription 'billing' has 2 unsettled messages and max_pending is 2. "
    "Waiting for room, because the topic has on_full: block. Press Ctrl-C to stop without publishing this message.\n"
)
# Python keeps SIGINT ignored when it starts with SIGINT ignored, as in a background job of a
# script, so the child restores Python's handler first, as a terminal session has it.
INTERRUPTIBLE_FLOWRUN = [
    sys.executable, "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('flowrun.cli', run_name='__main__')",
]


def read_line(stream: Any, timeout: float) -> str:
    """Read one line of a child's pipe, failing the test when none arrives within `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout}s"
    return str(stream.readline())


def test_publish_full_topic_notice_and_interrupt(tmp_path: Path) -> None:
    write_flow(tmp_path, FULL_FLOW)
    lines = tmp_path / "orders.jsonl"
    lines.write_text("".join(f"{order_line(number)}\n" for number in range(1, 5)), encoding="utf-8")
    environment = {name: value for name, value in os.environ.items() if name != BROKER_URL_VARIABLE}
    with lines.open(encoding="utf-8") as stdin:
        process = subprocess.Popen(
            [*INTERRUPTIBLE_FLOWRUN, "publish", "flow.yaml", "Orders"], cwd=tmp_path, env=environment,
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    try:
        started = time.monotonic()
        notice = read_line(process.stderr, timeout=SUBPROCESS_TIMEOUT)
        waited = time.monotonic() - started
        process.send_signal(signal.SIGINT)
        stdout, rest_of_stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        process.kill()
        process.wait()

    assert notice == FULL_NOTICE
    assert waited >= 1.0
    assert process.returncode == 130
    assert stdout == ""
    assert rest_of_stderr == (
        "stopped: stdin line 3 was not published to Orders; 2 earlier messages were published before it\n"
    )
    assert pending(tmp_path, "billing") == 2
    assert status_of(tmp_path)["topics"]["Orders"]["published"] == 2


# flowrun plugins


def test_plugins_lists_orders() -> None:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))
    declared = project["project"]["entry-points"]["flowrun.plugins"]
    # The replay is the one producer (a class with run); the other four are handler classes.
    expected = {
        name: [reference, "producer class" if name == "orders.file-replay" else "handler class", "flowrun"]
        for name, reference in declared.items()
    }
    result = run_flowrun("plugins", cwd=REPOSITORY)
    listed = {row[0]: row[1:] for row in table_rows(result.stdout) if row[0].startswith("orders.")}
    assert result.returncode == 0
    assert len(declared) == 5
    assert listed == expected


# flowrun status and flowrun dlq

FAILING_PLUGINS = """\
def produce(context):
    return iter([{"n": 1}, {"n": 2}, {"n": 3}])


def fail(message, context):
    raise RuntimeError(f"gateway down for order {message.payload['n']}")
"""
FAILING_FLOW = """\
name: failing
topics:
  Jobs:
  Failed:
producers:
  source:
    plugin: failing_plugins:produce
    publishes: [Jobs]
subscribers:
  worker:
    topic: Jobs
    plugin: failing_plugins:fail
    max_deliveries: 2
    dead_letter: Failed
    retry: {initial: 10ms, max: 10ms}
"""


@pytest.fixture
def failed_folder(tmp_path: Path) -> Path:
    """A flow whose three messages were dead-lettered by `flowrun up --until-drained`."""
    (tmp_path / "failing_plugins.py").write_text(FAILING_PLUGINS, encoding="utf-8")
    (tmp_path / "flow.yaml").write_text(FAILING_FLOW, encoding="utf-8")
    result = run_flowrun("up", "flow.yaml", "--until-drained", cwd=tmp_path)
    assert result.returncode == 0
    return tmp_path


def list_dead_letters(folder: Path, *options: str) -> list[dict[str, Any]]:
    result = run_flowrun("dlq", "flow.yaml", "list", "--json", *options, cwd=folder, traceback_in_stdout=True)
    assert result.returncode == 0
    return json.loads(result.stdout)


def test_dlq_list_headers(failed_folder: Path) -> None:
    letters = list_dead_letters(failed_folder)
    assert [json.loads(letter["body"]) for letter in letters] == [{"n": 1}, {"n": 2}, {"n": 3}]
    for number, letter in enumerate(letters, start=1):
        headers = letter["headers"]
        assert letter["subscription"] == "worker"
        assert letter["topic"] == "Jobs"
        assert headers["flowrun.error_type"] == "RuntimeError"
        assert headers["flowrun.error"] == f"gateway down for order {number}"
        assert headers["flowrun.delivery_count"] == "2"
        assert headers["flowrun.subscription"] == "worker"
        assert headers["flowrun.plugin"] == "failing_plugins:fail"
        assert headers["flowrun.original_topic"] == "Jobs"
        assert headers["flowrun.original_id"] == letter["message_id"]
        assert headers["flowrun.traceback"].endswith(f"RuntimeError: gateway down for order {number}\n")
        first = datetime.fromisoformat(headers["flowrun.first_delivered_at"])
        last = datetime.fromisoformat(headers["flowrun.last_delivered_at"])
        assert first.utcoffset() is not None
        assert first <= last


def test_dlq_list_table(failed_folder: Path) -> None:
    result = run_flowrun("dlq", "flow.yaml", "list", cwd=failed_folder)
    rows = table_rows(result.stdout)
    assert result.returncode == 0
    assert result.stdout.startswith("3 dead letters")
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert [row[3] for row in rows] == ["2", "2", "2"]
    assert [row[4] for row in rows] == [f"RuntimeError: gateway down for order {n}" for n in (1, 2, 3)]


def test_status_counts_dead_letters(failed_folder: Path) -> None:
    report = status_of(failed_folder)
    worker = report["subscriptions"]["worker"]
    assert worker["dead_lettered"] == 3
    assert worker["delivered"] == 6
    assert worker["acked"] == 0
    assert worker["pending"] == 0
    assert worker["in_flight"] == 0
    assert report["topics"]["Jobs"]["published"] == 3
    assert report["topics"]["Failed"]["published"] == 3


def test_status_table_dead_letters_all_time(failed_folder: Path) -> None:
    # The purge empties the dead-letter list, but the column counts all dead letters ever.
    purge = run_flowrun("dlq", "flow.yaml", "purge", cwd=failed_folder)
    result = run_flowrun("status", "flow.yaml", cwd=failed_folder)
    rows = {row[0]: row for row in table_rows(result.stdout)}

    assert purge.returncode == 0
    assert result.returncode == 0
    assert table_headings(result.stdout) == [
        "subscription", "topic", "pending", "in flight", "delayed", "dead-lettered (all time)", "oldest pending",
    ]
    assert rows["worker"][:6] == ["worker", "Jobs", "0", "0", "0", "3"]


def test_status_help_explains_dead_letters() -> None:
    result = run_flowrun("status", "--help", cwd=REPOSITORY)
    text = " ".join(result.stdout.replace("│", " ").split())

    assert result.returncode == 0
    assert ("Unlike the other columns, dead-lettered (all time) counts the dead letters of every run, "
            "replayed and purged ones too.") in text


def test_dlq_replay_requeues(failed_folder: Path) -> None:
    result = run_flowrun("dlq", "flow.yaml", "replay", cwd=failed_folder)
    worker = status_of(failed_folder)["subscriptions"]["worker"]
    assert result.returncode == 0
    assert result.stdout == "replayed 3 dead letters\n"
    assert worker["pending"] == 3
    assert list_dead_letters(failed_folder) == []


def test_dlq_replay_delivers_again(failed_folder: Path) -> None:
    run_flowrun("dlq", "flow.yaml", "replay", cwd=failed_folder)
    # --only leaves out the producer, which would publish three new messages.
    rerun = run_flowrun("up", "flow.yaml", "--until-drained", "--only", "worker", cwd=failed_folder)
    letters = list_dead_letters(failed_folder)
    assert rerun.returncode == 0
    assert [json.loads(letter["body"]) for letter in letters] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [letter["headers"]["flowrun.delivery_count"] for letter in letters] == ["2", "2", "2"]
    assert status_of(failed_folder)["subscriptions"]["worker"]["dead_lettered"] == 6


def test_dlq_replay_twice_keeps_first_ids(failed_folder: Path) -> None:
    first_ids = {json.loads(letter["body"])["n"]: letter["message_id"] for letter in list_dead_letters(failed_folder)}
    for _ in range(2):
        replay = run_flowrun("dlq", "flow.yaml", "replay", cwd=failed_folder)
        rerun = run_flowrun("up", "flow.yaml", "--until-drained", "--only", "worker", cwd=failed_folder)
        assert replay.returncode == 0
        assert rerun.returncode == 0

    letters = list_dead_letters(failed_folder)
    replayed_from = {json.loads(letter["body"])["n"]: letter["headers"]["flowrun.replayed_from"] for letter in letters}
    assert replayed_from == first_ids
    assert set(first_ids.values()).isdisjoint(letter["message_id"] for letter in letters)


def test_dlq_purge_subscription(failed_folder: Path) -> None:
    result = run_flowrun("dlq", "flow.yaml", "purge", "--subscription", "worker", cwd=failed_folder)
    assert result.returncode == 0
    assert result.stdout == "purged 3 dead letters\n"
    assert list_dead_letters(failed_folder) == []
    assert list_dead_letters(failed_folder, "--subscription", "worker") == []


def test_dlq_unknown_subscription(failed_folder: Path) -> None:
    result = run_flowrun("dlq", "flow.yaml", "purge", "--subscription", "wroker", cwd=failed_folder)
    assert result.returncode == 2
    assert "unknown subscription 'wroker'; choose from worker" in collapse_panel(result.stderr)
    assert len(list_dead_letters(failed_folder)) == 3


MEMORY_MESSAGE = (
    "error: the memory backend keeps no state outside the running process, so there is nothing to "
    "inspect; use the sqlite backend (the default) or a server backend\n"
)


@pytest.mark.parametrize("command", [["dlq", "flow.yaml", "list"], ["status", "flow.yaml"]])
def test_memory_backend_not_inspectable(tmp_path: Path, command: list[str]) -> None:
    write_flow(tmp_path, WARNING_FLOW.replace("name: shop\n", "name: shop\nbroker: {backend: memory}\n"))
    result = run_flowrun(*command, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == MEMORY_MESSAGE


@pytest.mark.parametrize("command", [
    ["status", "flow.yaml"],
    ["status", "flow.yaml", "--json"],
    ["dlq", "flow.yaml", "list"],
])
def test_inspect_before_first_run(tmp_path: Path, command: list[str]) -> None:
    write_flow(tmp_path, WARNING_FLOW)
    database = tmp_path.resolve() / ".flowrun" / "shop.db"

    result = run_flowrun(*command, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: no broker file yet at {database}, so there is nothing to inspect; "
        "the first run creates it: flowrun up flow.yaml\n"
    )
    assert not (tmp_path / ".flowrun").exists()


def test_status_before_run_quotes_path(tmp_path: Path) -> None:
    write_flow(tmp_path, WARNING_FLOW)
    (tmp_path / "flow.yaml").rename(tmp_path / "my flow.yaml")

    result = run_flowrun("status", "my flow.yaml", cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.endswith("the first run creates it: flowrun up 'my flow.yaml'\n")
    assert not (tmp_path / ".flowrun").exists()


# Broker URLs


@pytest.mark.parametrize(("url", "reason"), [
    ("redis://127.0.0.1:abc/0", "could not be cast to integer"),
    ("amqp://guest:secret@127.0.0.1:99999/", "out of range"),
])
def test_up_rejects_invalid_broker_port(tmp_path: Path, url: str, reason: str) -> None:
    write_flow(tmp_path, f"name: ports\nbroker:\n  backend: {url.split(':')[0].replace('amqp', 'rabbitmq')}\n"
                         f"  url: {url}\ntopics:\n  Work:\n")

    result = run_flowrun("up", "flow.yaml", "--until-drained", cwd=tmp_path)

    assert result.returncode == 1
    assert "invalid port in the broker URL" in result.stderr
    assert reason in result.stderr
    assert "secret" not in result.stderr + result.stdout
