"""``python -m minitron_jax.teacher_logits``, kept for the command line: the command lives in
:mod:`minitron_jax.cli.teacher_logits`."""

import sys

from minitron_jax.cli.teacher_logits import main

if __name__ == "__main__":
    sys.exit(main())
