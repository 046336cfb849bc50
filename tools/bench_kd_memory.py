"""Compiled memory of the KD loss + gradient: token-chunked vs naive, at Llama-3 scale.

Nothing is allocated: the loss+grad is lowered on abstract inputs (``jax.ShapeDtypeStruct``) and
compiled, and XLA's buffer assignment reports the temporary bytes the step would need. Gradients
are taken w.r.t. the student hidden states and student lm_head, as in distillation.

    python tools/bench_kd_memory.py                       # V=128256, N=8192, D=4096, all bf16
    python tools/bench_kd_memory.py --head-dtype float32 --compute-dtype bfloat16   # fp32 master heads
    python tools/bench_kd_memory.py --chunk-sizes 512 1024 2048 --student-hidden 3072

Reading the numbers: the chunked temp is a fixed part that scales with the head ([D, V]: the head
gradient of one chunk plus its running sum, and a bf16 copy of fp32 heads) plus ~4 chunk-sized
[chunk, V] fp32 buffers; the naive temp holds ~3 full [N, V] fp32 buffers. XLA:CPU also upcasts bf16
matmul operands to fp32, which inflates both columns on CPU compared with GPU/TPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from minitron_jax.train.chunked_loss import chunked_logit_loss, naive_logit_loss
from minitron_jax.train.losses import KD_KINDS

GIB = 2**30


def abstract_inputs(n: int, ds: int, dt: int, vocab: int, hidden_dtype, head_dtype) -> tuple:
    spec = jax.ShapeDtypeStruct
    return (
        spec((n, ds), hidden_dtype),  # student hidden
        spec((ds, vocab), head_dtype),  # student lm_head
        spec((n, dt), hidden_dtype),  # teacher hidden
        spec((dt, vocab), head_dtype),  # teacher lm_head
        spec((n,), jnp.int32),  # targets
        spec((n,), jnp.float32),  # weights
    )


def compiled_memory(loss_fn, inputs, **options):
    """(memory stats, compile seconds) of jit(grad(loss)) w.r.t. student hidden and head."""
    grad = jax.jit(jax.grad(lambda *a: loss_fn(*a, **options)[0], argnums=(0, 1)))
    start = time.perf_counter()
    stats = grad.lower(*inputs).compile().memory_analysis()
    return stats, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096, help="teacher hidden size")
    parser.add_argument("--student-hidden", type=int, default=None, help="default: same as --hidden")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the hidden states")
    parser.add_argument("--head-dtype", default=None, help="dtype of the lm_heads (default: --dtype)")
    parser.add_argument("--compute-dtype", default=None, help="matmul operand dtype (default: inputs' own)")
    parser.add_argument("--kind", default="forward_kl", choices=KD_KINDS)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args()

    ds = args.student_hidden or args.hidden
    head_dtype = args.head_dtype or args.dtype
    inputs = abstract_inputs(
        args.tokens, ds, args.hidden, args.vocab, jnp.dtype(args.dtype), jnp.dtype(head_dtype)
    )
    compute_dtype = None if args.compute_dtype is None else jnp.dtype(args.compute_dtype)
    options = dict(kind=args.kind, top_k=args.top_k, alpha=args.alpha, compute_dtype=compute_dtype)
    logits_gib = args.tokens * args.vocab * 4 / GIB

    print(f"backend={jax.default_backend()}  N={args.tokens}  V={args.vocab}  Ds={ds}  Dt={args.hidden}  "
          f"hidden={args.dtype}  head={head_dtype}  compute={args.compute_dtype}  kind={args.kind}  "
          f"top_k={args.top_k}  alpha={args.alpha}")
    print(f"one fp32 [N, V] logits buffer = {logits_gib:.2f} GiB")

    naive, secs = compiled_memory(naive_logit_loss, inputs, **options)
    if naive is None:
        raise SystemExit(f"memory_analysis() is not available on backend {jax.default_backend()!r}")
    print(f"{'variant':<22}{'temp GiB':>10}{'args GiB':>10}{'out GiB':>10}{'naive/this':>12}{'compile s':>11}")

    def row(name, stats, seconds):
        ratio = naive.temp_size_in_bytes / max(stats.temp_size_in_bytes, 1)
        print(f"{name:<22}{stats.temp_size_in_bytes / GIB:>10.2f}{stats.argument_size_in_bytes / GIB:>10.2f}"
              f"{stats.output_size_in_bytes / GIB:>10.2f}{ratio:>12.1f}{seconds:>11.1f}")

    row("naive", naive, secs)
    for chunk in args.chunk_sizes:
        stats, secs = compiled_memory(chunked_logit_loss, inputs, chunk_size=chunk, **options)
        row(f"chunked (chunk={chunk})", stats, secs)


if __name__ == "__main__":
    main()
