"""Host memory: this process's resident set (now and its peak) and giving freed memory back to the system.

Why this exists (measured on the README's demo, docs/pipeline.md "Host memory"): on XLA:CPU every buffer is host
memory from glibc's malloc, and glibc keeps most of what is freed — a checkpoint save's serialization buffers
(allocated on tensorstore's threads, each with its own malloc arena), a loaded model's host copy once placed, a
finished stage's arrays — in its heaps instead of returning it. The resident set then grows by ~1 GB per checkpoint
save and by whatever the previous stage left, although Python and jax hold none of it. ``malloc_trim(0)`` returns
those free pages; it costs a few milliseconds, so it is called at the points where much was just freed.

Linux/glibc only where it matters; elsewhere the functions do nothing and the readings are ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["release", "trim", "rss_bytes", "peak_rss_bytes"]

_STATUS = "/proc/self/status"


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def trim() -> bool:
    """Return the free pages of every malloc arena to the system (glibc's ``malloc_trim(0)``); False where the C
    library has no such call (musl, macOS)."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def release(clear_jax_caches: bool = False) -> None:
    """Collect Python garbage (reference cycles can hold arrays), optionally drop jax's compiled executables and
    tracing caches, then :func:`trim`."""
    gc.collect()
    if clear_jax_caches:
        import jax

        jax.clear_caches()
        gc.collect()
    trim()


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """The resident set size now (VmRSS)."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int | None:
    """The peak resident set size since the process started (VmHWM): what ``/usr/bin/time -v`` reports as
    "Maximum resident set size". Not reset per stage on purpose: resetting it (``/proc/self/clear_refs``) also
    resets what the kernel reports to ``time`` and ``getrusage`` at exit, so the process's peak would be lost."""
    return _status_kb("VmHWM")

