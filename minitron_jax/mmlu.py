"""``python -m minitron_jax.mmlu``, kept for the command line: the command lives in
:mod:`minitron_jax.evaluate.mmlu`."""

import sys

from minitron_jax.evaluate.mmlu import main

if __name__ == "__main__":
    sys.exit(main())
