"""HF ↔ params ↔ HF / Orbax, the convert CLI, and every bad input's error."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from utils import save_tiny_hf, tiny_hf_model, tiny_tokenizer, torch_logits

from minitron_jax import model as M
from minitron_jax.cli.convert import main as convert_main
from minitron_jax.config import ConfigError
from minitron_jax.convert import detect_format, load_model
from minitron_jax.convert import orbax as checkpoint
from minitron_jax.convert.hf import ConversionError, SafetensorsDir, load_hf_params, save_hf


def _tensors(path):
    st = SafetensorsDir(path)
    return {k: np.asarray(st.get(k)) for k in st.where}


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, head_dim=24),
                                       dict(attention_bias=True, mlp_bias=True)])
def test_hf_params_hf_bit_exact(tmp_path, overrides):
    src = save_tiny_hf(tmp_path / "src", **overrides)
    config, params = load_hf_params(src)
    save_hf(tmp_path / "dst", config, params)
    a, b = _tensors(src), _tensors(tmp_path / "dst")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_bf16_round_trip_bit_exact(tmp_path):
    hf = tiny_hf_model()
    hf.to(dtype=__import__("torch").bfloat16).save_pretrained(tmp_path / "src")
    config, params = load_hf_params(tmp_path / "src")
    assert params["embed"].dtype == ml_dtypes.bfloat16
    save_hf(tmp_path / "dst", config, params)
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "dst")
    for k in a:
        assert np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)), k
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_loads_in_transformers_with_sharding_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tiny_tokenizer()
    src = save_tiny_hf(tmp_path / "src", tokenizer=tok)
    m = load_model(src)
    assert m.format == "hf" and m.tokenizer is not None
    # Force several shards so the index path is exercised.
    save_hf(tmp_path / "out", m.config, m.params, tokenizer=m.tokenizer, max_shard_bytes=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 16))
    np.testing.assert_allclose(torch_logits(hf, tokens), np.asarray(M.forward(m.config, m.params, tokens)),
                               atol=1e-4)
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok2("the quick fox")["input_ids"] == tok("the quick fox")["input_ids"]
    # Sharded checkpoints load back through our reader too, bit-exactly.
    _, back = load_hf_params(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(back)):
        assert np.array_equal(a, b)


def test_export_of_unusual_shapes_loads_in_transformers(tmp_path):
    """A pruned-looking config (odd FFN, fewer heads per group, head_dim ≠ D/H) exports and matches."""
    from transformers import AutoModelForCausalLM

    from minitron_jax.config import LlamaConfig

    config = LlamaConfig(vocab_size=77, hidden_size=40, intermediate_size=52, num_layers=2, num_heads=6,
                         num_kv_heads=3, head_dim=12)
    params = jax.tree.map(np.asarray, M.init_params(config, jax.random.key(1), std=0.2))
    save_hf(tmp_path / "odd", config, params)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "odd")
    # 40 % 6 != 0: transformers' Llama config refuses that, so it is written as the identical windowless Mistral.
    assert type(hf).__name__ == "MistralForCausalLM"
    tokens = np.random.default_rng(1).integers(0, 77, (1, 12))
    np.testing.assert_allclose(torch_logits(hf, tokens), np.asarray(M.forward(config, params, tokens)), atol=1e-4)


def test_orbax_round_trip_and_format_detection(tmp_path):
    tok = tiny_tokenizer()
    src = save_tiny_hf(tmp_path / "src", tokenizer=tok)
    assert detect_format(src) == "hf"
    assert convert_main([str(src), str(tmp_path / "ck"), "--to", "orbax", "--quiet"]) == 0
    assert detect_format(tmp_path / "ck") == "orbax"
    m = load_model(tmp_path / "ck")
    assert m.tokenizer is not None
    _, ref = load_hf_params(src)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(m.params)):
        assert np.array_equal(a, b)
    # and back to HF, cast to bf16
    assert convert_main([str(tmp_path / "ck"), str(tmp_path / "hf16"), "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "hf16" / "tokenizer.json").is_file()


def test_export_is_atomic_and_refuses_existing(tmp_path):
    config, params = load_hf_params(save_tiny_hf(tmp_path / "src"))
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_hf(tmp_path / "dst", config, params)

    class Boom(Exception):
        pass

    def explode(name):
        if "layers.2" in name:
            raise Boom

    with pytest.raises(Boom):
        save_hf(tmp_path / "new", config, params, progress=explode)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")], "temp dir left behind"
    # --overwrite replaces the old directory whole.
    save_hf(tmp_path / "dst", config, params, overwrite=True)
    assert (tmp_path / "dst" / "model.safetensors").is_file()


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an HF model directory"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")

    src = save_tiny_hf(tmp_path / "src")
    # truncated safetensors
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        load_model(trunc)
    # garbage header
    (trunc / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ConversionError, match="corrupt safetensors header"):
        load_model(trunc)
    # no weights at all
    (trunc / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"no \*\.safetensors"):
        load_model(trunc)
    # unknown architecture
    cfg = json.loads((src / "config.json").read_text())
    (trunc / "model.safetensors").write_bytes(data)
    (trunc / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        load_model(trunc)
    # shape mismatch between config and weights
    (trunc / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ConversionError,
                       match=r"mlp.down_proj.weight: checkpoint shape \(64, 96\).*expects \(64, 100\)"):
        load_model(trunc)
    # missing tensor
    (trunc / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(ConversionError, match="model.layers.3.*missing"):
        load_model(trunc)


def test_cli_errors_exit_nonzero_without_output(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "minitron_jax.convert", str(tmp_path / "nope"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "out").exists()
    src = save_tiny_hf(tmp_path / "src")
    (tmp_path / "out").mkdir()
    assert convert_main([str(src), str(tmp_path / "out"), "--quiet"]) == 2


def test_orbax_restore_rejects_mismatched_config(tmp_path):
    config, params = load_hf_params(save_tiny_hf(tmp_path / "src"))
    checkpoint.save_model(tmp_path / "ck", config, params)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ValueError, match="stored with shape"):
        checkpoint.load_model(tmp_path / "ck")
