"""Distillation / teacher correction / SFT training (the CLI is :mod:`minitron_jax.cli.distill`).

Modules, bottom-up: ``config`` (run config schema) → ``state`` (train state + shardings) → ``step`` (the jitted
step) → ``checkpoints``, ``inputs``, ``models``, ``observe`` → ``loop`` (``run``).
"""
