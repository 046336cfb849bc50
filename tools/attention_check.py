"""The attention implementations on this machine: do packed documents stay apart, do they agree with a float32
reference, and what does one attention forward + backward cost at a long row.

    python tools/attention_check.py [--dtype bfloat16] [--batch 2 --seq-len 512] [--time-batch 4 --time-seq-len 4096]
                                    [--no-time] [--json]

The fused implementation (``train.attention: fused``) hands our boolean mask to ``jax.nn.dot_product_attention``,
which on an NVIDIA GPU in half precision is cuDNN's kernel. No CPU can run that kernel, and the distillation
benchmark feeds it rows of a single document. This checks the kernel on rows that pack several documents and end
in padding, which is what training feeds it. It is a piece of ``tools/gpu_check.sh``.

For each of ``einsum``, ``blockwise`` and ``fused`` (``minitron_jax.attention.ATTENTION_IMPLS``), in ``--dtype``:
- **leak**: the largest change of any document's outputs, and of the gradients that reach its queries, keys and
  values, when every *other* document's queries, keys and values are replaced. It must be exactly 0. A kernel that
  sees only "causal" lets a document attend to the documents packed before it.
- **error**: the largest absolute difference of the outputs and of the q/k/v gradients from ``attend`` run in
  float32 on the same (rounded) inputs, at real (non-padding) query positions, relative to the reference's largest
  magnitude.
- **time**: median milliseconds of one jitted forward + backward at ``--time-batch × --time-seq-len`` (one
  document per row), with tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: also when imported as a module (tests)

from bench_forward import at_least  # noqa: E402

from minitron_jax.attention import ATTENTION_IMPLS, attend, attention_mask, cudnn_fused_attention  # noqa: E402

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def packed_rows(batch: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(segment_ids, positions)`` ``[B, T]``: three to five documents per row, positions restarting at each, the
    last 10% padding (segment 0)."""
    seg = np.zeros((batch, seq_len), np.int32)
    pos = np.zeros((batch, seq_len), np.int32)
    used = seq_len - max(1, seq_len // 10)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, used - 1), size=rng.integers(2, 5), replace=False))
        bounds = [0, *cuts.tolist(), used]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), 1):
            seg[b, lo:hi] = i
            pos[b, lo:hi] = np.arange(hi - lo)
    return seg, pos


def _mask(seg, pos):
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    return attention_mask(pos, pos, seg, seg, seg > 0)


