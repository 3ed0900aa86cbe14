"""Tests of the orders example plugins on the real data files, with no broker.

Expected counts are computed independently from the CSV files with the `csv` module and
also written out, so that a change of the data files shows up as well. Handlers run
against small stand-ins for the message and context that implement the plugin API.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import logging
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flowrun.loader import load_flow
from flowrun.runtime import run_flow
from flowrun_plugins.orders.billing import Billing, charge_request
from flowrun_plugins.orders.errors import InvalidOptionError, InvalidPayloadError
from flowrun_plugins.orders.events import InvoiceKind, ReplayTopics, classify_invoice
from flowrun_plugins.orders.gateway import (
    ChargeDecision,
    GatewaySettings,
    GatewayUnavailable,
    PaymentGateway,
)
from flowrun_plugins.orders.inventory import Inventory, Restock
from flowrun_plugins.orders.invoices import GroupingStats, Invoice, InvoiceLine, group_invoices
from flowrun_plugins.orders.money import invoice_total
from flowrun_plugins.orders.replay import FileReplay, ReplayOptions, invoice_messages
from flowrun_plugins.orders.sources import COLUMNS, SourceError, expand_paths
from flowrun_plugins.orders.status import OrderStatus, StatusEvent, status_update, topic_states
from flowrun_plugins.orders.status_store import OrderStatusStore
from flowrun_plugins.orders.stock import reservation_demand, restock_supply
from flowrun_plugins.orders.stock_store import StockStore

REPOSITORY = Path(__file__).resolve().parent.parent
DATA = REPOSITORY / "data" / "orders"
SAMPLE = DATA / "sample.csv"
FEBRUARY_2011 = DATA / "online_retail_2011-02.csv.gz"
HEADER = ",".join(COLUMNS)


# Independent reading of the CSV files


def read_csv(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def expected_topics(rows: list[dict[str, str]]) -> Counter[str]:
    """Route each distinct InvoiceNo by its prefix and the sign of its quantities."""
    quantities: dict[str, list[int]] = {}
    for row in rows:
        quantities.setdefault(row["InvoiceNo"], []).append(int(row["Quantity"]))

    topics: Counter[str] = Counter()
    for invoice, values in quantities.items():
        if invoice.startswith("C"):
            topics["OrderCancelled"] += 1
        elif invoice.startswith("A") or all(value < 0 for value in values):
            topics["InvoiceAdjusted"] += 1
        else:
            topics["OrderPlaced"] += 1
    return topics


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    return path


# Stand-ins for the plugin API


class FakeClock:
    """Clock whose sleeps only advance its time and are recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeContext:
    """Context with the documented attributes; `publish` records instead of sending."""

    def __init__(
        self,
        folder: Path,
        options: dict[str, Any] | None = None,
        publishes: tuple[str, ...] = (),
        journal: list[tuple[str, str]] | None = None,
    ) -> None:
        self.name = "test"
        self.options = dict(options or {})
        self.publishes = publishes
        self.logger = logging.getLogger("test")
        self.clock = FakeClock()
        self.flow_path = folder / "flow.yaml"
        self.stopping = asyncio.Event()
        self.published: list[dict[str, Any]] = []
        self.journal = journal if journal is not None else []

    def resolve_path(self, value: str | Path) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.flow_path.parent / path

    def publish(
        self,
        topic: str,
        payload: Any,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        id: str | None = None,
    ) -> Any:
        if topic not in self.publishes:
            raise AssertionError(f"publish to undeclared topic {topic}")

        self.published.append({"topic": topic, "payload": payload, "key": key, "id": id})
        self.journal.append(("publish", topic))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return id

        future: asyncio.Future[str | None] = loop.create_future()
        future.set_result(id)
        return future


class FakeMessage:
    """Message with the documented attributes; settling is recorded."""

    def __init__(
        self,
        payload: Any,
        topic: str = "OrderPlaced",
        headers: dict[str, str] | None = None,
        delivery_count: int = 1,
        journal: list[tuple[str, str]] | None = None,
    ) -> None:
        self.id = f"message-{id(self)}"
        self.topic = topic
        self.payload = payload
        self.key = payload.get("invoice") if isinstance(payload, dict) else None
        self.headers = headers or {}
        self.delivery_count = delivery_count
        self.settled: str | None = None
        self.error: BaseException | None = None
        self.journal = journal if journal is not None else []

    def ack(self) -> None:
        self.settled = self.settled or "ack"
        self.journal.append(("ack", self.id))

    def nack(self, delay: float | None = None, error: BaseException | None = None) -> None:
        self.settled = self.settled or "nack"

    def reject(self, error: BaseException | None = None) -> None:
        self.settled = self.settled or "reject"
        self.error = error


def order_payload(
    invoice: str, lines: list[tuple[str, int, str]], customer_id: str | None = "17850"
) -> dict[str, Any]:
    return {
        "invoice": invoice,
        "customer_id": customer_id,
        "country": "United Kingdom",
        "placed_at": "2010-12-01T08:26:00",
        "lines": [
            {"stock_code": code, "description": None, "quantity": quantity, "unit_price": price}
            for code, quantity, price in lines
        ],
        "source": {"file": "test.csv", "row": 1},
    }


