"""Topic schemas: publish-time checks, typed handlers, and the schema checks of `flowrun validate`.

Runs use real flow files and plugin modules in tmp_path and the default SQLite broker
(tmp_path/.flowrun). The flow file's folder goes on sys.path, so every plugin module gets a
unique name: Python's import cache would otherwise hand one test another test's module.
Plugins record what they received in module-level lists, read back through sys.modules.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from flowrun.brokers import BROKER_URL_VARIABLE
from flowrun.errors import FlowrunError
from flowrun.inspect_cli import with_broker
from flowrun.loader import load_flow
from flowrun.runtime import RunResult, run_flow

RUN_TIMEOUT = 60.0
SUBPROCESS_TIMEOUT = 60
ORDER_PLACED = "flowrun_plugins.orders.schemas:OrderPlaced"
# The JSON Schema equivalent of the pydantic model ORDER_MODEL below.
ORDER_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["invoice", "amount"],
    "properties": {"invoice": {"type": "string"}, "amount": {"type": "integer"}},
}
ORDER_MODEL = """\
from pydantic import BaseModel


class Order(BaseModel):
    invoice: str
    amount: int
"""
# pydantic 2 error text for the string 'lots' given to an int field.
INT_PARSING_ERROR = "Input should be a valid integer"


@pytest.fixture(autouse=True)
def no_broker_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # FLOWRUN_BROKER_URL would replace the SQLite broker each flow uses by default.
    monkeypatch.delenv(BROKER_URL_VARIABLE, raising=False)


def write_module(folder: Path, stem: str, source: str) -> str:
    """Write a Python module under a unique name and return that name."""
    name = f"{stem}_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    importlib.invalidate_caches()
    return name


def write_flow(folder: Path, text: str, name: str = "flow.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


async def run_until_drained(path: Path) -> RunResult:
    return await asyncio.wait_for(run_flow(load_flow(path), until_drained=True), RUN_TIMEOUT)


async def dead_letters(path: Path) -> list[dict[str, Any]]:
    """Read the flow broker's dead letters the way `flowrun dlq list` does."""
    return await with_broker(load_flow(path), lambda broker: broker.dead_letters(None))


def recorded(module_name: str) -> list[Any]:
    return sys.modules[module_name].RECEIVED


def run_flowrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the flowrun CLI and fail the test if it printed a Python traceback."""
    environment = {name: value for name, value in os.environ.items() if name != BROKER_URL_VARIABLE}
    result = subprocess.run(
        [sys.executable, "-m", "flowrun.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result


# Producers publishing to a topic with a schema

RECORDER = """\
RECEIVED = []


def record(message, context):
    RECEIVED.append(message.payload)
"""


# Producer bodies of each shape the runtime accepts; PAYLOADS is defined above them.
PRODUCER_STYLES = {
    "iterator": """\
def produce(context):
    return iter(PAYLOADS)
""",
    "generator": """\
def produce(context):
    yield from PAYLOADS
""",
    "async-generator": """\
async def produce(context):
    for payload in PAYLOADS:
        yield payload
