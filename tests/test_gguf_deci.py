"""GGUF in llama.cpp's ``deci`` architecture (heterogeneous / Nemotron-NAS models), both directions.

A small random :class:`~minitron_jax.hetero.HeteroConfig` model with every block kind llama.cpp runs (fewer KV
heads, no attention, linear attention, varying FFN widths) is exported, read back by our reader (bit-exact in F32,
config equal) and scored by llama.cpp itself (``llama_cpp_runtime``) against our forward pass. Blocks llama.cpp
cannot run as we do are refused before anything is written, naming the layer and block.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from utils import tiny_tokenizer

from minitron_jax import hetero
from minitron_jax.blocks import BlockSpec
from minitron_jax.config import LlamaConfig, RopeScaling
from minitron_jax.convert import load_model
from minitron_jax.convert.gguf import GGUFError, read_gguf
from minitron_jax.convert.gguf_export import check_quant, deci_problems, save_gguf
from minitron_jax.evaluate.perplexity import perplexity
from minitron_jax.exitcodes import BadInputError, ExitCode, classify

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the DeciLM GGUF
# exports (~12 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("gguf_deci")

WINDOW = 64
# Untied, Llama-3.1 RoPE scaling (a rope_freqs tensor; head_dim 32 gives it enough blended frequencies to be read
# back), 4 heads × 32 ≠ hidden 64 as in a pruned student. torch_dtype is what our GGUF reader reports, so the
# config read back can equal this one.
BASE = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=4,
                   head_dim=32, rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=False,
                   rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 128),
                   extra=(("bos_token_id", 0), ("eos_token_id", 0), ("torch_dtype", "float32")))
# Every kind llama.cpp's deci graph runs as we do: GQA with 4/2/1 KV heads, attention removed, linear attention,
# MLP widths 256/512/768 (layers 0 and 1 repeat as a two-layer segment at the end).
RUNNABLE = "gqa4/mlp256,gqa2/mlp512,none/mlp256,linear/mlp768,gqa1/mlp256,gqa2/mlp512,gqa2/mlp512"


def _blocks(text: str) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec.parse(t) for t in text.split(","))


def _model(text: str, seed: int = 0, base: LlamaConfig = BASE):
    hcfg = hetero.HeteroConfig(base, _blocks(text))
    # std 0.1: large enough that every block matters, small enough that 7 layers keep the logits moderate.
    return hcfg, jax.tree.map(np.asarray, hetero.init_params(hcfg, jax.random.key(seed), std=0.1))


def _leaves_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=jax.tree_util.keystr(path))


def _fields(path, keys):
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: fields[k].contents() for k in keys if k in fields}


@pytest.fixture(scope="module")
def llama_cpp():
    from llama_cpp_runtime import UNAVAILABLE, load_runtime

    rt = load_runtime()
    if rt is None:
        pytest.skip(f"llama.cpp runtime unavailable: {UNAVAILABLE}")
    return rt


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(300)


@pytest.fixture(scope="module")
def model():
    return _model(RUNNABLE)


@pytest.fixture(scope="module")
def exports(model, tok, tmp_path_factory):
    """The model exported as f32, f16 and q8_0: {quant: (path, summary)}."""
    hcfg, params = model
    out = tmp_path_factory.mktemp("deci_exports")
    return {q: (out / f"deci.{q}.gguf", save_gguf(out / f"deci.{q}.gguf", hcfg, params, tokenizer=tok, quant=q))
            for q in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(1).integers(0, 300, size=(2, WINDOW)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Back through our own reader


def test_f32_export_reads_back_bit_exact(model, exports):
    hcfg, params = model
    path, summary = exports["f32"]
    meta = _fields(path, ["general.architecture", "deci.attention.head_count", "deci.attention.head_count_kv",
                          "deci.feed_forward_length", "deci.attention.key_length", "deci.block_count"])
    assert meta == {"general.architecture": "deci", "deci.block_count": 7, "deci.attention.key_length": 32,
                    "deci.attention.head_count": [4, 4, 0, 4, 4, 4, 4],  # 0: attention removed
                    "deci.attention.head_count_kv": [4, 2, 0, 0, 1, 2, 2],  # 0 under 4 query heads: linear
                    "deci.feed_forward_length": [256, 512, 256, 768, 256, 512, 512]}
    gg = read_gguf(path)
    assert gg.hf_config["architectures"] == ["DeciLMForCausalLM"]
    assert gg.hf_config["block_configs"][3]["attention"] == {"n_heads_in_group": None, "no_op": False,
                                                             "replace_with_linear": True}
    # Each layer holds only its block's tensors: the linear attention is attn_output [D, D], no q/k/v; the removed
    # attention has no norm either.
    names = {gg.raw_tensor(n).gguf_name: gg.tensor_shapes[n] for n in gg.tensor_names}
    assert names["blk.3.attn_output.weight"] == (64, 64) and "blk.3.attn_q.weight" not in names
    assert not any(n.startswith("blk.2.attn") for n in names)
    assert gg.raw_tensor("model.layers.3.self_attn.linear_attn.weight").gguf_name == "blk.3.attn_output.weight"
    assert summary["tensor_types"] == {"F32": len(names) + 1}  # + rope_freqs
    assert summary["params"] == hetero.count_params(hcfg)

    back = load_model(path)
    assert back.config == hcfg
    _leaves_equal(params, back.params)
    text = "the quick brown fox 123"
    assert back.tokenizer(text)["input_ids"] == tiny_tokenizer(300)(text)["input_ids"]


def test_removed_layers_are_left_out_of_the_file(tok, tmp_path):
    """An attention-free, FFN-free layer (DeciLM's dummy layer, none/none) is the identity: the file leaves it out
    (old llama.cpp builds cannot load an FFN-free layer, and an empty last layer would skip llama.cpp's output-row
    selection), and reads back as the same function without it, every kept tensor bit-exact. A tied head and no
    RoPE scaling this time."""
    base = BASE.replace(tie_word_embeddings=True, rope_scaling=None)
    hcfg, params = _model("none/none,gqa2/mlp256,none/none,none/none,linear/mlp512,none/none", seed=1, base=base)
    path = tmp_path / "dummy.gguf"
    summary = save_gguf(path, hcfg, params, tokenizer=tok, quant="f32")
    meta = _fields(path, ["deci.block_count", "deci.attention.head_count", "deci.feed_forward_length"])
    assert meta == {"deci.block_count": 2, "deci.attention.head_count": [4, 4], "deci.feed_forward_length": [256, 512]}
    gg = read_gguf(path)
    assert "lm_head.weight" not in gg.tensor_names
    assert summary["tensor_types"] == {"F32": len(gg.tensor_names)}
    back = load_model(path, with_tokenizer=False)
    kept, kept_params = hetero.without_identity_layers(hcfg, params)
    assert back.config == kept and [b.describe() for b in kept.blocks] == ["gqa2/mlp256", "linear/mlp512"]
    _leaves_equal(kept_params, back.params)
    windows = np.random.default_rng(0).integers(0, base.vocab_size, (2, 16), dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(hetero.forward(hcfg, params, windows)),
                                  np.asarray(hetero.forward(back.config, back.params, windows)))
    with pytest.raises(BadInputError, match="every layer is removed"):
        save_gguf(tmp_path / "empty.gguf", *_without_layers(hcfg, params), tokenizer=tok, quant="f32")
    assert not (tmp_path / "empty.gguf").exists()


def test_per_layer_arrays_longer_than_64_layers(tok, tmp_path):
    """The reader skips long metadata arrays (the vocabulary) but keeps the architecture's per-layer ones: a
    70-layer model (Nemotron Ultra has 162) reads back with every layer's block."""
    hcfg, params = _model(",".join(["gqa1/mlp256"] * 69 + ["linear/mlp512"]), seed=3)
    path = tmp_path / "deep.gguf"
    save_gguf(path, hcfg, params, tokenizer=tok, quant="f16")
    back = load_model(path, with_tokenizer=False)
    assert back.config == hcfg and back.config.blocks[-1].describe() == "linear/mlp512"


@pytest.mark.parametrize("quant,steps", [("f16", None), ("q8_0", 127)])
def test_quantized_export_reads_back_within_bound(model, exports, quant, steps):
    """Norms stay F32 (exact); f16 within half an f16 ulp; Q8_0 within a block's amax/127 step (+ its f16 scale)."""
    hcfg, params = model
    path, summary = exports[quant]
    back = load_model(path, with_tokenizer=False)
    assert back.config == hcfg
    types = set(summary["tensor_types"])
    assert types == {"F32", quant.upper()}
    for (kp, w), got in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(back.params)):
        w, got, name = np.asarray(w), np.asarray(got), jax.tree_util.keystr(kp)
        err = np.abs(got - w)
        if "norm" in name:
            assert err.max() == 0, name
        elif steps is None:
            assert (err <= np.abs(w) * 2**-11 + 2**-24).all(), name
        else:
            # Blocks run along the HF input axis, which our layouts do not keep contiguous: bound by the tensor's
            # largest block amax instead (still catches a wrong layout or a missed permutation by orders of size).
            assert err.max() <= np.abs(w).max() / steps * (0.5 + steps * 2**-11) * (1 + 1e-6), name
            assert err.max() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself


