"""Tests for minitron_jax.train.losses and .chunked_loss: per-token losses against float64 numpy,
chunked ≡ naive, memory."""

from __future__ import annotations

import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.train import chunked_loss, losses

# ----------------------------------------------------------------------------------------------
# float64 numpy references, written straight from the definitions
# ----------------------------------------------------------------------------------------------


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def np_forward_kl(s, t, T=1.0):
    return T**2 * np_kl(np_log_softmax(t / T), np_log_softmax(s / T))


def np_reverse_kl(s, t, T=1.0):
    return T**2 * np_kl(np_log_softmax(s / T), np_log_softmax(t / T))


def np_jsd(s, t, T=1.0, beta=0.5):
    pt, ps = np.exp(np_log_softmax(t / T)), np.exp(np_log_softmax(s / T))
    m = beta * pt + (1 - beta) * ps
    return T**2 * (beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1))


def np_top_k_kl(s, t, k, T=1.0):
    t64, s64 = np.asarray(t, np.float64) / T, np.asarray(s, np.float64) / T
    idx = np.argsort(-t64, axis=-1)[..., :k]
    log_qt = np_log_softmax(np.take_along_axis(t64, idx, -1))
    log_ps = np.take_along_axis(np_log_softmax(s64), idx, -1)
    return T**2 * np_kl(log_qt, log_ps)


def np_ce(z, y):
    return -np.take_along_axis(np_log_softmax(z), np.asarray(y)[..., None], -1)[..., 0]


