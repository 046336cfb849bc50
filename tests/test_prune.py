"""Structured pruning: slicing invariants, GQA, export to transformers, refusals, and the CLI end to end."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from utils import tiny_hf_model, tiny_tokenizer, torch_logits

from minitron_jax import model as M
from minitron_jax.cli import prune as prune_cli
from minitron_jax.compress import prune
from minitron_jax.compress.spec import PruneSpec, check_spec, target_config
from minitron_jax.config import ConfigError
from minitron_jax.convert import load_model
from minitron_jax.convert.hf import load_hf_params

# Biases on, so the slices of q_bias / gate_bias / up_bias are exercised too.
BIASED = dict(attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_model(seed=5, **BIASED)
    hf.save_pretrained(path)
    config, params = load_hf_params(path)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    return hf, config, params, tokens


def logits(config, params, tokens):
    return np.asarray(M.forward(config, params, tokens))


def zeroed(params, layer_updates):
    """A copy of params with some entries set to zero: {name: index tuple into params["layers"][name]}."""
    out = jax.tree.map(np.array, params)
    for name, index in layer_updates:
        out["layers"][name][index] = 0.0
    return out


def random_keep(rng, batch_shape, size, n):
    return np.sort(np.stack([rng.choice(size, n, replace=False) for _ in range(int(np.prod(batch_shape)))])
                   .reshape(batch_shape + (n,)), axis=-1)


def dropped(keep_row, size):
    return np.setdiff1d(np.arange(size), keep_row)


# ------------------------------------------------------------------------------------------------------------------
# Invariants
# ------------------------------------------------------------------------------------------------------------------
def test_full_size_is_identity(tiny):
    _, config, params, tokens = tiny
    spec = PruneSpec(hidden=config.hidden_size, ffn=config.intermediate_size,
                     heads_per_group=config.q_per_kv, drop_layers=0, importance="magnitude")
    new_config, new_params, report = prune.prune_from_spec(config, params, None, spec, None)
    assert new_config == config
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    np.testing.assert_array_equal(logits(new_config, new_params, tokens), logits(config, params, tokens))
    assert report["params_before"] == report["params_after"] == M.count_params(config)


def test_ffn_slice_equals_zeroed_neurons(tiny):
    _, config, params, tokens = tiny
    keep = random_keep(np.random.default_rng(1), (config.num_layers,), config.intermediate_size, 40)
    updates = []
    for layer, row in enumerate(keep):
        gone = dropped(row, config.intermediate_size)
        # Zeroing down_proj's rows alone is enough; gate/up/biases too, so nothing of the neuron survives.
        updates += [("down", (layer, gone)), ("gate", (layer, slice(None), gone)),
                    ("up", (layer, slice(None), gone)), ("gate_bias", (layer, gone)), ("up_bias", (layer, gone))]
    c, p = prune.prune_ffn(config, params, keep)
    assert c.intermediate_size == 40 and p["layers"]["down"].shape[1] == 40
    np.testing.assert_allclose(logits(c, p, tokens), logits(config, zeroed(params, updates), tokens), atol=2e-6)


def test_head_slice_equals_zeroed_heads(tiny):
    _, config, params, tokens = tiny
    K, G = config.num_kv_heads, config.q_per_kv
    keep = random_keep(np.random.default_rng(2), (config.num_layers, K), G, 2)
    updates = []
    for layer in range(config.num_layers):
        for k in range(K):
            gone = dropped(keep[layer, k], G)
            updates += [("o", (layer, k, gone)), ("q", (layer, slice(None), k, gone)), ("q_bias", (layer, k, gone))]
    c, p = prune.prune_heads(config, params, keep)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (K * 2, K, config.head_dim)
    np.testing.assert_allclose(logits(c, p, tokens), logits(config, zeroed(params, updates), tokens), atol=2e-6)


def test_layer_drop_equals_zeroed_layer(tiny):
    """A layer whose o_proj and down_proj (and their biases) are zero is an exact identity block."""
    _, config, params, tokens = tiny
    updates = [(name, (1,)) for name in ("o", "down", "o_bias", "down_bias")]
    c, p = prune.drop_layers(config, params, [1])
    assert c.num_layers == 2
    np.testing.assert_array_equal(p["layers"]["q"], params["layers"]["q"][[0, 2]])
    np.testing.assert_allclose(logits(c, p, tokens), logits(config, zeroed(params, updates), tokens), atol=2e-6)
    keep_mask = np.array([1.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(logits(c, p, tokens), np.asarray(M.forward(config, params, tokens,
                                                                           layer_keep=keep_mask)), atol=2e-6)


def test_hidden_slice_shapes_and_device_arrays(tiny):
    """Every array on the residual stream shrinks; device arrays stay device arrays."""
    _, config, params, _ = tiny
    keep = np.arange(0, config.hidden_size, 2)
    c, p = prune.prune_hidden(config, jax.device_put(params), keep)
    M.check_params(c, p)
    assert isinstance(p["embed"], jax.Array)
    np.testing.assert_array_equal(p["lm_head"], params["lm_head"][keep])
    np.testing.assert_array_equal(p["layers"]["o"], params["layers"]["o"][..., keep])


# ------------------------------------------------------------------------------------------------------------------
# Export and GQA
# ------------------------------------------------------------------------------------------------------------------
def hf_pruned_by_torch(hf, keep_heads, keep_ffn, keep_hidden, drop):
    """The pruned model built independently: a transformers model from the pruned sizes, weights copied by
    torch indexing of the original HF tensors (query head h of q_proj belongs to KV group h // G)."""
    import torch
    import transformers

    cfg = hf.config
    H, K, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    G, L = H // K, cfg.num_hidden_layers
    layers = [i for i in range(L) if i not in drop]
    new_cfg = transformers.LlamaConfig(**{**cfg.to_dict(), "hidden_size": len(keep_hidden), "head_dim": Hd,
                                          "intermediate_size": keep_ffn.shape[1], "num_hidden_layers": len(layers),
                                          "num_attention_heads": K * keep_heads.shape[2]})
    new = transformers.LlamaForCausalLM(new_cfg).eval()
    sd = hf.state_dict()
    d = torch.as_tensor(keep_hidden)
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, d],
           "lm_head.weight": sd["lm_head.weight"][:, d], "model.norm.weight": sd["model.norm.weight"][d]}
    for j, i in enumerate(layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        heads = (np.arange(K)[:, None] * G + keep_heads[i]).reshape(-1)  # HF head numbers, group by group
        q_rows = torch.as_tensor((heads[:, None] * Hd + np.arange(Hd)).reshape(-1))
        f = torch.as_tensor(keep_ffn[i])
        out.update({
            dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"][d],
            dst + "post_attention_layernorm.weight": sd[src + "post_attention_layernorm.weight"][d],
            dst + "self_attn.q_proj.weight": sd[src + "self_attn.q_proj.weight"][q_rows][:, d],
            dst + "self_attn.q_proj.bias": sd[src + "self_attn.q_proj.bias"][q_rows],
            dst + "self_attn.k_proj.weight": sd[src + "self_attn.k_proj.weight"][:, d],
            dst + "self_attn.k_proj.bias": sd[src + "self_attn.k_proj.bias"],
            dst + "self_attn.v_proj.weight": sd[src + "self_attn.v_proj.weight"][:, d],
            dst + "self_attn.v_proj.bias": sd[src + "self_attn.v_proj.bias"],
            dst + "self_attn.o_proj.weight": sd[src + "self_attn.o_proj.weight"][d][:, q_rows],
            dst + "self_attn.o_proj.bias": sd[src + "self_attn.o_proj.bias"][d],
            dst + "mlp.gate_proj.weight": sd[src + "mlp.gate_proj.weight"][f][:, d],
            dst + "mlp.gate_proj.bias": sd[src + "mlp.gate_proj.bias"][f],
            dst + "mlp.up_proj.weight": sd[src + "mlp.up_proj.weight"][f][:, d],
            dst + "mlp.up_proj.bias": sd[src + "mlp.up_proj.bias"][f],
            dst + "mlp.down_proj.weight": sd[src + "mlp.down_proj.weight"][d][:, f],
            dst + "mlp.down_proj.bias": sd[src + "mlp.down_proj.bias"][d],
        })
    new.load_state_dict(out, strict=False)  # strict=False: rotary inv_freq buffers are not in the state dict
    missing = set(new.state_dict()) - set(out) - {k for k in new.state_dict() if "rotary" in k}
    assert not missing, missing
    return new


def test_export_loads_in_transformers_and_matches(tiny, tmp_path):
    """Heads (GQA), FFN, hidden and depth pruned together: our export loads in transformers with our logits, and
    equals a transformers model pruned independently by torch indexing."""
    from transformers import AutoModelForCausalLM

    hf, config, params, tokens = tiny
    rng = np.random.default_rng(3)
    keep = {"heads": random_keep(rng, (config.num_layers, config.num_kv_heads), config.q_per_kv, 3),
            "ffn": random_keep(rng, (config.num_layers,), config.intermediate_size, 50),
            "hidden": np.sort(rng.choice(config.hidden_size, 48, replace=False)),
            "drop_layers": [1]}
    c, p = prune.apply_plan(config, params, keep)
    assert (c.num_heads, c.num_kv_heads, c.intermediate_size, c.hidden_size, c.num_layers) == (6, 2, 50, 48, 2)
    assert c == target_config(config, PruneSpec(hidden=48, ffn=50, heads_per_group=3, layers=[1]))
    ours = logits(c, p, tokens)

    from minitron_jax.convert.hf import save_hf

    save_hf(tmp_path / "pruned", c, p)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.config.num_attention_heads == 6 and loaded.config.num_key_value_heads == 2
    np.testing.assert_allclose(torch_logits(loaded, tokens), ours, atol=1e-4, rtol=0)

    independent = hf_pruned_by_torch(hf, keep["heads"], keep["ffn"], keep["hidden"], keep["drop_layers"])
    np.testing.assert_allclose(torch_logits(independent, tokens), ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Ranking helpers
# ------------------------------------------------------------------------------------------------------------------
def test_top_k_indices_sorted_ties_nan():
    s = np.array([[0.5, 2.0, 1.0, 2.0, np.nan], [5, 4, 3, 2, 1]], float)
    np.testing.assert_array_equal(prune.top_k_indices(s, 3), [[1, 2, 3], [0, 1, 2]])
    np.testing.assert_array_equal(prune.top_k_indices(s[0], 2), [1, 3])  # tie: lower index first
    with pytest.raises(ConfigError):
        prune.top_k_indices(s, 6)


def test_heads_to_keep_per_group(tiny):
    _, config, _, _ = tiny
    scores = np.zeros((config.num_layers, config.num_heads))
    scores[:, [0, 5, 6]] = 1.0  # group 0 holds heads 0..3, group 1 heads 4..7
    keep = prune.heads_to_keep(config, scores, 2)
    assert keep.shape == (3, 2, 2)
    np.testing.assert_array_equal(keep[0], [[0, 1], [1, 2]])  # group 0: head 0 + tie-break; group 1: heads 5, 6


def test_layers_to_drop():
    assert prune.layers_to_drop([5.0, 3.0, 4.0, np.nan], 2, "contiguous") == [1, 2]
    assert prune.layers_to_drop([5.0, 3.0, 9.0, 1.0], 2, "ppl") == [1, 3]
    assert prune.layers_to_drop([0.5, 0.1, 0.9, 0.05], 3, "bi") == [0, 1, 3]
    assert prune.layers_to_drop([1.0], 0, "bi") == []


# ------------------------------------------------------------------------------------------------------------------
# Refusals, before any work
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,error,match", [
    (dict(hidden=0), ValueError, "hidden must be an integer >= 1"),
    (dict(hidden=65), ConfigError, "hidden=65 exceeds"),
    (dict(ffn=97), ConfigError, "ffn=97 exceeds"),
    (dict(heads=3), ConfigError, "not divisible across the 2 KV groups"),
    (dict(heads_per_group=5), ConfigError, "heads_per_group=5 exceeds"),
    (dict(drop_layers=3), ConfigError, "leaves no layer"),
    (dict(layers=[0, 3]), ConfigError, r"\[3\] out of range"),
    (dict(layers=[1, 1]), ConfigError, "duplicates"),
    (dict(layers=[0, 1, 2]), ConfigError, "at least one must remain"),
    (dict(drop_layers=1, layers=[0]), ValueError, "not both"),
    (dict(depth_metric="loss"), ValueError, "depth_metric must be one of"),
    (dict(hidden=40, heads_per_group=3), ConfigError, "transformers cannot load"),  # biased: no HF export
    (dict(seq_len=1), ValueError, "seq_len"),
])
def test_bad_specs_refused_before_work(tiny, options, error, match):
    _, config, params, _ = tiny
    with pytest.raises(error, match=match):
        # No tokenizer and no text: a refusal must come from the size check, before calibration is attempted.
        prune.prune_from_spec(config, params, None, PruneSpec(**options), None)