# FileReplay: grouping, routing and payloads


def test_sample_invoices_published_once() -> None:
    rows = read_csv(SAMPLE)
    expected = list(dict.fromkeys(row["InvoiceNo"] for row in rows))

    messages = list(invoice_messages([SAMPLE], ReplayTopics()))

    assert [message.key for message in messages] == expected
    assert len(messages) == 25
    assert [message.id for message in messages] == [f"invoice-{number}" for number in expected]


def test_sample_topics_match_csv() -> None:
    messages = list(invoice_messages([SAMPLE], ReplayTopics()))
    topics = Counter(message.topic for message in messages)

    assert topics == expected_topics(read_csv(SAMPLE))
    assert topics == Counter({"OrderPlaced": 23, "OrderCancelled": 2})


def test_sample_lines_match_rows() -> None:
    rows = read_csv(SAMPLE)
    messages = list(invoice_messages([SAMPLE], ReplayTopics()))
    lines = [line for message in messages for line in message.payload["lines"]]

    assert len(lines) == len(rows) == 200
    for line, row in zip(lines, rows, strict=True):
        assert line["stock_code"] == row["StockCode"]
        assert line["quantity"] == int(row["Quantity"])
        assert Decimal(line["unit_price"]) == Decimal(row["UnitPrice"])


def test_first_sample_invoice_payload() -> None:
    message = next(invoice_messages([SAMPLE], ReplayTopics()))

    assert message.topic == "OrderPlaced"
    assert message.key == "536365"
    assert message.id == "invoice-536365"
    assert message.payload == {
        "invoice": "536365",
        "customer_id": "17850",
        "country": "United Kingdom",
        "placed_at": "2010-12-01T08:26:00",
        "lines": [
            {
                "stock_code": "85123A",
                "description": "WHITE HANGING HEART T-LIGHT HOLDER",
                "quantity": 6,
                "unit_price": "2.55",
            },
            {
                "stock_code": "71053",
                "description": "WHITE METAL LANTERN",
                "quantity": 6,
                "unit_price": "3.39",
            },
            {
                "stock_code": "84406B",
                "description": "CREAM CUPID HEARTS COAT HANGER",
                "quantity": 8,
                "unit_price": "2.75",
            },
            {
                "stock_code": "84029G",
                "description": "KNITTED UNION FLAG HOT WATER BOTTLE",
                "quantity": 6,
                "unit_price": "3.39",
            },
            {
                "stock_code": "84029E",
                "description": "RED WOOLLY HOTTIE WHITE HEART.",
                "quantity": 6,
                "unit_price": "3.39",
            },
            {
                "stock_code": "22752",
                "description": "SET 7 BABUSHKA NESTING BOXES",
                "quantity": 2,
                "unit_price": "7.65",
            },
            {
                "stock_code": "21730",
                "description": "GLASS STAR FROSTED T-LIGHT HOLDER",
                "quantity": 6,
                "unit_price": "4.25",
            },
        ],
        "source": {"file": "sample.csv", "row": 1},
    }


def test_sample_cancellation_payload() -> None:
    messages = {message.key: message for message in invoice_messages([SAMPLE], ReplayTopics())}
    cancellation = messages["C536379"]

    assert cancellation.topic == "OrderCancelled"
    assert cancellation.payload["kind"] == "cancellation"
    assert cancellation.payload["source"] == {"file": "sample.csv", "row": 142}
    assert cancellation.payload["lines"] == [
        {"stock_code": "D", "description": "Discount", "quantity": -1, "unit_price": "27.5"}
    ]
    assert "kind" not in messages["536365"].payload


def test_split_invoice_published_once() -> None:
    rows = read_csv(FEBRUARY_2011)
    split_rows = [number for number, row in enumerate(rows, 1) if row["InvoiceNo"] == "542806"]
    distinct = list(dict.fromkeys(row["InvoiceNo"] for row in rows))

    messages = list(invoice_messages([FEBRUARY_2011], ReplayTopics()))
    keys = [message.key for message in messages]
    split = messages[keys.index("542806")]

    assert keys == distinct
    assert keys.count("542806") == 1
    assert len(split.payload["lines"]) == len(split_rows) == 39
    assert split.payload["source"]["row"] == split_rows[0]
    assert keys.index("542806") < keys.index("C542805")


