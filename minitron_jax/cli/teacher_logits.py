"""The offline teacher: ``python -m minitron_jax.teacher_logits`` (console script ``minitron-teacher-logits``).

Usage::

    python -m minitron_jax.teacher_logits --config RUN.yaml [section.key=value ...] [--out DIR] --top-k K
        [--dtype float16|bfloat16|float32] [--teacher PATH] [--rows-per-shard N] [--batch-rows N] [--chunk-size N]
    python -m minitron_jax.teacher_logits --teacher PATH --data SRC [SRC ...] --out DIR --top-k K
        [--seq-len T] [--val-rows N] [--split-seed S] [--cache-dir DIR] [--teacher-dtype bfloat16|float32|...]

Runs the teacher once over the run's packed rows (the same rows ``train/inputs.build_datasets`` gives the trainer:
same token cache, ``seq_len`` and held-out documents) and writes each token's top-K ids, log-probs and rest mass to
DIR (default: the config's ``teacher.logits_cache``). Resumable: a rerun writes only missing shards. A run with
``teacher.logits_cache: DIR`` then trains from it without the teacher. The work is
:func:`minitron_jax.train.teacher_cache.write_teacher_cache`; see docs/distillation.md.

Exit codes (:mod:`minitron_jax.exitcodes`): 0 done, 2 bad input (including a DIR holding a cache of another
teacher, data, K or dtype), 5 another writer holds DIR, 6 the system refused a write.
"""

from __future__ import annotations

import argparse
import json
import sys

from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.train.config import from_dict, load_config
from minitron_jax.train.teacher_cache import LOGPROB_DTYPES, write_teacher_cache

PROG = "python -m minitron_jax.teacher_logits"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Compute a teacher's top-k next-token log-probs over a "
                                 "run's training (and validation) rows once, for distillation without the teacher.")
    ap.add_argument("--config", help="run config YAML: its teacher and data section say what to compute")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of --config")
    ap.add_argument("--teacher", help="teacher model path (HF dir, .gguf, checkpoint); overrides teacher.path")
    ap.add_argument("--data", nargs="+", metavar="SRC", help="text sources, without --config")
    ap.add_argument("--seq-len", type=int, default=2048, help="packed row length, without --config")
    ap.add_argument("--val-rows", type=float, default=0.01,
                    help="held-out validation documents as in data.val_rows (an integer: rows), without --config")
    ap.add_argument("--split-seed", type=int, default=0, help="data.split_seed, without --config")
    ap.add_argument("--cache-dir", help="token cache directory (data.cache_dir), without --config")
    ap.add_argument("--teacher-dtype", default="bfloat16", help="the teacher's forward dtype, without --config")
    ap.add_argument("--out", help="cache directory (default: teacher.logits_cache of --config)")
    ap.add_argument("--top-k", type=int, required=True, help="ids kept per token (K)")
    ap.add_argument("--dtype", choices=LOGPROB_DTYPES, default="float16", help="stored log-prob dtype")
    ap.add_argument("--rows-per-shard", type=int, help="rows per shard file (default: about 256 MB)")
    ap.add_argument("--batch-rows", type=int, default=8, help="rows per teacher forward")
    ap.add_argument("--chunk-size", type=int, help="tokens per logits chunk (default: loss.chunk_size)")
    return ap


@cli_exit
def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.config and args.data:
        ap.error("give --config (its data section) or --data, not both")
    if args.config or args.overrides:
        rc = load_config(args.config, args.overrides + ([f"teacher.path={args.teacher}"] if args.teacher else []))
    elif args.data and args.teacher:
        val_rows = int(args.val_rows) if float(args.val_rows).is_integer() else args.val_rows
        # A run config of the teacher and data alone (teacher_correction: a mode that needs no student), so the rows
        # are built by the trainer's own code.
        rc = from_dict({"run_dir": ".", "mode": "teacher_correction",
                        "teacher": {"path": args.teacher, "dtype": args.teacher_dtype},
                        "data": {"sources": args.data, "seq_len": args.seq_len, "val_rows": val_rows,
                                 "split_seed": args.split_seed, "cache_dir": args.cache_dir}})
    else:
        ap.error("give --config RUN.yaml, or --teacher PATH and --data SRC ...")
    out = args.out or rc.teacher.logits_cache
    if not out:
        ap.error("give --out DIR (or teacher.logits_cache in the config)")
    summary = write_teacher_cache(rc, out, top_k=args.top_k, dtype=args.dtype, rows_per_shard=args.rows_per_shard,
                                  batch_rows=args.batch_rows, chunk_size=args.chunk_size)
    print(json.dumps(summary))
    bpt = summary["bytes_per_token"]
    print(f"done: {summary['path']}: top-{summary['top_k']} {summary['logprobs_dtype']}, {summary['tokens']} tokens, "
          + (f"{bpt:.1f} bytes/token on disk" if bpt else "no shard") + f", {summary['seconds']:.1f}s"
          + ("" if summary["complete"] else f"; {summary['shards_missing']} shard(s) left to other processes"))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