""",
}


def producer_module(folder: Path, payloads: list[dict[str, Any]], style: str = "iterator") -> str:
    return write_module(folder, "source", f"PAYLOADS = {payloads!r}\n\n\n{PRODUCER_STYLES[style]}")


def producer_flow(folder: Path, schema: str, producer: str, recorder: str) -> Path:
    return write_flow(folder, f"""\
        name: shop
        topics:
          Orders:
            schema: {schema}
        producers:
          source:
            plugin: {producer}:produce
            publishes: [Orders]
        subscribers:
          audit:
            topic: Orders
            plugin: {recorder}:record
        """)


VALID_ORDERS = [{"invoice": "1", "amount": 1}, {"invoice": "2", "amount": 2}]
# The third payload fails the schema; the fourth is valid but comes after the failure.
ORDERS_WITH_BAD_AMOUNT = [*VALID_ORDERS, {"invoice": "3", "amount": "lots"}, {"invoice": "4", "amount": 4}]
ORDERS_WITH_MISSING_AMOUNT = [*VALID_ORDERS, {"invoice": "3"}, {"invoice": "4", "amount": 4}]


@pytest.mark.parametrize("style", list(PRODUCER_STYLES))
@pytest.mark.parametrize(
    ("payloads", "detail"),
    [
        (ORDERS_WITH_BAD_AMOUNT, f"field 'amount': {INT_PARSING_ERROR}"),
        (ORDERS_WITH_MISSING_AMOUNT, "field 'amount': Field required"),
    ],
    ids=["wrong-type", "missing-field"],
)
async def test_model_schema_stops_producer(
    tmp_path: Path, payloads: list[dict[str, Any]], detail: str, style: str
) -> None:
    # The two valid payloads before the invalid one are stored; nothing from it on is.
    models = write_module(tmp_path, "models", ORDER_MODEL)
    producer = producer_module(tmp_path, payloads, style)
    recorder = write_module(tmp_path, "recorder", RECORDER)
    path = producer_flow(tmp_path, f"{models}:Order", producer, recorder)

    result = await run_until_drained(path)

    assert result.failures == [
        f"producer 'source' failed: PayloadError: payload for topic 'Orders' does not match {models}:Order: {detail}"
    ]
    assert result.report["topics"]["Orders"]["published"] == 2
    assert recorded(recorder) == VALID_ORDERS


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize(
    ("payloads", "detail"),
    [
        (ORDERS_WITH_BAD_AMOUNT, "field 'amount': 'lots' is not of type 'integer'"),
        # jsonschema reports a missing property at the object that lacks it.
        (ORDERS_WITH_MISSING_AMOUNT, "field '(payload)': 'amount' is a required property"),
    ],
    ids=["wrong-type", "missing-field"],
)
async def test_json_schema_stops_producer(
    tmp_path: Path, suffix: str, payloads: list[dict[str, Any]], detail: str
) -> None:
    schema_name = f"order.schema{suffix}"
    # JSON is a subset of YAML, so one text serves both file types.
    (tmp_path / schema_name).write_text(json.dumps(ORDER_JSON_SCHEMA), encoding="utf-8")
    # An async producer publishes one payload at a time; test_model_schema_stops_producer covers the others.
    producer = producer_module(tmp_path, payloads, "async-generator")
    recorder = write_module(tmp_path, "recorder", RECORDER)
    path = producer_flow(tmp_path, schema_name, producer, recorder)

    result = await run_until_drained(path)

    assert result.failures == [
        f"producer 'source' failed: PayloadError: payload for topic 'Orders' does not match {schema_name}: {detail}"
    ]
    assert result.report["topics"]["Orders"]["published"] == 2
    assert recorded(recorder) == VALID_ORDERS


async def test_yaml_schema_file_written_as_yaml(tmp_path: Path) -> None:
    (tmp_path / "order.schema.yml").write_text(
        "type: object\nrequired: [invoice, amount]\nproperties:\n"
        "  invoice: {type: string}\n  amount: {type: integer}\n",
        encoding="utf-8",
    )
    producer = producer_module(tmp_path, ORDERS_WITH_BAD_AMOUNT, "async-generator")
    recorder = write_module(tmp_path, "recorder", RECORDER)
    path = producer_flow(tmp_path, "order.schema.yml", producer, recorder)

    result = await run_until_drained(path)

    assert result.failures == [
        "producer 'source' failed: PayloadError: payload for topic 'Orders' does not match order.schema.yml: "
        "field 'amount': 'lots' is not of type 'integer'"
    ]
    assert result.report["topics"]["Orders"]["published"] == 2


async def test_valid_payloads_all_published(tmp_path: Path) -> None:
    models = write_module(tmp_path, "models", ORDER_MODEL)
    producer = producer_module(tmp_path, VALID_ORDERS)
    recorder = write_module(tmp_path, "recorder", RECORDER)
    path = producer_flow(tmp_path, f"{models}:Order", producer, recorder)

    result = await run_until_drained(path)

    assert result.failures == []
    assert result.report["topics"]["Orders"]["published"] == 2
    assert recorded(recorder) == VALID_ORDERS


async def test_unreadable_schema_stops_run(tmp_path: Path) -> None:
    producer = producer_module(tmp_path, VALID_ORDERS)
    recorder = write_module(tmp_path, "recorder", RECORDER)
    path = producer_flow(tmp_path, "absent.json", producer, recorder)

    with pytest.raises(FlowrunError) as raised:
        await run_until_drained(path)

    assert str(raised.value) == (
        f"{path}:4:13: error: cannot read schema file {tmp_path / 'absent.json'}: No such file or directory"
    )


# Handlers publishing to a topic with a schema

# Each handler publishes an amount that is not an integer to Billed, whose schema is Order.
FORWARDERS = {
    "sync": """\
        def forward(message, context):
            context.publish("Billed", {"invoice": message.payload["invoice"], "amount": "lots"})
        """,
    "async-awaited": """\
        async def forward(message, context):
            await context.publish("Billed", {"invoice": message.payload["invoice"], "amount": "lots"})
        """,
    "async-not-awaited": """\
        async def forward(message, context):
            context.publish("Billed", {"invoice": message.payload["invoice"], "amount": "lots"})
        """,
}


@pytest.mark.parametrize("style", list(FORWARDERS))
async def test_invalid_publish_dead_letters_input(tmp_path: Path, style: str) -> None:
    models = write_module(tmp_path, "models", ORDER_MODEL)
    producer = producer_module(tmp_path, [{"invoice": "1"}])
    forwarder = write_module(tmp_path, "forwarder", FORWARDERS[style])
    path = write_flow(tmp_path, f"""\
        name: shop
        topics:
          Orders:
          Billed:
            schema: {models}:Order
          Failed:
        producers:
          source:
            plugin: {producer}:produce
            publishes: [Orders]
        subscribers:
          billing:
            topic: Orders
            plugin: {forwarder}:forward
            publishes: [Billed]
            max_deliveries: 5
            dead_letter: Failed
        """)

    result = await run_until_drained(path)
    letters = await dead_letters(path)

    counts = result.report["subscriptions"]["billing"]
    assert result.failures == []
    assert counts["delivered"] == 1
    assert counts["redelivered"] == 0
    assert counts["dead_lettered"] == 1
    assert result.report["topics"]["Billed"]["published"] == 0
    assert result.report["topics"]["Failed"]["published"] == 1
    assert len(letters) == 1
    headers = letters[0]["headers"]
    assert headers["flowrun.delivery_count"] == "1"
    assert headers["flowrun.error_type"] == "flowrun.errors.PayloadError"
    assert headers["flowrun.error"] == (
        f"payload for topic 'Billed' does not match {models}:Order: field 'amount': {INT_PARSING_ERROR}"
    )


# Handlers annotated with a pydantic model

TYPED_HANDLERS = {
    "function": """\
        from {models} import Order

        RECEIVED = []


        def handle(order: Order, context) -> None:
            RECEIVED.append(order)
        """,
    "async-function": """\
        from {models} import Order

        RECEIVED = []


        async def handle(order: Order) -> None:
            RECEIVED.append(order)
        """,
    "class": """\
        from {models} import Order

        RECEIVED = []


        class Handle:
            def handle(self, order: Order, context) -> None:
                RECEIVED.append(order)
        """,
}
TYPED_SOURCE = """\
from flowrun import Outgoing


