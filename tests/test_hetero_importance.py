"""Importance and pruning of a heterogeneous (Puzzle-style) model.

- the calibration pass on a heterogeneous model made of uniform blocks ≡ the uniform model's (every score);
- with removed and linear sub-blocks: channels and Block Importance against a hand computation from ``collect``,
  heads / neurons ragged (None where a layer has none);
- hidden-size pruning ≡ the model sliced by hand (param by param, by name); keeping every channel is the identity;
- dropping a layer ≡ running with ``layer_keep`` masking it; the single-layer-drop perplexity scan agrees;
- ``importance.npz`` round trip of the ragged scores;
- FFN / head pruning of a heterogeneous model refused in one line naming what is allowed;
- the prune command end to end on a DeciLM directory: its output is a heterogeneous model again.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import hetero as X
from minitron_jax import model as M
from minitron_jax.blocks import BlockSpec
from minitron_jax.compress import importance as imp
from minitron_jax.compress import prune
from minitron_jax.compress.importance_cache import CalibrationSettings, Importance
from minitron_jax.compress.spec import PruneSpec, check_spec, target_config
from minitron_jax.config import ConfigError, LlamaConfig

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=8, rope_theta=10000.0, max_position_embeddings=64)
# A removed attention, a removed layer, linear sub-blocks on both sides and a GQA layer without FFN; two runs of
# gqa2/mlp48 that dropping layer 1 joins into one segment.
BLOCKS = ("gqa2/mlp48", "none/mlp16", "gqa2/mlp48", "linear/linear", "none/none", "gqa4/none")
N, T = 5, 12  # 5 windows in batches of 2: three batches, the last padded


def _blocks(texts):
    return tuple(BlockSpec.parse(t) for t in texts)


def _random_params(shapes, seed):
    """Normal(0, 0.2) matrices (random linears too) and norms near 1: a slice in the wrong place would show. From
    numpy, as device arrays: the jax initialisers compile per shape, seconds on a busy CPU."""
    rng = np.random.default_rng(seed)

    def one(path, shape):
        name = str(getattr(path[-1], "key", ""))
        x = 1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm") else 0.2 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=lambda x: isinstance(x, tuple) and all(
        isinstance(i, int) for i in x))


def _hmodel(texts=BLOCKS, seed=0, base=BASE):
    hcfg = X.HeteroConfig(base, _blocks(texts))
    return hcfg, _random_params(X.param_shapes(hcfg), seed)


def _windows(n=N, t=T, vocab=BASE.vocab_size, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, layer_keep=None):
    return X.forward(config, params, tokens, layer_keep=layer_keep)


def _logits(config, params, tokens, **kw):
    # Jitted: one compile per config (eager scans would trace every call), numbers as the forward gives them.
    return np.asarray(_forward(config, params, jnp.asarray(tokens), **kw))


# ------------------------------------------------------------------------------------------------------------------
# (a) uniform blocks ≡ the uniform model
# ------------------------------------------------------------------------------------------------------------------
def test_uniform_blocks_give_the_uniform_models_scores():
    config = BASE
    params = _random_params(M.param_shapes(config), 3)
    hcfg, hparams = X.from_uniform(config, params)
    windows = _windows()
    u = imp.collect_activation_stats(config, params, windows, batch_size=2)
    h = imp.collect_activation_stats(hcfg, hparams, windows, batch_size=2)
    for seq_agg in imp.SEQ_AGGS:
        for batch_agg in imp.BATCH_AGGS:
            for metric in imp.WIDTH_METRICS:
                want, got = u.scores(metric, seq_agg, batch_agg), h.scores(metric, seq_agg, batch_agg)
                if metric == "channels":
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
                else:  # ragged: one row per layer, every layer has them
                    assert len(got) == config.num_layers and all(r is not None for r in got)
                    np.testing.assert_allclose(np.stack(got), want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(h.block_importance(), u.block_importance(), rtol=1e-6, atol=1e-12)
    # The baselines too: magnitude from the weights (walked per segment), random from the same streams.
    for unit in imp.UNIT_AXES:
        for method in ("magnitude", "random"):
            want = imp.width_importance(config, params, method, seed=4)[unit]
            got = imp.width_importance(hcfg, hparams, method, seed=4)[unit]
            np.testing.assert_allclose(np.stack(got) if unit != "channels" else got, want, rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# (b) removed / linear sub-blocks: a hand computation
# ------------------------------------------------------------------------------------------------------------------
def test_scores_of_removed_and_linear_blocks_against_a_hand_computation():
    hcfg, params = _hmodel()
    windows = _windows()
    stats = imp.collect_activation_stats(hcfg, params, windows, batch_size=2)
    collected = jax.jit(lambda p, t: X.hidden_states(hcfg, p, t, collect=True)[1])(params, jnp.asarray(windows))
    layers = [jax.tree.map(lambda x, i=i: np.asarray(x[i], np.float64), seg)
              for seg, (a, b, _) in zip(collected, hcfg.segments()) for i in range(b - a)]
    assert len(layers) == hcfg.num_layers

    # Channels: sequence mean of |norm output| of every norm a layer has, summed; batch l2 over the windows.
    per_sample = np.zeros((N, BASE.hidden_size))
    counted = []
    for i, inter in enumerate(layers):
        for key in ("attn_norm_out", "mlp_norm_out"):
            if key in inter:
                per_sample += np.abs(inter[key]).mean(axis=1)
                counted.append((i, key))
    # gqa/mlp: 2 norms; none/mlp: the MLP's; linear/linear: both; none/none: none; gqa/none: the attention's.
    assert [i for i, _ in counted] == [0, 0, 1, 2, 2, 3, 3, 5]
    np.testing.assert_allclose(stats.scores("channels"), np.sqrt((per_sample ** 2).sum(0)), rtol=1e-5)

    # Block Importance: mean over every token of 1 − cos(layer in, layer out); the removed layer is exactly 0.
    bi = []
    for inter in layers:
        x, y = inter["layer_in"], inter["layer_out"]
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        bi.append((1 - cos).mean())
    np.testing.assert_allclose(stats.block_importance(), bi, rtol=1e-5, atol=1e-6)
    assert abs(stats.block_importance()[4]) < 1e-6  # cos(x, x): 1 up to rounding

    # Heads and neurons: ragged, None exactly where the layer has no GQA attention / no MLP.
    heads, neurons = stats.scores("heads"), stats.scores("neurons")
    assert [r is None for r in heads] == [False, True, False, True, True, False]
    assert [None if r is None else len(r) for r in neurons] == [48, 16, 48, None, None, None]
    a = layers[5]["attn_heads"]  # [N, T, K, G] per head over head_dim
    want = np.sqrt((np.linalg.norm(a, axis=-1).mean(axis=1).reshape(N, -1) ** 2).sum(0))
    np.testing.assert_allclose(heads[5], want, rtol=1e-5)
    want = np.sqrt((np.abs(layers[1]["mlp_act"]).mean(axis=1) ** 2).sum(0))
    np.testing.assert_allclose(neurons[1], want, rtol=1e-5)
    # The magnitude baseline is ragged the same way and counts a linear [D, D] on both of its sides.
    mag = imp.weight_magnitude(hcfg, params, "neurons")
    assert [None if r is None else len(r) for r in mag] == [48, 16, 48, None, None, None]
    ch = imp.weight_magnitude(hcfg, params, "channels")
    w = np.asarray(params["segments"][3]["attn_linear"][0], np.float64)
    assert np.all(ch ** 2 >= (w ** 2).sum(0) + (w ** 2).sum(1))


# ------------------------------------------------------------------------------------------------------------------
# (c) hidden size
# ------------------------------------------------------------------------------------------------------------------
def _slice_by_hand(hcfg, params, keep):
    """Every array touching the residual stream sliced by name (not through the axes table)."""
    k = np.asarray(keep)
    out = {"embed": np.asarray(params["embed"])[:, k], "final_norm": np.asarray(params["final_norm"])[k]}
    if "lm_head" in params:
        out["lm_head"] = np.asarray(params["lm_head"])[k, :]
    segs = []
    for seg in params["segments"]:
        s = {name: np.asarray(v) for name, v in seg.items()}
        for name in ("attn_norm", "mlp_norm", "q", "k", "v", "gate", "up"):
            if name in s:
                s[name] = s[name][:, k]
        if "o" in s:
            s["o"] = s["o"][..., k]
        if "down" in s:
            s["down"] = s["down"][:, :, k]
        for name in ("attn_linear", "ffn_linear"):
            if name in s:
                s[name] = s[name][:, k][:, :, k]
        segs.append(s)
    out["segments"] = segs
    return X.HeteroConfig(hcfg.base.replace(hidden_size=len(k)), hcfg.blocks), out


def test_hidden_prune_equals_the_model_sliced_by_hand_and_keeping_all_is_the_identity():
    hcfg, params = _hmodel()
    tokens = _windows(2)
    keep = np.sort(np.random.default_rng(5).choice(BASE.hidden_size, 20, replace=False))
    cfg2, p2 = prune.prune_hidden(hcfg, params, keep)
    cfg_hand, p_hand = _slice_by_hand(hcfg, params, keep)
    assert cfg2 == cfg_hand and cfg2.hidden_size == 20 and cfg2.blocks == hcfg.blocks
    X.check_params(cfg2, p2)
    np.testing.assert_array_equal(_logits(cfg2, p2, tokens), _logits(cfg_hand, p_hand, tokens))
    # Numpy params stay numpy, device params stay on device.
    assert isinstance(p2["segments"][0]["q"], jax.Array)
    _, p_np = prune.prune_hidden(hcfg, jax.tree.map(np.asarray, params), keep)
    assert isinstance(p_np["segments"][0]["q"], np.ndarray)

    same_cfg, same = prune.prune_hidden(hcfg, params, np.arange(BASE.hidden_size))
    assert same_cfg == hcfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), same, params)
    np.testing.assert_array_equal(_logits(same_cfg, same, tokens), _logits(hcfg, params, tokens))


# ------------------------------------------------------------------------------------------------------------------
# (d) depth
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop", [1, 3, 5])
def test_dropping_a_layer_equals_masking_it_with_layer_keep(drop):
    hcfg, params = _hmodel()
    tokens = _windows(2)
    cfg2, p2 = prune.drop_layers(hcfg, params, [drop])
    assert cfg2.blocks == tuple(b for i, b in enumerate(hcfg.blocks) if i != drop)
    X.check_params(cfg2, p2)
    if drop == 1:  # the two gqa2/mlp48 runs around the dropped layer are one segment now
        assert len(cfg2.segments()) == len(hcfg.segments()) - 2
    keep = np.ones(hcfg.num_layers, np.float32)
    keep[drop] = 0.0
    np.testing.assert_allclose(_logits(cfg2, p2, tokens), _logits(hcfg, params, tokens, layer_keep=jnp.asarray(keep)),
                               rtol=1e-5, atol=1e-5)


def test_layer_drop_perplexity_scan_equals_the_dropped_models_perplexity():
    from minitron_jax.evaluate.perplexity import nll_sum

    hcfg, params = _hmodel()
    windows = _windows(3)
    scores = imp.layer_importance(hcfg, params, "ppl", windows=windows, batch_size=2)
    assert scores.shape == (hcfg.num_layers,)
    for i in (1, 3):
        cfg2, p2 = prune.drop_layers(hcfg, params, [i])
        total, count = nll_sum(cfg2, p2, windows, batch_size=2)
        np.testing.assert_allclose(scores[i], math.exp(total / count), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# (e) importance.npz
# ------------------------------------------------------------------------------------------------------------------
def test_importance_npz_round_trip_of_ragged_scores(tmp_path):
    hcfg, params = _hmodel()
    importance = Importance(hcfg, params, _windows(), CalibrationSettings(batch_size=2))
    importance.layers("bi")
    importance.layers("contiguous", 2)
    path = importance.save(tmp_path / "importance.npz")
    with np.load(path) as z:
        assert z["neurons_offsets"].tolist() == [0, 48, 64, 112, 112, 112, 112]
        assert z["heads_offsets"].dtype == np.int64 and z["heads"].shape == (3 * BASE.num_heads,)
    loaded = Importance.load(path)
    want, got = importance.width(), loaded.width()
    np.testing.assert_array_equal(got["channels"], want["channels"].astype(np.float32))
    for unit in ("heads", "neurons"):
        assert len(got[unit]) == hcfg.num_layers
        for w, g in zip(want[unit], got[unit]):
            assert (w is None) == (g is None)
            if w is not None:
                np.testing.assert_array_equal(g, w.astype(np.float32))
    np.testing.assert_array_equal(loaded.layers("bi"), importance.layers("bi").astype(np.float32))
    np.testing.assert_array_equal(loaded.layers("contiguous", 2),
                                  importance.layers("contiguous", 2).astype(np.float32))


# ------------------------------------------------------------------------------------------------------------------
# (f) what stays refused
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(ffn=16), dict(heads_per_group=1), dict(heads=2, hidden=16)])
def test_ffn_and_head_pruning_of_a_heterogeneous_model_is_refused(options):
    hcfg, params = _hmodel()
    with pytest.raises(ConfigError, match=r"heterogeneous .* hidden, drop_layers, layers only .*minitron_jax\.puzzle"
                       ) as e:
        check_spec(hcfg, PruneSpec(**options))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="puzzle"):
        prune.prune_ffn(hcfg, params, np.arange(8))
    with pytest.raises(ConfigError, match="heterogeneous"):
        prune.keep_along_axis(hcfg, params, "embed", np.arange(8))
    # What is allowed passes; its size limits are checked as for a uniform model.
    check_spec(hcfg, PruneSpec(hidden=16, drop_layers=2))
    with pytest.raises(ConfigError, match="hidden=40"):
        check_spec(hcfg, PruneSpec(hidden=40))
    with pytest.raises(ConfigError, match="out of range"):
        check_spec(hcfg, PruneSpec(layers=(6,)))
    assert target_config(hcfg, PruneSpec(hidden=16, layers=(4,))) == X.HeteroConfig(
        BASE.replace(hidden_size=16), tuple(b for i, b in enumerate(hcfg.blocks) if i != 4))


# ------------------------------------------------------------------------------------------------------------------
# The command, end to end
# ------------------------------------------------------------------------------------------------------------------
def test_prune_command_on_a_deci_model_writes_a_heterogeneous_model(tmp_path):
    from utils import tiny_tokenizer

    from minitron_jax.cli.prune import main
    from minitron_jax.convert import load_model, save_hf

    tok = tiny_tokenizer()
    # FFN widths that DeciLM's ffn_mult can express (multiples of 256).
    hcfg, params = _hmodel(("gqa2/mlp256", "none/mlp256", "linear/none", "gqa2/mlp256"),
                           base=BASE.replace(vocab_size=len(tok)))
    save_hf(tmp_path / "deci", hcfg, params, tokenizer=tok)
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc = main(["--model", str(tmp_path / "deci"), "--calib", str(tmp_path / "calib.txt"), "--out",
               str(tmp_path / "out"), "--hidden", "24", "--drop-layers", "1", "--depth-metric", "bi",
               "--calib-samples", "3", "--seq-len", "16", "--batch-size", "2"])
    assert rc == 0
    m = load_model(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    dropped = report["kept"]["dropped_layers"]
    assert isinstance(m.config, X.HeteroConfig) and m.config.hidden_size == 24 and len(dropped) == 1
    assert m.config.blocks == tuple(b for i, b in enumerate(hcfg.blocks) if i not in dropped)
    # The saved model is the library's pruned model, and its scores were saved ragged.
    imp_saved = Importance.load(tmp_path / "out" / "importance.npz").width()
    keep = np.asarray(report["kept"]["hidden"])
    want_cfg, want = prune.drop_layers(*prune.prune_hidden(hcfg, params, keep), dropped)
    assert want_cfg.blocks == m.config.blocks and want_cfg.hidden_size == m.config.hidden_size
    tokens = _windows(1, vocab=len(tok))
    np.testing.assert_allclose(_logits(m.config, m.params, tokens), _logits(want_cfg, want, tokens), rtol=1e-6,
                               atol=1e-6)
    assert [r is None for r in imp_saved["neurons"]] == [False, False, True, False]