def assert_close(actual, expected, tol=1e-5):
    """Relative-to-scale closeness, for arrays whose entries span orders of magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    shape = (3, 5, 50)
    return (rng.normal(size=shape) * 3).astype(np.float32), (rng.normal(size=shape) * 3).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Per-token losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_per_token_losses_match_float64(logits, T):
    s, t = logits
    assert_close(losses.forward_kl(s, t, temperature=T), np_forward_kl(s, t, T))
    assert_close(losses.reverse_kl(s, t, temperature=T), np_reverse_kl(s, t, T))
    assert_close(losses.jsd(s, t, temperature=T), np_jsd(s, t, T))
    assert_close(losses.jsd(s, t, temperature=T, beta=0.2), np_jsd(s, t, T, beta=0.2))
    assert_close(losses.top_k_forward_kl(s, t, 7, temperature=T), np_top_k_kl(s, t, 7, T))


def test_cross_entropy_matches_float64(logits):
    s, _ = logits
    y = np.random.default_rng(1).integers(0, s.shape[-1], size=s.shape[:-1])
    assert_close(losses.cross_entropy(s, y), np_ce(s, y))


def test_cross_entropy_clips_ignore_ids():
    z = jnp.zeros((2, 4))
    out = losses.cross_entropy(z, jnp.array([-100, 9]))
    assert np.all(np.isfinite(out))


def test_zero_weighted_term_is_left_out_of_the_objective():
    """alpha=1 (0=) leaves CE (KD) out instead of multiplying it by 0: same value and gradient when the dropped term
    is finite; a non-finite dropped term no longer poisons the objective."""
    kd, ce = jnp.asarray(2.0), jnp.asarray(3.0)
    assert float(losses.mix_kd_ce(kd, ce, 1.0)) == 2.0 and float(losses.mix_kd_ce(kd, ce, 0.0)) == 3.0
    assert float(losses.mix_kd_ce(kd, ce, 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 3)
    assert float(losses.mix_kd_ce(kd, jnp.asarray(jnp.nan), 1.0)) == 2.0
    g_new = jax.grad(lambda a, b: losses.mix_kd_ce(a * a, b * b, 1.0), argnums=(0, 1))(kd, ce)
    g_old = jax.grad(lambda a, b: 1.0 * a * a + 0.0 * b * b, argnums=(0, 1))(kd, ce)
    assert [float(g) for g in g_new] == [float(g) for g in g_old] == [4.0, 0.0]


def test_divergence_of_identical_distributions_is_zero(logits):
    _, t = logits
    for fn in (losses.forward_kl, losses.reverse_kl, losses.jsd):
        np.testing.assert_allclose(fn(t, t), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.top_k_forward_kl(t, t, t.shape[-1]), 0.0, atol=1e-6)


def test_divergences_are_nonnegative(logits):
    s, t = logits
    for fn in (losses.forward_kl, losses.reverse_kl, losses.jsd):
        assert np.all(np.asarray(fn(s, t)) >= -1e-6)
    assert np.all(np.asarray(losses.top_k_forward_kl(s, t, 3)) >= -1e-6)
    # JSD(β=0.5) is bounded by log 2.
    assert np.all(np.asarray(losses.jsd(s, t)) <= np.log(2) + 1e-6)


@pytest.mark.parametrize("fn", [losses.forward_kl, losses.reverse_kl, losses.jsd])
def test_temperature_scales_loss_by_t_squared(logits, fn):
    s, t = logits
    T = 3.0
    np.testing.assert_allclose(fn(s, t, temperature=T), T**2 * fn(s / T, t / T), rtol=1e-5)


def test_top_k_with_full_vocab_equals_forward_kl(logits):
    s, t = logits
    V = s.shape[-1]
    np.testing.assert_allclose(
        losses.top_k_forward_kl(s, t, V, temperature=2.0), losses.forward_kl(s, t, temperature=2.0), rtol=1e-5
    )


def test_losses_are_stable_for_huge_logits(logits):
    s, t = logits
    s, t = s * 1e4, t * 1e4
    for fn in (losses.forward_kl, losses.reverse_kl, losses.jsd):
        assert np.all(np.isfinite(fn(s, t)))
    assert np.all(np.isfinite(losses.top_k_forward_kl(s, t, 5)))


def test_kd_loss_dispatch_and_validation(logits):
    s, t = logits
    np.testing.assert_allclose(losses.kd_loss(s, t, kind="reverse_kl"), losses.reverse_kl(s, t))
    np.testing.assert_allclose(losses.kd_loss(s, t, top_k=4), losses.top_k_forward_kl(s, t, 4))
    with pytest.raises(ValueError, match="unknown KD loss kind"):
        losses.kd_loss(s, t, kind="kl")
    with pytest.raises(ValueError, match="top_k is only defined"):
        losses.kd_loss(s, t, kind="jsd", top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(s, t, beta=1.0)
    with pytest.raises(ValueError, match="top_k must be in"):
        losses.top_k_forward_kl(s, t, s.shape[-1] + 1)


# ----------------------------------------------------------------------------------------------
# Chunked fused loss ≡ naive
# ----------------------------------------------------------------------------------------------


def make_inputs(n, ds=16, dt=24, v=64, seed=0, zero_frac=0.2):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    weights = (rng.random(n) > zero_frac).astype(np.float32)
    return (
        f32(n, ds),
        f32(ds, v) * 0.5,
        f32(n, dt),
        f32(dt, v) * 0.5,
        jnp.asarray(rng.integers(0, v, size=n), jnp.int32),
        jnp.asarray(weights),
    )


@functools.partial(jax.jit, static_argnames=("fn", "options"))
def loss_and_student_grads(fn, options, *args):
    """(loss, aux), (d/d student_hidden, d/d student_head) for a loss function and frozen options."""
    kwargs = dict(options)
    (loss, aux), grads = jax.value_and_grad(lambda *a: fn(*a, **kwargs), argnums=(0, 1), has_aux=True)(*args)
    return loss, aux, grads


def compare_chunked_to_naive(args, tol=1e-5, **options):
    frozen = tuple(sorted(options.items()))
    loss_c, aux_c, grads_c = loss_and_student_grads(chunked_loss.chunked_logit_loss, frozen, *args)
    loss_n, aux_n, grads_n = loss_and_student_grads(chunked_loss.naive_logit_loss, frozen, *args)
    assert_close(loss_c, loss_n, tol)
    for key in ("kd", "ce", "num_tokens", "weight_sum"):
        assert_close(aux_c[key], aux_n[key], tol)
    for g_c, g_n in zip(grads_c, grads_n):
        assert g_c.shape == g_n.shape
        assert_close(g_c, g_n, tol)


@pytest.mark.parametrize("n", [1, 37, 97])
@pytest.mark.parametrize("kind", losses.KD_KINDS)
def test_chunked_matches_naive_each_kind(n, kind):
    compare_chunked_to_naive(make_inputs(n), kind=kind, chunk_size=16)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=0.5),
        dict(alpha=0.0),
        dict(alpha=0.3, kind="jsd", jsd_beta=0.1),
        dict(temperature=2.0, alpha=0.7),
        dict(top_k=5, temperature=1.5, alpha=0.5),
        dict(chunk_size=1000),  # single chunk bigger than N
        dict(chunk_size=1),
    ],
)
def test_chunked_matches_naive_options(options):
    options = {"chunk_size": 16, **options}
    compare_chunked_to_naive(make_inputs(45, seed=3), **options)


def test_chunked_matches_naive_with_equal_widths():
    compare_chunked_to_naive(make_inputs(40, ds=24, dt=24, seed=4), chunk_size=16)


def test_chunked_value_matches_float64_reference():
    sh, sw, th, tw, y, w = (np.asarray(x) for x in make_inputs(37, seed=5))
    s_logits, t_logits = sh.astype(np.float64) @ sw, th.astype(np.float64) @ tw
    alpha = 0.6
    per_token = alpha * np_forward_kl(s_logits, t_logits) + (1 - alpha) * np_ce(s_logits, y)
    expected = (w * per_token).sum() / max(w.sum(), 1.0)
    loss, aux = chunked_loss.chunked_logit_loss(sh, sw, th, tw, y, w, alpha=alpha, chunk_size=8)
    assert_close(loss, expected)
    assert float(aux["num_tokens"]) == float((w != 0).sum())


@pytest.mark.parametrize("fn", [chunked_loss.chunked_logit_loss, chunked_loss.naive_logit_loss])
def test_no_gradient_reaches_the_teacher(fn):
    args = make_inputs(30)

    def loss(*a):
        return fn(*a, chunk_size=8, alpha=0.5)[0]

    g_th, g_tw = jax.jit(jax.grad(loss, argnums=(2, 3)))(*args)
    assert not np.any(np.asarray(g_th)) and not np.any(np.asarray(g_tw))


def test_zero_weight_tokens_are_excluded_exactly():
    sh, sw, th, tw, y, w = make_inputs(24, zero_frac=0.0, seed=6)
    keep = np.arange(24) % 3 != 0
    # Garbage (large, finite) hidden states and out-of-range targets on the masked tokens.
    sh_g = jnp.where(keep[:, None], sh, 1e3)
    th_g = jnp.where(keep[:, None], th, -1e3)
    y_g = jnp.where(keep, y, -100)
    w_g = jnp.where(keep, w, 0.0)
    opts = dict(alpha=0.5, chunk_size=5)
    grad_fn = jax.jit(jax.value_and_grad(lambda *a: chunked_loss.chunked_logit_loss(*a, **opts)[0], argnums=(0, 1)))
    loss_full, (g_h, g_w) = grad_fn(sh_g, sw, th_g, tw, y_g, w_g)
    loss_sub, (g_h_sub, g_w_sub) = grad_fn(sh[keep], sw, th[keep], tw, y[keep], w[keep])
    assert np.isfinite(loss_full)
    np.testing.assert_allclose(loss_full, loss_sub, rtol=1e-6)
    np.testing.assert_allclose(g_w, g_w_sub, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(g_h)[~keep])  # masked tokens get exactly zero gradient
    np.testing.assert_allclose(np.asarray(g_h)[keep], g_h_sub, rtol=1e-5, atol=1e-7)


def test_weighted_mean_and_empty_mask():
    sh, sw, th, tw, y, _ = make_inputs(10)
    loss_fn = jax.jit(functools.partial(chunked_loss.chunked_logit_loss, chunk_size=4))
    loss, aux = loss_fn(sh, sw, th, tw, y, jnp.zeros(10))
    assert float(loss) == 0.0 and float(aux["num_tokens"]) == 0.0  # max(sum w, 1) avoids 0/0
    # Doubling every weight leaves the mean unchanged.
    w = jnp.ones(10)
    l1, _ = loss_fn(sh, sw, th, tw, y, w)
    l2, aux2 = loss_fn(sh, sw, th, tw, y, 2 * w)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert float(aux2["weight_sum"]) == 20.0


def test_leading_token_dims_are_flattened():
    sh, sw, th, tw, y, w = make_inputs(24)
    flat, _ = chunked_loss.chunked_logit_loss(sh, sw, th, tw, y, w, chunk_size=7)
    batched, _ = chunked_loss.chunked_logit_loss(
        sh.reshape(4, 6, -1), sw, th.reshape(4, 6, -1), tw, y.reshape(4, 6), w.reshape(4, 6), chunk_size=7
    )
    np.testing.assert_allclose(flat, batched, rtol=1e-6)


def test_bf16_inputs_and_compute_dtype():
    args = make_inputs(33)
    ref, _ = chunked_loss.naive_logit_loss(*args)
    bf16_args = tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in args[:4]) + args[4:]
    out, aux = jax.jit(functools.partial(chunked_loss.chunked_logit_loss, chunk_size=8))(*bf16_args)
    assert out.dtype == jnp.float32 and aux["kd"].dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=5e-2)
    out2, _ = jax.jit(
        functools.partial(chunked_loss.chunked_logit_loss, chunk_size=8, compute_dtype=jnp.bfloat16)
    )(*args)
    np.testing.assert_allclose(out2, out, rtol=1e-5)
    g = jax.jit(jax.grad(lambda *a: chunked_loss.chunked_logit_loss(*a, chunk_size=8)[0]))(*bf16_args)
    assert g.dtype == jnp.bfloat16


def test_fp32_master_head_gradient_is_summed_in_fp32():
    """With fp32 heads and bf16 compute, chunking must not add error over the naive bf16 version.

    (It would if the head were cast to bf16 outside the scan: the head gradient would then be a
    bf16 running sum over chunks, measured ~3x the naive error at 64 chunks.)
    """
    rng = np.random.default_rng(11)
    n, d, v = 2048, 32, 256
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    args = (f32(n, d), f32(d, v) * 0.2, f32(n, d), f32(d, v) * 0.2, jnp.asarray(rng.integers(0, v, n)), jnp.ones(n))

    def head_grad(fn, **options):
        # Inputs are jit arguments, not closed-over constants (XLA would constant-fold the loss).
        return jax.jit(jax.grad(lambda *a: fn(*a, **options)[0], argnums=1))(*args)

    exact = np.asarray(head_grad(chunked_loss.naive_logit_loss), np.float64)
    rel_err = lambda g: np.linalg.norm(np.asarray(g, np.float64) - exact) / np.linalg.norm(exact)  # noqa: E731
    naive_bf16 = rel_err(head_grad(chunked_loss.naive_logit_loss, compute_dtype=jnp.bfloat16))
    chunked_bf16 = rel_err(head_grad(chunked_loss.chunked_logit_loss, compute_dtype=jnp.bfloat16, chunk_size=32))
    assert chunked_bf16 < 1.5 * naive_bf16, (chunked_bf16, naive_bf16)


def test_chunked_loss_validation():
    sh, sw, th, tw, y, w = make_inputs(8)
    with pytest.raises(ValueError, match="teacher_head"):
        chunked_loss.chunked_logit_loss(sh, sw, th, sw, y, w)
    with pytest.raises(ValueError, match="vocab sizes differ"):
        chunked_loss.chunked_logit_loss(sh, sw, th, tw[:, :10], y, w)
    with pytest.raises(ValueError, match="weights token shape"):
        chunked_loss.chunked_logit_loss(sh, sw, th, tw, y, w[:4])
    with pytest.raises(ValueError, match="alpha"):
        chunked_loss.chunked_logit_loss(sh, sw, th, tw, y, w, alpha=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss.chunked_logit_loss(sh, sw, th, tw, y, w, chunk_size=0)


def _abstract_logit_loss_args(n: int, d: int, v: int) -> tuple:
    """Abstract fp32 (student hidden, student head, teacher hidden, teacher head, targets, weights) of
    ``chunked_logit_loss`` for n tokens, width d and vocabulary v: compiled, never allocated."""
    spec = jax.ShapeDtypeStruct
    return (spec((n, d), jnp.float32), spec((d, v), jnp.float32), spec((n, d), jnp.float32),
            spec((d, v), jnp.float32), spec((n,), jnp.int32), spec((n,), jnp.float32))


def test_chunked_loss_uses_several_times_less_memory():
    """The point of chunking: the compiled loss+grad's temporaries do not grow with the number of tokens (the naive
    version's grow by a whole [N, V] fp32 buffer per N tokens), and at 8192 tokens they are a fraction of it."""
    v, d = 32768, 256

    def temp_bytes(fn, n):
        args = _abstract_logit_loss_args(n, d, v)
        grad = jax.jit(jax.grad(lambda *a: fn(*a, chunk_size=512)[0], argnums=(0, 1)))
        stats = grad.lower(*args).compile().memory_analysis()
        return None if stats is None else stats.temp_size_in_bytes

    if temp_bytes(chunked_loss.naive_logit_loss, 64) is None:
        if jax.default_backend() == "cpu":
            pytest.fail("memory_analysis() is expected to work on CPU")
        pytest.skip(f"memory_analysis() unavailable on {jax.default_backend()}")
    naive = {n: temp_bytes(chunked_loss.naive_logit_loss, n) for n in (4096, 8192)}
    chunked = {n: temp_bytes(chunked_loss.chunked_logit_loss, n) for n in (4096, 8192)}
    logits_bytes = 4096 * v * 4  # one fp32 [4096, V] buffer
    assert naive[4096] >= logits_bytes  # sanity: the naive version really holds full logits
    assert naive[8192] - naive[4096] >= logits_bytes
    assert chunked[8192] - chunked[4096] < 0.05 * logits_bytes
    assert chunked[8192] * 4 < naive[8192], (chunked, naive)


