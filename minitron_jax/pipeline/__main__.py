"""``python -m minitron_jax.pipeline``: the command lives in :mod:`minitron_jax.cli.pipeline`."""

import sys

from minitron_jax.cli.pipeline import main

sys.exit(main())
