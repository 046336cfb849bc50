"""Knowledge distillation (and teacher correction, SFT): ``python -m minitron_jax.distill``.

Usage::

    python -m minitron_jax.distill --config configs/distill_smollm2_135m_demo.yaml [section.key=value ...]
    python -m minitron_jax.distill --export-from RUN_DIR[/checkpoints/STEP] --out HF_DIR
    python -m minitron_jax.distill --config RECIPE.yaml --dry-run [--accelerator h100] [--json [PATH]]

The first form trains (resuming from the run dir's latest checkpoint) and prints the resolved config first; the
second writes a run's student (or any model ``convert.load_model`` reads) as an HF directory; the third plans the
run on hardware we do not have (:mod:`minitron_jax.planning.dryrun`, docs/scaling.md). The pieces live in
:mod:`minitron_jax.train`: ``config`` (the YAML schema), ``state`` and ``step`` (the sharded, jitted train step
that a dry run can lower with abstract inputs), ``checkpoints``, ``inputs``, ``models``, ``observe``, ``loop``.
See docs/distillation.md.

Exit codes: 0 done, 1 bad config or inputs, 3 non-finite loss (the last good checkpoint is kept), 4 (``--dry-run``)
the plan does not fit the accelerator's memory.
"""

from __future__ import annotations

import argparse
import sys

from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.train.checkpoints import export_to_hf
from minitron_jax.train.config import RunConfig, RunConfigError, load_config
from minitron_jax.train.loop import NonFiniteLossError, RunResult, run
from minitron_jax.train.state import abstract_teacher, abstract_train_state
from minitron_jax.train.step import abstract_batch, build_eval_step, build_train_step

__all__ = ["RunConfig", "RunConfigError", "load_config", "run", "RunResult", "NonFiniteLossError",
           "build_train_step", "build_eval_step", "abstract_train_state", "abstract_teacher", "abstract_batch",
           "export_to_hf", "main"]

EXIT_CONFIG, EXIT_NONFINITE = ExitCode.BAD_INPUT, ExitCode.NON_FINITE


@cli_exit
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:  # plan without the hardware: docs/scaling.md
        from minitron_jax.planning import dryrun

        return dryrun.distill_main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m minitron_jax.distill",
        description="Sharded knowledge distillation of a Llama-family student from a teacher (also teacher "
                    "correction and SFT), with Orbax checkpoints, exact resume and HF export.")
    parser.add_argument("--config", help="run config YAML (see docs/distillation.md)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    parser.add_argument("--export-from", metavar="CKPT", help="export RUN_DIR (latest checkpoint), "
                        "RUN_DIR/checkpoints/STEP or any model path to --out as an HF directory, then exit")
    parser.add_argument("--out", help="HF output directory for --export-from")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="export dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)

    if args.export_from:
        if not args.out:
            parser.error("--export-from needs --out")
        try:
            path = export_to_hf(args.export_from, args.out, dtype=args.dtype, overwrite=args.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"exported {args.export_from} to {path}")
        return 0

    if not args.config and not args.overrides:
        parser.error("give --config FILE (and/or section.key=value overrides), or --export-from")
    try:
        rc = load_config(args.config, args.overrides)
    except RunConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print("# resolved config\n" + rc.to_yaml(), flush=True)
    try:
        result = run(rc)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (RunConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"done: {result.step} steps in {result.run_dir}"
          + (f"; student exported to {result.export_path}" if result.export_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
