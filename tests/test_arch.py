"""arch.py dispatches to model.py or hetero.py; HeteroConfig round-trips through a DeciLM config.json."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from minitron_jax import arch, hetero, model
from minitron_jax.blocks import BlockSpec
from minitron_jax.config import ConfigError, LlamaConfig

BASE = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=512, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=12, tie_word_embeddings=True)
BLOCKS = tuple(BlockSpec.parse(t) for t in ("gqa2/mlp512", "gqa1/mlp256", "linear/none", "none/linear"))


def test_deci_config_round_trip(tmp_path):
    hcfg = hetero.HeteroConfig(BASE, BLOCKS)
    hf = hcfg.to_hf()
    assert hf["architectures"] == ["DeciLMForCausalLM"] and hf["model_type"] == "nemotron-nas"
    assert hf["num_key_value_heads"] is None and hf["intermediate_size"] is None and hf["num_hidden_layers"] == 4
    assert hf["block_configs"][2]["attention"]["replace_with_linear"] and hf["block_configs"][3]["attention"]["no_op"]
    back = hetero.HeteroConfig.from_hf(json.loads(json.dumps(hf)))
    assert back.blocks == BLOCKS
    assert back.base.hidden_size == 48 and back.base.tie_word_embeddings and back.base.head_dim == 12
    assert "block_configs" not in back.base.extra_dict
    hcfg.to_json_file(tmp_path / "config.json")
    assert arch.config_from_json_file(tmp_path / "config.json") == back
    # A uniform config still loads as a LlamaConfig.
    BASE.to_json_file(tmp_path / "config.json")
    assert arch.config_from_json_file(tmp_path / "config.json") == BASE


@pytest.mark.parametrize("mutate, message", [
    (lambda hf: hf.update(block_configs=[]), "non-empty"),
    (lambda hf: hf.update(num_hidden_layers=7), "num_hidden_layers is 7"),
    (lambda hf: hf["block_configs"][1]["attention"].update(n_heads_in_group=3), "block_configs[1]"),
    (lambda hf: hf["block_configs"][0]["ffn"].update(sparsify=["x"]), "sparsify"),
    (lambda hf: hf["block_configs"][0].pop("ffn"), "block_configs[0] has no 'ffn'"),
])
def test_bad_deci_configs_are_refused_naming_the_key(tmp_path, mutate, message):
    hf = hetero.HeteroConfig(BASE, BLOCKS).to_hf()
    mutate(hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="config.json") as e:
        arch.config_from_json_file(tmp_path / "config.json")
    assert message in str(e.value)


def test_arch_dispatches_to_both_kinds():
    key = jax.random.PRNGKey(0)
    params = model.init_params(BASE, key)
    tokens = jax.random.randint(key, (2, 7), 0, BASE.vocab_size)
    assert arch.count_params(BASE) == model.count_params(BASE)
    np.testing.assert_array_equal(np.asarray(arch.forward(BASE, params, tokens)),
                                  np.asarray(model.forward(BASE, params, tokens)))
    hcfg, hparams = hetero.from_uniform(BASE, params)
    assert arch.count_params(hcfg) == model.count_params(BASE)
    h, collected, cache = arch.hidden_states(hcfg, hparams, tokens)
    assert collected is None and cache is None
    np.testing.assert_array_equal(np.asarray(arch.logits_from_hidden(hcfg, hparams, h)),
                                  np.asarray(model.forward(BASE, params, tokens)))
    arch.check_params(hcfg, hparams)
    with pytest.raises(ValueError, match="segments"):
        arch.check_params(hcfg, params)
    with pytest.raises(TypeError, match="not a model config"):
        arch.count_params({"hidden_size": 3})


def test_heterogeneous_model_round_trips_through_an_orbax_checkpoint(tmp_path):
    from minitron_jax.convert import load_model
    from minitron_jax.convert.orbax import save_model

    hcfg = hetero.HeteroConfig(BASE, BLOCKS)
    params = hetero.init_params(hcfg, jax.random.PRNGKey(1))
    save_model(tmp_path / "m", hcfg, params)
    loaded = load_model(tmp_path / "m", with_tokenizer=False)
    assert loaded.format == "orbax" and loaded.config == hcfg
    assert isinstance(loaded.params["segments"], list) and len(loaded.params["segments"]) == 4
    jax.tree.map(np.testing.assert_array_equal, params, loaded.params)


def test_tokenizer_of_a_deci_directory_loads_without_a_remote_code_prompt(tmp_path, monkeypatch, capfd):
    """A DeciLM config.json (auto_map) must not make AutoTokenizer ask about remote code: a script's stdin is
    closed, the prompt hits EOF and the load crashes (seen converting a DeciLM HF directory to GGUF)."""
    import io

    from utils import tiny_tokenizer

    from minitron_jax.convert import load_tokenizer, save_hf

    hcfg = hetero.HeteroConfig(BASE.replace(vocab_size=300), BLOCKS)
    tok = tiny_tokenizer()
    save_hf(tmp_path / "hf", hcfg, hetero.init_params(hcfg, jax.random.PRNGKey(0)), tokenizer=tok)
    # As a tokenizer built from a GGUF saves itself under transformers 5: a class name AutoTokenizer does not map,
    # so it looks at config.json.
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": "TokenizersBackend"}))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    capfd.readouterr()
    loaded = load_tokenizer(tmp_path / "hf")
    assert loaded("the quick brown fox").input_ids == tok("the quick brown fox").input_ids
    out, err = capfd.readouterr()
    assert "custom code" not in out + err and "nemotron-nas" not in out + err
