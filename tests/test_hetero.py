"""The heterogeneous model (``minitron_jax.hetero``): uniform blocks ≡ model.py exactly, removed and replaced
blocks against hand computations, KV-head merging and the variant initialisation from a parent layer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import hetero as X
from minitron_jax import model as M
from minitron_jax.blocks import BlockSpec, uniform_blocks
from minitron_jax.config import LlamaConfig

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=8, num_kv_heads=4,
                   head_dim=8, rope_theta=10000.0)
VARIANTS = {"plain": {}, "tied_biases": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)}


def _model(seed=0, **overrides):
    config = BASE.replace(**overrides)
    params = M.init_params(config, jax.random.key(seed), std=0.2)
    if config.attention_bias:  # biases init to zero: give them values so that a dropped one would show
        params = {**params, "layers": {k: (v + 0.1 * jax.random.normal(jax.random.key(9), v.shape)
                                           if k.endswith("bias") else v) for k, v in params["layers"].items()}}
    return config, params


def _tokens(shape=(2, 16), seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, BASE.vocab_size, shape))


def _layer(params, i):
    return jax.tree.map(lambda x: x[i], params["layers"])


def _blocks(*texts):
    return tuple(BlockSpec.parse(t) for t in texts)


def _norm(x, w, eps=BASE.rms_norm_eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_uniform_blocks_equal_the_uniform_model_exactly(variant):
    config, params = _model(**VARIANTS[variant])
    hcfg, hparams = X.from_uniform(config, params)
    assert len(hcfg.segments()) == 1 and hparams["segments"][0] is params["layers"]
    X.check_params(hcfg, hparams)
    assert X.count_params(hcfg) == M.count_params(config)
    tokens = _tokens()
    np.testing.assert_array_equal(np.asarray(X.forward(hcfg, hparams, tokens)),
                                  np.asarray(M.forward(config, params, tokens)))

    # Under jit, on packed rows (segment ids), with remat: logits and every gradient equal.
    seg = jnp.asarray(np.repeat([[1, 2, 3, 3], [1, 1, 2, 2]], 4, axis=1))
    w = jax.random.normal(jax.random.key(3), (2, 16, config.vocab_size))

    def loss_and_logits(fwd):
        def f(p):
            logits = fwd(p, tokens, segment_ids=seg, remat="full")
            return jnp.sum(w * logits), logits
        return jax.jit(jax.grad(f, has_aux=True))

    gx, lx = loss_and_logits(lambda *a, **k: X.forward(hcfg, *a, **k))(hparams)
    gm, lm = loss_and_logits(lambda *a, **k: M.forward(config, *a, **k))(params)
    np.testing.assert_array_equal(np.asarray(lx), np.asarray(lm))
    back_config, gx_uniform = X.to_uniform(hcfg, gx)
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, gx_uniform, gm)


def test_none_block_equals_the_model_without_that_layer():
    config, params = _model()
    drop = 1
    layers = [_layer(params, i) for i in range(config.num_layers)]
    blocks = list(uniform_blocks(config))
    blocks[drop], layers[drop] = BlockSpec.parse("none/none"), {}
    hcfg = X.HeteroConfig(config, tuple(blocks))
    hparams = {**{k: v for k, v in params.items() if k != "layers"}, "segments": X.stack_layers(layers, blocks)}
    X.check_params(hcfg, hparams)

    shallow = config.replace(num_layers=config.num_layers - 1)
    shallow_params = {**params, "layers": jax.tree.map(lambda x: jnp.delete(x, drop, axis=0), params["layers"])}
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(X.forward(hcfg, hparams, tokens)),
                               np.asarray(M.forward(shallow, shallow_params, tokens)), atol=1e-6, rtol=0)


# Every kind of sub-block once, in five segments (linear/none and none/mlp run in the tests further down).
MIXED = _blocks("gqa4/mlp48", "gqa4/mlp48", "gqa1/none", "none/none", "linear/mlp16", "none/linear")


def test_mixed_segments_run_one_scan_each_and_count_their_params():
    hcfg = X.HeteroConfig(BASE, MIXED)
    assert hcfg.num_layers == 6 and len(hcfg.segments()) == 5
    assert "gqa4/mlp48 x2" in hcfg.describe() and "none/none" in hcfg.describe()
    params = X.init_params(hcfg, jax.random.key(0), std=0.2)
    X.check_params(hcfg, params)
    leaves = jax.tree.leaves(params)
    assert X.count_params(hcfg) == sum(x.size for x in leaves)
    # Axes and shapes describe the same tree, rank for rank; a removed sub-block has no params at all.
    axes = X.param_axes(hcfg)
    jax.tree.map(lambda a, x: len(a) == x.ndim or pytest.fail(f"{a} vs {x.shape}"), axes, params,
                 is_leaf=lambda a: isinstance(a, tuple))
    assert params["segments"][2] == {} and set(params["segments"][4]) == {"mlp_norm", "ffn_linear"}
    assert set(params["segments"][3]) == {"attn_norm", "attn_linear", "mlp_norm", "gate", "up", "down"}
    assert params["segments"][1]["k"].shape == (1, 32, 1, 8) and params["segments"][1]["q"].shape == (1, 32, 1, 8, 8)
    assert params["segments"][0]["gate"].shape == (2, 32, 48) and params["segments"][3]["down"].shape == (1, 16, 32)

    tokens = _tokens()

    def loss(p):
        logits = X.forward(hcfg, p, tokens)
        return jnp.mean(logits ** 2), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert logits.shape == (2, 16, BASE.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["segments"]))

    # One scan per segment with params (the none/none segment runs nothing).
    jaxpr = jax.make_jaxpr(lambda p: X.forward(hcfg, p, tokens))(params)
    scans = sum(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)
    assert scans == len(hcfg.segments()) - 1


def test_attention_and_ffn_halves_are_the_decoder_layer_halves():
    """gqa/none followed by none/mlp is the same function as one gqa/mlp layer with those weights."""
    config, params = _model(**VARIANTS["tied_biases"])
    one = _layer(params, 0)
    att = {k: v for k, v in one.items() if k in X.block_axes(BlockSpec.parse("gqa4/none"), attention_bias=True)}
    ffn = {k: v for k, v in one.items() if k in X.block_axes(BlockSpec.parse("none/mlp48"), mlp_bias=True)}
    blocks = _blocks("gqa4/none", "none/mlp48")
    hcfg = X.HeteroConfig(config, blocks)
    hparams = {**{k: v for k, v in params.items() if k != "layers"}, "segments": X.stack_layers([att, ffn], blocks)}
    one_layer = config.replace(num_layers=1)
    ref = M.forward(one_layer, {**params, "layers": jax.tree.map(lambda x: x[:1], params["layers"])}, _tokens())
    np.testing.assert_allclose(np.asarray(X.forward(hcfg, hparams, _tokens())), np.asarray(ref), atol=1e-6, rtol=0)


def test_merged_kv_heads_are_means_and_queries_keep_their_order():
    config, params = _model()
    D, K, G, Hd = config.hidden_size, config.num_kv_heads, config.q_per_kv, config.head_dim
    rng = np.random.default_rng(0)
    for i in range(2):  # two layers with hand-made k/v
        parent = {**_layer(params, i), "k": jnp.asarray(rng.normal(size=(D, K, Hd)), jnp.float32),
                  "v": jnp.asarray(rng.normal(size=(D, K, Hd)), jnp.float32)}
        for kv in (2, 1):
            r = K // kv
            merged = X.init_block(config, parent, BlockSpec.parse(f"gqa{kv}/mlp48"))
            k, v = np.asarray(parent["k"]), np.asarray(parent["v"])
            for j in range(kv):
                np.testing.assert_allclose(np.asarray(merged["k"][:, j]), k[:, j * r:(j + 1) * r].mean(axis=1),
                                           rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(np.asarray(merged["v"][:, j]), v[:, j * r:(j + 1) * r].mean(axis=1),
                                           rtol=1e-6, atol=1e-7)
            # Query head g of parent group k sits in merged group k // r at (k % r) * G + g.
            for kk in range(K):
                for g in range(G):
                    np.testing.assert_array_equal(np.asarray(merged["q"][:, kk // r, (kk % r) * G + g]),
                                                  np.asarray(parent["q"][:, kk, g]))
                    np.testing.assert_array_equal(np.asarray(merged["o"][kk // r, (kk % r) * G + g]),
                                                  np.asarray(parent["o"][kk, g]))

    # Merging groups whose KV heads are already equal changes nothing: this checks the query regrouping through
    # the attention itself, not only the shapes.
    parent = _layer(params, 0)
    dup = {**parent, "k": jnp.repeat(parent["k"][:, ::2], 2, axis=1), "v": jnp.repeat(parent["v"][:, ::2], 2, axis=1)}
    h = jax.random.normal(jax.random.key(5), (2, 16, D))
    pos = M.default_positions(_tokens())
    cos, sin = M.rope_cos_sin(config, pos)
    mask = M.attention_mask(pos, pos, None, None)
    run = lambda spec, p: X.apply_block(config, BlockSpec.parse(spec), p, h, cos, sin, mask,  # noqa: E731
                                        dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(run("gqa2/mlp48", X.init_block(config, dup, BlockSpec.parse("gqa2/mlp48")))),
                               np.asarray(run("gqa4/mlp48", dup)), atol=1e-5, rtol=0)
    # K' = K is the parent exactly.
    same = X.init_block(config, parent, BlockSpec.parse("gqa4/mlp48"))
    np.testing.assert_array_equal(np.asarray(run("gqa4/mlp48", same)), np.asarray(run("gqa4/mlp48", parent)))

    with pytest.raises(ValueError, match="cannot be merged"):
        X.merge_kv_heads(parent, 3)
    with pytest.raises(ValueError, match="cannot be merged"):
        X.merge_kv_heads(parent, 8)


def test_init_block_of_the_parent_shape_is_the_parent_and_ffn_keep_slices_channels():
    config, params = _model(**VARIANTS["tied_biases"])
    parent = _layer(params, 2)
    h = jax.random.normal(jax.random.key(6), (2, 16, config.hidden_size))
    pos = M.default_positions(_tokens())
    cos, sin = M.rope_cos_sin(config, pos)
    mask = M.attention_mask(pos, pos, None, None)

    def run(spec, p):
        return np.asarray(X.apply_block(config, BlockSpec.parse(spec), p, h, cos, sin, mask, dtype=jnp.float32))

    ref = run("gqa4/mlp48", parent)
    np.testing.assert_array_equal(run("gqa4/mlp48", X.init_block(config, parent, BlockSpec.parse("gqa4/mlp48"))), ref)
    # Every channel kept in another order: the same function (only the sum's order changes).
    perm = np.random.default_rng(0).permutation(48)
    np.testing.assert_allclose(run("gqa4/mlp48", X.init_block(config, parent, BlockSpec.parse("gqa4/mlp48"),
                                                              ffn_keep=perm)), ref, atol=1e-5, rtol=0)
    # Keeping 20 channels ≡ the parent with the other 28 zeroed in down (and their biases' path cut).
    keep = np.sort(np.random.default_rng(1).choice(48, 20, replace=False))
    zeroed = {**parent, "down": parent["down"] * jnp.zeros(48).at[keep].set(1.0)[:, None]}
    np.testing.assert_allclose(run("gqa4/mlp20", X.init_block(config, parent, BlockSpec.parse("gqa4/mlp20"),
                                                              ffn_keep=keep)),
                               run("gqa4/mlp48", zeroed), atol=1e-5, rtol=0)
    default = X.init_block(config, parent, BlockSpec.parse("gqa4/mlp20"))
    np.testing.assert_array_equal(np.asarray(default["gate"]), np.asarray(parent["gate"][:, :20]))
    for bad in ([0] * 20, list(range(19)), list(range(30, 50))):
        with pytest.raises(ValueError, match="ffn_keep"):
            X.init_block(config, parent, BlockSpec.parse("gqa4/mlp20"), ffn_keep=bad)


def test_linear_and_none_blocks_against_a_hand_computation():
    config = BASE.replace(tie_word_embeddings=True)
    blocks = _blocks("linear/linear", "none/linear", "linear/none")
    hcfg = X.HeteroConfig(config, blocks)
    params = X.init_params(hcfg, jax.random.key(2), std=0.2)
    norms = jax.random.uniform(jax.random.key(4), (4, config.hidden_size), minval=0.5, maxval=1.5)
    params["segments"][0]["attn_norm"] = params["segments"][0]["attn_norm"] * norms[0]
    params["segments"][0]["mlp_norm"] = params["segments"][0]["mlp_norm"] * norms[1]
    params["segments"][1]["mlp_norm"] = params["segments"][1]["mlp_norm"] * norms[2]
    params["segments"][2]["attn_norm"] = params["segments"][2]["attn_norm"] * norms[3]
    tokens = _tokens()

    p = jax.tree.map(np.asarray, params)
    s = p["segments"]
    h = p["embed"][np.asarray(tokens)].astype(np.float64)
    h = h + _norm(h, s[0]["attn_norm"][0]) @ s[0]["attn_linear"][0]
    h = h + _norm(h, s[0]["mlp_norm"][0]) @ s[0]["ffn_linear"][0]
    h = h + _norm(h, s[1]["mlp_norm"][0]) @ s[1]["ffn_linear"][0]
    h = h + _norm(h, s[2]["attn_norm"][0]) @ s[2]["attn_linear"][0]
    expected = _norm(h, p["final_norm"]) @ p["embed"].T
    np.testing.assert_allclose(np.asarray(X.forward(hcfg, params, tokens)), expected, atol=1e-4, rtol=1e-4)

    # A model of removed blocks only is embed → final norm → head.
    empty = X.HeteroConfig(config, _blocks("none/none", "none/none"))
    eparams = {"embed": params["embed"], "final_norm": params["final_norm"], "segments": [{}]}
    h0 = p["embed"][np.asarray(tokens)].astype(np.float64)
    np.testing.assert_allclose(np.asarray(X.forward(empty, eparams, tokens)), _norm(h0, p["final_norm"]) @ p["embed"].T,
                               atol=1e-4, rtol=1e-4)


def test_linear_init_from_a_parent_is_the_identity_like_none():
    config, params = _model()
    parents = [_layer(params, i) for i in range(config.num_layers)]
    linear = _blocks("gqa4/mlp48", "linear/linear", "gqa2/linear", "linear/mlp24")
    removed = _blocks("gqa4/mlp48", "none/none", "gqa2/none", "none/mlp24")
    top = {k: v for k, v in params.items() if k != "layers"}
    out = {}
    for name, blocks in (("linear", linear), ("removed", removed)):
        layers = [X.init_block(config, parents[i], b) for i, b in enumerate(blocks)]
        if name == "linear":  # zero matrices under the parent's norms
            assert not np.any(np.asarray(layers[1]["attn_linear"])) and not np.any(np.asarray(layers[2]["ffn_linear"]))
            assert layers[1]["attn_norm"] is parents[1]["attn_norm"]
        out[name] = X.forward(X.HeteroConfig(config, blocks), {**top, "segments": X.stack_layers(layers, blocks)},
                              _tokens())
    np.testing.assert_array_equal(np.asarray(out["linear"]), np.asarray(out["removed"]))


def _zeros(abstract):
    return jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract)


def test_refusals():
    config = BASE
    params = _zeros(M.abstract_params(config))
    with pytest.raises(ValueError, match="do not divide"):
        X.HeteroConfig(config, _blocks("gqa3/mlp48"))
    with pytest.raises(ValueError, match="at least one"):
        X.HeteroConfig(config, ())
    hcfg = X.HeteroConfig(config, _blocks("gqa4/mlp48", "gqa2/mlp48"))
    with pytest.raises(ValueError, match="not a uniform model"):
        X.to_uniform(hcfg, _zeros(X.abstract_params(hcfg)))
    with pytest.raises(ValueError, match="not a plain Llama layer"):
        X.to_uniform(X.HeteroConfig(config, _blocks("linear/mlp48")), {})
    hp = _zeros(X.abstract_params(hcfg))
    bad = {**hp, "segments": [hp["segments"][0], {**hp["segments"][1], "k": hp["segments"][1]["k"][:, :, :1]}]}
    with pytest.raises(ValueError, match=r"segments\[1\]\.k: shape"):
        X.check_params(hcfg, bad)
    with pytest.raises(ValueError, match="segments"):
        X.forward(hcfg, {**hp, "segments": hp["segments"][:1]}, _tokens())
    with pytest.raises(ValueError, match="lacks"):
        X.stack_layers([_layer(params, 0), {}], _blocks("gqa4/mlp48", "linear/none"))


# ------------------------------------------------------------------------------------------------------------------
# Sharding: the uniform model's rules, segment by segment
# ------------------------------------------------------------------------------------------------------------------
# gqa with fewer KV heads (2, and 1: indivisible by any tensor axis), a linear attention, removed sub-blocks and an
# FFN of another width, next to the parent's own block.
SHARDED = _blocks("gqa4/mlp48", "gqa2/mlp48", "gqa2/mlp48", "linear/mlp24", "none/linear", "gqa1/none", "none/none")


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest)")


def test_param_specs_follow_the_uniform_rules_per_segment():
    from jax.sharding import PartitionSpec as P

    from minitron_jax import sharding as S

    _need_8()
    mesh = S.make_mesh(1, 2, 4)
    hcfg = X.HeteroConfig(BASE, SHARDED)
    specs = X.param_specs(hcfg, mesh)
    # the same tree as the params; the parent-shaped segment gets exactly the uniform model's specs
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        X.abstract_params(hcfg))
    uniform = S.param_specs(BASE.replace(num_layers=1), mesh)
    assert specs["segments"][0] == uniform["layers"]
    assert {k: specs[k] for k in specs if k != "segments"} == {k: uniform[k] for k in uniform if k != "layers"}
    seg = specs["segments"]
    # 2 and 1 KV heads do not divide tensor=4: replicated there, the residual stream still over fsdp
    assert seg[1]["k"] == P(None, "fsdp", None, None) and seg[4]["q"] == P(None, "fsdp", None, None, None)
    assert seg[2]["gate"] == P(None, "fsdp", "tensor") and seg[2]["down"] == P(None, "tensor", "fsdp")
    # [D, D] linear matrices: fsdp on the first embed axis only
    assert seg[2]["attn_linear"] == P(None, "fsdp", None) and seg[3]["ffn_linear"] == P(None, "fsdp", None)
    assert seg[5] == {}
    # a mesh with tensor=2 splits the 2 KV heads
    assert X.param_specs(hcfg, S.make_mesh(2, 2, 2))["segments"][1]["k"] == P(None, "fsdp", "tensor", None)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        X.param_specs(hcfg, mesh, {"embed": "model"})


@functools.cache
def _sharded_reference():
    """The SHARDED model, a batch, its CE step (value_and_grad, logits as aux) and the step's single-device result:
    computed once for every mesh."""
    hcfg = X.HeteroConfig(BASE, SHARDED)
    params = X.init_params(hcfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, BASE.vocab_size, (8, 16))
    targets = rng.integers(0, BASE.vocab_size, (8, 16))

    def loss(p, t, y):  # cross entropy on random targets; the logits come back too (one compile per placement)
        logits = X.forward(hcfg, p, t)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked), logits

    step = jax.value_and_grad(loss, has_aux=True)
    return hcfg, params, tokens, targets, step, jax.jit(step)(params, tokens, targets)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_hetero_forward_and_grad_equal_single_device(shape):
    from minitron_jax import sharding as S

    _need_8()
    mesh = S.make_mesh(*shape)
    hcfg, params, tokens, targets, step, ((single_loss, single_logits), single_grads) = _sharded_reference()

    shardings = X.param_shardings(hcfg, mesh)
    batch = S.batch_sharding(mesh)
    sp = S.shard_params(params, shardings)
    st, sy = jax.device_put(tokens, batch), jax.device_put(targets, batch)
    # the params really are split: no device holds a whole matrix of any segment
    for seg, key in ((0, "q"), (1, "k"), (2, "attn_linear"), (2, "gate"), (3, "ffn_linear")):
        x = sp["segments"][seg][key]
        assert x.addressable_shards[0].data.size < x.size, (seg, key, x.sharding)

    (sharded_loss, logits), grads = jax.jit(step, in_shardings=(shardings, batch, batch),
                                            out_shardings=((None, S.batch_sharding(mesh, 3)), shardings))(sp, st, sy)
    assert logits.sharding.is_equivalent_to(S.batch_sharding(mesh, 3), 3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single_logits), atol=2e-5)
    assert np.isfinite(float(sharded_loss)) and abs(float(sharded_loss) - float(single_loss)) < 1e-5
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params))
    for g, g1, s in zip(leaves, jax.tree.leaves(single_grads), jax.tree.leaves(shardings)):
        assert g.sharding.is_equivalent_to(s, g.ndim)
        g = np.asarray(g)  # on the host: a jnp check per differently sharded leaf would compile one program each
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, np.asarray(g1), atol=2e-6, rtol=1e-4)
