"""Heterogeneous models ↔ HF directories in the Nemotron-NAS ("DeciLM") layout (``convert.deci_hf``): bit-exact round
trips, the shipped modeling file in transformers against ``hetero.forward``, the tensor names vLLM's loader
expects, the convert CLI, and every bad input's one-line error."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from minitron_jax import hetero as X
from minitron_jax import model as M
from minitron_jax.blocks import BlockSpec
from minitron_jax.config import ConfigError, LlamaConfig, RopeScaling
from minitron_jax.convert import load_model, save_hf
from minitron_jax.convert import orbax as checkpoint
from minitron_jax.convert.deci_hf import (
    MODELING_FILES,
    hf_tensors,
    load_deci_hf,
    modeling_sources,
    params_from_hf_tensors,
    save_deci_hf,
)
from minitron_jax.convert.hf import ConversionError, SafetensorsDir
from minitron_jax.exitcodes import BadInputError, NonFiniteError

BASE = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=1, num_layers=1, num_heads=8, num_kv_heads=8,
                   head_dim=8, rope_theta=10000.0)
# Positions past original_max_position_embeddings, so the llama3 rescaling changes the logits.
LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=32)
# All six kinds: GQA with fewer KV heads (a two-layer segment) and with all of them, linear and no-op attention;
# MLPs of two widths (multiples of 256, which DeciLM's ffn_mult can express), linear and no-op FFNs.
BLOCKS = ("gqa2/mlp256", "gqa2/mlp256", "gqa8/mlp512", "linear/linear", "none/mlp256", "gqa4/none", "none/none")
CASES = {"untied_llama3": dict(rope_scaling=LLAMA3), "tied": dict(tie_word_embeddings=True),
         "biases": dict(attention_bias=True, mlp_bias=True, rope_scaling=RopeScaling("linear", factor=2.0))}


def _model(case: str, seed: int = 0, blocks=BLOCKS):
    hcfg = X.HeteroConfig(BASE.replace(**CASES[case]), tuple(BlockSpec.parse(b) for b in blocks))
    params = jax.tree.map(np.asarray, X.init_params(hcfg, jax.random.key(seed), std=0.1))
    rng = np.random.default_rng(seed)

    def perturb(tree):  # norms start at 1 and biases at 0: give them values so a swapped or dropped one shows
        return {k: (v + rng.normal(0, 0.2, v.shape).astype(v.dtype) if "norm" in k or k.endswith("bias") else v)
                for k, v in tree.items()}

    params = {**perturb({k: v for k, v in params.items() if k != "segments"}),
              "segments": [perturb(seg) for seg in params["segments"]]}
    return hcfg, params


def _tokens(shape=(2, 40), seed=1):
    return np.random.default_rng(seed).integers(0, BASE.vocab_size, shape)


def _tensors(path):
    st = SafetensorsDir(path)
    return {k: np.asarray(st.get(k)) for k in st.where}


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_bit_exact(tmp_path, case):
    hcfg, params = _model(case)
    out = save_deci_hf(tmp_path / "hf", hcfg, params)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                               "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert cfg["num_key_value_heads"] is None and cfg["intermediate_size"] is None
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [4, 4, 1, None, None, 2, None]
    assert all((out / f).is_file() for f in MODELING_FILES)
    assert (out / "generation_config.json").is_file()

    back_cfg, back = load_deci_hf(out)
    assert back_cfg.blocks == hcfg.blocks and back_cfg.base.replace(extra=()) == hcfg.base
    _leaves_equal(params, back)
    # ...and the same through load_model (which dispatches on the config), and back out again byte for byte.
    m = load_model(out, with_tokenizer=False)
    _leaves_equal(params, m.params)
    save_hf(tmp_path / "again", m.config, m.params)  # save_hf sends a HeteroConfig to save_deci_hf
    a, b = _tensors(out), _tensors(tmp_path / "again")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_bf16_cast_on_save_and_tensor_orientation(tmp_path):
    import ml_dtypes

    hcfg, params = _model("untied_llama3")
    save_deci_hf(tmp_path / "hf", hcfg, params, dtype=ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    t = _tensors(tmp_path / "hf")
    # torch Linear weights are [out, in]: ours [in, out] transposed (layer 3 is linear/linear, segment 2).
    lin = params["segments"][2]["attn_linear"][0]
    assert t["model.layers.3.self_attn.linear_attn.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(t["model.layers.3.self_attn.linear_attn.weight"],
                                  lin.T.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(t["model.layers.3.mlp.linear_mlp.weight"],
                                  params["segments"][2]["ffn_linear"][0].T.astype(ml_dtypes.bfloat16))
    assert t["model.layers.5.self_attn.k_proj.weight"].shape == (4 * 8, 64)  # gqa4: 4 KV heads of 8


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_logits_and_generate_match(tmp_path, case):
    import torch
    from transformers import AutoModelForCausalLM

    hcfg, params = _model(case)
    save_deci_hf(tmp_path / "hf", hcfg, params)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                    output_loading_info=True)
    assert type(hf).__name__ == "DeciLMForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = _tokens()
    ours = np.asarray(X.forward(hcfg, params, tokens))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    if hcfg.base.rope_scaling is not None:  # the rescaling is really applied on both sides, not ignored on both
        plain = X.HeteroConfig(hcfg.base.replace(rope_scaling=None), hcfg.blocks)
        assert np.abs(np.asarray(X.forward(plain, params, tokens)) - ours).max() > 1e-2

    # Greedy generation (the modeling file runs without a KV cache) equals our own greedy loop.
    prompt = tokens[:1, :6]
    with torch.no_grad():
        generated = hf.generate(torch.as_tensor(prompt), max_new_tokens=5, do_sample=False).numpy()
    # Our forward is causal: one forward of what transformers generated gives each greedy step's logits.
    np.testing.assert_array_equal(generated[:, :6], prompt)
    greedy = np.asarray(X.forward(hcfg, params, generated[:, :-1]))[:, 5:].argmax(-1)
    np.testing.assert_array_equal(generated[:, 6:], greedy)

    # Saved again by transformers (which rewrites RoPE as rope_parameters), it loads back into ours unchanged.
    hf.save_pretrained(tmp_path / "resaved")
    back = load_model(tmp_path / "resaved", with_tokenizer=False)
    assert back.config.blocks == hcfg.blocks and back.config.base.rope_scaling == hcfg.base.rope_scaling
    _leaves_equal(params, back.params)

    # Left padding: the padded row's real tokens get the same logits as the row alone.
    padded = np.concatenate([np.zeros((1, 3), np.int64), tokens[:1, :10]], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones((1, 10), np.int64)], axis=1)
    with torch.no_grad():
        pad_logits = hf(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(pad_logits[:, 3:], ours[:1, :10], atol=1e-4, rtol=0)


# What vLLM's nemotron_nas loader expects (DeciLMDecoderLayer builds input_layernorm + self_attn only for an
# attention that is not no_op, post_attention_layernorm + mlp only for an FFN that is not no_op, with Llama's
# q/k/v/o and gate/up/down names, which it fuses into qkv_proj / gate_up_proj on load); lm_head only untied.
VLLM_BLOCKS = ("gqa2/mlp256", "gqa8/none", "none/mlp512", "none/none")
VLLM_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.2.post_attention_layernorm.weight",
    "model.layers.2.mlp.gate_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]
# The linear replacements, as NVIDIA's Nemotron-NAS modeling code names them (vLLM does not build these yet).
LINEAR_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.linear_attn.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.linear_mlp.weight",
    "model.norm.weight",
]


def test_tensor_names_are_the_nemotron_nas_names(tmp_path):
    hcfg, params = _model("untied_llama3", blocks=VLLM_BLOCKS)
    assert [name for name, _ in hf_tensors(hcfg, params)] == VLLM_NAMES
    save_deci_hf(tmp_path / "hf", hcfg, params)
    t = _tensors(tmp_path / "hf")
    assert sorted(t) == sorted(VLLM_NAMES)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 64)
    assert t["model.layers.2.mlp.gate_proj.weight"].shape == (512, 64)
    tied, tparams = _model("tied", blocks=("linear/linear",))
    assert [name for name, _ in hf_tensors(tied, tparams)] == LINEAR_NAMES


def test_uniform_model_still_exports_as_llama(tmp_path):
    config = BASE.replace(num_layers=2, num_kv_heads=4, intermediate_size=96)
    params = jax.tree.map(np.asarray, M.init_params(config, jax.random.key(0)))
    save_hf(tmp_path / "hf", config, params)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "block_configs" not in cfg and "auto_map" not in cfg
    assert not any((tmp_path / "hf" / f).exists() for f in MODELING_FILES)


def test_modeling_files_are_package_data():
    sources = modeling_sources()
    assert sorted(sources) == sorted(MODELING_FILES)
    assert "class DeciLMForCausalLM" in sources["modeling_decilm.py"]
    assert "model_type = \"nemotron-nas\"" in sources["configuration_decilm.py"]
    for text in sources.values():  # self-contained: nothing of ours imported where the directory is loaded
        assert "minitron_jax" not in "\n".join(l for l in text.splitlines() if l.startswith(("import", "from")))


def test_bad_inputs_give_one_line_errors(tmp_path):
    hcfg, params = _model("untied_llama3")
    out = save_deci_hf(tmp_path / "hf", hcfg, params)
    cfg = json.loads((out / "config.json").read_text())

    # An unsupported block key: ConfigError naming config.json, the layer and the key.
    bad = json.loads(json.dumps(cfg))
    bad["block_configs"][2]["attention"]["window_length"] = 128
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"config\.json: block_configs\[2\]\.attention\.window_length") as e:
        load_model(out, with_tokenizer=False)
    assert "\n" not in str(e.value)

    # A key of a newer Nemotron-NAS block that is set and that we do not implement: refused, not ignored.
    bad = json.loads(json.dumps(cfg))
    bad["block_configs"][1]["ffn"]["moe"] = {"num_local_experts": 8}
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"config\.json: block_configs\[1\]\.ffn\.moe = .* is not supported"):
        load_model(out, with_tokenizer=False)
    # ...while keys that are present but off, or state what we run anyway, change nothing.
    bad = json.loads(json.dumps(cfg))
    bad["block_configs"][0]["attention"].update(unshifted_sink=False, num_sink_tokens=None)
    bad["block_configs"][0]["ffn"].update(hidden_act="silu", gated=True)
    (out / "config.json").write_text(json.dumps(bad))
    _leaves_equal(params, load_model(out, with_tokenizer=False).params)

    # A width the safetensors disagree with: the tensor, both shapes.
    bad = json.loads(json.dumps(cfg))
    bad["block_configs"][2]["ffn"]["ffn_mult"] = 6.0  # 256 wide instead of 512
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.gate_proj\.weight: checkpoint shape "
                                              r"\(512, 64\).*expects \(256, 64\)") as e:
        load_model(out, with_tokenizer=False)
    assert str(out) in str(e.value) and "\n" not in str(e.value)

    # A tensor the config needs and the checkpoint lacks (layer 6 becomes a linear attention).
    bad = json.loads(json.dumps(cfg))
    bad["block_configs"][6]["attention"] = {"no_op": False, "replace_with_linear": True, "n_heads_in_group": None}
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.6\.input_layernorm\.weight is missing") as e:
        load_model(out, with_tokenizer=False)
    assert str(out) in str(e.value)

    # The GGUF / generic entry point gets the same check from any tensor source.
    tensors = dict(hf_tensors(hcfg, params))
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8]
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint shape "
                                              r"\(8, 64\)"):
        params_from_hf_tensors(hcfg, tensors.__getitem__)

    # A width DeciLM's ffn_mult cannot express is refused, naming the layer, before anything is written.
    odd, odd_params = _model("tied", blocks=("gqa2/mlp256", "gqa2/mlp300"))
    with pytest.raises(BadInputError, match=r"layer 1 has FFN width 300.*multiples of 256"):
        save_hf(tmp_path / "odd", odd, odd_params)
    assert not (tmp_path / "odd").exists()

    # NaN params are refused before anything is written.
    poisoned = {**params, "segments": [dict(s) for s in params["segments"]]}
    poisoned["segments"][2]["ffn_linear"] = poisoned["segments"][2]["ffn_linear"].copy()
    poisoned["segments"][2]["ffn_linear"][0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"segments\.2\.ffn_linear\[0\]"):
        save_deci_hf(tmp_path / "nan", hcfg, poisoned)
    assert not (tmp_path / "nan").exists()


def test_cli_converts_an_orbax_hetero_checkpoint_to_deci(tmp_path, capsys):
    from minitron_jax.cli.convert import main as convert_main

    hcfg, params = _model("tied")
    checkpoint.save_model(tmp_path / "ck", hcfg, params)
    assert convert_main([str(tmp_path / "ck"), str(tmp_path / "hf"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "orbax → hf" in printed and "linear/linear" in printed
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and "auto_map" in cfg
    assert all((tmp_path / "hf" / f).is_file() for f in MODELING_FILES)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "trust_remote_code=True" in card and "linear/linear" in card
    assert "| FFN size | 256–512 (per layer) |" in card and "| KV heads | 2–8 (per layer) |" in card
    _leaves_equal(params, load_model(tmp_path / "hf", with_tokenizer=False).params)
    # A bad destination is a one-line error with the bad-input exit code, nothing written.
    assert convert_main([str(tmp_path / "ck"), str(tmp_path / "hf"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_config_class_reads_as_vllm_reads_it(tmp_path):
    """vLLM loads config.json through our DeciLMConfig (trust_remote_code) and reads each block by attribute: the
    KV heads of the first attention layer, each layer's no_op flags, ``ffn_mult`` when ``hasattr`` finds it, and the
    model-wide ``hidden_act`` unless the block has its own."""
    from transformers import AutoConfig

    hcfg, params = _model("untied_llama3", blocks=VLLM_BLOCKS)
    save_deci_hf(tmp_path / "hf", hcfg, params)
    cfg = AutoConfig.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(cfg).__name__ == "DeciLMConfig" and cfg.model_type == "nemotron-nas"
    assert cfg.num_key_value_heads is None and cfg.intermediate_size is None
    first = next(b for b in cfg.block_configs if not b.attention.no_op)
    assert cfg.num_attention_heads // first.attention.n_heads_in_group == 2
    widths, kv = [], []
    for b in cfg.block_configs:
        assert not hasattr(b.ffn, "hidden_act")
        if not b.ffn.no_op:
            assert hasattr(b.ffn, "ffn_mult")
            m = int(2 * b.ffn.ffn_mult * cfg.hidden_size / 3)
            widths.append(m if m % 256 == 0 else m + 256 - m % 256)  # vLLM's _ffn_mult_to_intermediate_size
        if not b.attention.no_op:
            kv.append(cfg.num_attention_heads // b.attention.n_heads_in_group)
    assert widths == [256, 512] and kv == [2, 8]
    # Saved back by transformers, block_configs are plain dicts again, equal to ours.
    cfg.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["block_configs"] == json.loads((tmp_path / "hf" / "config.json").read_text())["block_configs"]
