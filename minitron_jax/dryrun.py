"""``python -m minitron_jax.dryrun``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.dryrun`."""

import sys

from minitron_jax.cli.dryrun import main

if __name__ == "__main__":
    sys.exit(main())
