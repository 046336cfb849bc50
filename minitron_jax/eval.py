"""``python -m minitron_jax.eval``, kept for the command line: the command lives in
:mod:`minitron_jax.evaluate.perplexity`."""

import sys

from minitron_jax.evaluate.perplexity import main

if __name__ == "__main__":
    sys.exit(main())
