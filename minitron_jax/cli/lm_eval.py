"""``python -m minitron_jax.lm_eval_adapter [lm_eval arguments]``: lm-eval's own CLI with the ``minitron_jax`` model
registered (:mod:`minitron_jax.evaluate.lm_eval_adapter` registers it when imported)."""

from __future__ import annotations

import sys

from minitron_jax.evaluate.lm_eval_adapter import lm_eval_available
from minitron_jax.exitcodes import ExitCode, cli_exit


@cli_exit
def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with ``minitron_jax`` registered (same arguments as ``lm_eval``)."""
    if not lm_eval_available():
        print("error: lm-eval is not installed (pip install 'minitron_jax[lm-eval]')", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