def test_pure_kd_loss_runs_no_cross_entropy_backward(monkeypatch):
    """At alpha=1 the chunked loss's gradient does not differentiate CE (it is only logged): the compiled gradient
    has fewer FLOPs and no more temporaries than the same loss mixed as 1·KD + 0·CE, whose CE backward XLA keeps."""
    chunk = 512
    args = _abstract_logit_loss_args(512, 64, 8192)

    def compiled():
        grad = jax.jit(jax.grad(lambda *a: chunked_loss.chunked_logit_loss(*a, chunk_size=chunk)[0], argnums=(0, 1)))
        c = grad.lower(*args).compile()
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return c.memory_analysis().temp_size_in_bytes, cost["flops"], c.as_text()

    temp, flops, text = compiled()
    monkeypatch.setattr(chunked_loss, "mix_kd_ce", lambda kd, ce, alpha: alpha * kd + (1.0 - alpha) * ce)
    temp_mixed, flops_mixed, text_mixed = compiled()
    assert temp <= temp_mixed and flops < flops_mixed, (temp, temp_mixed, flops, flops_mixed)
    # CE's backward is the scatter of -1 at each target into a [chunk, V] gradient
    assert "scatter" in text_mixed and "scatter" not in text


# ----------------------------------------------------------------------------------------------
# Hidden-state distillation
# ----------------------------------------------------------------------------------------------


