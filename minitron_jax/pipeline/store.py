"""The stage store: which stages of a run directory are done, under which key, and with what result.

A finished stage leaves a done-marker ``stages/<stage>.json`` holding its key (a hash of the stage's own settings
and of the keys of the stages it reads, :func:`stage_key`), its result and its timings. :meth:`StageStore.stage`
skips a stage whose marker holds the same key; a marker with another key means the settings changed: it is
removed, the stage's ``on_redo`` clears its old outputs, and the stage runs again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from minitron_jax.fsutil import write_json_atomic
from minitron_jax.typed_config import nondefault

__all__ = ["STAGES_DIR", "StageRecord", "StageStore", "StopAfter", "stage_key", "file_id", "nondefault"]

STAGES_DIR = "stages"


def stage_key(*parts: Any) -> str:
    """The key of a stage: a short hash of its (JSON-able) parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_id(path: str | Path) -> list:
    """What a stage key records of an input file: its resolved path, size and modification time."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return [str(p.resolve())]


@dataclasses.dataclass
class StageRecord:
    name: str
    key: str
    result: dict[str, Any]
    seconds: float
    skipped: bool
    cpu_seconds: float = 0.0
    memory: dict[str, float] | None = None  # host memory after the stage (see _release_after_stage)


class StopAfter(Exception):
    """Raised after the stage named by ``--stop-after`` (done or skipped)."""


class StageStore:
    """The done-markers of one run directory; ``records`` holds every stage met by this invocation, in order."""

    def __init__(self, run_dir: Path, console, stop_after: str | None = None):
        self.run_dir = run_dir
        self.console = console
        self.stop_after = stop_after
        self.records: dict[str, StageRecord] = {}

    def stage(self, name: str, key_parts: Any, fn: Callable[[], dict[str, Any]],
              on_redo: Callable[[], None] | None = None) -> StageRecord:
        """Run ``fn`` unless ``stages/<name>.json`` holds the same key; record and return the result."""
        key = stage_key(key_parts)
        marker = self.run_dir / STAGES_DIR / f"{name}.json"
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())
            except json.JSONDecodeError:
                done = {}
            if done.get("key") == key:
                self.console.print(f"[green]✓[/green] [bold]{name}[/bold] done earlier "
                                   f"({done.get('seconds', 0):.0f}s), skipped")
                rec = StageRecord(name, key, done["result"], float(done.get("seconds", 0.0)), True,
                                  float(done.get("cpu_seconds", 0.0)), done.get("memory"))
                self.records[name] = rec
                self._maybe_stop(name)
                return rec
            self.console.print(f"[yellow]↻[/yellow] [bold]{name}[/bold]: settings changed since the last run, redoing")
            marker.unlink()
            if on_redo is not None:
                on_redo()
        self.console.rule(f"[bold]{name}")
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        memory = _release_after_stage()
        # CPU seconds (all threads) next to wall seconds: on a shared machine the wall time says little.
        write_json_atomic(marker, {"stage": name, "key": key, "result": result, "seconds": seconds,
                                   "cpu_seconds": cpu_seconds, "finished": time.time(), "memory": memory})
        self.console.print(f"[green]✓[/green] [bold]{name}[/bold] finished in {seconds:.1f}s"
                           + (f" (process peak RSS so far {memory['peak_rss_gb']:.2f} GB, "
                              f"{memory['rss_gb']:.2f} GB after the stage)" if memory else ""))
        rec = StageRecord(name, key, result, seconds, False, cpu_seconds, memory)
        self.records[name] = rec
        self._maybe_stop(name)
        return rec

    def _maybe_stop(self, name: str) -> None:
        if self.stop_after is not None and name == self.stop_after:
            raise StopAfter(name)


def _release_after_stage() -> dict[str, float] | None:
    """Give back what the finished stage freed, and read the process's host memory.

    A stage's models, optimizer state and compiled executables are unreachable once it returns (the pipeline keeps
    no model across stages), but glibc keeps the freed pages and jax keeps the compiled executables: the next stage
    would start gigabytes higher (measured: 2.8 GB resident after the first distillation, 0.7 GB after this).
    ``peak_rss_gb`` is the process's peak so far (VmHWM, never reset: resetting it would also reset the peak that
    ``/usr/bin/time`` reports), so the stage that raised it is the one that made the run's peak."""
    from minitron_jax import hostmem

    hostmem.release(clear_jax_caches=True)
    rss, peak = hostmem.rss_bytes(), hostmem.peak_rss_bytes()
    if rss is None or peak is None:
        return None
    return {"peak_rss_gb": round(peak / 1e9, 3), "rss_gb": round(rss / 1e9, 3)}
