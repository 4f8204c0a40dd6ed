"""The one timing harness of the benchmarks: contenders side by side.

Every contender runs once per round, in turn, so that drifts in machine
load hit all alike; each result is synchronised the same way (`sync`)
before its clock stops; the figure is the median over the rounds.
"""

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    contenders: dict[str, Callable[[], object]],
    sync: Callable[[object], object],
    rounds: int = 11,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternation."""
    for _ in range(warmup):
        for fn in contenders.values():
            sync(fn())
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