def np_cos(a, b):
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_float64(kind):
    rng = np.random.default_rng(7)
    s = rng.normal(size=(2, 9, 12)).astype(np.float32)  # [layers, N, Ds]
    t = rng.normal(size=(2, 9, 20)).astype(np.float32)  # [layers, N, Dt]
    proj = (rng.normal(size=(12, 20)) * 0.3).astype(np.float32)
    w = (rng.random(9) > 0.3).astype(np.float32)  # [N], broadcast over layers
    sp = s.astype(np.float64) @ proj
    per = ((sp - t) ** 2).mean(-1) if kind == "mse" else 1 - np_cos(sp, t.astype(np.float64))
    wb = np.broadcast_to(w, per.shape)
    expected = (wb * per).sum() / max(wb.sum(), 1)
    out = losses.hidden_state_loss(s, t, proj, kind=kind, weights=w)
    assert_close(out, expected)


def test_hidden_state_loss_identity_and_errors():
    rng = np.random.default_rng(8)
    s = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    np.testing.assert_allclose(losses.hidden_state_loss(s, s), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.hidden_state_loss(s, 2 * s, kind="cosine"), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="pass a projection"):
        losses.hidden_state_loss(s, jnp.zeros((6, 10)))
    with pytest.raises(ValueError, match="projection must be"):
        losses.hidden_state_loss(s, jnp.zeros((6, 10)), jnp.zeros((10, 8)))
    with pytest.raises(ValueError, match="unknown hidden-state loss"):
        losses.hidden_state_loss(s, s, kind="l1")


