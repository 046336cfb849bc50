"""Where a traced step's device time goes: a jax profiler trace summed by kernel (GPU) or XLA op (CPU).

    python tools/trace_summary.py TRACE_DIR [--top 15]        # a directory written by jax.profiler.trace(...,
                                                               # create_perfetto_trace=True); prints one JSON object

``bench_distill.py --profile`` traces one extra train step and puts this summary in its JSON. That is how
``tools/gpu_check.sh`` brings a per-op breakdown back from a lent GPU. It reads only the trace's Chrome-format JSON
(``perfetto_trace.json.gz``, or ``*.trace.json.gz``), so it needs no TensorBoard or xprof on the device machine.

Which events count:
- **Device processes** (process name containing ``/device:``, e.g. ``/device:GPU:0``): their complete events are
  kernels, memcpys and collectives on the device's streams. Threads named like XLA's derived timelines
  (``XLA Modules``, ``XLA Ops``, ``Steps``…) repeat the same time at a coarser grain, so they are summed separately
  and not counted twice. The thread totals are reported as well, so an unexpected layout shows in the output.
- **No device process** (XLA:CPU): the host events that carry an ``hlo_op`` argument, i.e. the thunks that ran
  the compiled program's ops. XLA:CPU runs its dots as YNNPACK fusions (``ynn_fusion``), counted as matmul; they
  may carry fused elementwise work too.

``busy_ms`` is the union of the counted intervals. Kernels on parallel streams overlap, so it can be below
``sum_ms``. Set against the step's wall time, the gap is time the device spent waiting on the host or idle.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# Ordered: the first match names the category. Kernel names (cuBLAS/cuDNN/NCCL/Triton) and XLA op names both.
CATEGORIES = (
    ("attention", re.compile(r"fmha|flash|sdpa|attn|attention|fprop|dgrad_attn|cudnn", re.I)),
    ("matmul", re.compile(r"ynn_fusion|gemm|nvjet|cublas|cutlass|xmma|matmul|\bdot\b|dot[._]|convolution|wgmma|"
                          r"sm\d+_.*mma", re.I)),
    ("collective", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective|all-to-all|allreduce|"
                              r"allgather", re.I)),
    ("copy", re.compile(r"memcpy|memset|\bcopy|transpose|dynamic-update-slice|dynamic_update_slice", re.I)),
)
OTHER = "other (fusions, reductions, elementwise)"
# XLA's derived per-op/per-module timelines on a device: the same time as the stream events, coarser.
# Names as xprof's derived lines have them (tsl/profiler: "Steps", "XLA Modules", "XLA Ops", "Async XLA Ops",
# "TensorFlow Name Scope", "TensorFlow Ops", "Launch Stats", "Source code"; SparseCore lines on TPUs).
DERIVED_THREADS = re.compile(r"^(XLA Modules|XLA Ops|Async XLA Ops|XLA TraceMe|Steps|TensorFlow|Framework|"
                             r"Source code|Launch Stats|Host Threads|SparseCore)", re.I)


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return OTHER


def find_trace(trace_dir: str | Path) -> Path:
    """The newest Chrome-format trace under ``trace_dir`` (jax writes ``plugins/profile/<run>/…``)."""
    found = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz")) or sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz or *.trace.json.gz (was the trace written "
                                "with create_perfetto_trace=True?)")
    return max(found, key=lambda p: p.stat().st_mtime)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total / 1e3


def _group_name(name: str) -> str:
    """``fusion.123`` / ``loop_add_fusion_7`` → ``fusion`` / ``loop_add_fusion``: one row per kind of op, not per
    instance; long templated kernel names are cut at 100 characters."""
    return re.sub(r"([._]\d+)+$", "", name)[:100]


def summarize(events: list[dict], *, wall_ms: float | None = None, top: int = 15) -> dict:
    """The summary of one trace's events (see the module docstring)."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and "args" in e}
    device_pids = {pid for pid, name in processes.items() if "/device:" in name}
    counted, derived = [], defaultdict(float)
    thread_ms = defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids:
            if e["pid"] not in device_pids:
                continue
            thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
            label = f"{processes[e['pid']]} / {thread}"
            thread_ms[label] += e["dur"] / 1e3
            if DERIVED_THREADS.match(thread):
                derived[thread] += e["dur"] / 1e3
                continue
        elif "hlo_op" not in e.get("args", {}):
            continue
        counted.append(e)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_cat: dict[str, float] = defaultdict(float)
    for e in counted:
        name = e["name"]
        hlo = e.get("args", {}).get("hlo_op")
        key = _group_name(name) if not hlo or hlo == name else f"{_group_name(name)} [{_group_name(hlo)}]"
        by_name[key][0] += e["dur"] / 1e3
        by_name[key][1] += 1
        by_cat[category(f"{name} {hlo or ''}")] += e["dur"] / 1e3
    sum_ms = sum(v[0] for v in by_name.values())
    busy_ms = _union_ms([(e["ts"], e["ts"] + e["dur"]) for e in counted])
    out = {"source": "device" if device_pids else "host (hlo_op events)",
           "processes": sorted(processes[p] for p in device_pids) if device_pids else sorted(processes.values()),
           "events": len(counted), "sum_ms": round(sum_ms, 3), "busy_ms": round(busy_ms, 3),
           "categories": {k: {"ms": round(v, 3), "share": round(v / sum_ms, 4) if sum_ms else None}
                          for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
           "top": [{"name": k, "ms": round(v[0], 3), "count": v[1], "share": round(v[0] / sum_ms, 4)}
                   for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]] if sum_ms else [],
           "threads_ms": {k: round(v, 3) for k, v in sorted(thread_ms.items(), key=lambda kv: -kv[1])[:12]}}
    if derived:
        out["derived_ms"] = {k: round(v, 3) for k, v in derived.items()}
    if wall_ms:
        out["wall_ms"] = round(wall_ms, 3)
        out["busy_over_wall"] = round(busy_ms / wall_ms, 4)
    return out


def summarize_dir(trace_dir: str | Path, *, wall_ms: float | None = None, top: int = 15) -> dict:
    path = find_trace(trace_dir)
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return {"trace": path.name, **summarize(events, wall_ms=wall_ms, top=top)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=15, help="rows of the per-op table")
    p.add_argument("--wall-ms", type=float, default=None, help="the traced step's wall time, for busy_over_wall")
    args = p.parse_args(argv)
    try:
        print(json.dumps(summarize_dir(args.trace_dir, wall_ms=args.wall_ms, top=args.top), indent=1))
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