def test_keep_along_axis_refusals(tiny):
    _, config, params, _ = tiny
    with pytest.raises(ValueError, match="duplicates"):
        prune.prune_hidden(config, params, [0, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        prune.prune_hidden(config, params, [0, 64])
    with pytest.raises(ValueError, match=r"shape \(3, 'n'\)"):
        prune.keep_along_axis(config, params, "mlp", np.arange(4)[None].repeat(2, 0), ("layer",))
    with pytest.raises(ConfigError, match="zero"):
        prune.prune_hidden(config, params, np.zeros(0, int))
    with pytest.raises(ConfigError, match="head_dim"):
        prune.keep_along_axis(config, params, "head_dim", [0, 1])
    with pytest.raises(ValueError, match="needs calibration"):
        prune.prune_from_spec(config, params, None, PruneSpec(ffn=10), None)


def test_spec_from_dict():
    spec = PruneSpec.from_dict({"heads-per-group": 2, "layers": [3, 1], "batch_agg": "mean"})
    assert spec.heads_per_group == 2 and spec.layers == (3, 1) and spec.batch_agg == "mean"
    with pytest.raises(ValueError, match="unknown prune option.*hiddn"):
        PruneSpec.from_dict({"hiddn": 3})


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny HF directory with a tokenizer, and a jsonl calibration file."""
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    hf = tiny_hf_model(seed=7, vocab_size=len(tok))
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog pruning heads neurons channels teacher student".split()
    lines = [json.dumps({"text": " ".join(rng.choice(words, 30))}) for _ in range(20)]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run_cli(*args):
    return prune_cli.main([str(a) for a in args])


def test_cli_end_to_end(cli_model, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cli_model / "out"
    rc = run_cli("--model", cli_model / "model", "--calib", cli_model / "calib.jsonl", "--out", out,
                 "--hidden", 48, "--ffn", 64, "--heads-per-group", 2, "--drop-layers", 1, "--depth-metric", "ppl",
                 "--calib-samples", 6, "--seq-len", 16, "--batch-size", 4)
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "prune_report.json").read_text())
    scores = np.load(out / "importance.npz")
    assert {k: scores[k].shape for k in scores.files} == {"heads": (3, 8), "neurons": (3, 96),
                                                          "channels": (64,), "layers": (3,)}
    kept = report["kept"]
    assert len(kept["hidden"]) == 48 and np.shape(kept["ffn"]) == (3, 64) and np.shape(kept["heads"]) == (3, 4)
    assert kept["dropped_layers"] == [int(np.argmin(scores["layers"]))] and len(kept["layers"]) == 2
    # Kept heads are per group: two of heads 0..3 and two of 4..7 in every layer.
    assert all(sum(h < 4 for h in row) == 2 for row in kept["heads"])
    after = report["config_after"]
    assert (after["hidden_size"], after["intermediate_size"], after["num_attention_heads"],
            after["num_hidden_layers"]) == (48, 64, 4, 2)
    m = load_model(out)
    assert report["params_after"] == M.count_params(m.config) < report["params_before"]
    assert report["calibration"] == {"windows": 6, "seq_len": 16, "tokens": 96, "requested_windows": 6}
    assert report["options"]["depth_metric"] == "ppl" and report["timings"]["calibration_tokens_per_s"] > 0
    np.testing.assert_array_equal(scores["channels"] >= np.sort(scores["channels"])[-48],
                                  np.isin(np.arange(64), kept["hidden"]))
    # The output carries a model card: the architecture before → after, and what decided the pruning.
    card = (out / "README.md").read_text()
    assert "| Hidden size | 64 | **48** |" in card and "| Layers | 3 | **2** |" in card
    assert "### Pruning" in card and f"Dropped layers: {kept['dropped_layers'][0]}" in card
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.asarray(AutoTokenizer.from_pretrained(out)("the quick brown fox")["input_ids"])[None]
    np.testing.assert_allclose(torch_logits(loaded, tokens), logits(m.config, m.params, tokens), atol=1e-4)


def test_cli_yaml_config_and_overrides(cli_model, tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("# a recipe\nffn: 32\nimportance: magnitude\nlayers: [0]\nhidden: 40\n")
    out = tmp_path / "out"
    rc = run_cli("--config", cfg, "--model", cli_model / "model", "--out", out, "--hidden", 56)
    assert rc == 0  # no --calib: magnitude ranking and an explicit layer list need no calibration
    report = json.loads((out / "prune_report.json").read_text())
    assert report["config_after"]["hidden_size"] == 56 and report["config_after"]["intermediate_size"] == 32
    assert report["kept"]["dropped_layers"] == [0] and report["calibration"] is None
    assert set(np.load(out / "importance.npz").files) == {"heads", "neurons", "channels"}  # layers not ranked


def test_cli_error_exits_leave_nothing(cli_model, tmp_path, capsys):
    base = ["--model", cli_model / "model", "--calib", cli_model / "calib.jsonl"]
    out = tmp_path / "out"
    assert run_cli(*base, "--out", out, "--hidden", 100) == 2
    assert "hidden=100 exceeds" in capsys.readouterr().err
    assert run_cli("--model", cli_model / "model", "--calib", tmp_path / "nope.txt", "--out", out, "--ffn", 8) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert run_cli(*base, "--out", out, "--ffn", 8, "--seq-len", 100000) == 2  # calibration text too short
    assert "fewer than one window" in capsys.readouterr().err
    assert run_cli(*base, "--out", out, "--ffn", 8, "--config", tmp_path / "missing.yaml") == 2
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no stray temporary directory

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(*base, "--out", out, "--ffn", 8, "--importance", "random") == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a directory we wrote (or an empty one): never the user's files.
    assert run_cli(*base, "--out", out, "--ffn", 8, "--importance", "random", "--overwrite") == 2
    assert "was not written by minitron_jax" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli(*base, "--out", out, "--ffn", 8, "--importance", "random", "--overwrite") == 0
    assert run_cli(*base, "--out", out, "--ffn", 16, "--importance", "random", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An output inside the input model would be written into it: refused.
    assert run_cli(*base, "--out", cli_model / "model" / "pruned", "--ffn", 8, "--importance", "random") == 2
    assert "lies inside the source" in capsys.readouterr().err and not (cli_model / "model" / "pruned").exists()


def test_cli_module_entry_point(cli_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minitron_jax.prune", "--model", str(cli_model / "model"),
                           "--out", str(tmp_path / "o"), "--heads", "3", "--importance", "random"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not divisible across the 2 KV groups" in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------------------------
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128)
NEMO_12B = dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_layers=40, num_heads=32,
                num_kv_heads=8, head_dim=128)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


@pytest.mark.parametrize("name,base,params_after", [
    ("prune_llama31_8b_width", LLAMA31_8B, 4.51e9), ("prune_llama31_8b_depth", LLAMA31_8B, 4.54e9),
    ("prune_mistral_nemo_12b_width", NEMO_12B, 8.41e9), ("prune_smollm2_135m_width", SMOLLM2_135M, 90.0e6),
    ("prune_smollm2_135m_depth", SMOLLM2_135M, 92.0e6),
])
def test_recipes_build_the_sizes_they_claim(name, base, params_after):
    from pathlib import Path

    import yaml

    from minitron_jax.config import LlamaConfig

    text = (Path(__file__).parents[1] / "configs" / f"{name}.yaml").read_text()
    assert text.startswith("# Reproduces") or text.startswith("# Demo")  # the header says what it is
    spec = PruneSpec.from_dict(yaml.safe_load(text))
    config = LlamaConfig(**base)
    check_spec(config, spec)
    assert M.count_params(target_config(config, spec)) == pytest.approx(params_after, rel=2e-3)