def test_hidden_state_loss_gradients():
    rng = np.random.default_rng(9)
    s = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    proj = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    w = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0])
    for kind in ("mse", "cosine"):
        loss = functools.partial(losses.hidden_state_loss, kind=kind, weights=w)
        g_s, g_t, g_p = jax.jit(jax.grad(loss, (0, 1, 2)))(s, t, proj)
        assert not np.any(np.asarray(g_t))  # teacher is a constant
        assert not np.any(np.asarray(g_s)[w == 0])  # masked tokens get no gradient
        assert np.any(np.asarray(g_p)) and np.all(np.isfinite(g_s))
    # Zero vectors (padding) keep cosine gradients finite.
    g = jax.grad(lambda a: losses.hidden_state_loss(a, a + 1, kind="cosine"))(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------------------------
# fused_head_loss: the hand-written backward ≡ jax.grad of the materialized loss
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("fn", "options"))
def objective_and_all_grads(fn, options, *args):
    """Loss and jax.grad w.r.t. every float input (teacher ones must come out exactly 0)."""
    kwargs = dict(options)
    return jax.value_and_grad(lambda *a: fn(*a, **kwargs)[0], argnums=(0, 1, 2, 3))(*args)


@pytest.mark.parametrize(
    "options",
    [
        dict(kind="forward_kl"),
        dict(kind="reverse_kl", temperature=0.7),
        dict(kind="jsd", jsd_beta=0.3, alpha=0.6),
        dict(kind="forward_kl", top_k=4, temperature=2.0, alpha=0.25),
        dict(kind="reverse_kl", temperature=3.0, alpha=0.0),
    ],
)
def test_fused_gradients_equal_grad_of_naive_loss(options):
    # 53 tokens, ~30% masked, in chunks of 12: five chunks, the last one ragged (padded with weight-0 rows).
    args = make_inputs(53, seed=21, zero_frac=0.3)
    frozen = tuple(sorted({**options, "chunk_size": 12}.items()))
    loss_f, grads_f = objective_and_all_grads(chunked_loss.chunked_logit_loss, frozen, *args)
    loss_n, grads_n = objective_and_all_grads(chunked_loss.naive_logit_loss, frozen, *args)
    assert_close(loss_f, loss_n, 1e-5)
    for g_f, g_n in zip(grads_f[:2], grads_n[:2]):
        assert_close(g_f, g_n, 1e-5)
    assert not np.any(np.asarray(grads_f[0])[np.asarray(args[5]) == 0])  # masked tokens: exactly 0
    assert not np.any(np.asarray(grads_f[2])) and not np.any(np.asarray(grads_f[3]))  # the teacher is constant


