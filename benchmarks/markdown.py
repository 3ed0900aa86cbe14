"""Print the tables of a `--json` output file as Markdown, for docs/benchmarks.md.

    python -m benchmarks.markdown main.json [scaling.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _figure(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _milliseconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:,.1f}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """Format a Markdown table; the first `text_columns` columns align left, the rest right."""
    alignments = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(alignments) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_tables(data: dict[str, Any]) -> str:
    rate = data["settings"]["rate"]
    systems = data["systems"]
    ceiling = systems.get("asyncio-orjson", {}).get("throughput", {}).get("median", {}).get("throughput")
    rows = []
    for name, figures in systems.items():
        throughput = figures["throughput"]["median"]
        latency = figures["latency"]["median"]
        ratio = throughput["throughput"] / ceiling if throughput["throughput"] and ceiling else None
        p99 = _milliseconds(latency["latency_p99_ms"])
        if figures["latency"].get("kept_up") is False:
            p99 += " (fell behind)"
        if figures["latency"].get("skipped") and not figures["latency"]["runs"]:
            p99 = "not run (below rate)"
        rss = throughput["peak_rss_bytes"]
        errors = figures["throughput"]["errors"] + figures["latency"]["errors"]
        rows.append([name, _figure(figures["messages"]), _figure(throughput["throughput"]), _figure(ratio, 3),
                     _milliseconds(latency["latency_p50_ms"]), p99, _figure(rss / MIB if rss else None),
                     f"{len(figures['throughput']['runs'])}" + (f", {len(errors)} failed" if errors else "")])
    parts = [_table(["system", "messages", "handled/s", "x asyncio-orjson", f"p50 ms @{rate:g}/s",
                     f"p99 ms @{rate:g}/s", "peak RSS MiB", "runs"], rows)]

    if data.get("skipped"):
        parts.append("\n".join(f"- skipped {name}: {reason}" for name, reason in data["skipped"].items()))

    rows = [[name, probe["purpose"], _milliseconds(probe["median"]["latency_p50_ms"]),
             _milliseconds(probe["median"]["latency_p99_ms"])] for name, probe in data["probes"].items()]
    if rows:
        parts.append(_table(["probe", "what it measures", "p50 ms", "p99 ms"], rows, text_columns=2))

    rows = [[target["goal"], target["status"], target["figures"]] for target in data["targets"]]
    parts.append(_table(["target", "status", "figures"], rows, text_columns=3))
    return "\n\n".join(parts)


def scaling_tables(data: dict[str, Any]) -> str:
    parts = []
    rows = [[point["backend"], str(point["subscribers"]), _figure(point["messages"]), _figure(point["throughput"]),
             _figure(point["peak_rss_bytes"] / MIB if point["peak_rss_bytes"] else None)]
            for point in data["subscribers"]]
    parts.append(_table(["backend", "subscribers", "messages", "handled/s", "peak RSS MiB"], rows))

    rows = [[point["backend"], f"{point['payload_bytes']:,}", _figure(point["messages"]), _figure(point["throughput"]),
             _figure(point["mib_per_second"], 1)] for point in data["sizes"]]
    parts.append(_table(["backend", "payload bytes", "messages", "handled/s", "MiB/s"], rows))

    backlog = data["backlog"]
    rows = []
    for phase in ("publish", "drain"):
        figures = backlog.get(phase) or {}
        if "extra" not in figures:
            rows.append([phase, "failed: " + str(figures.get("error", "not run"))[:80]] + [""] * 6)
            continue
        extra = figures["extra"]
        growth = extra["rss_growth_bytes"]
        rows.append([phase, _figure(figures["handled"]), _figure(figures["seconds"], 1),
                     _figure(extra["db_bytes"] / MIB, 1), _figure(extra["wal_bytes"] / MIB, 1),
                     _figure(extra["freelist_bytes"] / MIB, 1), _figure(figures["peak_rss_bytes"] / MIB, 1),
                     _figure(growth / MIB if growth is not None else None, 1)])
    parts.append(_table(["phase", "messages", "seconds", "db MiB", "wal MiB", "freelist MiB", "peak RSS MiB",
                         "RSS growth MiB"], rows))

    rows = []
    for point in data["processes"]:
        if "skipped" in point:
            rows.append([point["backend"], "-", "-", "skipped: " + point["skipped"]])
        else:
            rows.append([point["backend"], str(point["processes"]), _figure(point["throughput"]),
                         "; ".join(point["errors"])[:160]])
    parts.append(_table(["backend", "processes", "handled/s", "notes"], rows))

    rows = [[target["goal"], target["status"], target["figures"]] for target in data["targets"]]
    parts.append(_table(["target", "status", "figures"], rows, text_columns=3))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m benchmarks.markdown MAIN_JSON [SCALING_JSON]", file=sys.stderr)
        return 2
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            print(f"error: cannot read {path} as the JSON of python -m benchmarks.run --json: {error}",
                  file=sys.stderr)
            return 1
        print(scaling_tables(data) if "subscribers" in data else main_tables(data))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
