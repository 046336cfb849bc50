"""Token-chunked fused distillation loss: final hidden states + lm_heads → KD (+ CE), never [N, V] logits.

`fused_head_loss` is the machinery: for any per-token loss of the logits ``hidden @ head`` it loops over chunks
of tokens with ``lax.scan`` and, in the same forward scan, computes each chunk's logits, loss and the gradient
w.r.t. ``hidden`` and ``head`` (a ``jax.custom_vjp``: the backward only scales the stored gradients). So no
``[N, V]`` array exists (for Llama-3, V=128256, one 8192-token sequence has 4.2 GB of fp32 logits per model)
and nothing is recomputed: a KD step does 4 head-sized matmuls (student and teacher logits, dH, dW), where a
``jax.checkpoint``-ed chunk did 6 (both models' logits again in the backward).

`chunked_logit_loss` (KD from a teacher's final hidden states and lm_head, + CE) and `chunked_cross_entropy`
(no teacher: teacher correction, SFT) are `fused_head_loss` with a per-token function each; a KD loss from
cached teacher outputs plugs in the same way. `naive_logit_loss` has `chunked_logit_loss`'s signature and
materializes everything; it is the reference in tests.

The per-token losses, the option checks and the conventions (argument order, temperature, alpha,
weighted-mean reductions) live in :mod:`minitron_jax.train.losses`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from minitron_jax.model import dot_lhs_transposed
from minitron_jax.train.losses import check_kd_options, cross_entropy, kd_loss, mix_kd_ce, weighted_sum

__all__ = [
    "fused_head_loss",
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


def _finish(kd_sum, ce_sum, weights, opts: _LossOptions, loss_sum=None):
    """Turn weighted sums into the weighted-mean loss and the aux dict (``loss_sum``: the objective's sum, when it
    was summed on its own — the fused loss differentiates only that one)."""
    weight_sum = jnp.sum(weights)
    denom = jnp.maximum(weight_sum, 1.0)
    kd, ce = kd_sum / denom, ce_sum / denom
    aux = {
        "kd": kd,
        "ce": ce,
        "num_tokens": jnp.sum(weights != 0).astype(jnp.float32),
        "weight_sum": weight_sum,
    }
    loss = mix_kd_ce(kd, ce, opts.alpha) if loss_sum is None else loss_sum / denom
    return loss, aux


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


# ----------------------------------------------------------------------------------------------
# Fused hidden → logits → loss with a hand-written backward
# ----------------------------------------------------------------------------------------------


def fused_head_loss(
    hidden: jax.Array,
    head: jax.Array,
    per_token_fn: Callable[..., tuple[jax.Array, Any]],
    chunk_xs: tuple[jax.Array, ...] = (),
    *,
    weights: jax.Array,
    consts: tuple[jax.Array, ...] = (),
    chunk_size: int = 1024,
    compute_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, Any]:
    """``Σ_tokens w·loss`` of a per-token loss of the logits ``hidden @ head``, one chunk of tokens at a time,
    with its gradient w.r.t. ``hidden`` and ``head`` computed *in the forward pass* (fused linear loss).

    Per chunk of tokens the forward scan computes the logits ``z = h @ W`` ([chunk, V], fp32), the per-token
    loss, and — through ``jax.vjp`` of the chunk's weighted loss sum at ``z`` — the gradient ``dZ`` of that sum
    w.r.t. the logits; then ``dH = dZ @ Wᵀ`` (kept for the chunk) and ``dW += Hᵀ @ dZ`` (one fp32 running sum).
    The backward only scales the stored ``dH``/``dW`` by the cotangent of the loss sum. So a training step costs
    two ``[N, D]×[D, V]``-sized matmuls more than the forward (dH, dW) and recomputes nothing, and no ``[N, V]``
    array ever exists (only ``[chunk, V]`` per scan step), against three more with a rematerialized chunk
    (``jax.checkpoint``: logits again, then dH, dW). Outside differentiation (an eval step) only the forward
    scan runs, without the gradient matmuls. This is the "fused linear cross-entropy" of Liger-Kernel and
    Apple's cut-cross-entropy, generalized to any per-token loss ``jax.vjp`` can differentiate.

    Args:
      hidden: ``[..., D]`` final hidden states; leading dims are flattened to N tokens.
      head: ``[D, V]`` lm_head (tied embeddings: ``embed.T``).
      per_token_fn: ``per_token_fn(logits, *chunk_slices, *consts) -> (loss, aux)``. ``logits`` is the chunk's
        ``[c, V]`` fp32 logits; ``chunk_slices`` are the same ``c`` rows of each array of ``chunk_xs``;
        ``loss`` is ``[c]`` per-token values (the only output that is differentiated) and ``aux`` a pytree
        (possibly ``{}``) of ``[c]`` per-token values that are only summed, e.g. the KD and CE parts of a mixed
        loss for logging. It must be a pure function of its arguments, differentiable in ``logits`` (its other
        arguments are constants here). Padding rows (weight 0, zeros in ``hidden`` and every ``chunk_xs``) are
        passed to it too, so it must not fail on them; their values are selected away.
      chunk_xs: per-token inputs of ``per_token_fn``, each ``[..., *]`` with ``hidden``'s token dims, e.g. the
        teacher's final hidden states and the targets, or cached teacher top-k ids and log-probs. No gradient.
      weights: ``[...]`` token weights (loss mask); weight-0 tokens are selected away exactly (see
        ``losses.weighted_sum``), so their loss and their gradient are exactly 0 whatever ``per_token_fn`` says.
      consts: arrays passed whole (not chunked) to every call of ``per_token_fn``, e.g. a teacher's lm_head.
        No gradient: they are constants, as a frozen teacher is. (Pass them here rather than closing over them:
        a ``jax.custom_vjp`` function may not close over traced values.)
      chunk_size: max tokens per chunk; N is padded up to whole chunks with weight-0 rows.
      compute_dtype: dtype of the matmul operands (``hidden``, ``head`` and ``dZ``, e.g. bf16); None keeps
        ``hidden``/``head``'s. Accumulation, logits, the loss math and the ``dW`` running sum are fp32; the
        gradients come back in ``hidden``'s and ``head``'s dtypes.

    Returns:
      ``(loss_sum, aux_sums)``: fp32 scalars ``Σ w·loss`` and ``Σ w·aux`` (same pytree as ``aux``). Only
      ``loss_sum`` carries gradient (to ``hidden`` and ``head``); ``aux_sums`` are under ``stop_gradient``.
    """
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"head must be [D={hidden.shape[-1]}, V], got {head.shape}")
    tokens = hidden.shape[:-1]
    for i, x in enumerate((weights, *chunk_xs)):
        if x.shape[: len(tokens)] != tokens:
            name = "weights" if i == 0 else f"chunk_xs[{i - 1}]"
            raise ValueError(f"{name} token shape {x.shape[:len(tokens)]} does not match hidden's {tokens}")
    num_tokens = math.prod(tokens)
    flat = lambda x: x.reshape(num_tokens, *x.shape[len(tokens):])  # noqa: E731
    hidden = flat(hidden)
    # Everything but hidden and head is a constant of this loss; the stop_gradient says so in the primal too,
    # rather than leaving it to the custom backward to return zeros.
    weights = jax.lax.stop_gradient(flat(weights).astype(jnp.float32))
    chunk_xs = jax.lax.stop_gradient(tuple(flat(x) for x in chunk_xs))
    consts = jax.lax.stop_gradient(tuple(consts))
    num_chunks, chunk = _chunk_layout(num_tokens, chunk_size)
    hidden_chunks = _to_chunks(hidden, num_chunks, chunk)
    const_xs = (_to_chunks(weights, num_chunks, chunk), *(_to_chunks(x, num_chunks, chunk) for x in chunk_xs))

    def of_logits(z, consts, w, *rest):
        """(Σ w·loss, Σ w·aux) of one chunk, as a function of its logits ``z``."""
        loss, aux = per_token_fn(z, *rest, *consts)
        return weighted_sum(loss, w), jax.tree.map(lambda a: weighted_sum(a, w), aux)

    z_shape = jax.ShapeDtypeStruct((chunk, head.shape[1]), jnp.float32)
    row_shapes = (jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in const_xs)
    sums_shape = jax.eval_shape(of_logits, z_shape, consts, *row_shapes)
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)

    def cast(x):
        return x if compute_dtype is None else x.astype(compute_dtype)

    # const_xs and consts go into the custom_vjp as arguments (with no cotangent), not by closure: a custom_vjp
    # function must not close over traced values.
    def forward(hidden_chunks, head, frozen):
        """Forward only: the sums, no gradient work (what an undifferentiated call runs)."""
        const_xs, consts = frozen

        def body(sums, xs):
            h, *rest = xs
            return jax.tree.map(jnp.add, sums, of_logits(_logits(h, head, compute_dtype), consts, *rest)), None

        return jax.lax.scan(body, zero_sums, (hidden_chunks, *const_xs))[0]

    def forward_with_grads(hidden_chunks, head, frozen):
        """The sums, plus d(Σ w·loss)/d(hidden chunks) and d(Σ w·loss)/d(head), in one scan."""
        const_xs, consts = frozen
        head_t = cast(head).T  # loop-invariant: XLA hoists the cast and transpose out of the scan

        def body(carry, xs):
            sums, d_head = carry
            h, *rest = xs
            z = _logits(h, head, compute_dtype)
            loss, vjp, aux = jax.vjp(lambda z: of_logits(z, consts, *rest), z, has_aux=True)
            (d_z,) = vjp(jnp.ones((), loss.dtype))
            d_z = cast(d_z)
            d_h = jnp.dot(d_z, head_t, preferred_element_type=jnp.float32).astype(h.dtype)
            # dW as one fp32 running sum over chunks whatever the storage/compute dtypes: rounded once, at the end.
            # (dot_lhs_transposed: XLA:CPU's slow path for a dot contracting the rows of both operands is avoided.)
            d_head = d_head + dot_lhs_transposed(cast(h), d_z, preferred_element_type=jnp.float32)
            return (jax.tree.map(jnp.add, sums, (loss, aux)), d_head), d_h

        init = (zero_sums, jnp.zeros(head.shape, jnp.float32))
        (sums, d_head), d_hidden = jax.lax.scan(body, init, (hidden_chunks, *const_xs))
        return sums, (d_hidden, d_head.astype(head.dtype))

    @jax.custom_vjp
    def fused(hidden_chunks, head, frozen):
        return forward(hidden_chunks, head, frozen)

    def fused_bwd(grads, cotangent):
        d_hidden, d_head = grads
        g = cotangent[0]  # only the loss sum is differentiated: the aux sums are stop_gradient'ed below
        return g.astype(d_hidden.dtype) * d_hidden, g.astype(d_head.dtype) * d_head, None

    fused.defvjp(forward_with_grads, fused_bwd)
    loss_sum, aux_sums = fused(hidden_chunks, head, (const_xs, consts))
    return loss_sum, jax.lax.stop_gradient(aux_sums)


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
        The student head gradient is summed over chunks in fp32 and cast to the head's dtype once.

    Only ``loss`` is differentiable (to the student's hidden states and head, by `fused_head_loss`); the
    values in ``aux`` are for logging and carry no gradient.

    Returns:
      ``(loss, aux)``: ``loss = alpha*kd + (1-alpha)*ce`` as weighted means over tokens;
      ``aux = {"kd", "ce", "num_tokens" (count of weight≠0 tokens), "weight_sum"}``. Multiply a mean
      by ``max(weight_sum, 1)`` to recover the sum when combining across micro-batches.
    """
    opts = _make_options(kind, temperature, alpha, top_k, jsd_beta)
    s_hidden, s_head, t_hidden, t_head, targets, weights = _prepare(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, weights
    )

    def per_token(s_logits, t_hidden, targets, t_head):
        # The teacher's chunk logits do not depend on the student's: the vjp computes them once, in its primal.
        t_logits = _logits(t_hidden, t_head, compute_dtype)
        kd, ce = _token_losses(s_logits, t_logits, targets, opts)
        return mix_kd_ce(kd, ce, opts.alpha), {"kd": kd, "ce": ce}

    loss_sum, sums = fused_head_loss(s_hidden, s_head, per_token, (t_hidden, targets), weights=weights,
                                     consts=(t_head,), chunk_size=chunk_size, compute_dtype=compute_dtype)
    return _finish(sums["kd"], sums["ce"], weights, opts, loss_sum)


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
    """Next-token CE from final hidden states ``[..., D]`` and the lm_head ``[D, V]``, chunked and fused
    (`fused_head_loss`) like `chunked_logit_loss` but with no teacher (teacher correction, SFT).

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
    ce_sum, _ = fused_head_loss(hidden, head, lambda z, tgt: (cross_entropy(z, tgt), {}), (targets,),
                                weights=weights, chunk_size=chunk_size, compute_dtype=compute_dtype)
    weight_sum = jnp.sum(weights)
    ce = ce_sum / jnp.maximum(weight_sum, 1.0)
    return ce, {"ce": ce, "num_tokens": jnp.sum(weights != 0).astype(jnp.float32), "weight_sum": weight_sum}
