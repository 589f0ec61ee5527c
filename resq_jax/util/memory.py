"""Resident memory of this process, and stage meters for benchmarks (Linux /proc; elsewhere ru_maxrss).

``StageMeter`` times named stages and records each stage's peak resident set size: the kernel's high-water
mark (``VmHWM``) is reset at the start of a stage by writing 5 to ``/proc/self/clear_refs``, so a stage's
peak is its own, not the run's so far."""
from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size in MB (0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """Peak resident set size in MB since the process started or the last ``reset_peak``."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> bool:
    """Reset the peak (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class StageMeter:
    """``with meter.stage("calibrate"): ...`` records {"seconds", "peak_rss_mb", "rss_end_mb"} per stage."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.resettable = reset_peak()

    @contextlib.contextmanager
    def stage(self, name: str):
        reset_peak()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                                 "rss_end_mb": rss_mb()}


# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h)
_M_MMAP_THRESHOLD = -3


def release_large_blocks(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with their own mmap, so freeing one returns
    it to the OS at once. Without this glibc raises its threshold dynamically after the first large free and
    later layer-sized buffers (tens to hundreds of MB each, made and dropped per layer) stay in its heap: on a
    7B-width layer the resident set kept 3.3 GB of freed buffers after the float evaluation. Call once at
    start; returns False (and changes nothing) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
