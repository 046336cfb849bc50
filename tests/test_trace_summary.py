"""tools/trace_summary.py: a jax profiler trace summed by kernel/op. A hand-made trace in the GPU layout (a device
process with stream threads and XLA's derived per-op timeline, and a host process) checks what is counted, how
kernels are categorized and that overlapping streams are not counted twice in the busy time; a real XLA:CPU trace
of a small jitted function checks the host layout end to end."""

from __future__ import annotations

import gzip
import json

import pytest
from utils import load_tool


@pytest.fixture(scope="module")
def T():
    return load_tool("trace_summary")


def _gpu_trace():
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "Stream #8(NCCL)"}},
            {"ph": "M", "pid": 1, "tid": 99, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 1, "tid": 98, "name": "thread_name", "args": {"name": "Async XLA Ops"}},
            {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}}]

    def kernel(tid, ts, dur, name, hlo=None):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                "args": {"hlo_op": hlo} if hlo else {}}

    events = [kernel(7, 0, 400, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "custom-call.12"),
              kernel(7, 400, 300, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "cc.3"),
              kernel(7, 700, 100, "loop_multiply_fusion_4", "fusion.4"),
              kernel(7, 800, 50, "loop_multiply_fusion_9", "fusion.9"),
              kernel(8, 600, 300, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "all-reduce-start.1"),  # overlaps
              kernel(7, 1000, 50, "MemcpyD2D"),
              kernel(99, 0, 1050, "fusion.4"),  # XLA's derived op timelines: the same time again, not counted
              kernel(98, 600, 300, "all-reduce-start.1"),
              {"ph": "X", "pid": 701, "tid": 3, "ts": 0, "dur": 5000, "name": "PjitFunction(step)", "args": {}}]
    return meta + events


def test_gpu_layout_counts_stream_kernels_once_by_category(T):
    s = T.summarize(_gpu_trace(), wall_ms=1.5)
    assert s["source"] == "device" and s["processes"] == ["/device:GPU:0"]
    assert s["events"] == 6 and s["sum_ms"] == pytest.approx(1.2)
    assert s["busy_ms"] == pytest.approx(0.95)  # 0-900 and 1000-1050 µs: the NCCL kernel overlapped the compute
    assert s["busy_over_wall"] == pytest.approx(0.95 / 1.5, abs=1e-4)
    cats = {k: v["ms"] for k, v in s["categories"].items()}
    assert cats == pytest.approx({"matmul": 0.4, "attention": 0.3, "collective": 0.3, T.OTHER: 0.15, "copy": 0.05})
    assert list(s["categories"])[0] == "matmul"
    top = {t["name"]: (t["ms"], t["count"]) for t in s["top"]}
    assert top["loop_multiply_fusion [fusion]"] == (pytest.approx(0.15), 2)  # two instances, one row
    assert s["derived_ms"] == {"XLA Ops": 1.05, "Async XLA Ops": 0.3}
    assert s["threads_ms"]["/device:GPU:0 / Stream #7(Compute)"] == pytest.approx(0.9)


def test_a_real_cpu_trace_and_the_command_line(T, tmp_path, capsys):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()
    with jax.profiler.trace(str(tmp_path / "trace"), create_perfetto_trace=True):
        f(a, a).block_until_ready()
    assert T.main([str(tmp_path / "trace"), "--wall-ms", "1000"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["source"] == "host (hlo_op events)" and s["events"] >= 1 and s["sum_ms"] > 0
    assert 0 < s["busy_ms"] <= s["sum_ms"] and s["wall_ms"] == 1000
    assert sum(v["share"] for v in s["categories"].values()) == pytest.approx(1.0, abs=1e-3)

    assert T.main([str(tmp_path / "nothing")]) == 2
    assert "no perfetto_trace.json.gz" in capsys.readouterr().err
    bad = tmp_path / "bad" / "x.trace.json.gz"
    bad.parent.mkdir()
    with gzip.open(bad, "wt") as fh:
        fh.write("{not json")
    assert T.main([str(bad.parent)]) == 2


def test_a_failing_profiler_is_reported_not_raised(monkeypatch):
    """bench_distill --profile on a lent GPU: a profiler that cannot start (or a trace we cannot read) must not cost
    the piece its timings, so the failure comes back as the profile's "error"."""
    import jax

    B = load_tool("bench_distill")

    def refuse(*_, **__):
        raise RuntimeError("profiler already running")

    monkeypatch.setattr(jax.profiler, "trace", refuse)
    assert B.trace_one_step(None, None, None, None) == {"error": "RuntimeError: profiler already running"}
