"""``python -m minitron_jax.dryrun distill|prune [options of that command's --dry-run]`` (what ``distill --dry-run``
and ``prune --dry-run`` re-execute into when they need more fake devices than their process has), and
``python -m minitron_jax.dryrun table PLAN.json ...`` (markdown tables of saved plans, as in docs/scaling.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from minitron_jax.cli import distill, prune
from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.planning.report import markdown_tables

USAGE = ("usage: python -m minitron_jax.dryrun distill|prune [options of that CLI's --dry-run]\n"
         "       python -m minitron_jax.dryrun table PLAN.json [PLAN.json ...]")


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table":
        print(markdown_tables([json.loads(Path(a).read_text()) for a in argv[1:]]))
        return ExitCode.OK
    if not argv or argv[0] not in ("distill", "prune"):
        print(USAGE, file=sys.stderr)
        return ExitCode.BAD_INPUT
    return distill.dry_run(argv[1:]) if argv[0] == "distill" else prune.dry_run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
