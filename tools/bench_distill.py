"""Throughput of the distillation train step, its cost relative to plain CE training, and its memory.

CPU mode (default): SmolLM2-135M-Instruct (the embedded GGUF) teaches a width-pruned copy of itself (hidden
576 → 480, FFN 1536 → 1024, magnitude ranking: no calibration pass needed for a speed test). Three numbers:

1. tokens/s of the jitted distillation step (teacher forward + student forward/backward + chunked KD + AdamW);
2. tokens/s of the same student trained with plain CE (no teacher) through the same step builder, and the ratio —
   the price of the teacher;
3. compiled temporary memory (XLA buffer assignment, nothing allocated) of the *whole step* with the chunked loss
   vs the naive loss that materializes [tokens × vocab] logits of both models, for one ``--mem-seq-len``-token
   row: at SmolLM2's vocab, and at Llama-3's (128256, on a 2-layer model so that the logits dominate).

``--gpu``: 1B-class shapes in bf16 (a Llama-3.2-1B-like teacher, a width-pruned student, random weights), the
mesh over all local devices (FSDP), and MFU from ``minitron_jax.train.observe``'s peak-FLOP table.

    python tools/bench_distill.py                       # CPU, 1 device
    python tools/bench_distill.py --batch 4 --seq-len 512 --steps 5
    python tools/bench_distill.py --gpu --batch 16 --seq-len 4096 --grad-accum 2
    python tools/bench_distill.py --json
    python tools/bench_distill.py --cached-teacher 64      # also: the student trained from a cached top-64 teacher

``--cached-teacher K`` adds a third number: the same student's step when the teacher's top-K log-probs come with the
batch (``teacher.logits_cache``, ``python -m minitron_jax.teacher_logits``): no teacher weights, no teacher forward;
the cached arrays here are synthetic (uniform log-probs over K random ids), which costs the step the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: also when imported as a module (tests)

from bench_forward import at_least  # noqa: E402

from minitron_jax.attention import ATTENTION_IMPLS  # noqa: E402  (the model's own list of attention kinds)
from minitron_jax.config import LlamaConfig
from minitron_jax.model import count_params, init_params
from minitron_jax.sharding import make_mesh
from minitron_jax.train.config import load_config
from minitron_jax.train.observe import peak_flops, step_flops_per_token
from minitron_jax.train.state import abstract_teacher, abstract_train_state, init_train_state, place_teacher
from minitron_jax.train.step import abstract_batch, build_train_step

GIB = 2**30


def run_config(args, *extra):
    dtype = "bfloat16" if args.gpu else "float32"
    return load_config(None, [
        "run_dir=/tmp/bench_distill", "teacher.path=unused", "student.path=unused", "data.sources=unused",
        f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}", f"train.grad_accum={args.grad_accum}",
        "train.steps=1000", f"train.compute_dtype={dtype}", f"teacher.dtype={dtype}", f"train.remat={args.remat}",
        f"train.attention={args.attention}",
        f"loss.chunk_size={args.chunk_size}", *extra])


def cpu_models():
    from minitron_jax.compress.prune import prune_from_spec
    from minitron_jax.compress.spec import PruneSpec
    from minitron_jax.convert import load_model
    from minitron_jax.data.assets import smollm2_gguf

    teacher = load_model(smollm2_gguf(), with_tokenizer=False)
    student_cfg, student_params, _ = prune_from_spec(teacher.config, teacher.params, None,
                                                     PruneSpec(hidden=480, ffn=1024, importance="magnitude"), None)
    return teacher.config, teacher.params, student_cfg, student_params


def gpu_models():
    teacher = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                          max_position_embeddings=131072)
    student = teacher.replace(hidden_size=1536, intermediate_size=6144)
    key_t, key_s = jax.random.split(jax.random.key(0))
    host = lambda t: jax.tree.map(np.asarray, t)
    return teacher, host(init_params(teacher, key_t)), student, host(init_params(student, key_s))


def cached_teacher_arrays(rng, shape, vocab: int, top_k: int) -> dict:
    """Synthetic cached-teacher batch arrays in the cache's dtypes (ids uint16 below 2^16 vocab, log-probs fp16)."""
    ids = rng.integers(0, vocab, (*shape, top_k)).astype(np.uint16 if vocab <= 65536 else np.int32)
    uniform = np.float32(-np.log(top_k + 1))
    return {"teacher_ids": ids, "teacher_logprobs": np.full((*shape, top_k), uniform, np.float16),
            "teacher_rest": np.full(shape, uniform, np.float32)}


