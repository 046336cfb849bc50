"""Importance estimation against an independent reference: torch forward hooks on transformers' LlamaForCausalLM."""

import math

import numpy as np
import pytest
from utils import tiny_hf_model

from minitron_jax.compress import importance as imp
from minitron_jax.compress import prune
from minitron_jax.compress.importance_cache import CalibrationSettings, Importance
from minitron_jax.convert.hf import load_hf_params
from minitron_jax.evaluate.perplexity import batch_nll, perplexity

N_WINDOWS, SEQ, BATCH = 5, 16, 2  # 5 windows in batches of 2: three batches, the last one padded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_model(seed=3)
    hf.save_pretrained(path)
    config, params = load_hf_params(path)
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (N_WINDOWS, SEQ)).astype(np.int32)
    return hf, config, params, windows


@pytest.fixture(scope="module")
def stats(tiny):
    _, config, params, windows = tiny
    return imp.collect_activation_stats(config, params, windows, batch_size=BATCH)


# ------------------------------------------------------------------------------------------------------------------
# The reference: hooks on the HF model, aggregated with plain numpy
# ------------------------------------------------------------------------------------------------------------------
def hooked_activations(hf, windows):
    """Per-layer [N, T, ...] float64 magnitudes captured by hooks, and layer inputs/outputs for BI."""
    import torch

    cfg = hf.config
    H, Hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    got = {k: [] for k in ("heads", "neurons", "neurons_preact", "attn_norm", "mlp_norm", "last_out")}
    hooks = []
    for layer in hf.model.layers:
        def o_in(mod, args):  # o_proj's input: the per-head outputs, heads concatenated in HF order
            x = args[0].double()
            got["heads"].append(torch.linalg.norm(x.reshape(*x.shape[:2], H, Hd), dim=-1))
        hooks += [
            layer.self_attn.o_proj.register_forward_pre_hook(o_in),
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: got["neurons"].append(a[0].double().abs())),
            layer.mlp.gate_proj.register_forward_hook(lambda m, a, o: got["neurons_preact"].append(o.double().abs())),
            layer.input_layernorm.register_forward_hook(lambda m, a, o: got["attn_norm"].append(o.double().abs())),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o: got["mlp_norm"].append(o.double().abs())),
        ]
    # HF's last hidden_states entry is after the final norm, so the last layer's raw output comes from a hook.
    hooks.append(hf.model.layers[-1].register_forward_hook(
        lambda m, a, o: got["last_out"].append((o[0] if isinstance(o, tuple) else o).double())))
    with torch.no_grad():
        out = hf(torch.as_tensor(windows, dtype=torch.long), output_hidden_states=True)
    for h in hooks:
        h.remove()
    acts = {k: np.stack([t.numpy() for t in v]) for k, v in got.items() if k != "last_out"}
    hidden = [h.double().numpy() for h in out.hidden_states[:-1]] + [got["last_out"][0].numpy()]
    return acts, hidden


def ref_seq(x, how):  # x [..., N, T, U] → [..., N, U]
    return {"mean": x.mean(-2), "l2": np.sqrt((x ** 2).sum(-2)), "var": x.var(-2)}[how]


def ref_batch(s, how):  # s [..., N, U] → [..., U]
    return {"mean": s.mean(-2), "l2": np.sqrt((s ** 2).sum(-2)), "var": s.var(-2)}[how]


@pytest.fixture(scope="module")
def reference(tiny):
    hf, _, _, windows = tiny
    return hooked_activations(hf, windows)


PAIRS = [(s, b) for s in imp.SEQ_AGGS for b in imp.BATCH_AGGS]


@pytest.mark.parametrize("seq_agg,batch_agg", PAIRS)
def test_width_importance_matches_torch_hooks(stats, reference, seq_agg, batch_agg):
    acts, _ = reference
    for metric in ("heads", "neurons", "neurons_preact"):
        want = ref_batch(ref_seq(acts[metric], seq_agg), batch_agg)  # [L, U]
        np.testing.assert_allclose(stats.scores(metric, seq_agg, batch_agg), want, rtol=2e-4, atol=1e-6,
                                   err_msg=metric)
    per_sample = (ref_seq(acts["attn_norm"], seq_agg) + ref_seq(acts["mlp_norm"], seq_agg)).sum(0)  # over layers
    np.testing.assert_allclose(stats.scores("channels", seq_agg, batch_agg), ref_batch(per_sample, batch_agg),
                               rtol=2e-4, atol=1e-6)


def test_block_importance_matches_hidden_states(stats, reference):
    _, hidden = reference
    want = []
    for x, y in zip(hidden[:-1], hidden[1:]):
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        want.append(np.mean(1 - cos))
    np.testing.assert_allclose(stats.block_importance(), want, rtol=1e-4, atol=1e-7)


