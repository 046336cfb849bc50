"""``python -m minitron_jax.nas --model PATH --target-params P``: a small architecture search
(:mod:`minitron_jax.compress.nas`; docs/pipeline.md).

Exit codes (:mod:`minitron_jax.exitcodes`): 0 done (or ``--list`` printed), 2 bad input (an impossible target, a bad
grid or option, a model or text that cannot be read, a candidate whose loss became non-finite), 5 another search
holds ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from minitron_jax.compress.candidates import enumerate_candidates, parse_params, select_spread
from minitron_jax.compress.nas import RANK_BY, SearchSettings, candidates_table, run_search
from minitron_jax.exitcodes import ExitCode, cli_exit


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.nas",
                                 description="Enumerate width/depth candidates near a parameter budget, prune each "
                                             "from one importance pass, distill briefly, rank, export the winner.")
    ap.add_argument("--model", required=True, help="HF directory, .gguf or minitron_jax checkpoint (asset:NAME too)")
    ap.add_argument("--target-params", required=True, help="e.g. 90M, 0.09B, 90000000")
    ap.add_argument("--tolerance", type=float, default=0.05, help="candidates within ±this fraction (default 0.05)")
    ap.add_argument("--steps", type=int, default=400, help="distillation steps per candidate (paper: ~400)")
    ap.add_argument("--eval-steps", type=_int_list, default=None,
                    help="steps at which to evaluate and rank (default: 4 evenly spaced, ending at --steps)")
    ap.add_argument("--out", default="runs/nas", help="output directory (default runs/nas)")
    ap.add_argument("--data", default="asset:wikipedia", help="distillation/validation text (default asset:wikipedia)")
    ap.add_argument("--calib", default="asset:owt", help="calibration text (default asset:owt)")
    ap.add_argument("--max-candidates", type=int, default=8, help="search at most N (evenly spread; 0: all)")
    ap.add_argument("--hidden-grid", type=_int_list, help="hidden sizes to try (default: D − k·64 down to D/2)")
    ap.add_argument("--ffn-grid", type=_int_list, help="FFN sizes to try (default: F − k·F/12 down to F/2)")
    ap.add_argument("--heads-grid", type=_int_list, help="query heads per KV group to try (default: all)")
    ap.add_argument("--layers-grid", type=_int_list, help="layer counts to try (default: L − k·step down to L/2)")
    ap.add_argument("--depth-metric", default="bi", help="which layers go: bi (free, from the same pass), ppl or "
                                                         "contiguous (extra layer-drop scans)")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--peak-lr", type=float, default=1e-4)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--val-rows", type=int, default=16,
                    help="validate on at least this many rows' worth of documents held out of --data")
    ap.add_argument("--val-batches", type=int, default=2)
    ap.add_argument("--rank-by", choices=RANK_BY, default="ce", help="validation CE (default) or KL to the teacher")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--depth-samples", type=int, default=2, help="windows for the ppl/contiguous layer scans")
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-top-k", type=int, default=None, metavar="K",
                    help="run the teacher once, caching its top-K log-probs (OUT/teacher_logits), and train every "
                         "candidate from that cache (sparse KL) instead of a teacher forward per step")
    ap.add_argument("--teacher-logits-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    return ap


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    return _run(parser().parse_args(argv))


def _run(args) -> int:
    from minitron_jax.config import ConfigError, LlamaConfig
    from minitron_jax.convert import read_source_config
    from minitron_jax.train.config import resolve_path

    target = parse_params(args.target_params)
    model = resolve_path(args.model)
    config = read_source_config(model)
    if not isinstance(config, LlamaConfig):
        raise ConfigError(f"{args.model}: the NAS prunes a uniform Llama model; this one is heterogeneous "
                          f"({config.describe()}); the layer-by-layer search is python -m minitron_jax.puzzle")
    grids = {"hidden": args.hidden_grid, "ffn": args.ffn_grid, "heads_per_group": args.heads_grid,
             "layers": args.layers_grid}
    cands = enumerate_candidates(config, target, args.tolerance, grids)
    if args.list:
        from rich.console import Console

        chosen = select_spread(cands, args.max_candidates)
        Console().print(candidates_table(chosen, config))
        print(f"{len(cands)} candidates within ±{args.tolerance:.0%} of {target:,}; {len(chosen)} would be searched")
        return ExitCode.OK
    eval_steps = args.eval_steps or sorted({max(1, round(args.steps * k / 4)) for k in (1, 2, 3, 4)})
    settings = SearchSettings(steps=args.steps, eval_steps=tuple(eval_steps), seq_len=args.seq_len,
                              batch_size=args.batch_size, peak_lr=args.peak_lr, min_lr=args.min_lr,
                              warmup_steps=args.warmup_steps, val_rows=args.val_rows, val_batches=args.val_batches,
                              rank_by=args.rank_by, compute_dtype=args.compute_dtype, calib_samples=args.calib_samples,
                              calib_seq_len=args.calib_seq_len, depth_samples=args.depth_samples,
                              depth_metric=args.depth_metric, seed=args.seed, teacher_top_k=args.teacher_top_k,
                              teacher_logits_dtype=args.teacher_logits_dtype)
    settings.check()
    run_search(model, target, out=args.out, train_text=resolve_path(args.data), calib_text=resolve_path(args.calib),
               tolerance=args.tolerance, settings=settings, grids=grids, max_candidates=args.max_candidates)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