def produce(context):
    yield Outgoing("Orders", {"invoice": "1", "amount": 7}, id="good-1")
    yield Outgoing("Orders", {"invoice": "2", "amount": "lots"}, id="bad-2")
"""


@pytest.mark.parametrize("shape", list(TYPED_HANDLERS))
async def test_typed_handler_gets_model(tmp_path: Path, shape: str) -> None:
    models = write_module(tmp_path, "models", ORDER_MODEL)
    producer = write_module(tmp_path, "source", TYPED_SOURCE)
    handler = write_module(tmp_path, "typed", TYPED_HANDLERS[shape].format(models=models))
    attribute = "Handle" if shape == "class" else "handle"
    path = write_flow(tmp_path, f"""\
        name: shop
        topics:
          Orders:
          Failed:
        producers:
          source:
            plugin: {producer}:produce
            publishes: [Orders]
        subscribers:
          typed:
            topic: Orders
            plugin: {handler}:{attribute}
            max_deliveries: 5
            dead_letter: Failed
        """)

    result = await run_until_drained(path)
    letters = await dead_letters(path)

    received = recorded(handler)
    order_class = sys.modules[models].Order
    assert result.failures == []
    assert len(received) == 1
    assert type(received[0]) is order_class
    assert received[0].invoice == "1"
    assert received[0].amount == 7
    assert result.report["subscriptions"]["typed"]["acked"] == 1
    assert result.report["subscriptions"]["typed"]["dead_lettered"] == 1
    assert result.report["subscriptions"]["typed"]["redelivered"] == 0
    assert len(letters) == 1
    headers = letters[0]["headers"]
    assert letters[0]["message_id"] == "bad-2"
    assert headers["flowrun.delivery_count"] == "1"
    assert headers["flowrun.error_type"] == "flowrun.errors.PayloadError"
    assert headers["flowrun.error"] == (
        "message bad-2 on topic 'Orders' does not match Order, the input type of subscriber 'typed': "
        f"field 'amount': {INT_PARSING_ERROR}"
    )


# `flowrun validate`: schemas along the edges of the graph

BILLING_PLUGINS = """\
from pydantic import BaseModel