def test_fused_head_loss_with_cached_sparse_teacher():
    """A per-token function of per-token inputs only (what a KD from cached teacher top-k needs): value and
    gradients equal jax.grad of the same loss written on materialized logits; aux is summed, not differentiated."""
    rng = np.random.default_rng(22)
    n, d, v, k = 29, 8, 40, 3
    hidden = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) * 0.5, jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, size=(n, k)), jnp.int32)
    t_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(n, k)), jnp.float32))
    weights = jnp.asarray(rng.random(n) > 0.25, jnp.float32) * 1.5

    def per_token(z, ids, t_logp):
        log_ps = jax.nn.log_softmax(z)
        kl = jnp.sum(jnp.exp(t_logp) * (t_logp - jnp.take_along_axis(log_ps, ids, axis=-1)), axis=-1)
        return kl, {"max_logit": jnp.max(z, axis=-1)}

    def fused(hidden, head):
        return chunked_loss.fused_head_loss(hidden, head, per_token, (ids, t_logp), weights=weights, chunk_size=7)

    def naive(hidden, head):
        kl, aux = per_token(hidden @ head, ids, t_logp)
        return losses.weighted_sum(kl, weights), losses.weighted_sum(aux["max_logit"], weights)

    (loss_f, aux_f), grads_f = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, head)
    (loss_n, max_n), grads_n = jax.jit(jax.value_and_grad(naive, argnums=(0, 1), has_aux=True))(hidden, head)
    assert_close(loss_f, loss_n, 1e-5)
    assert_close(aux_f["max_logit"], max_n, 1e-5)
    for g_f, g_n in zip(grads_f, grads_n):
        assert_close(g_f, g_n, 1e-5)
    # Scaling the objective scales the gradient (the backward multiplies by the cotangent), and aux gets none.
    g2 = jax.jit(jax.grad(lambda h, w: 3.0 * fused(h, w)[0] + fused(h, w)[1]["max_logit"], argnums=(0, 1)))(
        hidden, head)
    for a, b in zip(g2, grads_f):
        assert_close(a, 3.0 * b, 1e-5)
    # Leading token dims are flattened like the other chunked losses.
    batched = chunked_loss.fused_head_loss(hidden[:28].reshape(4, 7, d), head, per_token,
                                           (ids[:28].reshape(4, 7, k), t_logp[:28].reshape(4, 7, k)),
                                           weights=weights[:28].reshape(4, 7), chunk_size=5)[0]
    flat = chunked_loss.fused_head_loss(hidden[:28], head, per_token, (ids[:28], t_logp[:28]),
                                        weights=weights[:28], chunk_size=5)[0]
    assert_close(batched, flat, 1e-6)
    with pytest.raises(ValueError, match="chunk_xs\\[1\\] token shape"):
        chunked_loss.fused_head_loss(hidden, head, per_token, (ids, t_logp[:5]), weights=weights)


def _count_dots(jaxpr) -> int:
    """dot_general equations a jaxpr runs, sub-jaxprs (scan bodies, custom_vjp rules) included; of a cond's branches
    (``platform_dependent``'s per-platform variants) only one runs, so the largest count."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        subs = [_count_dots(sub) for sub in jex_core.jaxprs_in_params(eqn.params)]
        count += (max(subs) if eqn.primitive.name == "cond" else sum(subs)) if subs else 0
    return count


def test_fused_kd_gradient_does_not_recompute_logits():
    """The point of the fused loss: a KD value_and_grad does 4 head-sized matmuls (student and teacher logits,
    dHidden, dHead), not 6 (a rematerialized chunk recomputes both models' logits in its backward)."""
    args = make_inputs(40)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(
        lambda *a: chunked_loss.chunked_logit_loss(*a, chunk_size=16)[0], argnums=(0, 1)))(*args)
    assert _count_dots(jaxpr.jaxpr) == 4
