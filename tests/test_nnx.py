"""The Flax NNX face (``LlamaNNX``): its state is exactly our params tree, its call is exactly ``model.forward`` (for a
full and a pruned config), it round-trips params, and it trains with ``nnx.value_and_grad`` + ``nnx.Optimizer`` under
``nnx.jit`` with the same gradients as the functional model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minitron_jax import model as M
from minitron_jax.compress import prune
from minitron_jax.config import LlamaConfig
from minitron_jax.nnx_model import LlamaNNX

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
            head_dim=8)
CONFIGS = {
    "untied": LlamaConfig(**BASE),
    "tied_biased": LlamaConfig(**BASE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def _params(config, seed=0):
    return M.init_params(config, jax.random.key(seed), std=0.2)


def _tokens(config, B=2, T=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (B, T)), jnp.int32)


def _pruned():
    """Width (hidden, FFN, heads) and depth pruning of the untied model, through the library's own slicing."""
    config, params = CONFIGS["untied"], _params(CONFIGS["untied"])
    rng = np.random.default_rng(3)
    c, p = prune.prune_hidden(config, params, np.sort(rng.permutation(32)[:24]))
    c, p = prune.prune_ffn(c, p, np.sort(rng.permutation(48)[:20]))
    c, p = prune.prune_heads(c, p, np.asarray([[0], [1]]))
    c, p = prune.drop_layers(c, p, [1])
    assert (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers) == (24, 20, 2, 2)
    return c, p


def _loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_the_functional_model(name):
    config = CONFIGS[name]
    params = _params(config)
    module = LlamaNNX.from_params(config, params)
    tokens = _tokens(config)
    segment_ids = jnp.asarray(np.repeat([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0]], 2, axis=0), jnp.int32)
    positions = M.default_positions(tokens, segment_ids)
    np.testing.assert_array_equal(module(tokens), M.forward(config, params, tokens))
    np.testing.assert_array_equal(module(tokens, positions, segment_ids),
                                  M.forward(config, params, tokens, positions=positions, segment_ids=segment_ids))
    # Under jit too: nnx.jit of the module ≡ jax.jit of the function.
    nnx_logits = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(module, tokens, segment_ids)
    ref = jax.jit(lambda p, t, s: M.forward(config, p, t, segment_ids=s))(params, tokens, segment_ids)
    np.testing.assert_array_equal(nnx_logits, ref)


def test_pruned_student_drops_in():
    config, params = _pruned()
    module = LlamaNNX.from_params(config, params)
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    assert jax.tree.map(np.shape, state) == jax.tree.map(np.shape, params)
    assert jax.tree.map(np.shape, state) == M.param_shapes(config)
    tokens = _tokens(config, seed=1)
    np.testing.assert_array_equal(module(tokens), M.forward(config, params, tokens))
    with pytest.raises(ValueError, match="do not match config"):  # sliced params need the pruned config
        LlamaNNX.from_params(CONFIGS["untied"], params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_is_the_params_tree(name):
    config = CONFIGS[name]
    params = _params(config)
    module = LlamaNNX.from_params(config, params)
    param_state = nnx.state(module, nnx.Param)
    assert nnx.state(module) == param_state  # nothing but the params in the module's state
    pure = nnx.to_pure_dict(param_state)
    _assert_trees_equal(pure, params)
    assert set(pure) == set(M.param_axes(config))  # lm_head only when untied
    # The very arrays, each an nnx.Param carrying its logical axes.
    flat_state = dict(jax.tree.flatten_with_path(param_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0])
    flat_params = dict(jax.tree.flatten_with_path(params)[0])
    flat_axes = dict(jax.tree.flatten_with_path(M.param_axes(config), is_leaf=lambda x: isinstance(x, tuple))[0])
    assert set(flat_state) == set(flat_params) == set(flat_axes)
    for path, variable in flat_state.items():
        assert isinstance(variable, nnx.Param)
        assert variable[...] is flat_params[path]
        assert variable.get_metadata()["axes"] == flat_axes[path]


def test_round_trip_and_random_init():
    config = CONFIGS["tied_biased"]
    params = _params(config)
    back = LlamaNNX.from_params(config, params).to_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))

    module = LlamaNNX(config, rngs=nnx.Rngs(params=0), param_dtype=jnp.bfloat16)
    fresh = module.to_params()
    M.check_params(config, fresh)
    assert {x.dtype for x in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.bfloat16)}
    _assert_trees_equal(LlamaNNX.from_params(config, fresh).to_params(), fresh)
    # split / merge (what nnx transforms do) keeps the same tree.
    graphdef, state = nnx.split(module)
    _assert_trees_equal(nnx.merge(graphdef, state).to_params(), fresh)
    with pytest.raises(ValueError, match="rngs"):
        LlamaNNX(config)
    with pytest.raises(ValueError, match="attention"):
        LlamaNNX.from_params(config, params, attention="nope")


@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_train_step_with_nnx_optimizer(pruned):
    config, params = _pruned() if pruned else (CONFIGS["untied"], _params(CONFIGS["untied"]))
    tokens = _tokens(config, B=4, T=16, seed=2)
    module = LlamaNNX.from_params(config, params)

    optimizer = nnx.Optimizer(module, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(module, optimizer, tokens):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(tokens), tokens))(module)
        optimizer.update(module, grads)
        return loss, grads

    # The module's gradients ≡ the function's (same tree, same values).
    loss, grads = step(module, optimizer, tokens)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p, t: _loss(M.forward(config, p, t), t)))(params, tokens)
    assert loss == ref_loss
    _assert_trees_equal(nnx.to_pure_dict(grads), ref_grads)

    losses = [float(loss)] + [float(step(module, optimizer, tokens)[0]) for _ in range(4)]
    assert losses[-1] < losses[0]
    after = module.to_params()
    M.check_params(config, after)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after, params)
    assert all(jax.tree.leaves(changed)), changed
    # The trained tree goes straight back into the functional model.
    np.testing.assert_array_equal(M.forward(config, after, tokens), module(tokens))
