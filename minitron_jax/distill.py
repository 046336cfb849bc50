"""``python -m minitron_jax.distill``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.distill`."""

import sys

from minitron_jax.cli.distill import main

if __name__ == "__main__":
    sys.exit(main())
