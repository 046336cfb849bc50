"""HF config.json in and out: both RoPE layouts, explicit head_dim, and clear refusals."""

import json

import pytest

from minitron_jax.config import ConfigError, LlamaConfig, RopeScaling

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}


def test_llama31_classic_layout():
    c = LlamaConfig.from_hf(LLAMA31_8B)
    assert (c.num_layers, c.hidden_size, c.head_dim, c.q_per_kv) == (32, 4096, 128, 4)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.rope_theta == 500000.0
    assert c.extra_dict["eos_token_id"] == [128001, 128008, 128009]


def test_rope_parameters_layout_equals_classic():
    new = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert LlamaConfig.from_hf(new) == LlamaConfig.from_hf(LLAMA31_8B)


def test_default_rope_parameters_mean_no_scaling():
    hf = {**LLAMA31_8B, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    c = LlamaConfig.from_hf(hf)
    assert c.rope_scaling is None and c.rope_theta == 1e4


def test_round_trip_keeps_unknown_keys(tmp_path):
    c = LlamaConfig.from_hf(LLAMA31_8B)
    c.to_json_file(tmp_path / "config.json")
    back = LlamaConfig.from_json_file(tmp_path / "config.json")
    assert back == c
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["bos_token_id"] == 128000 and data["head_dim"] == 128


def test_mistral_nemo_explicit_head_dim():
    nemo = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 131072,
            "hidden_size": 5120, "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000.0, "sliding_window": None,
            "max_position_embeddings": 1024000}
    c = LlamaConfig.from_hf(nemo)
    assert c.head_dim == 128 and c.head_dim != c.hidden_size // c.num_heads
    assert c.to_hf()["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
    ({"model_type": "qwen2", "architectures": None}, "unsupported model_type"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing 'low_freq_factor'"),
    ({"sliding_window": 4096, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "sliding-window"),
    ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
])
def test_refusals(change, match):
    hf = {**LLAMA31_8B, **change}
    hf = {k: v for k, v in hf.items() if v is not None or k in ("sliding_window", "rope_scaling")}
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_hf(hf)


def test_missing_keys_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="missing required keys: hidden_size"):
        LlamaConfig.from_hf({k: v for k, v in LLAMA31_8B.items() if k != "hidden_size"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlamaConfig.from_json_file(tmp_path / "nope" / "config.json")


def test_config_is_hashable_for_jit_static_args():
    c = LlamaConfig.from_hf(LLAMA31_8B)
    assert hash(c) == hash(LlamaConfig.from_hf(LLAMA31_8B))