def test_invoice_spanning_two_files(tmp_path: Path) -> None:
    first = write_csv(
        tmp_path / "a.csv",
        [
            "100,10001,ONE,1,2011-01-31 23:59:00,1.5,12345,United Kingdom",
            "101,10002,TWO,2,2011-01-31 23:59:00,2.5,12346,France",
        ],
    )
    second = write_csv(
        tmp_path / "b.csv",
        [
            "101,10003,THREE,3,2011-02-01 00:00:00,3.5,12346,France",
            "102,10004,FOUR,4,2011-02-01 00:05:00,4.5,,United Kingdom",
        ],
    )

    invoices = list(group_invoices([first, second]))

    assert [invoice.number for invoice in invoices] == ["100", "101", "102"]
    assert [line.stock_code for line in invoices[1].lines] == ["10002", "10003"]
    assert (invoices[1].file, invoices[1].row) == ("a.csv", 2)
    assert invoices[1].placed_at.isoformat() == "2011-01-31T23:59:00"
    assert invoices[2].customer_id is None


def test_invoice_returning_in_later_file(tmp_path: Path) -> None:
    first = write_csv(
        tmp_path / "a.csv",
        [
            "200,10001,ONE,1,2011-01-01 10:00:00,1,1,UK",
            "201,10002,TWO,1,2011-01-01 10:01:00,1,1,UK",
        ],
    )
    second = write_csv(
        tmp_path / "b.csv",
        [
            "202,10003,THREE,1,2011-01-01 10:02:00,1,1,UK",
            "200,10004,FOUR,1,2011-01-01 09:59:00,1,1,UK",
            "203,10005,FIVE,1,2011-01-01 10:03:00,1,1,UK",
        ],
    )

    invoices = list(group_invoices([first, second]))

    assert [invoice.number for invoice in invoices] == ["200", "201", "202", "203"]
    assert [line.stock_code for line in invoices[0].lines] == ["10001", "10004"]
    assert invoices[0].placed_at.isoformat() == "2011-01-01T09:59:00"


def test_invalid_rows_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_csv(
        tmp_path / "bad.csv",
        [
            "300,10001,GOOD,2,2011-01-01 10:00:00,1.25,1,UK",
            "300,10002,BAD QUANTITY,two,2011-01-01 10:00:00,1.25,1,UK",
            "300,10003,BAD PRICE,1,2011-01-01 10:00:00,abc,1,UK",
            "300,10004,BAD DATE,1,yesterday,1.25,1,UK",
            "300,10005,NAN PRICE,1,2011-01-01 10:00:00,NaN,1,UK",
            ",10006,NO INVOICE,1,2011-01-01 10:00:00,1.25,1,UK",
            "301,10007,ONLY BAD,x,2011-01-01 10:00:00,1.25,1,UK",
            "302,10008,GOOD,1,2011-01-01 10:01:00,2,1,UK",
        ],
    )
    stats = GroupingStats()

    with caplog.at_level(logging.WARNING):
        invoices = list(group_invoices([path], stats))

    assert [invoice.number for invoice in invoices] == ["300", "302"]
    assert [line.stock_code for line in invoices[0].lines] == ["10001"]
    assert stats.rows == 8
    assert stats.invalid_rows == 6
    assert stats.invoices == 2
    assert stats.invoices_without_valid_rows == 1
    assert "file bad.csv row 2: invalid Quantity 'two'" in caplog.text
    assert "file bad.csv row 3: invalid UnitPrice 'abc'" in caplog.text
    assert "file bad.csv row 4: invalid InvoiceDate 'yesterday'" in caplog.text
    assert "file bad.csv row 6: missing InvoiceNo" in caplog.text
    assert "invoice 301 (file bad.csv row 7) has no valid rows" in caplog.text


