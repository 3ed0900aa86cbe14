"""Summarise a py-spy profile: the functions with the largest share of samples.

    py-spy record --format raw -o profile.txt -- python -m benchmarks.child '{...}'
    python -m benchmarks.hotspots profile.txt [--top 10] [--under runner/]

py-spy's raw format has one line per distinct stack, `frame;frame;... count`, where a
frame reads `function (path:line)`. Self time counts the innermost frame of each sample;
total time counts every function once per sample in which it appears.

py-spy 0.4 still samples some threads that only wait (the event loop in epoll, an idle
executor worker), so samples whose innermost frame is one of WAITING_FRAMES count as
waiting and the shares are of the other (busy) samples. Profiles recorded with
`--threads` also get a line per thread.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]+)(?::\d+)?\)$")
THREAD_FRAME = re.compile(r"^thread \(\d+\)")
WAITING_FRAMES = {
    "selectors.py:EpollSelector.select",
    "concurrent/futures/thread.py:_worker",
    "threading.py:Condition.wait",
    "threading.py:Event.wait",
    "queue.py:Queue.get",
}


def frame_name(frame: str) -> str:
    """Return `path:function` for a py-spy frame, without the line number."""
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['path']}:{match['function']}"


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([frame_name(frame) for frame in stack.split(";")], int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], under: str | None
              ) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    """Return self and total busy-sample counts per function, samples per thread, and busy samples.

    With `under`, the self time of a sample goes to its innermost frame whose path contains
    `under` (so time inside libraries is charged to the project function that called them).
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    busy = 0
    for frames, count in stacks:
        thread = THREAD_FRAME.sub("thread", frames[0]) if THREAD_FRAME.match(frames[0]) else None
        waiting = frames[-1] in WAITING_FRAMES
        if thread is not None:
            threads[f"{thread} ({'waiting' if waiting else 'busy'})"] += count
            frames = frames[1:] or ["(no Python frame)"]
        if waiting:
            continue
        busy += count
        for name in set(frames):
            total[name] += count
        chosen = frames[-1]
        if under is not None:
            chosen = next((name for name in reversed(frames) if under in name), "(outside " + under + ")")
        own[chosen] += count
    return own, total, threads, busy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotspots", description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy output written with --format raw")
    parser.add_argument("--top", type=int, default=10, help="functions to list (default 10)")
    parser.add_argument("--under", default=None,
                        help="charge self time to the innermost frame whose path contains this text, e.g. runner/")
    arguments = parser.parse_args(argv)

    stacks = read_stacks(arguments.profile)
    own, total, threads, samples = summarise(stacks, arguments.under)
    if not samples:
        print(f"error: no busy samples in {arguments.profile}; record it with py-spy --format raw", file=sys.stderr)
        return 1
    recorded = sum(count for _, count in stacks)
    print(f"{recorded} samples, {samples} busy")
    for thread, count in threads.most_common():
        print(f"{100 * count / recorded:5.1f}% of all samples: {thread}")
    print(f"{'self':>6} {'total':>6}  function (shares of busy samples)")
    for name, count in own.most_common(arguments.top):
        print(f"{100 * count / samples:5.1f}% {100 * total[name] / samples:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
