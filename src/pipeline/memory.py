"""Peak resident memory of this process, per phase (load, each stage): what a CPU run costs in memory.

Linux keeps the peak (VmHWM in /proc/self/status) and lets a process reset it (writing 5 to
/proc/self/clear_refs, since Linux 4.0), so each phase gets its own peak. Elsewhere the peak since the
process started (getrusage) is all there is, and phases after the first report at least the earlier peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new peak at the current resident size; False where the OS cannot (the peak then keeps growing)."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The peak resident memory (MiB) since the last `reset_peak`, or since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """The resident memory (MiB) now."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()


def seconds_since_start() -> float:
    """Seconds since this process started (interpreter start-up and imports included).

    On Linux both ends are read from the boot clock: the process's start in clock ticks since boot
    (/proc/self/stat, field 22) against CLOCK_BOOTTIME now, so the figure is good to a tick (10 ms).
    psutil's create_time adds that to the boot time of /proc/stat, which is whole seconds: every process
    then seems to have started up to a second earlier (0.59 s on the machine this was found on).
    """
    import os
    import time

    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # the fields after "(comm) ": state is field 3
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except (ImportError, OSError):
        return float("nan")
