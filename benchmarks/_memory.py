"""The one memory harness of the benchmarks: extra peak RSS, fresh processes.

A process's peak RSS only grows, so each contender is measured in a
process of its own: the benchmark runs itself again with the arguments
that name it, and reads the number that run prints last.
"""

import resource
import subprocess
import sys
from collections.abc import Callable


def extra_peak_mib(step: Callable[[], object], sync: Callable[[object], object]):
    """How far one call of `step` raises this process's peak RSS, in MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sync(step())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def in_fresh_process(script: str, arguments: list[str]) -> float | str:
    """The last number `script` prints, or why it failed (its last line)."""
    result = subprocess.run(
        [sys.executable, script, *arguments], capture_output=True, text=True
    )
    if result.returncode == 0:
        return float(result.stdout.split()[-1])
    # (Out of memory, for one: the naive step at long lengths.)
    last = (result.stderr.strip().splitlines() or ["no stderr"])[-1]
    return f"failed ({result.returncode}): {last}"
