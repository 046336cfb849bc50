"""Evaluation: perplexity, MMLU and an lm-eval-harness adapter, all over pure scoring functions."""
