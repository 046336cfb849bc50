"""minitron_jax: Minitron-style compression (importance, pruning, distillation) of Llama-family models in JAX."""

__version__ = "0.1.0"
