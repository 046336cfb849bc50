"""Token-chunked fused distillation loss: final hidden states + lm_heads → KD (+ CE), never [N, V] logits.

`chunked_logit_loss` takes the *final hidden states* and the *lm_head* of both models rather than
logits, and loops over chunks of tokens with ``lax.scan``, computing ``hidden @ head`` for one chunk
at a time. The scan body is wrapped in ``jax.checkpoint`` so the backward pass recomputes chunk
logits instead of keeping ``[N, V]`` residuals: for Llama-3 (V=128256) a single 8192-token sequence
has 4.2 GB of fp32 logits per model, and the naive loss+grad keeps several such buffers alive.
`naive_logit_loss` has the same signature and materializes everything; it is the reference in tests.
`chunked_cross_entropy` is the teacher-free CE counterpart.

The per-token losses, the option checks and the conventions (argument order, temperature, alpha,
weighted-mean reductions) live in :mod:`minitron_jax.train.losses`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from minitron_jax.train.losses import check_kd_options, cross_entropy, kd_loss, mix_kd_ce, weighted_sum

__all__ = [
    "chunked_logit_loss",
    "naive_logit_loss",
    "chunked_cross_entropy",
]


# ----------------------------------------------------------------------------------------------
# Options and input checks
# ----------------------------------------------------------------------------------------------


class _LossOptions(NamedTuple):
    """Static loss options shared by the chunked and naive implementations."""

    kind: str
    temperature: float
    alpha: float
    top_k: int | None
    jsd_beta: float


def _make_options(kind, temperature, alpha, top_k, jsd_beta) -> _LossOptions:
    check_kd_options(kind, temperature, top_k, jsd_beta)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    top_k = None if top_k is None else int(top_k)
    return _LossOptions(kind, float(temperature), float(alpha), top_k, float(jsd_beta))


def _check_logit_inputs(student_hidden, student_head, teacher_hidden, teacher_head, targets, weights) -> None:
    """Shape checks with messages that name the offending argument."""
    ds, dt = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if student_head.ndim != 2 or student_head.shape[0] != ds:
        raise ValueError(f"student_head must be [Ds={ds}, V], got {student_head.shape}")
    if teacher_head.ndim != 2 or teacher_head.shape[0] != dt:
        raise ValueError(f"teacher_head must be [Dt={dt}, V], got {teacher_head.shape}")
    if student_head.shape[1] != teacher_head.shape[1]:
        raise ValueError(
            f"student and teacher vocab sizes differ: {student_head.shape[1]} vs {teacher_head.shape[1]}"
        )
    tokens = student_hidden.shape[:-1]
    for name, shape in (
        ("teacher_hidden", teacher_hidden.shape[:-1]),
        ("targets", targets.shape),
        ("weights", weights.shape),
    ):
        if shape != tokens:
            raise ValueError(f"{name} token shape {shape} does not match student_hidden token shape {tokens}")


# ----------------------------------------------------------------------------------------------
# Fused hidden → logits → loss
# ----------------------------------------------------------------------------------------------


def _logits(hidden: jax.Array, head: jax.Array, compute_dtype) -> jax.Array:
    """``hidden @ head`` with fp32 accumulation, operands optionally cast to ``compute_dtype`` first.

    The cast happens here, inside the chunk, on purpose: the scan then closes over the head in its
    *storage* dtype, so with fp32 master weights the head gradient is accumulated across chunks in
    fp32 (each chunk's bf16 contribution is rounded once) instead of in a bf16 running sum. XLA
    hoists the loop-invariant cast of the head out of the loop.
    """
    if compute_dtype is not None:
        hidden, head = hidden.astype(compute_dtype), head.astype(compute_dtype)
    return jnp.dot(hidden, head, preferred_element_type=jnp.float32)



def _token_losses(s_logits, t_logits, targets, opts: _LossOptions) -> tuple[jax.Array, jax.Array]:
    """Per-token (kd, ce) from a block of student and teacher logits."""
    kd = kd_loss(
        s_logits, t_logits, kind=opts.kind, temperature=opts.temperature, top_k=opts.top_k, jsd_beta=opts.jsd_beta
    )
    ce = cross_entropy(s_logits, targets)
    return kd, ce


def _prepare(student_hidden, student_head, teacher_hidden, teacher_head, targets, weights):
    """Flatten token dims and stop teacher gradients."""
    _check_logit_inputs(student_hidden, student_head, teacher_hidden, teacher_head, targets, weights)
    # The teacher is frozen: no gradient may flow into its hidden states or head.
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_head = jax.lax.stop_gradient(teacher_head)
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    targets = targets.reshape(-1).astype(jnp.int32)
    weights = weights.reshape(-1).astype(jnp.float32)
    return student_hidden, student_head, teacher_hidden, teacher_head, targets, weights


def _finish(kd_sum, ce_sum, weights, opts: _LossOptions):
    """Turn weighted sums into the weighted-mean loss and the aux dict."""
    weight_sum = jnp.sum(weights)
    denom = jnp.maximum(weight_sum, 1.0)
    kd, ce = kd_sum / denom, ce_sum / denom
    aux = {
        "kd": kd,
        "ce": ce,
        "num_tokens": jnp.sum(weights != 0).astype(jnp.float32),
        "weight_sum": weight_sum,
    }
    return mix_kd_ce(kd, ce, opts.alpha), aux


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """[N, ...] → [num_chunks, chunk, ...], zero-padding N up to num_chunks * chunk.

    Chunks are *strided*: chunk j holds tokens j, j + num_chunks, j + 2·num_chunks, ... The loss is
    a sum over tokens so the grouping is irrelevant to the value, but this layout keeps a token
    sharding (contiguous blocks of N over data/fsdp devices) on the within-chunk axis, so every
    scan step uses all devices instead of walking one device's shard at a time.
    """
    pad = num_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return jnp.swapaxes(x.reshape(chunk, num_chunks, *x.shape[1:]), 0, 1)


def _chunk_layout(num_tokens: int, chunk_size: int) -> tuple[int, int]:
    """(num_chunks, chunk) with chunk ≤ chunk_size and as little padding as possible (< num_chunks)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_chunks = max(1, -(-num_tokens // chunk_size))
    chunk = max(1, -(-num_tokens // num_chunks))
    return num_chunks, chunk


def chunked_logit_loss(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    top_k: int | None = None,
    jsd_beta: float = 0.5,
    chunk_size: int = 1024,
    compute_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KD (+ CE) loss from final hidden states and lm_heads, never materializing [N, V] logits.

    Args:
      student_hidden: ``[..., Ds]`` student final-norm outputs (leading dims are flattened to N).
      student_head: ``[Ds, V]`` student lm_head (for tied embeddings pass ``embed.T``).
      teacher_hidden: ``[..., Dt]``; Dt may differ from Ds (width-pruned student).
      teacher_head: ``[Dt, V]``.
      targets: ``[...]`` int next-token ids (used by the CE term only).
      weights: ``[...]`` float loss mask / token weights.
      kind: one of `KD_KINDS`. temperature, alpha, top_k, jsd_beta: see :mod:`~.losses`. All
        options are static Python values (they shape the traced program).
      chunk_size: max tokens per chunk; N need not divide it (it is padded with weight-0 tokens).
      compute_dtype: dtype to cast hidden states and heads to before the matmul (e.g. bf16 for
        tensor cores); None keeps their dtypes. Accumulation, logits and all loss math are fp32.
        The head gradient is summed over chunks in the head's *storage* dtype: pass fp32 master
        heads with ``compute_dtype=bf16`` for an fp32 sum (measured more accurate than the naive
        bf16 version); a bf16-stored head gets a bf16 running sum, rounded once per chunk.

    Returns:
      ``(loss, aux)``: ``loss = alpha*kd + (1-alpha)*ce`` as weighted means over tokens;
      ``aux = {"kd", "ce", "num_tokens" (count of weight≠0 tokens), "weight_sum"}``. Multiply a mean
      by ``max(weight_sum, 1)`` to recover the sum when combining across micro-batches.
    """
    opts = _make_options(kind, temperature, alpha, top_k, jsd_beta)
    s_hidden, s_head, t_hidden, t_head, targets, weights = _prepare(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, weights
    )
    num_chunks, chunk = _chunk_layout(s_hidden.shape[0], chunk_size)
    xs = tuple(_to_chunks(x, num_chunks, chunk) for x in (s_hidden, t_hidden, targets, weights))

    # Rematerialized: the backward pass recomputes this chunk's logits from (hidden chunk, heads)
    # instead of saving [chunk, V] softmax residuals for every chunk, i.e. [N, V] in total. The
    # price is one extra student and one extra teacher head matmul per chunk in the backward pass.
    @jax.checkpoint
    def chunk_sums(s_head, t_head, s_h, t_h, tgt, w):
        s_logits, t_logits = _logits(s_h, s_head, compute_dtype), _logits(t_h, t_head, compute_dtype)
        kd, ce = _token_losses(s_logits, t_logits, tgt, opts)
        return weighted_sum(kd, w), weighted_sum(ce, w)

    def body(carry, chunk_xs):
        kd_sum, ce_sum = chunk_sums(s_head, t_head, *chunk_xs)
        return (carry[0] + kd_sum, carry[1] + ce_sum), None

    zero = jnp.zeros((), jnp.float32)
    (kd_sum, ce_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    return _finish(kd_sum, ce_sum, weights, opts)


def naive_logit_loss(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    top_k: int | None = None,
    jsd_beta: float = 0.5,
    chunk_size: int = 1024,
    compute_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Same contract as `chunked_logit_loss`, but materializes full [N, V] logits of both models.

    The reference for tests and for small models; ``chunk_size`` is accepted and ignored so the
    two functions are drop-in interchangeable.
    """
    del chunk_size
    opts = _make_options(kind, temperature, alpha, top_k, jsd_beta)
    s_hidden, s_head, t_hidden, t_head, targets, weights = _prepare(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, weights
    )
    s_logits, t_logits = _logits(s_hidden, s_head, compute_dtype), _logits(t_hidden, t_head, compute_dtype)
    kd, ce = _token_losses(s_logits, t_logits, targets, opts)
    return _finish(weighted_sum(kd, weights), weighted_sum(ce, weights), weights, opts)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int = 1024,
    compute_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token CE from final hidden states ``[..., D]`` and the lm_head ``[D, V]``, chunked and
    rematerialized like `chunked_logit_loss` but with no teacher (teacher correction, SFT).

    Returns ``(ce, aux)``: the weighted-mean CE and ``aux = {"ce", "num_tokens", "weight_sum"}``.
    """
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"head must be [D={hidden.shape[-1]}, V], got {head.shape}")
    if targets.shape != hidden.shape[:-1] or weights.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {targets.shape} / weights {weights.shape} must match hidden tokens "
                         f"{hidden.shape[:-1]}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).astype(jnp.int32)
    weights = weights.reshape(-1).astype(jnp.float32)
    num_chunks, chunk = _chunk_layout(hidden.shape[0], chunk_size)
    xs = tuple(_to_chunks(x, num_chunks, chunk) for x in (hidden, targets, weights))

    @jax.checkpoint
    def chunk_sum(head, h, tgt, w):
        return weighted_sum(cross_entropy(_logits(h, head, compute_dtype), tgt), w)

    def body(total, chunk_xs):
        return total + chunk_sum(head, *chunk_xs), None

    ce_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    weight_sum = jnp.sum(weights)
    ce = ce_sum / jnp.maximum(weight_sum, 1.0)
    return ce, {"ce": ce, "num_tokens": jnp.sum(weights != 0).astype(jnp.float32), "weight_sum": weight_sum}