@pytest.mark.parametrize("quant,rtol", [("f32", 1e-3), ("f16", 1e-3), ("q8_0", 0.05)])
def test_llama_cpp_perplexity_equals_ours(llama_cpp, model, exports, windows, quant, rtol):
    """llama.cpp's perplexity on the deci file equals ours (hetero forward) on the weights the file holds."""
    hcfg, params = model
    path, _ = exports[quant]
    if quant != "f32":
        params = load_model(path, with_tokenizer=False).params
    ours = perplexity(hcfg, params, windows, batch_size=2)
    with llama_cpp.load(path, n_ctx=WINDOW) as lm:
        theirs = lm.perplexity(windows)
        assert lm.tokenize("the quick brown fox") == tiny_tokenizer(300)("the quick brown fox")["input_ids"]
    assert abs(theirs - ours) / ours < rtol, (quant, theirs, ours)
    # Not vacuous: the layers do change the prediction (a model of embeddings alone scores differently).
    assert abs(ours - perplexity(*_without_layers(hcfg, params), windows, batch_size=2)) / ours > 0.01


def _without_layers(hcfg, params):
    """The same model with every layer's block removed (none/none): only embedding, final norm and head."""
    empty = hetero.HeteroConfig(hcfg.base, _blocks(",".join(["none/none"] * hcfg.num_layers)))
    return empty, {**{k: v for k, v in params.items() if k != "segments"}, "segments": [{}]}