def test_json_lines_and_gzip_match_csv(tmp_path: Path) -> None:
    rows = read_csv(SAMPLE)
    records = [
        {
            **row,
            "Quantity": int(row["Quantity"]),
            "UnitPrice": float(row["UnitPrice"]),
            "CustomerID": int(row["CustomerID"]) if row["CustomerID"] else None,
        }
        for row in rows
    ]
    text = "".join(json.dumps(record) + "\n" for record in records)
    (tmp_path / "rows.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress(SAMPLE.read_bytes()))

    def payloads(path: Path) -> list[dict[str, Any]]:
        messages = invoice_messages([path], ReplayTopics())
        return [{**message.payload, "source": None} for message in messages]

    expected = payloads(SAMPLE)
    for name in ("rows.jsonl", "rows.jsonl.gz", "rows.csv.gz"):
        assert payloads(tmp_path / name) == expected, name


def test_json_lines_bad_line_counted(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    good = {
        "InvoiceNo": "400",
        "StockCode": "10001",
        "Description": "GOOD",
        "Quantity": 1,
        "InvoiceDate": "2011-01-01 10:00:00",
        "UnitPrice": 1.5,
        "CustomerID": 12345.0,
        "Country": "UK",
    }
    path.write_text(f"{json.dumps(good)}\nnot json\n\n[1, 2]\n", encoding="utf-8")
    stats = GroupingStats()

    invoices = list(group_invoices([path], stats))

    assert [invoice.number for invoice in invoices] == ["400"]
    assert invoices[0].customer_id == "12345"
    assert invoices[0].lines[0].unit_price == Decimal("1.5")
    assert stats.invalid_rows == 2


def test_classify_invoice_kinds() -> None:
    def invoice(number: str, *quantities: int) -> Invoice:
        lines = tuple(InvoiceLine("10001", None, quantity, Decimal(1)) for quantity in quantities)
        return Invoice(number, None, "UK", datetime(2011, 1, 1), lines, "f", 1)

    cases = [
        (invoice("C100", -1, -2), InvoiceKind.CANCELLATION),
        (invoice("A100", 1), InvoiceKind.BAD_DEBT),
        (invoice("100", -5), InvoiceKind.STOCK_WRITE_OFF),
        (invoice("100", -5, 3), InvoiceKind.ORDER),
        (invoice("100", 5), InvoiceKind.ORDER),
    ]
    for value, kind in cases:
        assert classify_invoice(value) is kind, value.number


def test_topic_names_from_options() -> None:
    topics = ReplayTopics.from_options({"orders_topic": "Orders", "adjustments_topic": "Adjust"})

    assert topics.topic_for(InvoiceKind.ORDER) == "Orders"
    assert topics.topic_for(InvoiceKind.CANCELLATION) == "OrderCancelled"
    assert topics.topic_for(InvoiceKind.BAD_DEBT) == "Adjust"
    assert topics.topic_for(InvoiceKind.STOCK_WRITE_OFF) == "Adjust"


def test_expand_paths_sorted_by_name(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    for name in ("x/b.csv", "a.csv.gz", "c.jsonl", "x/d.jsonl.gz"):
        (tmp_path / name).write_text("")

    def resolve(pattern: str) -> Path:
        return tmp_path / pattern

    paths = expand_paths(["*.csv.gz", "x/*", "*.jsonl", "a.csv.gz"], resolve)

    assert [path.name for path in paths] == ["a.csv.gz", "b.csv", "c.jsonl", "d.jsonl.gz"]


def test_expand_paths_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("")

    def resolve(pattern: str) -> Path:
        return tmp_path / pattern

    with pytest.raises(SourceError, match="no files match 'missing/\\*.csv'"):
        expand_paths("missing/*.csv", resolve)
    with pytest.raises(SourceError, match="unsupported file .*notes.txt"):
        expand_paths("*.txt", resolve)
    with pytest.raises(SourceError, match="invalid paths"):
        expand_paths([], resolve)


def test_missing_column_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("InvoiceNo,StockCode\n1,2\n", encoding="utf-8")

    with pytest.raises(SourceError, match="missing columns in the header: Description, Quantity"):
        list(group_invoices([path]))


def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    data = FEBRUARY_2011.read_bytes()
    path = tmp_path / "truncated.csv.gz"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(SourceError, match="failed to read .*truncated.csv.gz after data row"):
        list(group_invoices([path]))


def test_replay_options_rejected() -> None:
    def resolve(pattern: str) -> Path:
        return DATA / pattern

    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "missing option 'paths'"),
        ({"paths": "sample.csv", "rate": -1}, "invalid rate -1"),
        ({"paths": "sample.csv", "rate": "fast"}, "invalid rate 'fast'"),
        ({"paths": "sample.csv", "limit": 0}, "invalid limit 0"),
        ({"paths": "sample.csv", "limit": True}, "invalid limit True"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidOptionError, match=message):
            ReplayOptions.from_options(options, resolve)


async def test_file_replay_limit_and_rate(tmp_path: Path) -> None:
    context = FakeContext(tmp_path, {"paths": str(SAMPLE), "limit": 4, "rate": 2})
    replay: Any = FileReplay()
    replay.setup(context)

    messages = [message async for message in replay.run(context)]
    replay.close()

    assert [message.key for message in messages] == ["536365", "536366", "536367", "536368"]
    assert context.clock.sleeps == [0.5, 0.5, 0.5]


async def test_file_replay_stops_when_flow_stops(tmp_path: Path) -> None:
    context = FakeContext(tmp_path, {"paths": str(SAMPLE)})
    replay: Any = FileReplay()
    replay.setup(context)

    keys = []
    async for message in replay.run(context):
        keys.append(message.key)
        if len(keys) == 2:
            context.stopping.set()

    assert keys == ["536365", "536366"]


@pytest.mark.slow
def test_full_data_each_invoice_once() -> None:
    paths = sorted(DATA.glob("online_retail_*.csv.gz"))
    rows = [row for path in paths for row in read_csv(path)]
    distinct = {row["InvoiceNo"] for row in rows}
    stats = GroupingStats()

    messages = list(invoice_messages(paths, ReplayTopics(), stats))
    ids = Counter(message.id for message in messages)
    topics = Counter(message.topic for message in messages)
    kinds = Counter(message.payload.get("kind") for message in messages)

    assert len(paths) == 13
    assert len(rows) == stats.rows == 541_909
    assert set(ids) == {f"invoice-{number}" for number in distinct}
    assert max(ids.values()) == 1
    assert len(messages) == len(distinct) == 25_900
    assert sum(len(message.payload["lines"]) for message in messages) == len(rows)
    assert topics == expected_topics(rows)
    assert topics == Counter(
        {"OrderPlaced": 20_725, "OrderCancelled": 3_836, "InvoiceAdjusted": 1_339}
    )
    assert kinds["stock_write_off"] == 1_336
    assert kinds["bad_debt"] == 3
    assert stats.invalid_rows == 0


# Billing and the payment gateway


def test_invoice_total_exact() -> None:
    payload = next(invoice_messages([SAMPLE], ReplayTopics())).payload

    assert invoice_total(payload["lines"]) == Decimal("139.12")
    assert invoice_total([{"quantity": 5, "unit_price": "0.001"}]) == Decimal("0.01")
    assert invoice_total([{"quantity": 3, "unit_price": "0.1"}]) == Decimal("0.30")
    assert invoice_total([{"quantity": -2, "unit_price": "1.5"}]) == Decimal("-3.00")
    assert invoice_total([]) == Decimal("0.00")


def test_invoice_total_rejects_bad_lines() -> None:
    cases: list[list[dict[str, Any]]] = [
        [{"quantity": "2", "unit_price": "1"}],
        [{"quantity": True, "unit_price": "1"}],
        [{"quantity": 2, "unit_price": "abc"}],
        [{"quantity": 2, "unit_price": "Infinity"}],
        [{"quantity": 2}],
    ]
    for lines in cases:
        with pytest.raises(InvalidPayloadError, match="line 0: invalid"):
            invoice_total(lines)


def test_charge_request_guest_order() -> None:
    request = charge_request(order_payload("500", [("10001", 2, "1.25")], customer_id=None))

    assert request.invoice == "500"
    assert request.customer_id is None
    assert request.amount == Decimal("2.50")


def test_gateway_decisions_repeatable() -> None:
    settings = GatewaySettings(seed=7)
    state = random.getstate()

    first = [PaymentGateway(settings).decide(str(number), 1) for number in range(500)]
    second = [PaymentGateway(settings).decide(str(number), 1) for number in range(500)]
    other_seed = [PaymentGateway(GatewaySettings(seed=8)).decide(str(n), 1) for n in range(500)]
    retried = [PaymentGateway(settings).decide(str(number), 2) for number in range(500)]

    assert first == second
    assert first != other_seed
    assert first != retried
    assert random.getstate() == state


def test_gateway_rates_close_to_settings() -> None:
    gateway = PaymentGateway(GatewaySettings(failure_rate=0.05, decline_rate=0.02, seed=7))

    decisions = Counter(gateway.decide(str(number), 1) for number in range(20_000))

    assert 0.04 < decisions[ChargeDecision.UNAVAILABLE] / 20_000 < 0.06
    assert 0.015 < decisions[ChargeDecision.DECLINED] / 20_000 < 0.025


def test_gateway_settings_from_options() -> None:
    settings = GatewaySettings.from_options({"latency": "2ms", "failure_rate": 0, "seed": 3})

    assert settings.latency == pytest.approx(0.002)
    assert settings.failure_rate == 0.0
    assert settings.decline_rate == 0.02
    assert settings.seed == 3


def test_gateway_settings_rejected() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"failure_rate": 1.5}, "invalid failure_rate 1.5"),
        ({"decline_rate": "often"}, "invalid decline_rate 'often'"),
        ({"failure_rate": 0.6, "decline_rate": 0.6}, "exceeds 1"),
        ({"seed": "seven"}, "invalid seed 'seven'"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidOptionError, match=message):
            GatewaySettings.from_options(options)

    with pytest.raises(ValueError, match="invalid duration"):
        GatewaySettings.from_options({"latency": "soon"})


