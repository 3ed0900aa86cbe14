"""The order example end to end through the real CLI, checked against counts read from the CSV."""

from __future__ import annotations

import asyncio
import csv
import gzip
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SERVER_URLS, require_server
from tests.processes import read_report, run_flowrun
from tests.test_scale_out import delete_flow

REPOSITORY = Path(__file__).resolve().parent.parent
DATA = REPOSITORY / "data" / "orders"
PRODUCER_TOPICS = ("OrderPlaced", "OrderCancelled", "InvoiceAdjusted")


def read_rows(paths: list[Path]) -> Iterator[dict[str, str]]:
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)


def expected_topic_counts(paths: list[Path]) -> dict[str, int]:
    """Classify every invoice from the raw rows, independently of the replay plugin."""
    quantities: dict[str, list[int]] = {}
    for row in read_rows(paths):
        quantities.setdefault(row["InvoiceNo"], []).append(int(row["Quantity"]))

    counts = dict.fromkeys(PRODUCER_TOPICS, 0)
    for invoice, invoice_quantities in quantities.items():
        if invoice.startswith("C"):
            counts["OrderCancelled"] += 1
        elif invoice.startswith("A") or all(quantity < 0 for quantity in invoice_quantities):
            counts["InvoiceAdjusted"] += 1
        else:
            counts["OrderPlaced"] += 1
    return counts


def copy_example(folder: Path) -> Path:
    shutil.copytree(REPOSITORY / "flows", folder / "flows", ignore=shutil.ignore_patterns(".flowrun"))
    shutil.copytree(DATA, folder / "data" / "orders")
    shutil.copy(REPOSITORY / "flowrun.schema.json", folder / "flowrun.schema.json")
    return folder / "flows"


def assert_report_adds_up(report: dict, expected: dict[str, int]) -> None:
    topics = report["topics"]
    for topic, count in expected.items():
        assert topics[topic]["published"] == count, topic

    for name, counts in report["subscriptions"].items():
        published = topics[counts["topic"]]["published"]
        assert counts["acked"] + counts["dead_lettered"] + counts["dropped"] == published, name
        assert counts["in_flight"] == 0, name
        assert counts["pending"] == 0, name

    placed = topics["OrderPlaced"]["published"]
    # Every order ends in exactly one payment outcome and one stock outcome.
    payment_outcomes = sum(topics[name]["published"] for name in ("PaymentSucceeded", "PaymentFailed"))
    assert payment_outcomes + report["subscriptions"]["billing"]["dead_lettered"] == placed
    assert topics["StockReserved"]["published"] + topics["OutOfStock"]["published"] == placed


def test_sample_flow_counts(tmp_path: Path) -> None:
    flows = copy_example(tmp_path)
    expected = expected_topic_counts([DATA / "sample.csv"])

    first = run_flowrun("up", "orders-sample.yaml", "--until-drained", "--report", "first.json", cwd=flows)
    second = run_flowrun("up", "orders-sample.yaml", "--until-drained", "--report", "second.json", cwd=flows)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in first.stderr
    assert sum(expected.values()) == 25
    assert_report_adds_up(read_report(flows / "first.json"), expected)
    # Nothing new was published, so the second run handled nothing: the durable counts are unchanged.
    assert read_report(flows / "second.json") == read_report(flows / "first.json")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_data_set_counts(tmp_path: Path) -> None:
    flows = copy_example(tmp_path)
    monthly = sorted(DATA.glob("online_retail_*.csv.gz"))
    expected = expected_topic_counts(monthly)

    result = run_flowrun("up", "orders.yaml", "--until-drained", "--report", "report.json", cwd=flows, timeout=900)

    assert result.returncode == 0, result.stderr
    assert len(monthly) == 13
    assert sum(expected.values()) == 25_900
    assert_report_adds_up(read_report(flows / "report.json"), expected)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["redis", "rabbitmq", "nats"])
def test_sample_flow_on_server(tmp_path: Path, backend: str) -> None:
    require_server(backend)
    flows = copy_example(tmp_path)
    flow_file = flows / "orders-sample.yaml"
    unique = f"sample{uuid.uuid4().hex[:8]}"
    flow_file.write_text(re.sub(r"(?m)^name: .*$", f"name: {unique}", flow_file.read_text(encoding="utf-8")),
                         encoding="utf-8")
    environment = {"FLOWRUN_BROKER_URL": SERVER_URLS[backend]}

    try:
        result = run_flowrun("up", "orders-sample.yaml", "--until-drained", "--report", "report.json", cwd=flows,
                             env=environment)
    finally:
        asyncio.run(delete_flow(flow_file, SERVER_URLS[backend]))

    assert result.returncode == 0, result.stderr
    assert_report_adds_up(read_report(flows / "report.json"), expected_topic_counts([DATA / "sample.csv"]))