from flowrun_plugins.orders.schemas import OrderLine, Source


class Charge(BaseModel):
    invoice: str
    amount: str


class NumericInvoice(BaseModel):
    invoice: int


class InvoiceOnly(BaseModel):
    invoice: str


class PartialOrder(BaseModel):
    # OrderPlaced without its required field 'country'.
    invoice: str
    customer_id: str | None
    placed_at: str
    lines: list[OrderLine]
    source: Source


class FullOrder(PartialOrder):
    country: str


class Billing:
    def handle(self, order: Charge, context) -> None:
        return None


class NumericBilling:
    def handle(self, order: NumericInvoice, context) -> None:
        return None


class InvoiceBilling:
    def handle(self, order: InvoiceOnly, context) -> None:
        return None


class PartialReplay:
    produces = {"OrderPlaced": PartialOrder}

    def run(self, context):
        return iter(())


class FullReplay:
    produces = {"OrderPlaced": FullOrder}

    def run(self, context):
        return iter(())


class PartialForwarder:
    produces = {"OrderPlaced": PartialOrder}

    def handle(self, message, context) -> None:
        return None


def produce(context):
    return iter(())


def handle(message, context) -> None:
    return None
"""
# The producer's `plugin` is on line 7, and the subscriber's `topic`, `plugin` and `ack` are on lines 11 to 13.
BILLING_FLOW = """\
name: shop
topics:
  OrderPlaced:
    schema: {schema}
producers:
  replay:
    plugin: {producer}
    publishes: [OrderPlaced]
subscribers:
  billing:
    topic: OrderPlaced
    plugin: {handler}
    ack: {ack}