async def run_billing(
    tmp_path: Path, payload: Any, options: dict[str, Any], delivery_count: int = 1
) -> tuple[FakeContext, FakeMessage]:
    context = FakeContext(tmp_path, options, publishes=("PaymentSucceeded", "PaymentFailed"))
    message = FakeMessage(payload, delivery_count=delivery_count)
    billing: Any = Billing()
    billing.setup(context)
    await billing.handle(message, context)
    return context, message


async def test_billing_charges_order(tmp_path: Path) -> None:
    payload = order_payload("600", [("10001", 6, "2.55"), ("POST", 1, "18")])

    context, message = await run_billing(tmp_path, payload, {"failure_rate": 0, "decline_rate": 0})

    assert context.published == [
        {
            "topic": "PaymentSucceeded",
            "payload": {
                "invoice": "600",
                "customer_id": "17850",
                "amount": "33.30",
                "currency": "GBP",
                "charged": True,
            },
            "key": "600",
            "id": "payment-600",
        }
    ]
    assert context.clock.sleeps == [0.002]
    assert message.settled is None


async def test_billing_declined_order(tmp_path: Path) -> None:
    payload = order_payload("601", [("10001", 1, "5")], customer_id=None)

    context, _ = await run_billing(tmp_path, payload, {"failure_rate": 0, "decline_rate": 1})

    assert [item["topic"] for item in context.published] == ["PaymentFailed"]
    assert context.published[0]["payload"] == {
        "invoice": "601",
        "customer_id": None,
        "amount": "5.00",
        "reason": "declined",
    }


