"""Smoke test of the benchmark harness: a tiny run of three systems must finish and report.

The benchmarks themselves are not part of the test suite; this only checks that
`python -m benchmarks.run` still runs end to end and prints its table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("asyncio-orjson", "flowrun-memory", "flowrun-sqlite")


def test_harness_tiny_run(tmp_path: Path) -> None:
    output = tmp_path / "figures.json"
    command = [
        sys.executable, "-m", "benchmarks.run", "--messages", "200", "--runs", "1", "--only", ",".join(SYSTEMS),
        "--latency-seconds", "0.5", "--no-plot", "--settle", "0", "--json", str(output),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "2 subscribers, each handles every message" in completed.stdout
    table_rows = [line for line in completed.stdout.splitlines() if line.startswith("│")]
    for system in SYSTEMS:
        assert any(row.split("│")[1].strip() == system for row in table_rows), f"no table row for {system}"
    assert "failed" not in completed.stdout

    figures = json.loads(output.read_text(encoding="utf-8"))
    for system in SYSTEMS:
        median = figures["systems"][system]["throughput"]["median"]
        assert median["throughput"] > 0, f"{system} has no throughput"
        assert median["handled"] >= 200, f"{system} handled {median['handled']} messages"
        latency = figures["systems"][system]["latency"]["median"]
        assert latency["latency_p99_ms"] is not None, f"{system} has no latency figure"
