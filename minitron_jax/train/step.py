"""The jitted train and eval steps.

One optimizer update is ONE ``jax.jit`` call, ``step(state, teacher_params, batch) -> (state, metrics)``, with
explicit in/out shardings and the train state donated. Inside it:

1. the global batch ``[B, T]`` is split into ``train.grad_accum`` micro-batches (strided rows, so each keeps the
   batch sharding) and scanned over;
2. per micro-batch, the teacher runs forward-only in ``teacher.dtype`` under ``stop_gradient``, the student runs
   in ``train.compute_dtype`` from fp32 master weights, and the loss is computed from both models' *final hidden
   states and lm_heads* by :func:`minitron_jax.train.chunked_loss.chunked_logit_loss`, so ``[tokens × vocab]``
   logits are never materialized;
3. gradients are **sums** over tokens, divided once by the batch's token count: a batch split into micro-batches
   gives the same update as the whole batch at once (token-weighted, not a mean of micro-batch means). This is
   also why accumulation lives here rather than in ``optax.MultiSteps``: one call is one update, and the
   optimizer state carries no accumulator;
4. clip → AdamW (``optim.make_optimizer``) and the new state.

Everything is built from configs and a mesh only, never from arrays, so the same jitted function lowers with
``jax.ShapeDtypeStruct`` inputs for a dry run::

    ts = build_train_step(rc, mesh, student_config, teacher_config)
    compiled = ts.step.lower(abstract_train_state(rc, mesh, student_config, teacher_config),
                             abstract_teacher(rc, mesh, teacher_config), abstract_batch(rc, mesh)).compile()
    compiled.memory_analysis(), compiled.cost_analysis()
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minitron_jax.arch import AnyConfig, hidden_states, lm_head, stacked_collected
from minitron_jax.model import Params
from minitron_jax.sharding import batch_sharding, batch_spec, data_parallel_size, logical_spec, replicated
from minitron_jax.train import chunked_loss, losses, sparse_loss, teacher_cache
from minitron_jax.train.config import LossConfig, RunConfig, RunConfigError
from minitron_jax.train.optim import make_schedule
from minitron_jax.train.state import (
    TrainState,
    dtype_of,
    make_run_optimizer,
    mesh_rules,
    state_shardings,
    teacher_shardings,
)

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
Batch = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------
def batch_shardings(mesh: Mesh, rc: RunConfig | None = None) -> Batch:
    """Every batch array split by rows; with ``teacher.logits_cache`` also the cached teacher's arrays."""
    out = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    if rc is not None and rc.teacher.logits_cache is not None:
        out.update({k: batch_sharding(mesh, ndim) for k, ndim in teacher_cache.CACHE_NDIM.items()})
    return out


def abstract_batch(rc: RunConfig, mesh: Mesh) -> Batch:
    shape = (rc.data.batch_size, rc.data.seq_len)
    shardings = batch_shardings(mesh, rc)
    out = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shardings[k]) for k in BATCH_KEYS}
    if rc.teacher.logits_cache is not None:  # [B, T, K] ids and log-probs, [B, T] rest, in the cache's dtypes
        out.update({k: jax.ShapeDtypeStruct(shape + tail, dtype, sharding=shardings[k])
                    for k, (tail, dtype) in teacher_cache.read_layout(rc.teacher.logits_cache).items()})
    return out


def check_batch_layout(rc: RunConfig, mesh: Mesh) -> None:
    """Each micro-batch must split evenly over the data-parallel devices."""
    micro = rc.data.batch_size // rc.train.grad_accum
    dp = data_parallel_size(mesh)
    if micro % dp:
        raise RunConfigError(f"micro-batch of {micro} rows (data.batch_size {rc.data.batch_size} / train.grad_accum "
                             f"{rc.train.grad_accum}) does not split over {dp} data-parallel devices "
                             f"(mesh data × fsdp); make it a multiple of {dp}")