def test_width_scores_picks_neuron_variant(stats):
    default = stats.width_scores()
    np.testing.assert_array_equal(default["neurons"], stats.scores("neurons", "mean", "l2"))
    np.testing.assert_array_equal(stats.width_scores(preact=True)["neurons"], stats.scores("neurons_preact"))
    assert default["heads"].shape == (3, 8) and default["channels"].shape == (64,)
    with pytest.raises(ValueError, match="batch aggregation"):
        stats.scores("heads", "mean", "max")


def test_calibration_pass_compiles_once(tiny):
    """Three batches (last one padded), then a different number of windows: a single trace."""
    _, config, params, windows = tiny
    config = config.replace(rms_norm_eps=config.rms_norm_eps * 1.5)  # a config no other test compiled
    before = imp.TRACE_COUNT
    imp.collect_activation_stats(config, params, windows, batch_size=BATCH)
    imp.collect_activation_stats(config, params, windows[:3], batch_size=BATCH)
    assert imp.TRACE_COUNT - before == 1


def test_padding_rows_do_not_count(tiny):
    """Batches of 3 (the second one with a padding row) give the same statistics as batches of 1 (no padding)."""
    _, config, params, windows = tiny
    a = imp.collect_activation_stats(config, params, windows, batch_size=3)
    b = imp.collect_activation_stats(config, params, windows, batch_size=1)
    for pair in [("mean", "var"), ("var", "l2")]:
        for k, v in a.width_scores(*pair).items():
            np.testing.assert_allclose(v, b.width_scores(*pair)[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(a.block_importance(), b.block_importance(), rtol=1e-5)


def test_moments_merge_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 0.01, (37, 4))  # large mean, small variance: where Σx² − N·mean² would cancel
    m = None
    for chunk in np.array_split(x, [5, 6, 20]):
        args = (len(chunk), chunk.mean(0), ((chunk - chunk.mean(0)) ** 2).sum(0))
        m = imp.Moments(*args) if m is None else (m.merge(*args) or m)
    np.testing.assert_allclose(m.aggregate("mean"), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.aggregate("var"), x.var(0), rtol=1e-9)
    np.testing.assert_allclose(m.aggregate("l2"), np.sqrt((x ** 2).sum(0)), rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------------------------
def test_weight_magnitude_matches_hf_weights(tiny):
    hf, config, params, _ = tiny
    sd = {k: v.double().numpy() for k, v in hf.state_dict().items()}
    L, Hd = config.num_layers, config.head_dim
    heads = np.zeros((L, config.num_heads))
    neurons = np.zeros((L, config.intermediate_size))
    channels = ((sd["model.embed_tokens.weight"] ** 2).sum(0) + (sd["lm_head.weight"] ** 2).sum(0)
                + sd["model.norm.weight"] ** 2)
    for i in range(L):
        p = f"model.layers.{i}."
        q, o = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.o_proj.weight"]
        for h in range(config.num_heads):
            heads[i, h] = (q[h * Hd:(h + 1) * Hd] ** 2).sum() + (o[:, h * Hd:(h + 1) * Hd] ** 2).sum()
        gate, up, down = (sd[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        neurons[i] = (gate ** 2).sum(1) + (up ** 2).sum(1) + (down ** 2).sum(0)
        for n in ("q", "k", "v"):  # [out, in]: a channel is a column
            channels += (sd[p + f"self_attn.{n}_proj.weight"] ** 2).sum(0)
        channels += (o ** 2).sum(1) + (gate ** 2).sum(0) + (up ** 2).sum(0) + (down ** 2).sum(1)
        channels += sd[p + "input_layernorm.weight"] ** 2 + sd[p + "post_attention_layernorm.weight"] ** 2
    np.testing.assert_allclose(imp.weight_magnitude(config, params, "heads"), np.sqrt(heads), rtol=1e-6)
    np.testing.assert_allclose(imp.weight_magnitude(config, params, "neurons"), np.sqrt(neurons), rtol=1e-6)
    np.testing.assert_allclose(imp.weight_magnitude(config, params, "channels"), np.sqrt(channels), rtol=1e-6)


def test_random_scores_are_seeded(tiny):
    _, config, params, _ = tiny
    a = imp.width_importance(config, params, "random", seed=1)
    b = imp.width_importance(config, params, "random", seed=1)
    c = imp.width_importance(config, params, "random", seed=2)
    assert {k: v.shape for k, v in a.items()} == {"heads": (3, 8), "neurons": (3, 96), "channels": (64,)}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])
    with pytest.raises(ValueError, match="needs the ActivationStats"):
        imp.width_importance(config, params, "activation")


# ------------------------------------------------------------------------------------------------------------------
# Depth metrics
# ------------------------------------------------------------------------------------------------------------------
def test_block_drop_perplexity_equals_sliced_model(tiny):
    """The layer_keep mask gives the perplexity of the model with those layers actually removed, and every
    window runs through one compiled function."""
    _, config, params, windows = tiny
    before = batch_nll._cache_size()
    ppl = imp.block_drop_perplexities(config, params, windows, block_size=2, batch_size=BATCH)
    assert ppl.shape == (2,) and batch_nll._cache_size() - before <= 1
    for start in range(2):
        c, p = prune.drop_layers(config, params, [start, start + 1])
        np.testing.assert_allclose(ppl[start], perplexity(c, p, windows, batch_size=BATCH), rtol=1e-5)


def test_layer_importance_metrics(tiny, stats):
    _, config, params, windows = tiny
    single = imp.layer_importance(config, params, "ppl", windows=windows, batch_size=BATCH)
    contiguous1 = imp.layer_importance(config, params, "contiguous", windows=windows, block_size=1,
                                       batch_size=BATCH)
    np.testing.assert_array_equal(single, contiguous1)  # ppl is the k = 1 scan
    blocks = imp.layer_importance(config, params, "contiguous", windows=windows, block_size=2, batch_size=BATCH)
    assert np.isfinite(blocks[:2]).all() and math.isnan(blocks[2])
    np.testing.assert_array_equal(imp.layer_importance(config, params, "bi", stats=stats),
                                  stats.block_importance())
    with pytest.raises(ValueError, match="block size"):
        imp.block_drop_perplexities(config, params, windows, block_size=3)
    with pytest.raises(ValueError, match="needs calibration windows"):
        imp.layer_importance(config, params, "ppl")


# ------------------------------------------------------------------------------------------------------------------
# The importance object
# ------------------------------------------------------------------------------------------------------------------
def test_importance_object_one_pass_cached_scans_and_file(tiny, stats, tmp_path, monkeypatch):
    """Nothing runs until a score is asked for; then one calibration pass however many scores follow, one
    layer-drop scan per distinct (metric, k) (ppl and bi serve every k), the same numbers as the functions; save →
    load gives those arrays back under importance.npz's keys."""
    _, config, params, windows = tiny
    want_ppl = imp.layer_importance(config, params, "ppl", windows=windows[:3], batch_size=BATCH)
    calls = {"pass": 0, "scan": 0}
    real_pass, real_scan = imp.collect_activation_stats, imp.block_drop_perplexities

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(imp, "collect_activation_stats", counted("pass", real_pass))
    monkeypatch.setattr(imp, "block_drop_perplexities", counted("scan", real_scan))
    settings = CalibrationSettings(calib_samples=N_WINDOWS, seq_len=SEQ, batch_size=BATCH, depth_samples=3)
    importance = Importance(config, params, windows, settings)
    assert calls == {"pass": 0, "scan": 0}
    for k, v in importance.width().items():
        np.testing.assert_array_equal(v, stats.width_scores()[k], err_msg=k)
    for k, v in importance.width(seq_agg="var", preact=True).items():
        np.testing.assert_array_equal(v, stats.width_scores("var", "l2", preact=True)[k], err_msg=k)
    np.testing.assert_array_equal(importance.layers("bi", 2), stats.block_importance())
    assert calls == {"pass": 1, "scan": 0}
    ppl = importance.layers("ppl", 1)
    np.testing.assert_array_equal(importance.layers("ppl", 2), ppl)
    np.testing.assert_array_equal(ppl, want_ppl)
    blocks = importance.layers("contiguous", 2)
    importance.layers("contiguous", 2)
    assert calls == {"pass": 1, "scan": 2}
    magnitude = importance.width("magnitude")
    np.testing.assert_array_equal(magnitude["heads"], imp.weight_magnitude(config, params, "heads"))
    assert calls["pass"] == 1

    path = importance.save(tmp_path / "importance.npz")
    with np.load(path) as z:
        assert z.files == ["heads", "neurons", "channels", "bi", "layers_bi_2", "layers_ppl_1", "layers_ppl_2",
                           "layers_contiguous_2"]
    loaded = Importance.load(path)
    for k, v in loaded.width().items():
        np.testing.assert_array_equal(v, stats.width_scores()[k].astype(np.float32), err_msg=k)
    np.testing.assert_array_equal(loaded.layers("contiguous", 2), blocks.astype(np.float32))
    np.testing.assert_array_equal(loaded.layers("ppl", 2), ppl.astype(np.float32))
    np.testing.assert_array_equal(loaded.block_importance(), stats.block_importance().astype(np.float32))
    with pytest.raises(ValueError, match="hold no contiguous layer scores"):
        loaded.layers("contiguous", 1)
    with pytest.raises(ValueError, match="aggregation only"):
        loaded.width(seq_agg="var")


def test_importance_from_text_uses_the_calibration_windows():
    from utils import tiny_tokenizer

    from minitron_jax.data import token_windows

    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 40
    settings = CalibrationSettings(calib_samples=3, seq_len=16)
    importance = Importance.from_text(None, None, tok, text, settings)
    np.testing.assert_array_equal(importance.windows, token_windows(tok, text, 16, 48))
    assert importance.timings == {}  # nothing computed