async def test_billing_nothing_to_charge(tmp_path: Path) -> None:
    payload = order_payload("602", [("10001", 4, "0"), ("10002", 1, "-0.50")])

    context, _ = await run_billing(tmp_path, payload, {"failure_rate": 1, "decline_rate": 0})

    assert [item["topic"] for item in context.published] == ["PaymentSucceeded"]
    assert context.published[0]["payload"]["amount"] == "0.00"
    assert context.published[0]["payload"]["charged"] is False
    assert context.clock.sleeps == []


async def test_billing_gateway_error_propagates(tmp_path: Path) -> None:
    payload = order_payload("603", [("10001", 1, "5")])

    with pytest.raises(GatewayUnavailable, match="invoice 603 \\(attempt 3\\)"):
        await run_billing(tmp_path, payload, {"failure_rate": 1, "decline_rate": 0}, 3)


async def test_billing_rejects_malformed_payload(tmp_path: Path) -> None:
    payload = {"invoice": "604", "lines": [{"quantity": "many", "unit_price": "1"}]}

    context, message = await run_billing(tmp_path, payload, {})

    assert context.published == []
    assert message.settled == "reject"
    assert "invoice 604: line 0: invalid quantity 'many'" in str(message.error)


# Inventory and Restock


def test_reservation_demand_skips_non_products() -> None:
    lines = order_payload(
        "700",
        [
            ("85123A", 6, "2.55"),
            ("85123a", 4, "2.55"),
            ("POST", 1, "18"),
            ("post", 1, "18"),
            ("M", 1, "1"),
            ("BANK CHARGES", 1, "15"),
            ("DCGSSGIRL", 1, "3.29"),
            ("gift_0001_20", 1, "16.67"),
            ("22752", -2, "7.65"),
            ("21730", 3, "4.25"),
        ],
    )["lines"]

    demand = reservation_demand(lines)
    supply = restock_supply(lines)

    assert demand.units_by_code == {"85123A": 10, "21730": 3}
    assert demand.lines == 3
    assert demand.units == 13
    assert supply.units_by_code == {"85123A": 10, "22752": 2, "21730": 3}


@pytest.fixture
def stock_store(tmp_path: Path) -> Iterator[StockStore]:
    store = StockStore(tmp_path / "state" / "inventory.db", initial_stock=10)
    yield store
    store.close()


def test_reserve_all_or_nothing(stock_store: StockStore) -> None:
    first = stock_store.reserve(
        "800", reservation_demand(order_payload("800", [("A", 6, "1"), ("22752", 4, "1")])["lines"])
    )
    second = stock_store.reserve(
        "801", reservation_demand(order_payload("801", [("A", 5, "1"), ("22752", 1, "1")])["lines"])
    )

    assert first.reserved is True
    assert first.payload == {"invoice": "800", "lines": 2, "units": 10}
    assert second.reserved is False
    assert second.payload == {
        "invoice": "801",
        "short": [{"stock_code": "A", "requested": 5, "available": 4}],
    }
    assert stock_store.available("A") == 4
    assert stock_store.available("22752") == 6


def test_reserve_idempotent(stock_store: StockStore) -> None:
    demand = reservation_demand(order_payload("810", [("A", 7, "1")])["lines"])
    short_demand = reservation_demand(order_payload("811", [("A", 5, "1")])["lines"])

    first = stock_store.reserve("810", demand)
    again = stock_store.reserve("810", demand)
    short = stock_store.reserve("811", short_demand)
    stock_store.restock("C812", restock_supply(order_payload("C812", [("A", -20, "1")])["lines"]))
    short_again = stock_store.reserve("811", short_demand)

    assert (first.repeated, again.repeated) == (False, True)
    assert again.payload == first.payload
    assert short_again.repeated is True
    assert short_again.reserved is False
    assert short_again.payload == short.payload
    assert stock_store.available("A") == 23


def test_restock_once_per_invoice(stock_store: StockStore) -> None:
    supply = restock_supply(
        order_payload("C820", [("A", -3, "1"), ("a", -2, "1"), ("POST", -1, "1")])["lines"]
    )

    assert stock_store.restock("C820", supply) is True
    assert stock_store.restock("C820", supply) is False
    assert stock_store.available("A") == 15
    assert stock_store.available("POST") is None


