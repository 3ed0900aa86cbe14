"""Property tests: `validate_file` reports problems for any input and never raises."""

from __future__ import annotations

from pathlib import Path

import pytest
from flowrun.problems import Severity
from flowrun.validate import validate_file
from hypothesis import given, settings
from hypothesis import strategies as st

VALID_FLOW = """\
name: shop
broker:
  backend: memory
topics:
  OrderPlaced:
  OrderBilled:
    description: billed orders
    max_pending: 100
  Failed:
producers:
  replay:
    plugin: orders.file-replay
    publishes: [OrderPlaced]
    with:
      path: ${FLOWRUN_FUZZ_PATH:data/orders.csv}
subscribers:
  billing:
    topic: OrderPlaced
    plugin: orders.billing
    ack: explicit
    ack_timeout: 2m
    max_deliveries: 3
    dead_letter: Failed
    retry:
      initial: 250ms
      max: 30s
    publishes:
      - OrderBilled
  audit:
    topic: OrderBilled
    plugin: module.path:handler
    mode: pull
    batch_size: 20
"""
FLOW_LINES = VALID_FLOW.splitlines()

# Characters and tokens that carry meaning in YAML, plus a few letters, digits and whitespace.
YAML_TOKENS = list(":-[]{},&*!|>'\"#?%@`~$<=\\ \t\n\r.0123456789aeTx_") + [
    "${",
    "---",
    "\u00e9",
    "\u2028",
    "\ufeff",
]


def yamlish_text(max_tokens: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(YAML_TOKENS), max_size=max_tokens).map("".join)


KEY_SAMPLES = [
    "",
    "x",
    "topic",
    "ack_timout",
    "with",
    "with_",
    "1",
    "true",
    "~",
    "'a b'",
    "OrderPlaced",
    "<<",
    "? a",
]
VALUE_SAMPLES = [
    "",
    "~",
    "[]",
    "{}",
    "true",
    "no",
    "0",
    "-1",
    "1e400",
    ".nan",
    ".inf",
    "-3.5",
    "'x'",
    "[a, [b]]",
    "{a: 1}",
    "&anchor x",
    "*anchor",
    "*missing",
    "!!binary aGk=",
    "!!python/object:os.system {}",
    "${FLOWRUN_FUZZ_UNSET}",
    "2001-12-14",
    "5 minutes",
    "|\n  block",
    "- item",
]


@st.composite
def mutated_flows(draw: st.DrawFn) -> str:
    """Return VALID_FLOW after one to four line edits: delete, duplicate, rename a key, retype a value or insert garbage."""
    lines = list(FLOW_LINES)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        index = draw(st.integers(min_value=0, max_value=len(lines) - 1)) if lines else 0
        kind = draw(st.sampled_from(["delete", "rename", "retype", "insert", "duplicate"]))

        if kind == "insert" or not lines:
            indent = " " * draw(st.integers(min_value=0, max_value=8))
            garbage = draw(yamlish_text(40))
            lines.insert(index, indent + garbage)
            continue

        line = lines[index]
        indent = line[: len(line) - len(line.lstrip())]
        key, colon, value = line.strip().partition(":")
        if kind == "delete":
            del lines[index]
        elif kind == "duplicate":
            lines.insert(index, line)
        elif kind == "rename":
            new_key = draw(st.sampled_from(KEY_SAMPLES) | yamlish_text(8))
            lines[index] = f"{indent}{new_key}{colon or ':'}{value}"
        else:
            new_value = draw(
                st.sampled_from(VALUE_SAMPLES) | st.integers().map(str) | st.floats().map(repr)
            )
            lines[index] = f"{indent}{key}: {new_value}"
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def flow_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return one file that every example overwrites.

    Hypothesis rejects function-scoped fixtures such as tmp_path because they are not reset between examples.
    """
    return tmp_path_factory.mktemp("fuzz") / "flow.yaml"


def write_text(path: Path, text: str) -> None:
    # newline="" keeps '\r' and '\r\n' exactly as generated.
    with path.open("w", encoding="utf-8", newline="") as file:
        file.write(text)


def check_problems(path: Path) -> None:
    """Validate `path` without importing plugins and check where each problem points."""
    found = validate_file(str(path), import_plugins=False)
    for problem in found:
        assert problem.location.path == str(path)
        assert problem.location.line >= 0
        assert problem.location.column >= 0
        assert problem.message != ""
    # A note names the checks that the errors before it stopped, so it comes last, after an error.
    notes = [index for index, problem in enumerate(found) if problem.severity is Severity.NOTE]
    assert notes in ([], [len(found) - 1])
    assert not notes or found[0].is_error


def test_valid_flow_has_no_errors(flow_path: Path) -> None:
    write_text(flow_path, VALID_FLOW)
    found = validate_file(str(flow_path), import_plugins=False)
    assert [str(problem) for problem in found if problem.is_error] == []


@settings(max_examples=200, deadline=None)
@given(text=yamlish_text(300))
def test_yamlish_text_never_raises(flow_path: Path, text: str) -> None:
    write_text(flow_path, text)
    check_problems(flow_path)


@settings(max_examples=200, deadline=None)
@given(text=mutated_flows())
def test_mutated_flow_never_raises(flow_path: Path, text: str) -> None:
    write_text(flow_path, text)
    check_problems(flow_path)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_never_raises(flow_path: Path, text: str) -> None:
    # Unlike the tests above, this alphabet includes control characters such as NUL and DEL.
    write_text(flow_path, text)
    check_problems(flow_path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_never_raises(flow_path: Path, data: bytes) -> None:
    flow_path.write_bytes(data)
    check_problems(flow_path)
