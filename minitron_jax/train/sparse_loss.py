"""The distillation loss from a teacher's cached top-k (``train/teacher_cache.py``): student hidden states + lm_head
+ the teacher's stored ids, log-probabilities and rest mass → sparse forward KL (+ CE), never ``[N, V]`` logits.

The per-token loss is :func:`minitron_jax.train.losses.sparse_forward_kl` (a KL over the teacher's top-k support
plus one rest-of-vocabulary bucket) mixed with CE by :func:`per_token_loss`; the chunking over tokens, and the
gradient, are ``chunked_loss.fused_head_loss``'s (one forward scan that also computes dH and dW, no
``[N, V]`` array, nothing recomputed), with the cached arrays as its per-token inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minitron_jax.train.chunked_loss import fused_head_loss
from minitron_jax.train.losses import cross_entropy, mix_kd_ce, sparse_forward_kl

__all__ = ["per_token_loss", "cached_teacher_loss"]


def per_token_loss(logits, teacher_ids, teacher_logprobs, teacher_rest, targets, *, alpha: float):
    """``(alpha·kd + (1 − alpha)·ce, {"kd", "ce"})`` per token of a chunk of student logits ``[c, V]``."""
    kd = sparse_forward_kl(logits, teacher_ids, teacher_logprobs, teacher_rest)
    ce = cross_entropy(logits, targets)
    return mix_kd_ce(kd, ce, alpha), {"kd": kd, "ce": ce}


def cached_teacher_loss(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_ids: jax.Array,
    teacher_logprobs: jax.Array,
    teacher_rest: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    compute_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sparse KD (+ CE) from the student's final hidden states ``[..., D]`` and lm_head ``[D, V]`` and the teacher's
    cached ``teacher_ids``/``teacher_logprobs`` ``[..., K]`` and ``teacher_rest`` ``[...]``.

    Same contract as ``chunked_loss.chunked_logit_loss``: returns ``(alpha·kd + (1 − alpha)·ce, aux)`` as weighted
    means over tokens, ``aux = {"kd", "ce", "num_tokens", "weight_sum"}``; weight-0 tokens are excluded exactly;
    the matmul runs in ``compute_dtype`` with fp32 accumulation. ``temperature`` must be 1 (see
    ``losses.sparse_forward_kl``)."""
    if temperature != 1.0:
        raise ValueError(f"a cached teacher supports temperature 1 only (it stores log-probabilities at T=1), got "
                         f"{temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_head.ndim != 2 or student_head.shape[0] != student_hidden.shape[-1]:
        raise ValueError(f"student_head must be [D={student_hidden.shape[-1]}, V], got {student_head.shape}")
    tokens = student_hidden.shape[:-1]
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs),
                    ("teacher_rest", teacher_rest), ("targets", targets), ("weights", weights)):
        if x.shape[:len(tokens)] != tokens:
            raise ValueError(f"{name} token shape {x.shape[:len(tokens)]} does not match the student's {tokens}")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_ids {teacher_ids.shape} and teacher_logprobs {teacher_logprobs.shape} differ")
    per_token = functools.partial(per_token_loss, alpha=alpha)
    loss_sum, sums = fused_head_loss(student_hidden, student_head, per_token,
                                     (teacher_ids, teacher_logprobs, teacher_rest, targets), weights=weights,
                                     chunk_size=chunk_size, compute_dtype=compute_dtype)
    weight_sum = jnp.sum(weights.astype(jnp.float32))
    denom = jnp.maximum(weight_sum, 1.0)
    aux = {"kd": sums["kd"] / denom, "ce": sums["ce"] / denom,
           "num_tokens": jnp.sum(weights != 0).astype(jnp.float32), "weight_sum": weight_sum}
    return loss_sum / denom, aux