def time_step(rc, mesh, student_cfg, student_params, teacher_cfg, teacher_params, steps: int,
              cached_top_k: int | None = None, profile: bool = False) -> dict:
    """Median seconds per step (after one compile/warm-up step) and tokens/s; with ``profile``, one more step under
    the jax profiler, summed by kernel/op (tools/trace_summary.py), as ``"profile"``."""
    ts = build_train_step(rc, mesh, student_cfg, teacher_cfg)
    state = init_train_state(rc, mesh, student_cfg, teacher_cfg, student_params)
    teacher = place_teacher(rc, mesh, teacher_cfg, teacher_params) if teacher_cfg else {}
    rng = np.random.default_rng(0)
    shape = (rc.data.batch_size, rc.data.seq_len)
    batch = {"tokens": rng.integers(0, student_cfg.vocab_size, shape), "segment_ids": np.ones(shape),
             "positions": np.broadcast_to(np.arange(shape[1]), shape), "loss_mask": np.ones(shape)}
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    if cached_top_k:
        batch.update(cached_teacher_arrays(rng, shape, student_cfg.vocab_size, cached_top_k))
    batch = jax.device_put(batch, ts.batch_shardings)
    start = time.perf_counter()
    state, metrics = ts.step(state, teacher, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = ts.step(state, teacher, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    traced = trace_one_step(ts, state, teacher, batch) if profile else None
    tokens = shape[0] * shape[1]
    # The cached step's useful work is the student's alone (teacher_cfg None): its MFU is not inflated.
    flops = step_flops_per_token(student_cfg, teacher_cfg, rc.data.seq_len) * tokens
    peak = peak_flops(list(mesh.devices.flat))
    return {"seconds_per_step": sec, "tokens_per_s": tokens / sec, "first_step_s": compile_s,
            "tflops_per_s": flops / sec / 1e12, "mfu": (flops / sec / peak) if peak else None,
            "loss": float(metrics["loss"]), **({"profile": traced} if traced else {})}


def trace_one_step(ts, state, teacher, batch) -> dict:
    """One more step under ``jax.profiler.trace``, summarized (tools/trace_summary.py) against its wall time. The
    trace itself is dropped: the device tool brings back only a few small files."""
    import tempfile

    from trace_summary import summarize_dir

    wall_ms = None
    # Whatever goes wrong with the profiler or the trace's layout is reported in the result, never raised: on a lent
    # GPU this piece's timings (and the CE-only and cached steps still to come) matter more than the profile.
    try:
        with tempfile.TemporaryDirectory(prefix="bench_distill_trace_") as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                start = time.perf_counter()
                _, metrics = ts.step(state, teacher, batch)
                jax.block_until_ready(metrics)
                wall_ms = (time.perf_counter() - start) * 1e3
            return summarize_dir(tmp, wall_ms=wall_ms)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}",
                **({"wall_ms": round(wall_ms, 3)} if wall_ms is not None else {})}


