"""``python -m minitron_jax.assets``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.assets`."""

import sys

from minitron_jax.cli.assets import main

if __name__ == "__main__":
    sys.exit(main())
