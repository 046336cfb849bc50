"""Tests for minitron_jax.train.optim: schedule values, decay mask, clipping, accumulation, validation."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minitron_jax.train.optim import (
    OptimConfig,
    default_weight_decay_mask,
    learning_rate_at,
    make_optimizer,
    make_schedule,
)

L, D, K, G, HD, F, V = 2, 8, 2, 2, 4, 12, 16


def llama_like_params(seed: int = 0) -> dict:
    """A tiny params tree with the layout of DESIGN.md (per-layer params stacked on axis 0)."""
    rng = np.random.default_rng(seed)  # numpy, not jax.random: no per-shape compiles in tests
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "embed": normal(V, D),
        "layers": {
            "attn_norm": 1.0 + normal(L, D),
            "mlp_norm": 1.0 + normal(L, D),
            "q": normal(L, D, K, G, HD),
            "k": normal(L, D, K, HD),
            "v": normal(L, D, K, HD),
            "o": normal(L, K, G, HD, D),
            "gate": normal(L, D, F),
            "up": normal(L, D, F),
            "down": normal(L, F, D),
        },
        "final_norm": 1.0 + normal(D),
        "lm_head": normal(D, V),
    }


def small_params(seed: int = 0) -> dict:
    """Three leaves (a matrix, a stacked norm, a stacked matrix): cheap to compile, still masked."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {"w": normal(4, 6), "layers": {"norm": 1.0 + normal(2, 6), "up": normal(2, 6, 3)}}


def random_like(tree, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), tree)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------


