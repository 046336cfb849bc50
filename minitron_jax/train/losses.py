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
    "sparse_forward_kl",
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


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − eˣ) for x ≤ 0, stable at both ends (Mächler 2012): ``log(−expm1(x))`` near 0, where 1 − eˣ is a
    small difference, ``log1p(−eˣ)`` far below it, where eˣ is small."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# The student's rest mass is floored at float32 resolution: when Σ_{i∈S} p_s(i) rounds to 1, log r_s would be
# −inf (and its gradient NaN); 2⁻²⁴ is the spacing of float32 just below 1, so no finer rest is representable.
# This caps log Σ_{i∈S} p_s(i) at log(1 − 2⁻²⁴), i.e. log r_s at −24·log 2 ≈ −16.6.
_MAX_LOG_SUPPORT_MASS = math.log1p(-(2.0**-24))


def sparse_forward_kl(
    student_logits: jax.Array,
    teacher_ids: jax.Array,
    teacher_logprobs: jax.Array,
    teacher_rest: jax.Array,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """Forward KL(teacher‖student) per token over the teacher's stored top-k ids plus one "rest" bucket.

    The teacher is known only on its top-k support ``S`` (an offline cache, ``train/teacher_cache.py``): ids
    ``[..., K]``, their log-probabilities ``log p_t(i)`` and ``log r_t = log(1 − Σ_{i∈S} p_t(i))`` ``[...]``. The
    student's distribution is collapsed onto the same K + 1 outcomes, so the loss is a proper KL of two distributions
    (≥ 0, zero only when they agree on S and on the rest)::

        log p_s(i) = z_s[i] − logsumexp(z_s)                          (the student's FULL log-softmax)
        log r_s    = log(1 − Σ_{i∈S} p_s(i)) = log1mexp(logsumexp_{i∈S} log p_s(i))
        loss       = Σ_{i∈S} p_t(i) (log p_t(i) − log p_s(i)) + r_t (log r_t − log r_s)

    With K = V the rest is empty (``teacher_rest = −inf``): its term is 0 with a zero gradient, and the loss is the
    dense forward KL. A teacher log-probability of −inf (underflow in a float16 cache) contributes 0. The ids must
    be distinct within a token (top-k ids are). The student's rest mass is floored at 2⁻²⁴ (float32 resolution
    below 1) so a student that puts all but a rounding error of its mass on S gets a large, finite loss.

    Only T = 1: the cache holds the teacher's log-probabilities at T = 1, and its distribution at another
    temperature needs the logits of the whole vocabulary (the rest bucket cannot be rescaled).
    """
    if temperature != 1.0:
        raise ValueError(f"sparse_forward_kl needs temperature 1 (the cache stores the teacher's log-probabilities "
                         f"at T=1; its distribution at T={temperature} needs the full logits), got {temperature}")
    z_s = student_logits.astype(jnp.float32)
    ids = teacher_ids.astype(jnp.int32)
    log_pt = teacher_logprobs.astype(jnp.float32)
    log_rt = teacher_rest.astype(jnp.float32)
    # Gather at S and subtract the full logsumexp: no second [..., V] array.
    log_ps = jnp.take_along_axis(z_s, ids, axis=-1) - jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
    # Σ p_t (log p_t − log p_s), with p_t = 0 (log p_t = −inf) selected away before the product (0 · −inf = NaN).
    pt_pos = jnp.isfinite(log_pt)
    safe_log_pt = jnp.where(pt_pos, log_pt, 0.0)
    support = jnp.sum(jnp.where(pt_pos, jnp.exp(safe_log_pt) * (safe_log_pt - log_ps), 0.0), axis=-1)
    # The rest bucket. Its input is replaced where r_t = 0 (double where): otherwise log1mexp(0) = −inf would send
    # NaN through the unselected branch's gradient.
    has_rest = jnp.isfinite(log_rt)
    in_s = jnp.minimum(jax.nn.logsumexp(log_ps, axis=-1), _MAX_LOG_SUPPORT_MASS)
    log_rs = _log1mexp(jnp.where(has_rest, in_s, -1.0))
    safe_log_rt = jnp.where(has_rest, log_rt, 0.0)
    rest = jnp.where(has_rest, jnp.exp(safe_log_rt) * (safe_log_rt - log_rs), 0.0)
    return support + rest


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
    """The training objective ``alpha * kd + (1 - alpha) * ce`` (alpha=1: pure KD).

    A term whose weight is 0 is left out rather than multiplied by 0. Differentiated, ``0 * ce`` still runs CE's
    whole backward (XLA keeps it, since 0 · NaN is NaN): at alpha=1 (Minitron's setting, where CE is only logged)
    that is a ``[tokens, V]`` scatter and softmax per loss chunk for a gradient of exactly 0. The value and the
    gradient are those of the full expression whenever CE is finite."""
    if alpha == 1.0:
        return kd
    if alpha == 0.0:
        return ce
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
