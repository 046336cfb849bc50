"""What every ``--dry-run`` command shares (``distill``, ``prune``, docs/scaling.md): the plan options, where the
progress lines go, and how a plan is printed and turned into an exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from minitron_jax.exitcodes import ExitCode
from minitron_jax.planning import capacity as P
from minitron_jax.planning.report import format_plan, plan_json, refusal_message

# The options added here, to be left out of the command's own options.
PLAN_KEYS = frozenset({"dry_run", "accelerator", "mfu", "memory_fraction", "json"})


def add_plan_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="plan, do not run (implied here)")
    ap.add_argument("--accelerator", default="h100", help=f"one of {', '.join(P.ACCELERATORS)} (default h100)")
    ap.add_argument("--mfu", type=float, default=P.DEFAULT_MFU, help="model FLOPs utilization for the time estimate")
    ap.add_argument("--memory-fraction", type=float, default=P.DEFAULT_MEMORY_FRACTION,
                    help="share of device memory the program may use (default %(default)s)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write the plan as one JSON object to PATH (or stdout with no PATH)")


def logger(json_dest: str | None) -> Callable[..., None]:
    """``print``, or printing to stderr when the plan's JSON goes to stdout."""
    return (lambda *a, **k: print(*a, file=sys.stderr, **k)) if json_dest == "-" else print


def emit(p: dict[str, Any], json_dest: str | None) -> int:
    """Print the plan (and write its JSON); the exit code: OK, or DOES_NOT_FIT with the refusal on stderr."""
    text = plan_json(p, indent=None if json_dest == "-" else 2)
    if json_dest == "-":
        print(text)
    else:
        print(format_plan(p))
        if json_dest:
            Path(json_dest).parent.mkdir(parents=True, exist_ok=True)
            Path(json_dest).write_text(text + "\n")
            print(f"plan written to {json_dest}")
    if not p["fits"]:
        print(refusal_message(p), file=sys.stderr)
        return ExitCode.DOES_NOT_FIT
    return ExitCode.OK
