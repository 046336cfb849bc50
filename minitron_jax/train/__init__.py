"""Distillation / teacher correction / SFT training (the CLI is :mod:`minitron_jax.cli.distill`).

Modules, bottom-up: ``config`` (run config schema) → ``state`` (train state + shardings) → ``step`` (the jitted
step) → ``checkpoints``, ``inputs``, ``models``, ``observe`` → ``loop`` (the pieces ``start``/``setup`` → ``Run``,
``train_steps``, ``validate``, and ``run``, their composition). ``train`` never imports ``compress``: a student given
as ``student.prune`` is built by the ``prune_student`` function the caller passes.
"""
