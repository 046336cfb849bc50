"""``python -m minitron_jax.puzzle``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.puzzle`."""

import sys

from minitron_jax.cli.puzzle import main

if __name__ == "__main__":
    sys.exit(main())
