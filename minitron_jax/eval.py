"""``python -m minitron_jax.eval``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.eval`."""

import sys

from minitron_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