def test_stock_database_file(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    store = StockStore(path, initial_stock=5)
    store.reserve("830", reservation_demand(order_payload("830", [("A", 2, "1")])["lines"]))
    store.close()

    reopened = StockStore(path, initial_stock=5)
    available = reopened.available("A")
    reopened.close()
    connection = sqlite3.connect(path)
    mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()

    assert available == 3
    assert mode == "wal"


def test_inventory_publishes_then_acks(tmp_path: Path) -> None:
    journal: list[tuple[str, str]] = []
    context = FakeContext(
        tmp_path,
        {"database": "state/inventory.db", "initial_stock": 5},
        publishes=("StockReserved", "OutOfStock"),
        journal=journal,
    )
    inventory: Any = Inventory()
    inventory.setup(context)
    payload = order_payload("840", [("A", 2, "1"), ("22752", 1, "1")])
    first = FakeMessage(payload, journal=journal)
    redelivered = FakeMessage(payload, delivery_count=2, journal=journal)
    short = FakeMessage(order_payload("841", [("A", 4, "1")]), journal=journal)

    inventory.handle(first, context)
    inventory.handle(redelivered, context)
    inventory.handle(short, context)
    inventory.close()

    assert journal == [
        ("publish", "StockReserved"),
        ("ack", first.id),
        ("publish", "StockReserved"),
        ("ack", redelivered.id),
        ("publish", "OutOfStock"),
        ("ack", short.id),
    ]
    assert context.published[0] == context.published[1]
    assert context.published[0]["id"] == "stock-840"
    assert context.published[2]["payload"]["short"] == [
        {"stock_code": "A", "requested": 4, "available": 3}
    ]
    assert (tmp_path / "state" / "inventory.db").exists()


def test_inventory_rejects_malformed_payload(tmp_path: Path) -> None:
    context = FakeContext(tmp_path, publishes=("StockReserved", "OutOfStock"))
    inventory: Any = Inventory()
    inventory.setup(context)
    message = FakeMessage({"invoice": "850", "lines": [{"stock_code": 7, "quantity": 1}]})

    inventory.handle(message, context)
    inventory.close()

    assert message.settled == "reject"
    assert context.published == []
    assert "invalid stock_code 7" in str(message.error)


def test_inventory_options_rejected(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"initial_stock": -1}, "invalid initial_stock -1"),
        ({"initial_stock": "lots"}, "invalid initial_stock 'lots'"),
        ({"database": ""}, "invalid database ''"),
    ]
    for options, message in cases:
        inventory: Any = Inventory()
        with pytest.raises(InvalidOptionError, match=message):
            inventory.setup(FakeContext(tmp_path, options))


def test_restock_handler_once(tmp_path: Path) -> None:
    context = FakeContext(tmp_path, {"database": "inventory.db", "initial_stock": 5})
    restock: Any = Restock()
    restock.setup(context)
    payload = {**order_payload("C860", [("A", -3, "1")]), "kind": "cancellation"}

    restock.handle(FakeMessage(payload, topic="OrderCancelled"), context)
    restock.handle(FakeMessage(payload, topic="OrderCancelled"), context)
    restock.close()
    store = StockStore(tmp_path / "inventory.db", initial_stock=5)
    available = store.available("A")
    store.close()

    assert available == 8


# OrderStatus


def test_status_upsert_idempotent(tmp_path: Path) -> None:
    store = OrderStatusStore(tmp_path / "orders.db")

    created = store.upsert("900", {"payment": "succeeded", "total": "1.00"}, "t1")
    repeated = store.upsert("900", {"payment": "succeeded", "total": "1.00"}, "t2")
    changed = store.upsert("900", {"stock": "reserved"}, "t3")
    row = store.row("900")
    store.close()

    assert (created, repeated, changed) == (True, False, True)
    assert row is not None
    assert row["payment"] == "succeeded"
    assert row["stock"] == "reserved"
    assert row["total"] == "1.00"
    assert row["updated_at"] == "t3"


def test_status_rejects_unknown_column(tmp_path: Path) -> None:
    store = OrderStatusStore(tmp_path / "orders.db")

    with pytest.raises(ValueError, match="unknown orders columns colour"):
        store.upsert("901", {"colour": "red"}, "t1")
    store.close()


