"""Puzzle-style search: one block variant per layer (:mod:`minitron_jax.blocks`), chosen to maximise a summed
per-layer score under targets on parameters, memory (weights + KV cache), FLOPs per token and measured latency.

``costs`` prices each block variant (analytically, by host timing, or from the compiler's cost analysis);
``targets`` turns ``--target-*`` values into constraints over those prices; ``solver`` picks the variants with an
exact MIP (HiGHS through ``scipy.optimize.milp``) and reports the best architecture and its runner-ups."""