def next_token_targets(tokens: jax.Array) -> jax.Array:
    """Targets of next-token prediction: tokens shifted left (the last column is masked by ``loss_mask``)."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def _micro_batches(batch: Batch, k: int, mesh: Mesh) -> Batch:
    """[B, T] → [k, B/k, T] with micro-batch j = rows j, j+k, j+2k, ...

    Strided rather than contiguous because the batch axis is sharded in contiguous blocks: a strided split keeps
    every device's rows spread over all micro-batches, so each micro-batch still uses every device."""
    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *batch_spec(mesh, x.ndim - 1))))

    return {name: split(x) for name, x in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# The loss of one micro-batch, as sums over its tokens
# ----------------------------------------------------------------------------------------------------------------
def _layer_outputs(intermediates: dict) -> jax.Array:
    return intermediates["layer_out"]


def make_loss_fn(rc: RunConfig, student: AnyConfig, teacher: AnyConfig | None,
                 loss: LossConfig | None = None,
                 mesh: Mesh | None = None) -> Callable[[Params, Params, Batch], tuple[jax.Array, dict]]:
    """``fn(trainable, teacher_params, micro_batch) -> (objective_sum, sums)``.

    ``objective_sum`` is ``alpha·Σkd + (1-alpha)·Σce + hidden.weight·Σhidden`` over the micro-batch's weighted
    tokens; ``sums`` holds each term's sum plus ``weight`` (Σ loss_mask) and ``tokens`` (count of loss tokens).
    Dividing by the whole batch's ``weight`` gives means. ``teacher=None`` trains with cross-entropy alone.

    With a ``mesh``, activations are pinned to the batch sharding (see `_activation_layout`)."""
    loss = loss or rc.loss
    compute = dtype_of(rc.train.compute_dtype)
    teacher_dtype = dtype_of(rc.teacher.dtype)
    pairs = loss.hidden.pairs if (teacher is not None and loss.hidden.weight > 0) else []
    collect = _layer_outputs if pairs else None
    logit_loss = chunked_loss.naive_logit_loss if loss.naive else chunked_loss.chunked_logit_loss
    cached = teacher is None and rc.teacher.logits_cache is not None  # the teacher's top-k come in the batch
    if pairs:
        bad = [p for p in pairs if p[0] >= student.num_layers or p[1] >= teacher.num_layers]
        if bad:
            raise RunConfigError(f"loss.hidden.pairs {bad} name layers beyond the student's {student.num_layers} "
                                 f"or the teacher's {teacher.num_layers}")

    act_sharding, head_of = _activation_layout(rc, mesh)

    def run_model(config, params, mb, dtype, remat):
        return hidden_states(config, params, mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"],
                             dtype=dtype, remat=remat, collect=collect, attention=rc.train.attention,
                             activation_sharding=act_sharding)

    def fn(trainable: Params, teacher_params: Params, mb: Batch):
        model = trainable["model"]
        targets = next_token_targets(mb["tokens"])
        weights = mb["loss_mask"].astype(jnp.float32)
        weight_sum = jnp.sum(weights)
        s_hidden, s_layers, _ = run_model(student, model, mb, compute, rc.train.remat)
        sums = {"weight": weight_sum, "tokens": jnp.sum(weights != 0).astype(jnp.float32)}
        scale = jnp.maximum(weight_sum, 1.0)  # the losses return weighted means: back to sums
        if cached:
            mean, aux = sparse_loss.cached_teacher_loss(
                s_hidden, head_of(student, model), mb["teacher_ids"], mb["teacher_logprobs"], mb["teacher_rest"],
                targets, weights, alpha=loss.alpha, temperature=loss.temperature, chunk_size=loss.chunk_size,
                compute_dtype=compute)
            return mean * scale, {**sums, "kd": aux["kd"] * scale, "ce": aux["ce"] * scale}
        if teacher is None:
            ce, _ = chunked_loss.chunked_cross_entropy(s_hidden, head_of(student, model), targets, weights,
                                                       chunk_size=loss.chunk_size, compute_dtype=compute)
            return ce * scale, {**sums, "ce": ce * scale}

        frozen = jax.lax.stop_gradient(teacher_params)  # forward-only: no gradient is ever traced into the teacher
        t_hidden, t_layers, _ = run_model(teacher, frozen, mb, teacher_dtype, "none")
        mean, aux = logit_loss(s_hidden, head_of(student, model), t_hidden, head_of(teacher, frozen), targets,
                               weights, kind=loss.kind, temperature=loss.temperature, alpha=loss.alpha,
                               top_k=loss.top_k, jsd_beta=loss.jsd_beta, chunk_size=loss.chunk_size,
                               compute_dtype=compute)
        objective = mean * scale
        sums.update(kd=aux["kd"] * scale, ce=aux["ce"] * scale)
        if pairs:
            s_idx = jnp.asarray([p[0] for p in pairs])
            t_idx = jnp.asarray([p[1] for p in pairs])
            # A heterogeneous model collects per segment: one [L, B, T, D] stack either way.
            s_layers, t_layers = stacked_collected(student, s_layers), stacked_collected(teacher, t_layers)
            s_sel, t_sel = s_layers[s_idx], t_layers[t_idx]  # [P, B, T, D]
            if "hidden_proj" in trainable:
                s_sel = jnp.einsum("pbtd,pde->pbte", s_sel, trainable["hidden_proj"].astype(s_sel.dtype),
                                   preferred_element_type=jnp.float32)
            hidden_mean = losses.hidden_state_loss(s_sel, t_sel, kind=loss.hidden.kind, weights=weights)
            # hidden_state_loss averages over pairs × tokens; keep the pair average, make the tokens a sum.
            hidden_sum = hidden_mean * jnp.maximum(len(pairs) * weight_sum, 1.0) / len(pairs)
            objective = objective + loss.hidden.weight * hidden_sum
            sums["hidden"] = hidden_sum
        return objective, sums

    return fn


def _activation_layout(rc: RunConfig, mesh: Mesh | None):
    """(residual-stream sharding, lm_head getter) that keep FSDP an FSDP.

    Left alone, XLA's partitioner meets batch-sharded activations and embed-sharded (FSDP) weights by resharding the
    activations over the hidden axis and all-reducing every matmul's [B, T, F] output, and it gathers the lm_heads
    inside the loss's chunk loop, once per chunk. The dry run of the 8B recipe measured 1.8 TB of collectives per
    micro-batch per device that way (docs/scaling.md). Pinning the residual stream to the batch sharding at every
    layer boundary makes it gather each layer's weights instead, and gathering each head over the FSDP axes once,
    before the chunk loop (vocab stays tensor-parallel), removes the per-chunk gathers: ~100 GB."""
    if mesh is None:
        return None, lm_head
    act = NamedSharding(mesh, batch_spec(mesh, 3))
    rules = {**mesh_rules(rc), "embed": None}

    def gathered_head(config: AnyConfig, params: Params) -> jax.Array:
        head = lm_head(config, params)
        spec = logical_spec(("embed", "vocab"), head.shape, mesh, rules)
        return jax.lax.with_sharding_constraint(head, NamedSharding(mesh, spec))

    return act, gathered_head


# ----------------------------------------------------------------------------------------------------------------
# Gradients over the whole batch
# ----------------------------------------------------------------------------------------------------------------
def make_grad_fn(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None,
                 loss: LossConfig | None = None):
    """``fn(trainable, teacher_params, batch) -> (grads, metrics)``: token-mean gradients of the objective over
    the whole batch, accumulated over ``train.grad_accum`` micro-batches. Not jitted (the train step is)."""
    loss_fn = make_loss_fn(rc, student, teacher, loss, mesh)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    k = rc.train.grad_accum

    def grad_of(trainable, teacher_params, mb):
        (objective, sums), grads = value_and_grad(trainable, teacher_params, mb)
        return grads, {**sums, "loss": objective}

    def fn(trainable: Params, teacher_params: Params, batch: Batch):
        if k == 1:
            grads, sums = grad_of(trainable, teacher_params, batch)
        else:
            micro = _micro_batches(batch, k, mesh)
            _, sums_shape = jax.eval_shape(grad_of, trainable, teacher_params, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (trainable, sums_shape))

            def body(acc, mb):
                return jax.tree.map(jnp.add, acc, grad_of(trainable, teacher_params, mb)), None

            (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        metrics = {name: value / denom for name, value in sums.items() if name not in ("weight", "tokens")}
        metrics["tokens"] = sums["tokens"]
        return grads, metrics

    return fn


# ----------------------------------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------------------------------
def all_finite(tree) -> jax.Array:
    """Scalar bool: every floating-point element of ``tree`` is finite (no NaN, no inf).

    As ``isfinite(Σ (x - x))``: x - x is exactly 0 for a finite x and NaN for NaN or ±inf, and a sum with a NaN is
    NaN. Each leaf is read once, inside the reduction; ``all(isfinite(x))`` materialized a bool copy of every leaf
    first. Not ``x * 0``: XLA turns the 0 into a zero array of the leaf's shape, merges it with the identical zero
    arrays the backward pass starts its gradients from, and the merged zeros then live from the start of the step to
    this check at its end, and force a copy of each as well: 0.3 GB of the demo's 1.19 GB of step temporaries."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(sum(jnp.sum(x - x, dtype=jnp.float32) for x in leaves)) if leaves else jnp.asarray(True)


class TrainStep(NamedTuple):
    """The jitted step and the shardings of its arguments (also what a dry run lowers with)."""

    step: Any  # jitted (state, teacher_params, batch) -> (state, metrics); the state is donated
    state_shardings: TrainState
    batch_shardings: Batch
    teacher_shardings: Params


def build_train_step(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None) -> TrainStep:
    """The train step of a run, for ``student`` distilled from ``teacher`` (None: cross-entropy only)."""
    check_batch_layout(rc, mesh)
    optimizer = make_run_optimizer(rc)
    opt = rc.optim
    schedule = make_schedule(opt.peak_lr, opt.min_lr, opt.warmup_steps, rc.train.steps)
    grad_fn = make_grad_fn(rc, mesh, student, teacher)

    def train_step(state: TrainState, teacher_params: Params, batch: Batch):
        grads, metrics = grad_fn(state.params, teacher_params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        metrics.update(grad_norm=grad_norm, lr=schedule(state.step))
        # The loop refuses a step whose result holds NaN/inf. Checked here, inside the step, rather than by a second
        # program reading the new state back: the loss is computed before the update and cannot vouch for it (an
        # overflowing update leaves NaN params behind a finite loss). A finite grad norm means finite grads.
        metrics["finite"] = all_finite((params, opt_state)) & jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    s_sh = state_shardings(rc, mesh, student, teacher, optimizer)
    t_sh = teacher_shardings(rc, mesh, teacher)
    b_sh = batch_shardings(mesh, rc)
    jitted = jax.jit(train_step, in_shardings=(s_sh, t_sh, b_sh), out_shardings=(s_sh, replicated(mesh)),
                     donate_argnums=(0,))
    return TrainStep(jitted, s_sh, b_sh, t_sh)


def build_eval_step(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None):
    """Jitted ``(trainable, teacher_params, batch) -> sums`` for validation: forward KL at T=1 (with a teacher)
    and the student's cross-entropy, as sums plus the token weight, to be added up over batches."""
    val_loss = LossConfig(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=rc.loss.chunk_size)
    val_rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, remat="none"))
    loss_fn = make_loss_fn(val_rc, student, teacher, val_loss, mesh)
    optimizer = make_run_optimizer(rc)
    params_sh = state_shardings(rc, mesh, student, teacher, optimizer).params

    def eval_step(trainable, teacher_params, batch):
        _, sums = loss_fn(trainable, teacher_params, batch)
        return sums

    return jax.jit(eval_step, in_shardings=(params_sh, teacher_shardings(rc, mesh, teacher),
                                            batch_shardings(mesh, rc)),
                   out_shardings=replicated(mesh))
