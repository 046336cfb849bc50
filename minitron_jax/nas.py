"""``python -m minitron_jax.nas``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.nas`."""

import sys

from minitron_jax.cli.nas import main

if __name__ == "__main__":
    sys.exit(main())
