"""The one memory harness of the benchmarks: extra peak RSS, fresh processes.

A process's peak RSS only grows, so each contender is measured in a
process of its own: the benchmark runs itself again with the arguments
that name it, and reads the number that run prints last.
"""

import resource
import subprocess
import sys
from collections.abc import Callable


def peak_rss_mib() -> float:
    """This process's peak RSS so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extra_peak_mib(step: Callable[[], object], sync: Callable[[object], object]):
    """How far one call of `step` raises this process's RSS at its peak, in MiB.

    On Linux the peak is reset first (`/proc/self/clear_refs`), so that the
    peak of the set-up before the call (the data's float32 copies, say)
    cannot hide the call's own; elsewhere, the growth of the lifetime peak.
    """
    if _reset_peak():
        before = _status_mib("VmRSS")
        sync(step())
        return _status_mib("VmHWM") - before
    before = peak_rss_mib()
    sync(step())
    return peak_rss_mib() - before


def torch_extra_peak_mib(step: Callable[[], object], sync: Callable[[object], object]):
    """`extra_peak_mib` of a PyTorch step: on a CUDA device, the extra peak
    of allocated device memory (`max_memory_allocated`); elsewhere, RSS."""
    import torch

    if not torch.cuda.is_available():
        return extra_peak_mib(step, sync)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sync(step())
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float:
    """A `/proc/self/status` field (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def in_fresh_process(script: str, arguments: list[str]) -> float | str:
    """The last number `script` prints, or why it failed (its last line)."""
    result = subprocess.run(
        [sys.executable, script, *arguments], capture_output=True, text=True
    )
    if result.returncode == 0:
        return float(result.stdout.split()[-1])
    if result.returncode == -9:
        return "killed (SIGKILL: out of memory, as a rule)"
    last = (result.stderr.strip().splitlines() or ["no stderr"])[-1]
    return f"failed ({result.returncode}): {last}"
