import sys

from minitron_jax.convert.cli import main

sys.exit(main())