def step_temp_bytes(rc, mesh, student_cfg, teacher_cfg) -> int:
    ts = build_train_step(rc, mesh, student_cfg, teacher_cfg)
    compiled = ts.step.lower(abstract_train_state(rc, mesh, student_cfg, teacher_cfg),
                             abstract_teacher(rc, mesh, teacher_cfg), abstract_batch(rc, mesh)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="1B-class bf16 shapes over all local devices")
    p.add_argument("--batch", type=at_least(1), default=None, help="global rows (default: 4 CPU, 8 per device GPU)")
    p.add_argument("--seq-len", type=at_least(2), default=None, help="default: 256 CPU, 4096 GPU")
    p.add_argument("--grad-accum", type=at_least(1), default=1)
    p.add_argument("--remat", default=None, help="default: none CPU, full GPU")
    p.add_argument("--chunk-size", type=at_least(1), default=1024)
    p.add_argument("--attention", choices=tuple(ATTENTION_IMPLS), default="einsum", help="train.attention")
    p.add_argument("--steps", type=at_least(1), default=3, help="timed steps (after a warm-up step)")
    p.add_argument("--mem-seq-len", type=at_least(2), default=4096, help="tokens of the memory comparison (one row)")
    p.add_argument("--no-memory", action="store_true", help="skip the compiled-memory comparison")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput measurements")
    p.add_argument("--cached-teacher", type=at_least(1), metavar="K",
                   help="also time the step reading a cached top-K teacher instead of running it")
    p.add_argument("--profile", action="store_true",
                   help="trace one more online step and report where its device time goes (tools/trace_summary.py)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    devices = jax.devices() if args.gpu else jax.devices()[:1]
    args.batch = args.batch or (8 * len(devices) if args.gpu else 4)
    args.seq_len = args.seq_len or (4096 if args.gpu else 256)
    args.remat = args.remat or ("full" if args.gpu else "none")
    mesh = make_mesh(1, len(devices), 1, devices=devices)
    teacher_cfg, teacher_params, student_cfg, student_params = gpu_models() if args.gpu else cpu_models()

    report = {"device": f"{len(devices)} x {devices[0].device_kind}", "platform": platform.processor() or "",
              "batch": args.batch, "seq_len": args.seq_len, "grad_accum": args.grad_accum, "remat": args.remat,
              "attention": args.attention,
              "teacher": f"{teacher_cfg.describe()} ({count_params(teacher_cfg) / 1e6:.1f}M)",
              "student": f"{student_cfg.describe()} ({count_params(student_cfg) / 1e6:.1f}M)"}
    if not args.no_speed:
        rc = run_config(args)
        report["distill"] = time_step(rc, mesh, student_cfg, student_params, teacher_cfg, teacher_params, args.steps,
                                      profile=args.profile)
        # The same student and step builder, trained with plain CE and no teacher (what teacher_correction runs).
        ce_rc = run_config(args, "mode=teacher_correction", "student.path=null")
        report["ce_only"] = time_step(ce_rc, mesh, student_cfg, student_params, None, None, args.steps)
        report["distill_over_ce_time"] = (report["distill"]["seconds_per_step"]
                                          / report["ce_only"]["seconds_per_step"])
        if args.cached_teacher:
            # The path is never opened: the step is built from the config and the batch arrays given here.
            cached_rc = run_config(args, "teacher.logits_cache=/nonexistent/synthetic")
            report["distill_cached"] = time_step(cached_rc, mesh, student_cfg, student_params, None, None,
                                                 args.steps, cached_top_k=args.cached_teacher)
            report["distill_cached"]["top_k"] = args.cached_teacher
            report["online_over_cached_time"] = (report["distill"]["seconds_per_step"]
                                                 / report["distill_cached"]["seconds_per_step"])

    if not args.no_memory:
        memory = {"tokens": args.mem_seq_len, "chunk_size": args.chunk_size}
        mem_args = argparse.Namespace(**{**vars(args), "batch": len(devices), "seq_len": args.mem_seq_len})
        large_vocab = student_cfg.replace(vocab_size=128256, num_layers=2)
        large_teacher = teacher_cfg.replace(vocab_size=128256, num_layers=2)
        for name, s_cfg, t_cfg in (("model_vocab", student_cfg, teacher_cfg),
                                   ("vocab_128256", large_vocab, large_teacher)):
            row = {"vocab": s_cfg.vocab_size}
            for impl in ("chunked", "naive"):
                rc = run_config(mem_args, f"loss.naive={impl == 'naive'}")
                row[f"{impl}_temp_gib"] = step_temp_bytes(rc, mesh, s_cfg, t_cfg) / GIB
            row["logits_fp32_gib_per_model"] = mem_args.batch * mem_args.seq_len * s_cfg.vocab_size * 4 / GIB
            memory[name] = row
        report["step_memory"] = memory

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"device: {report['device']}   batch {args.batch} x {args.seq_len} tokens   remat {args.remat}")
    print(f"teacher: {report['teacher']}\nstudent: {report['student']}")
    for name in ("distill", "ce_only", "distill_cached") if "distill" in report else ():
        if name not in report:
            continue
        r = report[name]
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{name:<8} {r['seconds_per_step']:.3f} s/step  {r['tokens_per_s']:,.0f} tok/s  "
              f"{r['tflops_per_s']:.3f} TFLOP/s  MFU {mfu}  (first step {r['first_step_s']:.1f} s)")
    if "distill" in report:
        print(f"distill step time / CE-only step time = {report['distill_over_ce_time']:.2f}")
    prof = report.get("distill", {}).get("profile")
    if prof and "categories" in prof:
        print(f"one traced online step: {prof['wall_ms']:.1f} ms wall, {prof['busy_ms']:.1f} ms busy, "
              + ", ".join(f"{k} {v['share']:.0%}" for k, v in prof["categories"].items()))
    if "distill_cached" in report:
        print(f"online-teacher step time / cached top-{args.cached_teacher} step time = "
              f"{report['online_over_cached_time']:.2f}")
    for row in (v for v in report.get("step_memory", {}).values() if isinstance(v, dict)):
        print(f"whole-step temp memory, V={row['vocab']}: chunked {row['chunked_temp_gib']:.3f} GiB, "
              f"naive {row['naive_temp_gib']:.3f} GiB "
              f"(one fp32 logits buffer: {row['logits_fp32_gib_per_model']:.3f} GiB)")


if __name__ == "__main__":
    main()
