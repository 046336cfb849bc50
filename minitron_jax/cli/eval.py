"""``python -m minitron_jax.eval --model PATH --text FILE --seq-len N [--max-tokens M] [--json]``: perplexity of a
model on a text, by the contract of :mod:`minitron_jax.evaluate.perplexity`."""

from __future__ import annotations

import argparse
import json
import sys

from minitron_jax.evaluate.perplexity import DTYPES, text_perplexity
from minitron_jax.exitcodes import ExitCode, cli_exit


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.eval", description="Perplexity of a model on a text.")
    ap.add_argument("--model", required=True, help="HF directory, .gguf file or minitron_jax checkpoint")
    ap.add_argument("--text", required=True, help=".jsonl (text field per record) or plain text file")
    ap.add_argument("--seq-len", type=int, required=True, help="window length N (tokens)")
    ap.add_argument("--max-tokens", type=int, default=None, help="use only the first M tokens of the text")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    ap.add_argument("--json", action="store_true", help='print one line {"perplexity", "tokens", "windows"}')
    return ap


@cli_exit
def main(argv=None) -> int:
    return run(parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise ValueError(f"--max-tokens ({args.max_tokens}) is smaller than --seq-len ({args.seq_len})")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    r = text_perplexity(args.model, args.text, args.seq_len, max_tokens=args.max_tokens,
                        batch_size=args.batch_size, dtype=args.dtype)
    if args.json:
        # "tokens" counts the tokens in the windows (windows × N); predictions are windows × (N − 1).
        print(json.dumps({k: r[k] for k in ("perplexity", "tokens", "windows")}, allow_nan=False))
    else:
        print(f"perplexity {r['perplexity']:.4f} over {r['predicted']} predicted tokens in {r['windows']} windows "
              f"of {args.seq_len} ({r['seconds']:.1f}s)")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
