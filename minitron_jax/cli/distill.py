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

Exit codes (:mod:`minitron_jax.exitcodes`): 0 done, 2 bad config or inputs, 3 non-finite loss (the last good
checkpoint is kept), 4 (``--dry-run``) the plan does not fit the accelerator's memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from minitron_jax.cli import plans
from minitron_jax.compress.prune import prune_student
from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.train.checkpoints import export_to_hf
from minitron_jax.train.config import load_config
from minitron_jax.train.loop import run

PROG = "python -m minitron_jax.distill"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Sharded knowledge distillation of a Llama-family student from a teacher (also teacher "
                    "correction and SFT), with Orbax checkpoints, exact resume and HF export.")
    ap.add_argument("--config", help="run config YAML (see docs/distillation.md)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    ap.add_argument("--export-from", metavar="CKPT", help="export RUN_DIR (latest checkpoint), "
                    "RUN_DIR/checkpoints/STEP or any model path to --out as an HF directory, then exit")
    ap.add_argument("--out", help="HF output directory for --export-from")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="export dtype")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return ap


@cli_exit
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:  # plan without the hardware: docs/scaling.md
        return dry_run(argv)
    ap = parser()
    args = ap.parse_args(argv)

    if args.export_from:
        if not args.out:
            ap.error("--export-from needs --out")
        path = export_to_hf(args.export_from, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"exported {args.export_from} to {path}")
        return ExitCode.OK

    if not args.config and not args.overrides:
        ap.error("give --config FILE (and/or section.key=value overrides), or --export-from")
    rc = load_config(args.config, args.overrides)
    print("# resolved config\n" + rc.to_yaml(), flush=True)
    # Failures become exit codes in one place (exitcodes.cli_exit): bad input 2, non-finite 3, busy 5, system 6.
    result = run(rc, prune_student=prune_student)  # a student given as student.prune
    print(f"done: {result.step} steps in {result.run_dir}"
          + (f"; student exported to {result.export_path}" if result.export_path else ""))
    return ExitCode.OK


def dry_run_parser(prog: str = PROG) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{prog} --dry-run", description="Plan a distillation run without its hardware: "
                                 "compile the real train step on fake devices and report memory, FLOPs, "
                                 "collectives and time.")
    ap.add_argument("--config", help="run config YAML")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    plans.add_plan_options(ap)
    ap.add_argument("--devices", type=int, help="devices to plan for (needed when the recipe's mesh has a -1)")
    ap.add_argument("--devices-per-host", type=int, help="default: the accelerator's devices per node")
    ap.add_argument("--tokens", type=float, help="token budget (default: train.steps × data.batch_size × seq_len)")
    ap.add_argument("--abstract", action="store_true", help="only lower on an AbstractMesh (no compile)")
    ap.add_argument("--on-device", action="store_true",
                    help="compile for this machine's own accelerator (JAX's default backend) instead of fake CPU "
                         "devices: checks the CPU-compiled plan against the real compiler")
    ap.add_argument("--no-verify", action="store_true", help="do not compile the best suggestion of a refusal")
    ap.add_argument("--teacher-config", help="HF config.json of the teacher (instead of configs/models lookup)")
    ap.add_argument("--student-config", help="HF config.json of the student when student.path is given")
    return ap


def dry_run(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """``distill --dry-run``: the run planned by compiling its real train step on fake CPU devices."""
    from minitron_jax.planning import capacity as P
    from minitron_jax.planning.dryrun import cpu_devices, make_plan, needed_devices, reexec

    argv = list(sys.argv[1:] if argv is None else argv)
    args = dry_run_parser(prog).parse_args(argv)
    if not args.config and not args.overrides:
        print("error: --dry-run needs --config FILE (and/or section.key=value overrides)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    log = plans.logger(args.json)
    acc = P.accelerator(args.accelerator)
    rc = load_config(args.config, args.overrides)
    n = needed_devices(rc, args.devices)
    if args.on_device and args.abstract:
        print("error: --on-device compiles on this machine's devices; --abstract only lowers: pick one",
              file=sys.stderr)
        return ExitCode.BAD_INPUT
    if not args.abstract and not args.on_device and cpu_devices(n) is None:
        log(f"[dry run] re-running in a fresh process with {n} fake CPU devices")
        return reexec(["distill", *argv], n)
    p = make_plan(rc, recipe=args.config, acc=acc, mfu=args.mfu, memory_fraction=args.memory_fraction,
                  devices=args.devices, devices_per_host=args.devices_per_host, total_tokens=args.tokens,
                  abstract=args.abstract, verify=not args.no_verify, teacher_config=args.teacher_config,
                  student_config=args.student_config, log=log, on_device=args.on_device)
    return plans.emit(p, args.json)


if __name__ == "__main__":
    sys.exit(main())
