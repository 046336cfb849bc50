import sys

from minitron_jax.cli.convert import main

sys.exit(main())
