"""``python -m minitron_jax.mmlu``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.mmlu`."""

import sys

from minitron_jax.cli.mmlu import main

if __name__ == "__main__":
    sys.exit(main())
