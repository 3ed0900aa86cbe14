"""Loading real flow files: positioned error lines, safe YAML, ${ENV} expansion and defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from flowrun.errors import FlowValidationError
from flowrun.loader import LoadedFlow, load_flow, read_flow, read_flow_file
from flowrun.spec import AckPolicy, DeliveryMode, OnFull

# Subscriber 'billing' ends on line 14, so a line appended by `with_billing` is line 15.
BASE_FLOW = """\
name: shop
topics:
  OrderPlaced:
  OrderBilled:
    description: billed orders
producers:
  replay:
    plugin: orders.file-replay
    publishes: [OrderPlaced]
subscribers:
  billing:
    topic: OrderPlaced
    plugin: orders.billing
    publishes: [OrderBilled]
"""
DURATION_HELP = "expected a number of seconds or 250ms, 30s, 2m, 1h"


def with_billing(*lines: str) -> str:
    """Return BASE_FLOW with `lines` appended to subscriber 'billing', one key per line."""
    return BASE_FLOW + "".join(f"    {line}\n" for line in lines)


def write(directory: Path, text: str, name: str = "flow.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(path: Path) -> list[str]:
    """Load `path` and return its problems as the CLI prints them."""
    flow, found = read_flow(path)
    assert flow is None
    return [str(problem) for problem in found]


def load(path: Path) -> LoadedFlow:
    flow, found = read_flow(path)
    assert found == []
    assert flow is not None
    return flow


# Schema errors


def test_base_flow_loads(tmp_path: Path) -> None:
    flow = load(write(tmp_path, BASE_FLOW))
    assert flow.spec.name == "shop"
    assert list(flow.spec.topics) == ["OrderPlaced", "OrderBilled"]
    assert flow.spec.subscribers["billing"].publishes == ["OrderBilled"]
    assert flow.display_path == str(tmp_path / "flow.yaml")


def test_misspelled_key_suggests_name(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("ack_timout: 5s"))
    assert error_lines(path) == [
        f"{path}:15:5: error: unknown key 'ack_timout' in subscriber 'billing' (did you mean 'ack_timeout'?)"
    ]


def test_misspelled_key_in_retry(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("retry:", "  intial: 1s"))
    assert error_lines(path) == [
        f"{path}:16:7: error: unknown key 'intial' in 'retry' of subscriber 'billing' (did you mean 'initial'?)"
    ]


def test_misspelled_broker_key(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  backnd: memory\n" + BASE_FLOW)
    assert error_lines(path) == [
        f"{path}:2:3: error: unknown key 'backnd' in 'broker' (did you mean 'backend'?)"
    ]


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("colour: red"))
    [line] = error_lines(path)
    prefix = f"{path}:15:5: error: unknown key 'colour' in subscriber 'billing'; allowed keys: "
    assert line.startswith(prefix)

    listed = line.removeprefix(prefix).split(", ")
    assert listed == sorted(listed)
    assert "ack_timeout" in listed
    assert "with" in listed
    assert "with_" not in listed


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_FLOW + "colour: red\n")
    [line] = error_lines(path)
    assert line.startswith(
        f"{path}:15:1: error: unknown key 'colour' at the top level of the flow; allowed keys: "
    )


def test_python_field_name_rejected(tmp_path: Path) -> None:
    # `with_` is the Python attribute behind the YAML key `with`, so a flow file must not use it.
    path = write(tmp_path, with_billing("with_:", "  region: eu"))
    [line] = error_lines(path)
    assert line.startswith(f"{path}:15:5: error: unknown key 'with_' in subscriber 'billing'")


def test_missing_required_key(tmp_path: Path) -> None:
    text = BASE_FLOW.replace("    plugin: orders.billing\n", "")
    path = write(tmp_path, text)
    assert error_lines(path) == [
        f"{path}:11:3: error: missing required key 'plugin' in subscriber 'billing'"
    ]


def test_missing_topics_section(tmp_path: Path) -> None:
    path = write(tmp_path, "name: shop\n")
    assert error_lines(path) == [
        f"{path}:1:1: error: missing required key 'topics' at the top level of the flow"
    ]


def test_wrong_ack_value(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("ack: sometimes"))
    assert error_lines(path) == [
        (
            f"{path}:15:10: error: invalid value 'sometimes' for 'ack' in subscriber 'billing': "
            "Input should be 'auto', 'explicit' or 'none'"
        )
    ]


def test_wrong_mode_value(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("mode: poll"))
    assert error_lines(path) == [
        f"{path}:15:11: error: invalid value 'poll' for 'mode' in subscriber 'billing': Input should be 'push' or 'pull'"
    ]


def test_wrong_on_full_value(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  Orders:\n    on_full: drop\n")
    assert error_lines(path) == [
        f"{path}:3:14: error: invalid value 'drop' for 'on_full' in topic 'Orders': Input should be 'block' or 'reject'"
    ]


def test_max_deliveries_above_limit(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("max_deliveries: 100000"))
    assert error_lines(path) == [
        (
            f"{path}:15:21: error: invalid value 100000 for 'max_deliveries' in subscriber 'billing': "
            "Input should be less than or equal to 1000"
        )
    ]


def test_publishes_not_a_list(tmp_path: Path) -> None:
    text = BASE_FLOW.replace("publishes: [OrderBilled]", "publishes: OrderBilled")
    path = write(tmp_path, text)
    assert error_lines(path) == [
        (
            f"{path}:14:16: error: invalid value 'OrderBilled' for 'publishes' in subscriber 'billing': "
            "Input should be a valid list"
        )
    ]


def test_retry_max_below_initial(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("retry:", "  initial: 5s", "  max: 1s"))
    assert error_lines(path) == [
        (
            f"{path}:16:7: error: invalid value (a mapping) for 'retry' in subscriber 'billing': "
            "retry max (1s) is below retry initial (5s)"
        )
    ]


def test_invalid_topic_name(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  'order placed':\n")
    assert error_lines(path) == [
        (
            f"{path}:2:3: error: invalid topic name 'order placed': "
            "use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    ]


def test_name_used_twice(tmp_path: Path) -> None:
    text = BASE_FLOW.replace("  replay:\n", "  billing:\n")
    path = write(tmp_path, text)
    assert error_lines(path) == [
        f"{path}:11:3: error: name 'billing' is used by a producer and a subscriber; rename one"
    ]


def test_load_flow_raises_with_problems(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("ack_timout: 5s"))
    with pytest.raises(FlowValidationError) as raised:
        load_flow(path)
    assert [str(problem) for problem in raised.value.problems] == error_lines(path)


# Durations


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("2.5", 2.5),
        ("45", 45.0),
    ],
)
def test_duration_accepted(tmp_path: Path, written: str, seconds: float) -> None:
    flow = load(write(tmp_path, with_billing(f"ack_timeout: {written}")))
    assert flow.spec.subscribers["billing"].ack_timeout == seconds


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("5 minutes", "'5 minutes'"),
        ("-1s", "'-1s'"),
        ("1m 30s", "'1m 30s'"),
        ("nan", "'nan'"),
        ("true", "true"),
    ],
)
def test_duration_rejected(tmp_path: Path, written: str, shown: str) -> None:
    path = write(tmp_path, with_billing(f"ack_timeout: {written}"))
    assert error_lines(path) == [
        (
            f"{path}:15:18: error: invalid value {shown} for 'ack_timeout' in subscriber 'billing': "
            f"invalid duration {shown}: {DURATION_HELP}"
        )
    ]


def test_duration_negative_number(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("ack_timeout: -1"))
    assert error_lines(path) == [
        (
            f"{path}:15:18: error: invalid value -1 for 'ack_timeout' in subscriber 'billing': "
            "invalid duration -1: must not be negative"
        )
    ]


def test_duration_zero_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("ack_timeout: 0s"))
    assert error_lines(path) == [
        f"{path}:15:18: error: invalid value '0s' for 'ack_timeout' in subscriber 'billing': must be greater than 0"
    ]


@pytest.mark.parametrize(
    "lines",
    [
        ("ack_timeout: .nan",),
        ("max_wait: .nan",),
        ("handler_timeout: .nan",),
        ("retry:", "  initial: .nan"),
    ],
)
def test_duration_nan_rejected(tmp_path: Path, lines: tuple[str, ...]) -> None:
    # YAML `.nan` is a float, and NaN compares false with 0, so the `< 0` and `<= 0` checks let it through.
    path = write(tmp_path, with_billing(*lines))
    flow, found = read_flow(path)
    assert flow is None
    assert len(found) == 1
    # The error points at the line with the value: the last of the inserted lines.
    assert found[0].location.line == 14 + len(lines)


def test_duration_nan_shutdown_timeout(tmp_path: Path) -> None:
    path = write(tmp_path, "shutdown_timeout: .nan\n" + BASE_FLOW)
    flow, found = read_flow(path)
    assert flow is None
    assert [problem.location.line for problem in found] == [1]


# Duplicate keys and YAML syntax


def test_duplicate_topic(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  Orders:\n  Orders:\n")
    assert error_lines(path) == [
        f"{path}:3:3: error: duplicate key 'Orders' (first defined on line 2); remove one of them"
    ]


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_FLOW + "name: other\n")
    assert error_lines(path) == [
        f"{path}:15:1: error: duplicate key 'name' (first defined on line 1); remove one of them"
    ]


def test_duplicate_subscriber_key(tmp_path: Path) -> None:
    path = write(tmp_path, with_billing("topic: OrderBilled"))
    assert error_lines(path) == [
        f"{path}:15:5: error: duplicate key 'topic' (first defined on line 12); remove one of them"
    ]


def test_duplicate_quoted_and_plain(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  Orders:\n  'Orders':\n")
    assert error_lines(path) == [
        f"{path}:3:3: error: duplicate key 'Orders' (first defined on line 2); remove one of them"
    ]


def test_yaml_mapping_value_misplaced(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  Orders:\n    description: a: b\n")
    assert error_lines(path) == [
        f"{path}:3:19: error: invalid YAML: mapping values are not allowed here; "
        "quote a value that contains ': ', or indent the line under its key"
    ]


def test_yaml_stray_sequence_item(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  Orders:\n    description: x\n  - item\n")
    assert error_lines(path) == [
        f"{path}:4:3: error: invalid YAML: expected <block end>, but found '-'; "
        "indent the keys of one mapping, or the items of one list, by the same number of spaces"
    ]


def test_yaml_unclosed_flow_sequence(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "topics:\n  Orders:\nproducers:\n  src:\n    plugin: a:b\n    publishes: [Orders\n",
    )
    assert error_lines(path) == [
        f"{path}:7:1: error: invalid YAML: expected ',' or ']', but got '<stream end>'; "
        "close the '[' list opened earlier, or put each item on its own '- ' line"
    ]


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n\tOrders:\n")
    assert error_lines(path) == [
        f"{path}:2:1: error: invalid YAML: found character '\\t' that cannot start any token; "
        "YAML indents with spaces only, so replace the tab with spaces"
    ]


def test_yaml_second_document(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  Orders:\n---\ntopics:\n  Other:\n")
    assert error_lines(path) == [
        f"{path}:3:1: error: invalid YAML: but found another document; "
        "a flow file is one YAML document, so remove the '---' line and what follows it"
    ]


def test_yaml_recursive_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "topics: &loop\n  Orders: *loop\n")
    assert error_lines(path) == [
        f"{path}:1:9: error: invalid YAML: found unconstructable recursive node; "
        "an alias cannot refer to the mapping or list that contains it, so write the values out"
    ]


def test_crlf_positions(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_bytes(with_billing("ack_timout: 5s").replace("\n", "\r\n").encode())
    assert error_lines(path) == [
        f"{path}:15:5: error: unknown key 'ack_timout' in subscriber 'billing' (did you mean 'ack_timeout'?)"
    ]


def test_utf8_bom_accepted(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE_FLOW.encode())
    assert load(path).spec.name == "shop"


@pytest.mark.parametrize("character", ["\x00", "\x0c", "\x7f"])
def test_control_character_reported(tmp_path: Path, character: str) -> None:
    # PyYAML rejects these characters while the loader is constructed, before any parsing.
    path = write(tmp_path, f"topics:\n  Orders:{character}\n")
    flow, found = read_flow(path)
    assert flow is None
    assert len(found) == 1
    assert found[0].location.path == str(path)
    assert found[0].message.startswith("invalid YAML")


# Files that are not a flow mapping


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert error_lines(path) == [
        f"{path}:1:1: error: a flow file must be a YAML mapping with a 'topics' key, found an empty file"
    ]


def test_comment_only_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    assert error_lines(path) == [
        f"{path}:1:1: error: a flow file must be a YAML mapping with a 'topics' key, found an empty file"
    ]


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "- OrderPlaced\n- OrderBilled\n")
    assert error_lines(path) == [
        f"{path}:1:1: error: a flow file must be a YAML mapping with a 'topics' key, found a list"
    ]


def test_top_level_string(tmp_path: Path) -> None:
    path = write(tmp_path, "hello\n")
    assert error_lines(path) == [
        f"{path}:1:1: error: a flow file must be a YAML mapping with a 'topics' key, found a string"
    ]


def test_topics_as_list(tmp_path: Path) -> None:
    path = write(tmp_path, "topics: [OrderPlaced, OrderBilled]\n")
    assert error_lines(path) == [
        (
            f"{path}:1:9: error: invalid value (a list) for 'topics' at the top level of the flow: "
            "Input should be a valid dictionary"
        )
    ]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_bytes(b"topics:\n  Caf\xe9:\n")
    assert error_lines(path) == [f"{path}: error: flow file is not valid UTF-8 (byte 13)"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert error_lines(path) == [f"{path}: error: flow file not found; check the path"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert error_lines(tmp_path) == [f"{tmp_path}: error: is a directory; pass a flow file (.yaml)"]


# The partial flow that validate checks references on despite schema errors


def partial_of(path: Path) -> LoadedFlow | None:
    reading = read_flow_file(path)
    assert reading.flow is None
    assert reading.problems != []
    return reading.partial_flow()


def test_partial_flow_drops_invalid_setting(tmp_path: Path) -> None:
    partial = partial_of(write(tmp_path, with_billing("ack_timout: 5s", "max_deliveries: many")))
    assert partial is not None
    billing = partial.spec.subscribers["billing"]
    assert billing.max_deliveries == 5
    assert billing.plugin == "orders.billing"
    assert billing.publishes == ["OrderBilled"]
    assert partial.locate_value("subscribers", "billing", "plugin").line == 13


def test_partial_flow_keeps_invalid_topic(tmp_path: Path) -> None:
    # Leaving the topic out would turn every reference to it undeclared.
    text = BASE_FLOW.replace("  OrderPlaced:\n", "  OrderPlaced: [a, list]\n")
    partial = partial_of(write(tmp_path, text))
    assert partial is not None
    assert list(partial.spec.topics) == ["OrderPlaced", "OrderBilled"]
    assert partial.spec.topics["OrderPlaced"].max_pending == 10_000


def test_partial_flow_drops_entry_without_topic(tmp_path: Path) -> None:
    # An invalid topic value is removed first, so the subscriber then lacks its topic.
    text = BASE_FLOW.replace("    topic: OrderPlaced\n", "    topic: [OrderPlaced]\n")
    partial = partial_of(write(tmp_path, text))
    assert partial is not None
    assert partial.spec.subscribers == {}
    assert list(partial.spec.producers) == ["replay"]


@pytest.mark.parametrize("text", [
    "name: shop\n",
    "topics: [OrderPlaced, OrderBilled]\n",
    "topics:\n  yes:\n",
    "- OrderPlaced\n",
])
def test_partial_flow_none_without_topics(tmp_path: Path, text: str) -> None:
    assert partial_of(write(tmp_path, text)) is None


def test_partial_flow_none_unread_file(tmp_path: Path) -> None:
    reading = read_flow_file(tmp_path / "absent.yaml")
    assert reading.file_read is False
    assert reading.partial_flow() is None


# ${ENV} expansion


def test_env_reference_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRUN_TEST_NAME", "shop-eu")
    path = write(tmp_path, BASE_FLOW.replace("name: shop", "name: ${FLOWRUN_TEST_NAME}"))
    assert load(path).spec.name == "shop-eu"


def test_env_default_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWRUN_TEST_NAME", raising=False)
    path = write(
        tmp_path, BASE_FLOW.replace("name: shop", "name: ${FLOWRUN_TEST_NAME:shop-default}")
    )
    assert load(path).spec.name == "shop-default"


def test_env_set_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRUN_TEST_NAME", "shop-eu")
    path = write(
        tmp_path, BASE_FLOW.replace("name: shop", "name: ${FLOWRUN_TEST_NAME:shop-default}")
    )
    assert load(path).spec.name == "shop-eu"


def test_env_empty_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWRUN_TEST_TEXT", raising=False)
    path = write(tmp_path, "topics:\n  Orders:\n    description: ${FLOWRUN_TEST_TEXT:}\n")
    assert load(path).spec.topics["Orders"].description == ""


def test_env_inside_longer_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRUN_TEST_REGION", "eu")
    monkeypatch.delenv("FLOWRUN_TEST_ZONE", raising=False)
    text = 'topics:\n  Orders:\n    description: "orders in ${FLOWRUN_TEST_REGION}/${FLOWRUN_TEST_ZONE:a}"\n'
    path = write(tmp_path, text)
    assert load(path).spec.topics["Orders"].description == "orders in eu/a"


def test_env_value_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRUN_TEST_PENDING", "25")
    path = write(tmp_path, "topics:\n  Orders:\n    max_pending: ${FLOWRUN_TEST_PENDING}\n")
    assert load(path).spec.topics["Orders"].max_pending == 25


def test_env_duration_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWRUN_TEST_TIMEOUT", raising=False)
    path = write(tmp_path, with_billing("ack_timeout: ${FLOWRUN_TEST_TIMEOUT:250ms}"))
    assert load(path).spec.subscribers["billing"].ack_timeout == 0.25


def test_env_unset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWRUN_TEST_NAME", raising=False)
    path = write(tmp_path, BASE_FLOW.replace("name: shop", "name: ${FLOWRUN_TEST_NAME}"))
    assert error_lines(path) == [
        (
            f"{path}:1:7: error: environment variable 'FLOWRUN_TEST_NAME' is not set; "
            "set it or write ${FLOWRUN_TEST_NAME:default}"
        )
    ]


def test_env_unset_in_plugin_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWRUN_TEST_URL", raising=False)
    path = write(tmp_path, with_billing("with:", "  url: ${FLOWRUN_TEST_URL}"))
    assert error_lines(path) == [
        (
            f"{path}:16:12: error: environment variable 'FLOWRUN_TEST_URL' is not set; "
            "set it or write ${FLOWRUN_TEST_URL:default}"
        )
    ]


# Safe loading


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!python/object:os.system {}", "tag:yaml.org,2002:python/object:os.system"),
        ("!!python/name:os.system", "tag:yaml.org,2002:python/name:os.system"),
        ("!custom {}", "!custom"),
    ],
)
def test_tag_rejected(tmp_path: Path, value: str, tag: str) -> None:
    path = write(tmp_path, f"topics: {value}\n")
    assert error_lines(path) == [
        f"{path}:1:9: error: invalid YAML: could not determine a constructor for the tag '{tag}'; "
        "flow files are plain YAML, so remove the tag"
    ]


def test_apply_tag_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = write(tmp_path, f"topics: !!python/object/apply:os.system ['touch {marker}']\n")
    assert error_lines(path) == [
        (
            f"{path}:1:9: error: invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'; flow files are plain YAML, so remove the tag"
        )
    ]
    assert not marker.exists()


# Defaults


def test_null_topic_body_defaults(tmp_path: Path) -> None:
    topic = load(write(tmp_path, BASE_FLOW)).spec.topics["OrderPlaced"]
    assert topic.description == ""
    assert topic.max_pending == 10_000
    assert topic.on_full is OnFull.BLOCK


def test_subscriber_defaults(tmp_path: Path) -> None:
    billing = load(write(tmp_path, BASE_FLOW)).spec.subscribers["billing"]
    assert billing.ack is AckPolicy.AUTO
    assert billing.mode is DeliveryMode.PUSH
    assert billing.ack_timeout == 30.0
    assert billing.max_deliveries == 5
    assert billing.dead_letter is None
    assert billing.concurrency == 1
    assert billing.max_in_flight is None
    assert billing.effective_max_in_flight == 1000
    assert billing.batch_size == 10
    assert billing.max_wait == 1.0
    assert billing.handler_timeout is None
    assert billing.with_ == {}


def test_retry_defaults(tmp_path: Path) -> None:
    retry = load(write(tmp_path, BASE_FLOW)).spec.subscribers["billing"].retry
    assert retry.initial == 0.1
    assert retry.multiplier == 2.0
    assert retry.max == 30.0
    assert retry.jitter == 0.0


def test_flow_defaults(tmp_path: Path) -> None:
    spec = load(write(tmp_path, "topics:\n  Orders:\n")).spec
    assert spec.name == "flow"
    assert spec.description == ""
    assert spec.allow_cycles is False
    assert spec.max_hops == 32
    assert spec.shutdown_timeout == 10.0
    assert spec.producers == {}
    assert spec.subscribers == {}


def test_positions_recorded(tmp_path: Path) -> None:
    flow = load(write(tmp_path, BASE_FLOW))
    assert str(flow.locate("subscribers", "billing", "topic")) == f"{flow.display_path}:12:5"
    assert str(flow.locate_value("subscribers", "billing", "topic")) == f"{flow.display_path}:12:12"
    assert str(flow.locate("producers", "replay", "publishes", 0)) == f"{flow.display_path}:9:17"
