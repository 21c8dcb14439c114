"""Freed CPU memory kept in the process, so the next tick does not fault the same pages in again.

A tick on the CPU allocates and frees hundreds of buffers of a few megabytes: the codec streams
of every session (32 sessions of the default model: [32, 8, 2000] float32, 2 MB each). glibc's
malloc hands free memory at the top of a heap back to the kernel once a few megabytes of it are
free, so each tick maps the same pages again: measured with the default model, 32 sessions at
position 50 on 2 threads, 12,000-16,000 page faults and 30-40 ms of kernel time per tick, and a
tick of 120 ms median with them against 83 ms without (docs/benchmarks.md). PyTorch's CPU
tuning guides reach for jemalloc or tcmalloc for the same reason; telling glibc to keep what it
frees does it without a preload.

It is process-wide and one-way (glibc has no call that restores its adaptive defaults), so the
stepper applies it once, for CPU models only; ``HERTZ_KEEP_FREED_MEMORY=0`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks below this come from the heap and are reused; glibc's largest allowed value on 64-bit.
# Larger blocks (weights being loaded) are still mapped on their own and given back when freed.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory a heap keeps rather than returns; the process's RSS stays at its peak heap use,
# which for the engine is one tick's working set (tens of megabytes for 32 default sessions).
TRIM_THRESHOLD = 1024 * 1024 * 1024

ENV_VAR = "HERTZ_KEEP_FREED_MEMORY"

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (once per process).

    Returns True when the setting is in effect; False where the C library is not glibc (musl,
    macOS, Windows), where ``HERTZ_KEEP_FREED_MEMORY=0`` turned it off, or where glibc refused.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> bool:
    if os.environ.get(ENV_VAR, "1").strip() in ("0", "false", "no"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it, and only glibc has these knobs
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not applied:
        log.warning("glibc refused the malloc settings; CPU ticks may page-fault their buffers")
    return applied