def test_llama_cpp_on_removed_layers(llama_cpp, tok, windows, tmp_path):
    """Removed layers (none/none, also the last): left out of the file, so even the llama.cpp build llama-cpp-cffi
    0.4.42 ships (which requires every layer's FFN tensors) loads it, and its perplexity is ours."""
    hcfg, params = _model("gqa2/mlp256,none/none,linear/mlp512,none/none", seed=2)
    path = tmp_path / "dummy.gguf"
    save_gguf(path, hcfg, params, tokenizer=tok, quant="f32")
    lm = llama_cpp.load(path, n_ctx=WINDOW)
    with lm:
        theirs = lm.perplexity(windows)
    ours = perplexity(hcfg, params, windows, batch_size=2)
    assert abs(theirs - ours) / ours < 1e-3, (theirs, ours)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line naming the layer and block, exit code 2, nothing written


@pytest.mark.parametrize("blocks,match", [
    ("gqa2/mlp256,gqa2/linear", r"layer 1 \(gqa2/linear\): llama\.cpp's deci architecture has no linear FFN"),
    ("gqa2/none,gqa2/mlp256", r"layer 0 \(gqa2/none\): llama\.cpp's deci graph drops the attention output"),
    ("linear/none,gqa2/mlp256", r"layer 0 \(linear/none\): llama\.cpp's deci graph drops"),
    ("gqa2/mlp256,gqa2/mlp320", r"layer 1 \(gqa2/mlp320\): FFN width 320 is not a multiple of 256"),
])
def test_blocks_llama_cpp_cannot_run_are_refused(tok, tmp_path, blocks, match):
    hcfg, params = _model(blocks)
    assert deci_problems(hcfg)
    with pytest.raises(BadInputError, match=match) as info:
        save_gguf(tmp_path / "x.gguf", hcfg, params, tokenizer=tok, quant="f32")
    code, msg = classify(info.value)
    assert code == ExitCode.BAD_INPUT and "\n" not in msg
    with pytest.raises(BadInputError, match=match):
        check_quant(hcfg, "f16")  # what the pipeline asks before a long run
    assert list(tmp_path.iterdir()) == []


