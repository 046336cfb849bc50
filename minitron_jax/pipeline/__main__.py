"""``python -m minitron_jax.pipeline``."""

import sys

from minitron_jax.pipeline import main

sys.exit(main())
