"""``python -m minitron_jax.lm_eval_adapter``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.lm_eval`."""

import sys

from minitron_jax.cli.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