def test_schedule_key_points():
    peak, low, warmup, total = 1e-4, 1e-5, 40, 1040
    sched = make_schedule(peak, low, warmup, total)
    np.testing.assert_allclose(sched(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(sched(warmup // 2), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(sched(warmup), peak, rtol=1e-6)
    mid = warmup + (total - warmup) // 2
    np.testing.assert_allclose(sched(mid), (peak + low) / 2, rtol=1e-5)  # cos(π/2) = 0
    quarter = warmup + (total - warmup) // 4
    expected = low + (peak - low) * 0.5 * (1 + math.cos(math.pi / 4))
    np.testing.assert_allclose(sched(quarter), expected, rtol=1e-5)
    np.testing.assert_allclose(sched(total), low, rtol=1e-5)
    np.testing.assert_allclose(sched(total + 500), low, rtol=1e-5)  # flat after the end


def test_schedule_is_monotone_in_each_phase():
    sched = make_schedule(1e-4, 1e-5, 40, 400)
    lrs = np.array([float(sched(s)) for s in range(0, 401)])
    assert np.all(np.diff(lrs[:41]) > 0)
    assert np.all(np.diff(lrs[40:]) <= 1e-12)


def test_schedule_without_warmup_starts_at_peak():
    np.testing.assert_allclose(make_schedule(3e-4, 0.0, 0, 100)(0), 3e-4, rtol=1e-6)


def test_learning_rate_at_matches_schedule():
    cfg = OptimConfig(total_steps=200)
    sched = make_schedule(cfg.peak_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
    for step in (0, 1, 39, 40, 41, 120, 200, 1000):
        assert learning_rate_at(cfg, step) == pytest.approx(float(sched(step)), rel=1e-7, abs=1e-15)
    assert isinstance(learning_rate_at(cfg, 10), float)


def test_config_defaults_are_the_paper_recipe():
    cfg = OptimConfig(total_steps=1000)
    assert (cfg.peak_lr, cfg.min_lr, cfg.warmup_steps) == (1e-4, 1e-5, 40)
    assert (cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps, cfg.grad_clip, cfg.accumulate_steps) == (
        0.1, 0.9, 0.95, 1e-8, 1.0, 1,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.peak_lr = 1.0  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Weight decay mask
# ----------------------------------------------------------------------------------------------


def test_default_mask_decays_matrices_only():
    mask = default_weight_decay_mask(llama_like_params())
    assert mask["embed"] and mask["lm_head"]
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        assert mask["layers"][name], name
    # Stacked norms are [L, D] (2-D) but still must not be decayed.
    assert not mask["layers"]["attn_norm"] and not mask["layers"]["mlp_norm"]
    assert not mask["final_norm"]


def test_default_mask_on_a_plain_tree():
    tree = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}, "scale": jnp.ones((4,))}
    mask = default_weight_decay_mask(tree)
    assert mask == {"dense": {"kernel": True, "bias": False}, "scale": False}


def test_weight_decay_applies_only_where_masked():
    # Zero gradients isolate the decay term: AdamW's update is then -lr * wd * p exactly.
    cfg = OptimConfig(total_steps=10, warmup_steps=0, peak_lr=1e-2, min_lr=1e-3, weight_decay=0.5)
    params = llama_like_params()
    opt = make_optimizer(cfg)
    updates, _ = jax.jit(opt.update)(jax.tree_util.tree_map(jnp.zeros_like, params), opt.init(params), params)
    mask = default_weight_decay_mask(params)
    expected = jax.tree_util.tree_map(lambda p, m: -1e-2 * 0.5 * p if m else jnp.zeros_like(p), params, mask)
    assert_trees_close(updates, expected)


def test_custom_mask_is_respected():
    cfg = OptimConfig(total_steps=10, warmup_steps=0, peak_lr=1e-2, weight_decay=0.5, min_lr=0.0)
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    opt = make_optimizer(cfg, weight_decay_mask={"a": False, "b": True})
    updates, _ = opt.update(jax.tree_util.tree_map(jnp.zeros_like, params), opt.init(params), params)
    assert not np.any(np.asarray(updates["a"])) and np.all(np.asarray(updates["b"]) < 0)


# ----------------------------------------------------------------------------------------------
# Clipping and accumulation
# ----------------------------------------------------------------------------------------------


def test_global_norm_clipping_comes_first():
    base = dict(total_steps=10, warmup_steps=0, peak_lr=1e-2, min_lr=1e-3, weight_decay=0.1)
    params = small_params()
    grads = random_like(params, seed=1, scale=10.0)
    clipped = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
    assert float(optax.global_norm(grads)) > 1.0

    def one_update(cfg, g):
        opt = make_optimizer(cfg)

        @jax.jit
        def two_updates(g, params):
            # Two steps so Adam's moments (not just the sign of the first step) depend on clipping.
            u1, state = opt.update(g, opt.init(params), params)
            u2, _ = opt.update(g, state, optax.apply_updates(params, u1))
            return u2

        return two_updates(g, params)

    with_clip = one_update(OptimConfig(**base, grad_clip=1.0), grads)
    manual = one_update(OptimConfig(**base, grad_clip=None), clipped)
    assert_trees_close(with_clip, manual)


def test_accumulation_equals_one_step_on_mean_gradient():
    k = 3
    base = dict(total_steps=20, warmup_steps=2, peak_lr=1e-2, min_lr=1e-3, grad_clip=0.5)
    accum = make_optimizer(OptimConfig(**base, accumulate_steps=k))
    plain = make_optimizer(OptimConfig(**base))
    accum_update, plain_update = jax.jit(accum.update), jax.jit(plain.update)
    params = small_params()
    p_acc, s_acc = params, accum.init(params)
    p_ref, s_ref = params, plain.init(params)
    for macro in range(3):  # several macro steps: the schedule and Adam state must advance once each
        micro = [random_like(params, seed=10 * macro + i) for i in range(k)]
        for i, g in enumerate(micro):
            u, s_acc = accum_update(g, s_acc, p_acc)
            if i < k - 1:
                assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(u))
            p_acc = optax.apply_updates(p_acc, u)
        mean_grad = jax.tree_util.tree_map(lambda *gs: sum(gs) / k, *micro)
        u, s_ref = plain_update(mean_grad, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        assert_trees_close(p_acc, p_ref, rtol=1e-5, atol=1e-6)


def test_optimizer_is_jittable():
    opt = make_optimizer(OptimConfig(total_steps=10, warmup_steps=2, accumulate_steps=2))
    params = small_params()

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = step(params, opt.init(params), random_like(params, seed=3))
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(params)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(peak_lr=-1e-4), "peak_lr"),
        (dict(peak_lr=0.0), "peak_lr"),
        (dict(min_lr=-1e-6), "min_lr must be >= 0"),
        (dict(min_lr=1e-3), "must be <= peak_lr"),
        (dict(warmup_steps=100), "must be < total_steps"),
        (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
        (dict(total_steps=0), "total_steps must be >= 1"),
        (dict(total_steps=10.5), "total_steps must be an int"),
        (dict(accumulate_steps=0), "accumulate_steps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(b1=1.0), "b1"),
        (dict(b2=-0.1), "b2"),
        (dict(eps=0.0), "eps"),
        (dict(grad_clip=0.0), "grad_clip"),
    ],
)
def test_bad_configs_are_rejected(overrides, message):
    kwargs = dict(total_steps=100, **{k: v for k, v in overrides.items() if k != "total_steps"})
    if "total_steps" in overrides:
        kwargs["total_steps"] = overrides["total_steps"]
        kwargs.setdefault("warmup_steps", 0)
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)
