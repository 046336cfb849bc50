"""``python -m minitron_jax.prune``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.prune`."""

import sys

from minitron_jax.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
