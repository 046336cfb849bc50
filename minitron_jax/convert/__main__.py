"""``python -m minitron_jax.convert``: the command lives in :mod:`minitron_jax.cli.convert`."""

import sys

from minitron_jax.cli.convert import main

sys.exit(main())