def test_every_problem_layer_is_counted(tok, tmp_path):
    hcfg, params = _model("gqa2/linear,gqa2/mlp256,gqa4/none,gqa2/mlp256")
    assert [p.split(":")[0] for p in deci_problems(hcfg)] == ["layer 0 (gqa2/linear)", "layer 2 (gqa4/none)"]
    with pytest.raises(BadInputError, match=r"layer 0 \(gqa2/linear\).*\(and 1 more layers\)"):
        save_gguf(tmp_path / "x.gguf", hcfg, params, tokenizer=tok, quant="f32")


def test_quant_block_must_fit_every_tensor(tok, tmp_path):
    """Hidden 48 is no multiple of Q8_0's 32-element block: refused naming the first tensor; f16 has no blocks."""
    base = BASE.replace(hidden_size=48, num_heads=3, num_kv_heads=3)
    hcfg, params = _model("gqa3/mlp256,linear/mlp256", base=base)
    with pytest.raises(BadInputError, match=r"tensor token_embd\.weight has shape \[320, 48\] .* Q8_0 block of 32"):
        save_gguf(tmp_path / "x.gguf", hcfg, params, tokenizer=tok, quant="q8_0")
    assert list(tmp_path.iterdir()) == []
    save_gguf(tmp_path / "y.gguf", hcfg, params, tokenizer=tok, quant="f16")
    assert load_model(tmp_path / "y.gguf", with_tokenizer=False).config == hcfg


def test_reader_refuses_what_deci_layout_cannot_express(tok, tmp_path, monkeypatch):
    """A deci file from elsewhere whose FFN width DeciLM's ffn_mult cannot give back, or whose per-layer array does
    not match the block count: GGUFError naming the file and the layer or key."""
    from minitron_jax.convert import gguf_export

    hcfg, params = _model("gqa2/mlp256,gqa2/mlp320")
    monkeypatch.setattr(gguf_export, "deci_problems", lambda h: [])  # write what we would refuse
    path = tmp_path / "w.gguf"
    save_gguf(path, hcfg, params, tokenizer=tok, quant="f32")
    with pytest.raises(GGUFError, match=r"w\.gguf: layer 1 \(gqa2/mlp320\): FFN width 320 cannot be expressed"):
        read_gguf(path)

    from minitron_jax.convert.gguf_config import build_hf_config

    meta = {"general.architecture": "deci", "deci.embedding_length": 64, "deci.block_count": 3,
            "deci.attention.head_count": [4, 4], "deci.attention.head_count_kv": 2,
            "deci.feed_forward_length": 256}
    tensors = {"token_embd.weight": np.zeros((64, 320))}
    with pytest.raises(GGUFError, match=r"'deci\.attention\.head_count' has 2 entries for 3 layers"):
        build_hf_config(meta, tensors, None, np.dtype(np.float32), tmp_path / "m.gguf")
    meta["deci.attention.head_count"] = [4, 0, 4]
    meta["deci.attention.head_count_kv"] = [2, 1, 3]
    with pytest.raises(GGUFError, match=r"layer 1 has 1 KV heads but no query heads"):
        build_hf_config(meta, tensors, None, np.dtype(np.float32), tmp_path / "m.gguf")
    meta["deci.attention.head_count_kv"] = [2, 0, 3]
    with pytest.raises(GGUFError, match=r"layer 2: 3 KV heads do not divide the 4 query heads"):
        build_hf_config(meta, tensors, None, np.dtype(np.float32), tmp_path / "m.gguf")
    meta["deci.attention.head_count"] = [4, 0, 2]
    with pytest.raises(GGUFError, match=r"head_count varies among attention layers \(\[2, 4\]\)"):
        build_hf_config(meta, tensors, None, np.dtype(np.float32), tmp_path / "m.gguf")