def _loss_and_grads(impl, q, k, v, mask, cot):
    """Output and (dq, dk, dv) of ``sum(out · cot)``: the cotangent is zero at padding queries, as the loss is."""
    def f(q, k, v):
        out = impl(q, k, v, mask)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def check(dtype, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seg, pos = packed_rows(batch, seq_len, rng)
    mask = _mask(seg, pos)
    G = heads // kv_heads
    shapes = {"q": (batch, seq_len, kv_heads, G, head_dim), "k": (batch, seq_len, kv_heads, head_dim),
              "v": (batch, seq_len, kv_heads, head_dim)}
    x = {n: jnp.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}
    other = {n: jnp.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}
    real = jnp.asarray(seg > 0)
    cot = jnp.asarray(rng.standard_normal(shapes["q"]), jnp.float32) * real[:, :, None, None, None]

    ref_out, ref_grads = jax.jit(lambda q, k, v: _loss_and_grads(attend, q, k, v, mask, cot))(
        *(x[n].astype(jnp.float32) for n in "qkv"))
    ref = [ref_out * real[:, :, None, None, None], *ref_grads]
    scale = [float(jnp.max(jnp.abs(r))) or 1.0 for r in ref]

    out = {}
    for name, impl in ATTENTION_IMPLS.items():
        fn = jax.jit(lambda q, k, v, impl=impl: _loss_and_grads(impl, q, k, v, mask, cot))
        o, g = fn(x["q"], x["k"], x["v"])
        got = [o.astype(jnp.float32) * real[:, :, None, None, None], *(t.astype(jnp.float32) for t in g)]
        error = {key: float(jnp.max(jnp.abs(a - r))) / s
                 for key, a, r, s in zip(("out", "dq", "dk", "dv"), got, ref, scale)}
        # Leak: for each document d, replace everything outside d and compare d's own outputs and gradients.
        leak = 0.0
        for d in range(1, int(seg.max()) + 1):
            inside = jnp.asarray(seg == d)
            swap = {n: jnp.where(inside.reshape(inside.shape + (1,) * (x[n].ndim - 2)), x[n], other[n]) for n in x}
            o2, g2 = fn(swap["q"], swap["k"], swap["v"])
            for a, b in zip((o, *g), (o2, *g2)):
                sel = inside.reshape(inside.shape + (1,) * (a.ndim - 2))
                leak = max(leak, float(jnp.max(jnp.abs(jnp.where(sel, a.astype(jnp.float32) - b.astype(jnp.float32),
                                                                    0.0)))))
        out[name] = {"leak": leak, "error": error}
    return {"shape": f"{batch} x {seq_len}, {heads} heads / {kv_heads} kv, head_dim {head_dim}",
            "documents_per_row": [int(s.max()) for s in seg], "impls": out}


def time_impls(dtype, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, repeats: int = 3) -> dict:
    rng = np.random.default_rng(1)
    seg = np.ones((batch, seq_len), np.int32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
    mask = _mask(seg, pos)
    G = heads // kv_heads
    q = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, G, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, head_dim)), dtype)
    cot = jnp.ones(q.shape, jnp.float32)
    out = {}
    for name, impl in ATTENTION_IMPLS.items():
        fn = jax.jit(lambda q, k, v, impl=impl: _loss_and_grads(impl, q, k, v, mask, cot)[1])
        try:
            jax.block_until_ready(fn(q, k, v))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1e3
            out[name] = {"ms": round(ms, 3), "tokens_per_s": round(batch * seq_len / ms * 1e3, 1)}
        except Exception as e:  # noqa: BLE001 - out of memory at this shape is a result, not a crash
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"shape": f"{batch} x {seq_len}, {heads} heads / {kv_heads} kv, head_dim {head_dim}", "impls": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--batch", type=at_least(1), default=2)
    p.add_argument("--seq-len", type=at_least(16), default=512)
    p.add_argument("--heads", type=at_least(1), default=32, help="query heads (Llama-3.2-1B: 32)")
    p.add_argument("--kv-heads", type=at_least(1), default=8)
    p.add_argument("--head-dim", type=at_least(1), default=64)
    p.add_argument("--time-batch", type=at_least(1), default=4)
    p.add_argument("--time-seq-len", type=at_least(2), default=4096)
    p.add_argument("--no-time", action="store_true", help="correctness only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    dtype = DTYPES[args.dtype]
    dims = (args.heads, args.kv_heads, args.head_dim)
    report = {"device": str(jax.devices()[0]), "dtype": args.dtype, "fused_uses_cudnn": cudnn_fused_attention(dtype),
              "check": check(dtype, args.batch, args.seq_len, *dims)}
    if not args.no_time:
        report["time"] = time_impls(dtype, args.time_batch, args.time_seq_len, *dims)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['device']}, {args.dtype}, fused uses cuDNN: {report['fused_uses_cudnn']}")
    print(f"packed rows {report['check']['shape']}, documents per row {report['check']['documents_per_row']}")
    for name, r in report["check"]["impls"].items():
        err = ", ".join(f"{k} {v:.1e}" for k, v in r["error"].items())
        print(f"  {name:<10} leak {r['leak']:.1e}   error vs float32 einsum: {err}")
    if "time" in report:
        print(f"forward + backward, {report['time']['shape']}:")
        for name, r in report["time"]["impls"].items():
            print(f"  {name:<10} " + (f"{r['ms']:.2f} ms, {r['tokens_per_s']:,.0f} tok/s" if "ms" in r else r["error"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
