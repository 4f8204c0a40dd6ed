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


def small_calls_row(ours, native, native_name, x, sync, rounds, calls=100):
    """A sampling loop: `calls` eager calls on one small `x`, time per call."""

    def loop(fn):
        def run():
            for _ in range(calls):
                out = fn(x)
            return out

        return run

    times = interleaved_medians(
        {"ours": loop(ours), "native": loop(native)}, sync=sync, rounds=rounds
    )
    shape = list(x.shape)
    return ratio_row(
        f"{calls} eager calls on {shape} (time per call)",
        times["ours"] / calls,
        native_name,
        times["native"] / calls,
        4,
    )


def logits_and_mask(shape, seed=0):
    """NumPy logits of scale 5, and a mask keeping 70% (the first of each slice)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(scale=5.0, size=shape).astype("float32")
    mask = rng.random(shape) >= 0.3
    mask[..., 0] = True
    return x, mask


TABLE_HEADER = (
    "| case | stable (ms) | baseline | baseline (ms) | ratio | target |\n"
    "|---|---:|---|---:|---:|---:|"
)


def _ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}"


def step_timings(steps: dict, rounds: int) -> Timings:
    """Times steps given as `{name: (step, sync)}`, in turn, after one warm-up.

    Every step is waited for with the first one's `sync`, so that all are
    synchronised alike.
    """
    sync = next(iter(steps.values()))[1]
    calls = {name: step for name, (step, _) in steps.items()}
    return interleaved_timings(calls, sync=sync, rounds=rounds, warmup=1)


def step_report(contenders, timings: Timings | None, memory: dict) -> list[str]:
    """A markdown table of each step's time and extra peak memory, then the
    first contender's ratios to each other one.

    `timings` is None where only memory was measured; a contender's memory
    is MiB, or why its measurement failed (a string).
    """
    ours = contenders[0]
    lines = ["| step | wall s | CPU s | extra peak MiB |", "|---|---|---|---|"]
    for which in contenders:
        # Four significant digits: a GPU's steps take milliseconds.
        wall = "" if timings is None else f"{timings.wall[which]:.4g}"
        cpu = "" if timings is None else f"{timings.cpu[which]:.4g}"
        peak = memory[which]
        peak = "failed" if isinstance(peak, str) else f"{peak:.0f}"
        lines.append(f"| {which} | {wall} | {cpu} | {peak} |")
    for which in contenders[1:]:
        time = (
            ""
            if timings is None
            else f"time {timings.wall[ours] / timings.wall[which]:.2f}, "
        )
        measured = all(isinstance(memory[w], float) for w in (ours, which))
        ratio = (
            f"memory {memory[ours] / memory[which]:.2f}"
            if measured
            else "memory: failed"
        )
        lines.append(f"{ours} / {which}: {time}{ratio}")
    return lines
