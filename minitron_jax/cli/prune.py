"""``python -m minitron_jax.prune``: rank units by importance and prune a model (width and/or depth).

Usage::

    python -m minitron_jax.prune --model PATH --calib FILE --out DIR [--hidden H] [--ffn F] [--heads-per-group G]
        [--drop-layers K | --layers i,j,...] [--depth-metric contiguous|ppl|bi]
        [--importance activation|magnitude|random] [--seq-agg mean|l2|var] [--batch-agg mean|l2|var] [--preact]
        [--calib-samples N] [--seq-len T] [--batch-size B] [--seed S] [--dtype float32|bfloat16]
        [--config FILE.yaml] [--overwrite]
    python -m minitron_jax.prune --config FILE.yaml --model PATH_OR_NAME --dry-run [--accelerator h100] [--json]

The first form writes DIR (:func:`minitron_jax.compress.prune.save_pruned`: an HF model, ``importance.npz`` and
``prune_report.json``); the second plans the importance pass on hardware we do not have
(:mod:`minitron_jax.planning.importance`, docs/scaling.md). The pruning itself is
:func:`minitron_jax.compress.prune.prune_from_spec`; see docs/pruning.md. A heterogeneous (DeciLM) model takes
``--hidden`` and the depth options only (``compress.spec.HETERO_OPTIONS``) and is written as a DeciLM directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from minitron_jax.cli import plans
from minitron_jax.compress import importance as imp
from minitron_jax.compress.prune import prune_from_spec, save_pruned
from minitron_jax.compress.spec import PruneSpec, check_spec
from minitron_jax.evaluate.perplexity import DTYPES
from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.planning import capacity as P

PROG = "python -m minitron_jax.prune"
# Options that say where things are, not how to prune: the rest is a PruneSpec.
PATH_KEYS = ("model", "calib", "out", "overwrite")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG,
                                 description="Rank units by importance and prune a model (width and/or depth).")
    ap.add_argument("--config", help="YAML file with any of the options below (underscored keys); flags override")
    ap.add_argument("--model", help="HF directory, .gguf file or minitron_jax checkpoint")
    ap.add_argument("--calib", help="calibration text (.jsonl text fields, or plain text; the data.read_text rules)")
    ap.add_argument("--out", help="output directory (HF model + importance.npz + prune_report.json)")
    ap.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    ap.add_argument("--hidden", type=int, help="target hidden size")
    ap.add_argument("--ffn", type=int, help="target FFN (intermediate) size")
    ap.add_argument("--heads-per-group", type=int, help="query heads kept in each KV group")
    ap.add_argument("--heads", type=int, help="total query heads kept (a multiple of the KV heads)")
    depth = ap.add_mutually_exclusive_group()
    depth.add_argument("--drop-layers", type=int, help="remove this many layers, chosen by --depth-metric")
    depth.add_argument("--layers", type=int_list, help="remove exactly these layers (0-based, comma-separated)")
    ap.add_argument("--depth-metric", choices=imp.DEPTH_METRICS)
    ap.add_argument("--importance", choices=imp.WIDTH_METHODS, help="width ranking")
    ap.add_argument("--seq-agg", choices=imp.SEQ_AGGS)
    ap.add_argument("--batch-agg", choices=imp.BATCH_AGGS)
    ap.add_argument("--preact", action=argparse.BooleanOptionalAction, default=None,
                    help="rank neurons by the gate pre-activation instead of silu(gate)*up")
    ap.add_argument("--calib-samples", type=int, help="at most this many calibration windows")
    ap.add_argument("--seq-len", type=int, help="calibration window length (tokens)")
    ap.add_argument("--batch-size", type=int, help="calibration batch size")
    ap.add_argument("--seed", type=int, help="seed of --importance random")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the loaded weights, calibration and output")
    return ap


def int_list(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """YAML options (if ``--config``) overridden by the flags actually given."""
    opts: dict[str, Any] = {}
    if args.config:
        from minitron_jax.typed_config import read_yaml_sections

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        loaded = read_yaml_sections(path, ValueError)  # refuses a file that is not a mapping
        opts.update({k.replace("-", "_"): v for k, v in loaded.items()})
    opts.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return opts


def spec_of(opts: dict[str, Any]) -> PruneSpec:
    return PruneSpec.from_dict({k: v for k, v in opts.items() if k not in PATH_KEYS})


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    if "--dry-run" in (sys.argv[1:] if argv is None else argv):  # plan the importance pass: docs/scaling.md
        return dry_run(argv)
    args = parser().parse_args(argv)
    try:
        return run(merged_options(args))
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT


def run(opts: dict[str, Any]) -> int:
    from rich.console import Console

    from minitron_jax.arch import count_params
    from minitron_jax.convert import detect_format, load_model, read_source_config
    from minitron_jax.data import read_text
    from minitron_jax.fsutil import check_destination
    from minitron_jax.progress import PhaseProgress

    missing = [f"--{k}" for k in ("model", "calib", "out") if not opts.get(k)]
    spec = spec_of(opts)
    if missing and not (missing == ["--calib"] and not spec.needs_calibration):
        raise ValueError(f"missing required option(s): {', '.join(missing)}")
    out = Path(opts["out"])
    sources = [opts["model"], opts.get("calib")]
    check_destination(out, overwrite=bool(opts.get("overwrite")), sources=sources)  # again under the lock
    calib_text = read_text(opts["calib"]) if spec.needs_calibration else None
    if detect_format(opts["model"]) != "gguf":  # a GGUF's config costs a full read: checked after loading
        check_spec(read_source_config(opts["model"]), spec)  # before minutes of weight loading

    console = Console(stderr=True)
    t0 = time.perf_counter()
    with console.status(f"loading {opts['model']} ..."):
        m = load_model(opts["model"], dtype=DTYPES[spec.dtype])
    load_s = time.perf_counter() - t0
    console.print(f"loaded {m.config.describe()} ({count_params(m.config):,} params) in {load_s:.1f}s")
    if spec.needs_calibration and m.tokenizer is None:
        raise ValueError(f"{opts['model']} carries no tokenizer; calibration needs one")

    with PhaseProgress(console) as progress:
        config, params, report = prune_from_spec(m.config, m.params, m.tokenizer, spec, calib_text,
                                                 progress=progress)
    report["timings"]["load_s"] = load_s
    report["model"], report["calib"] = str(opts["model"]), opts.get("calib")
    with console.status(f"writing {out} ..."):
        save_pruned(out, config, params, m.tokenizer, report, overwrite=bool(opts.get("overwrite")),
                    sources=sources)
    console.print(f"pruned {report['params_before']:,} → {report['params_after']:,} params "
                  f"({config.describe()}) into {out}")
    return ExitCode.OK


def dry_run(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """``prune --dry-run``: the options of the prune command (``--config``, ``--model``, sizes, calibration shape)
    plus the plan options; the importance pass compiled for one device, nothing loaded."""
    from minitron_jax.planning.dryrun import cpu_devices, reexec
    from minitron_jax.planning.importance import plan_prune, prune_model_config
    from minitron_jax.planning.models import DryRunError

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    ap.prog = f"{prog} --dry-run"
    plans.add_plan_options(ap)
    ap.add_argument("--model-config", help="HF config.json of --model (instead of configs/models lookup)")
    args = ap.parse_args(argv)
    log = plans.logger(args.json)
    try:
        acc = P.accelerator(args.accelerator)
        ns = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                   if k not in plans.PLAN_KEYS and k != "model_config"})
        opts = merged_options(ns)
        if not opts.get("model") and not args.model_config:
            raise DryRunError("--dry-run needs --model (a path or a name in configs/models) or --model-config")
        spec = spec_of(opts)
        cfg = prune_model_config(spec, opts.get("model"), recipe=args.config, explicit=args.model_config)
        if cpu_devices(1) is None:
            return reexec(["prune", *argv], 1)
        p = plan_prune(spec, cfg, acc=acc, mfu=args.mfu, memory_fraction=args.memory_fraction, recipe=args.config,
                       log=log)
    except (DryRunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return plans.emit(p, args.json)


if __name__ == "__main__":
    sys.exit(main())