def test_status_updates_by_event() -> None:
    order = order_payload("910", [("A", 2, "1.25")], customer_id=None)
    headers = {"flowrun.error": "gateway unavailable", "flowrun.error_type": "GatewayUnavailable"}
    payment = {
        "invoice": "910",
        "customer_id": None,
        "amount": "2.50",
        "currency": "GBP",
        "charged": True,
    }

    cases = [
        (
            StatusEvent.PAYMENT_SUCCEEDED,
            payment,
            {},
            {"payment": "succeeded", "customer_id": None, "total": "2.50", "kind": "order"},
        ),
        (
            StatusEvent.PAYMENT_FAILED,
            {**payment, "reason": "declined"},
            {},
            {"payment": "failed", "customer_id": None, "total": "2.50", "kind": "order"},
        ),
        (
            StatusEvent.STOCK_RESERVED,
            {"invoice": "910", "lines": 1, "units": 2},
            {},
            {"stock": "reserved", "kind": "order"},
        ),
        (
            StatusEvent.OUT_OF_STOCK,
            {"invoice": "910", "short": []},
            {},
            {"stock": "out_of_stock", "kind": "order"},
        ),
        (
            StatusEvent.DEAD_LETTER,
            order,
            headers,
            {
                "customer_id": None,
                "country": "United Kingdom",
                "placed_at": "2010-12-01T08:26:00",
                "total": "2.50",
                "payment": "dead_letter",
                "kind": "order",
                "error": "GatewayUnavailable: gateway unavailable",
            },
        ),
        (
            StatusEvent.ORDER_CANCELLED,
            {**order, "kind": "cancellation"},
            {},
            {
                "customer_id": None,
                "country": "United Kingdom",
                "placed_at": "2010-12-01T08:26:00",
                "total": "2.50",
                "kind": "cancellation",
            },
        ),
        (
            StatusEvent.INVOICE_ADJUSTED,
            {**order, "kind": "bad_debt"},
            {},
            {
                "customer_id": None,
                "country": "United Kingdom",
                "placed_at": "2010-12-01T08:26:00",
                "total": "2.50",
                "kind": "bad_debt",
            },
        ),
    ]
    for event, payload, message_headers, fields in cases:
        update = status_update(event, payload, message_headers)
        assert update.invoice == "910", event
        assert update.fields == fields, event


def test_status_update_rejects_payload() -> None:
    with pytest.raises(InvalidPayloadError, match="invalid invoice None"):
        status_update(StatusEvent.STOCK_RESERVED, {"lines": 1}, {})
    with pytest.raises(InvalidPayloadError, match="invoice 920: missing kind"):
        status_update(StatusEvent.INVOICE_ADJUSTED, order_payload("920", []), {})


def test_status_topic_states() -> None:
    states = topic_states(
        {"dead_letter_topic": "PaymentsDead", "states": {"Paid": "payment_succeeded"}}
    )

    assert states["Paid"] is StatusEvent.PAYMENT_SUCCEEDED
    assert states["PaymentsDead"] is StatusEvent.DEAD_LETTER
    assert states["StockReserved"] is StatusEvent.STOCK_RESERVED
    assert "OrderPlaced" not in states
    with pytest.raises(InvalidOptionError, match="invalid event 'paid' for topic 'Paid'"):
        topic_states({"states": {"Paid": "paid"}})


def test_order_status_handler_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    contexts = [FakeContext(tmp_path, {"database": "orders.db"}) for _ in range(2)]
    handlers: list[Any] = [OrderStatus(), OrderStatus()]
    for handler, context in zip(handlers, contexts, strict=True):
        handler.setup(context)
    messages = [
        FakeMessage(
            {
                "invoice": "930",
                "customer_id": "1",
                "amount": "9.99",
                "currency": "GBP",
                "charged": True,
            },
            topic="PaymentSucceeded",
        ),
        FakeMessage({"invoice": "930", "lines": 1, "units": 3}, topic="StockReserved"),
        FakeMessage({"invoice": "930", "lines": 1, "units": 3}, topic="StockReserved"),
        FakeMessage(
            {**order_payload("C931", [("A", -1, "2")]), "kind": "cancellation"},
            topic="OrderCancelled",
        ),
        FakeMessage({"invoice": "932"}, topic="Unmapped"),
    ]

    for index, message in enumerate(messages):
        handlers[index % 2].handle(message, contexts[index % 2])
    with caplog.at_level(logging.INFO, logger="flowrun_plugins.orders.status"):
        for handler in handlers:
            handler.close()
    connection = sqlite3.connect(tmp_path / "orders.db")
    rows = connection.execute(
        "SELECT invoice, payment, stock, kind, total FROM orders ORDER BY invoice"
    ).fetchall()
    connection.close()

    assert rows == [
        ("930", "succeeded", "reserved", "order", "9.99"),
        ("C931", None, None, "cancellation", "-2.00"),
    ]
    assert messages[4].settled == "reject"
    assert "no entry in the states option" in str(messages[4].error)
    count_lines = [record.message for record in caplog.records if "orders table" in record.message]
    assert len(count_lines) == 1
    assert "kind: cancellation 1, order 1" in count_lines[0]


# The sample flow through the real runtime


async def test_sample_flow_end_to_end(tmp_path: Path) -> None:
    text = (REPOSITORY / "flows" / "orders-sample.yaml").read_text(encoding="utf-8")
    flow_path = tmp_path / "orders-sample.yaml"
    flow_path.write_text(text.replace("../data/orders/sample.csv", str(SAMPLE)), encoding="utf-8")

    result = await run_flow(load_flow(flow_path), until_drained=True)
    connection = sqlite3.connect(tmp_path / ".flowrun" / "sample-order-status.db")
    kinds = dict(connection.execute("SELECT kind, COUNT(*) FROM orders GROUP BY kind").fetchall())
    stock = dict(connection.execute("SELECT stock, COUNT(*) FROM orders GROUP BY stock").fetchall())
    connection.close()

    assert result.failures == []
    assert kinds == {"order": 23, "cancellation": 2}
    assert stock == {"reserved": 23, None: 2}
