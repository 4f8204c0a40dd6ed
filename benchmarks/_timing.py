"""The one timing harness of the benchmarks: contenders side by side.

Every contender runs once per round, in turn, so that drifts in machine
load hit all alike; each result is synchronised the same way (`sync`)
before its clock stops; the figure is the median over the rounds.
"""

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple


class Timings(NamedTuple):
    """Median seconds per call of each contender: wall-clock and CPU time.

    CPU time (of all the process's threads) does not see the steps in
    which a shared machine's CPU quota throttles the wall-clock time.
    """

    wall: dict[str, float]
    cpu: dict[str, float]


def interleaved_timings(
    contenders: dict[str, Callable[[], object]],
    sync: Callable[[object], object],
    rounds: int = 11,
    warmup: int = 2,
) -> Timings:
    """Times each contender once per round, in turn; medians over rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            sync(fn())
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            sync(fn())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return Timings(
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


def interleaved_medians(
    contenders: dict[str, Callable[[], object]],
    sync: Callable[[object], object],
    rounds: int = 11,
    warmup: int = 2,
) -> dict[str, float]:
    """Median wall-clock seconds per call of each contender, timed in turn."""
    return interleaved_timings(contenders, sync, rounds, warmup).wall


def ratio_row(case: str, ours: float, baseline_name: str, baseline: float, target):
    """One markdown row: times in ms, the ratio, and whether it meets `target`."""
    ratio = ours / baseline
    goal = "" if target is None else f"≤ {target:g}"
    verdict = "" if target is None else (" ✓" if ratio <= target else " ✗")
    return (
        f"| {case} | {_ms(ours)} | {baseline_name} | {_ms(baseline)} | "
        f"{ratio:.2f}{verdict} | {goal} |"
    )


TABLE_HEADER = (
    "| case | stable (ms) | baseline | baseline (ms) | ratio | target |\n"
    "|---|---:|---|---:|---:|---:|"
)


def _ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}"