"""


def write_billing_flow(
    folder: Path,
    handler: str = "billing_plugins:handle",
    producer: str = "billing_plugins:produce",
    ack: str = "auto",
    schema: str = ORDER_PLACED,
) -> Path:
    (folder / "billing_plugins.py").write_text(BILLING_PLUGINS, encoding="utf-8")
    text = BILLING_FLOW.format(schema=schema, producer=producer, handler=handler, ack=ack)
    return write_flow(folder, text)


@pytest.mark.slow
def test_validate_matching_models_pass(tmp_path: Path) -> None:
    write_billing_flow(tmp_path, handler="billing_plugins:InvoiceBilling", producer="billing_plugins:FullReplay")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == "flow.yaml: valid\n"


@pytest.mark.slow
def test_validate_missing_input_field(tmp_path: Path) -> None:
    write_billing_flow(tmp_path, handler="billing_plugins:Billing")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "flow.yaml:11:12: error: subscriber 'billing' expects Charge but topic 'OrderPlaced' "
        f"({ORDER_PLACED}) does not guarantee it: field 'amount' is required but not provided\n"
    )


@pytest.mark.slow
def test_validate_input_type_clash(tmp_path: Path) -> None:
    write_billing_flow(tmp_path, handler="billing_plugins:NumericBilling")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "flow.yaml:11:12: error: subscriber 'billing' expects NumericInvoice but topic 'OrderPlaced' "
        f"({ORDER_PLACED}) does not guarantee it: field 'invoice' is string but integer is expected\n"
    )


@pytest.mark.slow
def test_validate_producer_produces(tmp_path: Path) -> None:
    write_billing_flow(tmp_path, producer="billing_plugins:PartialReplay")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "flow.yaml:7:13: error: producer 'replay' publishes PartialOrder to topic 'OrderPlaced', which does "
        f"not fit the topic's schema ({ORDER_PLACED}): field 'country' is required but not provided\n"
    )


@pytest.mark.slow
def test_validate_subscriber_produces(tmp_path: Path) -> None:
    # The forwarder consumes and publishes OrderPlaced, a cycle, so the flow allows cycles.
    path = write_billing_flow(tmp_path, handler="billing_plugins:PartialForwarder")
    path.write_text(
        "allow_cycles: true\n" + path.read_text(encoding="utf-8") + "    publishes: [OrderPlaced]\n",
        encoding="utf-8",
    )
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "flow.yaml:13:13: error: subscriber 'billing' publishes PartialOrder to topic 'OrderPlaced', which "
        f"does not fit the topic's schema ({ORDER_PLACED}): field 'country' is required but not provided\n"
    )


@pytest.mark.slow
def test_validate_typed_explicit_ack(tmp_path: Path) -> None:
    write_billing_flow(tmp_path, handler="billing_plugins:InvoiceBilling", ack="explicit")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "flow.yaml:13:10: error: subscriber 'billing' receives a parsed InvoiceOnly, which cannot be acked; "
        "annotate the parameter as flowrun.Message or use ack: auto\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            "nosuch.module:Model",
            "schema of topic 'OrderPlaced': module 'nosuch' not found; install the package that provides it, "
            "or put the module next to the flow file",
        ),
        (
            "billing_plugins:Missing",
            "schema of topic 'OrderPlaced': 'billing_plugins' has no attribute 'Missing'",
        ),
        (
            "billing_plugins:produce",
            "schema of topic 'OrderPlaced': 'billing_plugins:produce' is not a pydantic model class",
        ),
    ],
    ids=["module-missing", "attribute-missing", "not-a-model"],
)
def test_validate_schema_reference_invalid(tmp_path: Path, schema: str, message: str) -> None:
    write_billing_flow(tmp_path, schema=schema)
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"flow.yaml:4:13: error: {message}\n"


# Each case: the schema file's name, its text (None: the file is absent) and the message.
BROKEN_SCHEMA_FILES = [
    ("absent.json", None, "cannot read schema file {folder}/absent.json: No such file or directory"),
    (
        "broken.json",
        '{"type": ',
        "schema file {folder}/broken.json is not valid JSON: Expecting value: line 1 column 10 (char 9)",
    ),
    (
        "objekt.json",
        '{"type": "objekt"}',
        "schema file {folder}/objekt.json is not a valid JSON Schema: "
        "'objekt' is not valid under any of the given schemas",
    ),
    (
        "list.yaml",
        "- type: object\n",
        "schema file {folder}/list.yaml must contain a JSON Schema object",
    ),
]
BROKEN_SCHEMA_IDS = ["missing", "invalid-json", "invalid-schema", "not-an-object"]


def write_schema_file(folder: Path, name: str, text: str | None) -> None:
    if text is not None:
        (folder / name).write_text(text, encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "text", "message"), BROKEN_SCHEMA_FILES, ids=BROKEN_SCHEMA_IDS)
def test_validate_schema_file_invalid(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    write_schema_file(tmp_path, name, text)
    write_billing_flow(tmp_path, schema=name)
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"flow.yaml:4:13: error: {message.format(folder=tmp_path)}\n"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "text", "message"), BROKEN_SCHEMA_FILES, ids=BROKEN_SCHEMA_IDS)
def test_no_import_checks_schema_file(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    write_schema_file(tmp_path, name, text)
    write_billing_flow(tmp_path, schema=name)
    result = run_flowrun("validate", "--no-import", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"flow.yaml:4:13: error: {message.format(folder=tmp_path)}\n"


@pytest.mark.slow
def test_no_import_skips_models(tmp_path: Path) -> None:
    write_billing_flow(tmp_path, handler="billing_plugins:Billing", schema="nosuch.module:Model")
    result = run_flowrun("validate", "--no-import", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == "flow.yaml: valid\n"


@pytest.mark.slow
def test_valid_schema_file_passes(tmp_path: Path) -> None:
    (tmp_path / "order.schema.json").write_text(json.dumps(ORDER_JSON_SCHEMA), encoding="utf-8")
    write_billing_flow(tmp_path, schema="order.schema.json")
    result = run_flowrun("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == ""
