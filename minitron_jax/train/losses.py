"""Distillation losses: CE, forward/reverse KL, JSD, top-k KL, and hidden-state losses.

Two layers:

1. **Per-token losses on logits** (`forward_kl`, `reverse_kl`, `jsd`, `top_k_forward_kl`,
   `cross_entropy`, dispatched by `kd_loss`). They take logits ``[..., V]`` and return one value per
   token ``[...]``. All math is fp32 and goes through ``log_softmax`` (never ``log(softmax)``), so it
   is stable for large logits. Logits are assumed finite (no ``-inf`` vocabulary masking).

2. **Token-chunked fused loss** (`chunked_logit_loss`, in :mod:`minitron_jax.train.chunked_loss`).
   It takes both models' final hidden states and lm_heads rather than logits and never
   materializes ``[N, V]`` logits; it applies the per-token losses here one chunk of tokens at a time.

Conventions shared by everything here:

* Argument order is always ``(student, teacher)``.
* ``temperature`` T divides both models' logits and multiplies the KD loss by ``T**2`` (Hinton et
  al.), so gradient magnitudes stay comparable across temperatures. Cross-entropy is always at T=1.
* The final objective is ``alpha * kd + (1 - alpha) * ce``; ``alpha=1`` is pure KD (the Minitron
  setting: forward KL on logits, T=1).
* Reductions are weighted means over tokens: ``sum(w * l) / max(sum(w), 1)``. Tokens with weight 0
  are excluded *exactly* (their loss is selected away, not multiplied by 0, so even a non-finite
  per-token value cannot leak in).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

__all__ = [
    "KD_KINDS",
    "HIDDEN_LOSS_KINDS",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "top_k_forward_kl",
    "cross_entropy",
    "kd_loss",
    "mix_kd_ce",
    "hidden_state_loss",
]

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LOSS_KINDS = ("mse", "cosine")


# ----------------------------------------------------------------------------------------------
# Per-token losses on logits
# ----------------------------------------------------------------------------------------------


def _scaled_fp32(logits: jax.Array, temperature: float) -> jax.Array:
    """Logits in fp32 divided by T (skipping the divide at T=1 so XLA can share work with CE)."""
    logits = logits.astype(jnp.float32)
    return logits if temperature == 1.0 else logits / temperature


def _log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(_scaled_fp32(logits, temperature), axis=-1)


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p‖q) = Σ p (log p − log q) over the last axis, from log-probabilities."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Forward KL(teacher‖student) per token: ``T² Σ_v p_t (log p_t − log p_s)``.

    "Mean-seeking": the student is pushed to cover all of the teacher's mass. Minitron's choice.
    """
    log_pt = _log_probs(teacher_logits, temperature)
    log_ps = _log_probs(student_logits, temperature)
    return temperature**2 * _kl_from_log_probs(log_pt, log_ps)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Reverse KL(student‖teacher) per token: ``T² Σ_v p_s (log p_s − log p_t)`` ("mode-seeking")."""
    log_pt = _log_probs(teacher_logits, temperature)
    log_ps = _log_probs(student_logits, temperature)
    return temperature**2 * _kl_from_log_probs(log_ps, log_pt)


def jsd(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0, beta: float = 0.5
) -> jax.Array:
    """Generalized Jensen–Shannon divergence per token.

    With ``M = β p_t + (1 − β) p_s``::

        JSD_β = T² [ β KL(p_t‖M) + (1 − β) KL(p_s‖M) ]

    β=0.5 is the symmetric JSD (bounded by log 2 at T=1). ``log M`` is computed with ``logaddexp``
    of the two log-probabilities, never as ``log`` of a sum of probabilities. Requires 0 < β < 1
    (at either end the divergence degenerates to 0).
    """
    _check_beta(beta)
    log_pt = _log_probs(teacher_logits, temperature)
    log_ps = _log_probs(student_logits, temperature)
    log_m = jnp.logaddexp(math.log(beta) + log_pt, math.log1p(-beta) + log_ps)
    return temperature**2 * (
        beta * _kl_from_log_probs(log_pt, log_m) + (1.0 - beta) * _kl_from_log_probs(log_ps, log_m)
    )


def top_k_forward_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, k: int, *, temperature: float = 1.0
) -> jax.Array:
    """Forward KL restricted to the teacher's top-k tokens, per token.

    Exact definition. Let ``S`` be the indices of the teacher's k largest logits (per token) and
    ``z_t, z_s`` the logits divided by T. Then::

        q_t(i)     = exp(z_t[i]) / Σ_{j∈S} exp(z_t[j])          (teacher renormalized over S)
        log p_s(i) = z_s[i] − logsumexp_{all v}(z_s[v])          (student's FULL log-softmax)
        loss       = T² Σ_{i∈S} q_t(i) (log q_t(i) − log p_s(i))

    The student is *not* renormalized over S, so the loss is ≥ 0 (it equals
    ``KL(q_t ‖ p_s|S) − log p_s(S)``) and is minimized only when the student puts all of its mass
    on S in the teacher's proportions. With k = V it is exactly the full forward KL.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k must be in [1, vocab={vocab}], got {k}")
    z_t = _scaled_fp32(teacher_logits, temperature)
    z_s = _scaled_fp32(student_logits, temperature)
    top_z_t, top_idx = jax.lax.top_k(z_t, k)
    log_qt = jax.nn.log_softmax(top_z_t, axis=-1)
    # Gather the student's logits at S and subtract its full logsumexp: avoids a second [.., V] array.
    student_lse = jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
    log_ps_at_s = jnp.take_along_axis(z_s, top_idx, axis=-1) - student_lse
    return temperature**2 * _kl_from_log_probs(log_qt, log_ps_at_s)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Next-token cross-entropy per token: ``logsumexp(z) − z[target]`` (fp32, T=1).

    ``targets`` are integer ids with shape ``logits.shape[:-1]``. Out-of-range ids (e.g. -1/-100
    "ignore" markers) are clipped into range so the result stays finite; mask them with weight 0.
    """
    logits = logits.astype(jnp.float32)
    targets = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    top_k: int | None = None,
    jsd_beta: float = 0.5,
) -> jax.Array:
    """Per-token distillation loss of the given ``kind`` (see `KD_KINDS`); ``top_k`` needs forward_kl."""
    check_kd_options(kind, temperature, top_k, jsd_beta)
    if top_k is not None:
        return top_k_forward_kl(student_logits, teacher_logits, top_k, temperature=temperature)
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    return jsd(student_logits, teacher_logits, temperature=temperature, beta=jsd_beta)


def mix_kd_ce(kd: jax.Array, ce: jax.Array, alpha: float) -> jax.Array:
    """The training objective ``alpha * kd + (1 - alpha) * ce`` (alpha=1: pure KD)."""
    return alpha * kd + (1.0 - alpha) * ce


# ----------------------------------------------------------------------------------------------
# Option validation
# ----------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> None:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")


def check_kd_options(kind: str, temperature: float, top_k: int | None, jsd_beta: float) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KD_KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None:
        if kind != "forward_kl":
            raise ValueError(f"top_k is only defined for kind='forward_kl', got kind={kind!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if kind == "jsd":
        _check_beta(jsd_beta)


def weighted_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ w·l, with weight-0 tokens *selected away* so they contribute exactly nothing."""
    return jnp.sum(jnp.where(weights != 0, weights * values, 0.0))


# ----------------------------------------------------------------------------------------------
# Intermediate hidden-state distillation
# ----------------------------------------------------------------------------------------------


def hidden_state_loss(
    student_states: jax.Array,
    teacher_states: jax.Array,
    projection: jax.Array | None = None,
    kind: str = "mse",
    weights: jax.Array | None = None,
) -> jax.Array:
    """Distance between student and teacher hidden states on chosen layers (weighted token mean).

    Args:
      student_states: ``[..., Ds]``, e.g. ``[layers, N, Ds]`` for the layers being matched.
      teacher_states: ``[..., Dt]`` with the same leading dims; treated as a constant.
      projection: optional learned ``[Ds, Dt]`` map applied to the student first (needed when a
        width-pruned student has Ds < Dt); None means identity and requires Ds == Dt.
      kind: ``"mse"`` — mean over features of (s − t)², per token; ``"cosine"`` — 1 − cos(s, t).
      weights: token weights broadcastable to the leading dims (e.g. ``[N]`` against
        ``[layers, N, D]``); None weighs every token 1. Weight-0 tokens are excluded exactly.

    Returns:
      Scalar ``sum(w · l) / max(sum(w), 1)`` over all leading positions (layers × tokens).
    """
    if kind not in HIDDEN_LOSS_KINDS:
        raise ValueError(f"unknown hidden-state loss kind {kind!r}; expected one of {HIDDEN_LOSS_KINDS}")
    teacher = jax.lax.stop_gradient(teacher_states).astype(jnp.float32)
    student = student_states
    if projection is not None:
        if projection.shape != (student.shape[-1], teacher.shape[-1]):
            raise ValueError(
                f"projection must be [Ds={student.shape[-1]}, Dt={teacher.shape[-1]}], got {projection.shape}"
            )
        student = jnp.dot(student, projection, preferred_element_type=jnp.float32)
    elif student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student hidden size {student.shape[-1]} != teacher {teacher.shape[-1]}: pass a projection"
        )
    student = student.astype(jnp.float32)
    if student.shape != teacher.shape:
        raise ValueError(f"student states {student.shape} and teacher states {teacher.shape} do not line up")

    if kind == "mse":
        per_token = jnp.mean(jnp.square(student - teacher), axis=-1)
    else:
        per_token = 1.0 - _cosine_similarity(student, teacher)

    w = jnp.ones(per_token.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    w = jnp.broadcast_to(w, per_token.shape)
    return weighted_sum(per_token, w) / jnp.maximum(jnp.sum(w), 1.0)


def _cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """cos(a, b) over the last axis; eps keeps zero vectors (e.g. padding) finite, including grads."""
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1) + eps**2)
    return dot / norms
