"""Run one system once in this process and print its result as one JSON line.

The harness starts this module in a fresh interpreter per run, so the peak RSS it reports
(VmHWM from /proc/self/status) belongs to that system alone:

    python -m benchmarks.child '{"system": "asyncio-orjson", "messages": 1000, ...}'

The last line of standard output is `RESULT {...}`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import resource
import sys
from pathlib import Path
from typing import Any

from benchmarks.workload import RunSpec

RESULT_PREFIX = "RESULT "


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes (VmHWM, else ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_once(spec: RunSpec, module_name: str) -> dict[str, Any]:
    module = importlib.import_module(f"benchmarks.systems.{module_name}")
    outcome = module.run(spec)
    if inspect.isawaitable(outcome):
        outcome = asyncio.run(outcome)
    data = outcome.to_json()
    data["peak_rss_bytes"] = peak_rss_bytes()
    return data


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.child SPEC_JSON", file=sys.stderr)
        return 2
    request = json.loads(argv[1])
    module_name = request.pop("module")
    spec = RunSpec(**request)
    data = run_once(spec, module_name)
    print(RESULT_PREFIX + json.dumps(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
