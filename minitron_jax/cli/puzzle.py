"""``python -m minitron_jax.puzzle``: the layer-by-layer (Puzzle) search of a uniform parent for a deployment target.

Usage::

    python -m minitron_jax.puzzle --parent PATH --out DIR --target-params 70e6
        [--target-memory GB --context N --batch B --kv-dtype D --weight-dtype D] [--target-flops F]
        [--target-latency MS | --target-throughput TOK_S]  (timed on this host, or with --accelerator h100:
                                                            one decode step's roofline there)
        [--attention gqa3,gqa1,linear,none] [--ffn mlp1536,mlp1024,mlp512,linear,none]
        [--calib-tokens N] [--steps N] [--eval-windows N] [--runner-ups K] [--data PATH|asset:NAME]

The work is :func:`minitron_jax.compress.puzzle.search.run_search`; see docs/puzzle.md. Rerunning into the same
``--out`` continues (or only solves again for other targets); another parent, data, space or training setting
there is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from minitron_jax.exitcodes import ExitCode, cli_exit

PROG = "python -m minitron_jax.puzzle"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Layer-by-layer (Puzzle) search: blockwise local "
                                 "distillation of every block variant, replace-one-block KL scores, exact MIP.")
    ap.add_argument("--parent", required=True, help="uniform parent: HF directory, .gguf, checkpoint or asset:NAME")
    ap.add_argument("--out", required=True, help="run directory (results, model/, report.json/.md, architecture.png)")
    t = ap.add_argument_group("targets (at least one)")
    t.add_argument("--target-params", type=float, metavar="N", help="total parameters, e.g. 70e6")
    t.add_argument("--target-memory", type=float, metavar="GB", help="weights + KV cache in GB (1e9 bytes)")
    t.add_argument("--target-flops", type=float, metavar="F", help="forward FLOPs per token at --context")
    t.add_argument("--target-latency", type=float, metavar="MS",
                   help="ms per forward of --batch × --timing-seq-len tokens on this host; with --accelerator, ms "
                        "per decode step of --batch tokens at a full --context cache there")
    t.add_argument("--target-throughput", type=float, metavar="TOK_S",
                   help="tokens/s of that forward (this host) or of that decode step (--accelerator)")
    c = ap.add_argument_group("serving point of the memory/FLOPs/latency targets")
    c.add_argument("--context", type=int, default=4096)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--kv-dtype", default="bfloat16")
    c.add_argument("--weight-dtype", default="bfloat16")
    c.add_argument("--timing-seq-len", type=int, default=256, help="tokens per timed forward (latency targets)")
    c.add_argument("--accelerator", metavar="NAME",
                   help="price the latency/throughput targets as one decode step's roofline (weights + KV cache "
                        "read once, FLOPs at peak) on this accelerator: h100, h200, a100, tpu-v5p; the same "
                        "result on every machine, no timing")
    c.add_argument("--latency-phase", choices=("decode", "prefill"), default="decode",
                   help="with --accelerator: a decode step of --batch tokens at a full --context cache (default), "
                        "or the prefill of --batch × --context prompt tokens (XLA's compiled cost per block)")
    s = ap.add_argument_group("search")
    s.add_argument("--attention", help="attention options (default: the parent's KV heads and its divisors, "
                   "linear, none)")
    s.add_argument("--runtime", default="vllm,llama.cpp",
                   help="runtimes the chosen model must run on: vllm, llama.cpp (comma-separated) or any; blocks a "
                        "runtime cannot run are never chosen (vLLM: no linear sub-blocks; llama.cpp: no linear FFN, "
                        "no attention without FFN, no removed last layer). Default: both")
    s.add_argument("--ffn", help="FFN options (default: the parent's width, 2/3 and 1/3 of it, linear, none)")
    s.add_argument("--scoring", choices=("additive", "joint"), default="additive",
                   help="score each half inside the parent layer and add (default), or every variant whole")
    s.add_argument("--calib-tokens", type=int, default=16384)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--steps", type=int, default=50, help="Adam steps per sub-block")
    s.add_argument("--batch-windows", type=int, default=4, help="windows per Adam step")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--linear-init", choices=("lstsq", "zero"), default="lstsq",
                   help="start of a linear sub-block: the least-squares fit to the parent half on the calibration "
                        "windows (default) or zero (= removal)")
    s.add_argument("--eval-windows", type=int, default=8, help="held-out windows of the scores")
    s.add_argument("--runner-ups", type=int, default=3)
    s.add_argument("--no-importance", action="store_true", help="narrow MLPs keep the parent's first channels "
                   "instead of the most important ones")
    s.add_argument("--data", default="asset:wikipedia", help="text (default asset:wikipedia)")
    s.add_argument("--seed", type=int, default=0)
    return ap


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from minitron_jax.compress.puzzle.blockwise import BlockwiseSettings
    from minitron_jax.compress.puzzle.search import SearchSettings, SearchSpace, check_feasible, run_search
    from minitron_jax.compress.puzzle.targets import CostSettings, Targets
    from minitron_jax.config import LlamaConfig
    from minitron_jax.convert import detect_format, load_model, read_source_config
    from minitron_jax.dtypes import dtype as dtype_of
    from minitron_jax.progress import PhaseProgress
    from minitron_jax.train.config import resolve_path

    parent = resolve_path(args.parent)
    data = resolve_path(args.data)
    for name, v in (("--context", args.context), ("--batch", args.batch)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    dtype_of(args.kv_dtype), dtype_of(args.weight_dtype)  # refuse an unknown dtype name now
    targets = Targets(params=args.target_params, memory_gb=args.target_memory, flops_per_token=args.target_flops,
                      latency_s=None if args.target_latency is None else args.target_latency / 1e3,
                      throughput=args.target_throughput)
    for name in targets.given():
        if not getattr(targets, name) > 0:
            raise ValueError(f"--target-{name.split('_')[0]} must be positive, got {getattr(targets, name)}")
    if not targets.given():
        raise ValueError("give at least one target: --target-params, --target-memory, --target-flops, "
                         "--target-latency or --target-throughput")
    cost = CostSettings(context=args.context, batch=args.batch, weight_dtype=args.weight_dtype,
                        kv_dtype=args.kv_dtype)
    if args.accelerator is not None:
        from minitron_jax.planning.capacity import accelerator

        if targets.latency_s is None and targets.throughput is None:
            raise ValueError("--accelerator prices --target-latency / --target-throughput; give one of them")
        cost = cost.priced_on(accelerator(args.accelerator), args.latency_phase)
    elif args.latency_phase != "decode":
        raise ValueError("--latency-phase prices a latency on an --accelerator; give one")
    settings = SearchSettings(seq_len=args.seq_len, calib_tokens=args.calib_tokens, eval_windows=args.eval_windows,
                              runner_ups=args.runner_ups, scoring=args.scoring, importance=not args.no_importance,
                              timing_seq_len=args.timing_seq_len,
                              blockwise=BlockwiseSettings(steps=args.steps, batch_windows=args.batch_windows,
                                                          lr=args.lr, seed=args.seed,
                                                          linear_init=args.linear_init))
    settings.check()
    if not Path(data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    console = Console(stderr=True)
    if detect_format(parent) != "gguf":  # a GGUF's config costs a full read: checked after loading
        cfg = read_source_config(parent)
        if not isinstance(cfg, LlamaConfig):
            raise ValueError(f"{args.parent} is already heterogeneous; the parent must be a uniform model")
        space = SearchSpace.parse(cfg, args.attention, args.ffn, args.runtime)
        space.check(cfg)
        check_feasible(cfg, space, targets, cost)  # before minutes of loading and hours of training
    with console.status(f"loading {args.parent} ..."):
        m = load_model(parent)
    if not isinstance(m.config, LlamaConfig):
        raise ValueError(f"{args.parent} is already heterogeneous; the parent must be a uniform model")
    if m.tokenizer is None:
        raise ValueError(f"{args.parent} carries no tokenizer; the search tokenizes --data with it")
    space = SearchSpace.parse(m.config, args.attention, args.ffn, args.runtime)
    console.print(f"parent {m.config.describe()}; space {len(space.variants())} variants per layer "
                  f"({', '.join(space.names())})")
    with PhaseProgress(console) as progress:
        result = run_search(m.config, m.params, m.tokenizer, data, args.out, space=space, targets=targets,
                            cost_settings=cost, settings=settings, parent_name=str(args.parent), progress=progress,
                            log=lambda msg: console.print(msg, highlight=False))
    r = result.report
    print(r["solver"]["text"])
    print(f"chosen: {r['chosen']['params']:,} params, Σ KL {r['chosen']['summed_kl']:.4g}; "
          f"model in {result.out / 'model'}, report in {result.out / 'report.md'}, picture in "
          f"{result.out / 'architecture.png'}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
