"""``python -m minitron_jax.pipeline --config FILE [key=value ...]``: the whole method, resumable stage by stage.

The stages are :mod:`minitron_jax.pipeline`'s; this module reads the arguments and the config and maps the
failures to exit codes: 0 done, 2 bad config or inputs, 3 a distillation produced a non-finite loss (and, through
:func:`~minitron_jax.exitcodes.cli_exit`, 5 another process holds the run directory, 6 the system refused a write,
130 interrupted).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.pipeline import Pipeline, PipelineConfigError, load_pipeline_config, stage_names

EXIT_CONFIG, EXIT_NONFINITE = ExitCode.BAD_INPUT, ExitCode.NON_FINITE


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m minitron_jax.pipeline",
        description="Importance → width/depth pruning → distillation → evaluation → export → comparison table, "
                    "resumable stage by stage.")
    ap.add_argument("--config", required=True, help="pipeline YAML (e.g. configs/smollm2_135m_demo.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides with YAML values, e.g. distill.steps=400 run_dir=/tmp/run")
    ap.add_argument("--stop-after", metavar="STAGE", help="stop after this stage (e.g. importance, prune.width)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    pc = load_pipeline_config(args.config, args.overrides)
    if args.stop_after is not None and args.stop_after not in stage_names(pc):
        raise PipelineConfigError(f"--stop-after {args.stop_after!r} is not a stage of this run "
                                  f"({', '.join(stage_names(pc))})")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(pc.to_dict(), sort_keys=False))
        return 0
    # Failures become exit codes in one place (exitcodes.cli_exit): bad input 2, non-finite 3, busy 5, system 6.
    Pipeline(pc, stop_after=args.stop_after).run()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
