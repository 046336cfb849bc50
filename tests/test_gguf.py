"""GGUF → HF conversion: dequantization, q/k un-permutation, config, tokenizer.

Every check compares against something that does not share our code path:
- block types: a small per-block reference dequantizer written here from the ggml block layouts;
- K-quants: transformers' own torch dequantizer (``transformers.integrations.gguf.dequant``);
- q/k permutation: synthetic files written with llama.cpp's forward permutation (copied below), plus transformers'
  GGUF loader (``load_gguf_checkpoint``) on the real SmolLM2 file, plus a perplexity check that a wrong layout
  would fail;
- tokenizer: the ``tokenizers`` BPE the synthetic vocabulary was trained with, and transformers' GGUF tokenizer.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from minitron_jax.convert.gguf import (
    SUPPORTED_TYPES,
    GGUFError,
    dequantize_tensor,
    read_gguf,
    save_tokenizer,
    unpermute_qk,
)
from minitron_jax.convert.gguf_config import llama3_rope_freqs

# ---------------------------------------------------------------------------------------------------------------
# Independent reference dequantizer for the 32-element block types (ggml-common.h layouts), one block at a time.


def _f16(block: bytes, offset: int) -> float:
    return float(np.frombuffer(block[offset:offset + 2], np.float16)[0])


def ref_dequant_block(block: bytes, kind: str) -> np.ndarray:
    """32 float32 values of one block. Low nibbles are elements 0-15, high nibbles 16-31."""
    def nibbles(qs):
        return [b & 0xF for b in qs] + [b >> 4 for b in qs]

    def fifth_bits(qh: int):
        return [((qh >> j) & 1) << 4 for j in range(32)]

    if kind == "Q8_0":  # d, int8 q[32]
        vals = _f16(block, 0) * np.frombuffer(block[2:34], np.int8).astype(np.float64)
    elif kind == "Q4_0":  # d, q[16] (two 4-bit per byte), value = d * (q - 8)
        vals = _f16(block, 0) * (np.array(nibbles(block[2:18]), np.float64) - 8)
    elif kind == "Q4_1":  # d, m, q[16], value = d * q + m
        vals = _f16(block, 0) * np.array(nibbles(block[4:20]), np.float64) + _f16(block, 2)
    elif kind == "Q5_0":  # d, qh (32 fifth bits), q[16], value = d * (q - 16)
        q = np.array(nibbles(block[6:22])) | np.array(fifth_bits(int.from_bytes(block[2:6], "little")))
        vals = _f16(block, 0) * (q.astype(np.float64) - 16)
    elif kind == "Q5_1":  # d, m, qh, q[16], value = d * q + m
        q = np.array(nibbles(block[8:24])) | np.array(fifth_bits(int.from_bytes(block[4:8], "little")))
        vals = _f16(block, 0) * q.astype(np.float64) + _f16(block, 2)
    else:
        raise ValueError(kind)
    return vals.astype(np.float32)


def ref_dequant(raw: np.ndarray, kind: str) -> np.ndarray:
    block_bytes = gguf.GGML_QUANT_SIZES[QT[kind]][1]
    flat = raw.reshape(-1).tobytes()
    blocks = [flat[i:i + block_bytes] for i in range(0, len(flat), block_bytes)]
    return np.concatenate([ref_dequant_block(b, kind) for b in blocks])


# Byte offsets of the fp16 scale fields in each block type: random bytes there could be inf/nan.
_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind: str, n_blocks: int, rng) -> np.ndarray:
    """Random raw blocks (uint8 [n_blocks, block_bytes]) with finite, varied fp16 scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[QT[kind]][1]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in _F16_FIELDS[kind]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_block_types_match_reference(kind, rng):
    raw = random_blocks(kind, 24, rng)
    n = 24 * 32
    ours = dequantize_tensor(raw.reshape(-1), kind, (n,), "t")
    np.testing.assert_array_equal(ours, ref_dequant(raw, kind))


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_match_transformers_torch_dequantizer(kind, rng):
    torch = pytest.importorskip("torch")
    tdq = pytest.importorskip("transformers.integrations.gguf.dequant")
    raw = random_blocks(kind, 8, rng)
    ours = dequantize_tensor(raw.reshape(-1), kind, (8 * 256,), "t")
    theirs = tdq.dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(QT[kind])).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,steps", [("Q8_0", 127), ("Q4_0", 8), ("Q4_1", 15), ("Q5_0", 16), ("Q5_1", 31)])
def test_quantize_round_trip_error_bound(kind, steps, rng):
    """Quantize random rows with gguf-py and check every element lands within one quantization step of the input
    (per 32-element block: step = max|x|/steps for symmetric types, (max-min)/steps for the ones with a min)."""
    x = (rng.standard_normal((16, 64)) * rng.uniform(0.01, 3, size=(16, 1))).astype(np.float32)
    got = dequantize_tensor(gguf_quantize(x, QT[kind]), kind, x.shape, "t")
    blocks, err = x.reshape(-1, 32), np.abs(got - x).reshape(-1, 32)
    symmetric = kind in ("Q8_0", "Q4_0", "Q5_0")
    span = np.abs(blocks).max(1) if symmetric else blocks.max(1) - blocks.min(1)
    bound = span / steps * 1.01 + 1e-6  # 1% slack for the fp16 rounding of the scale
    assert (err.max(1) <= bound).all()
    assert err.mean() < 0.3 * bound.mean()  # and typical errors are well inside the step


def test_float_types_exact(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_array_equal(dequantize_tensor(x, "F32", x.shape, "t"), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize_tensor(h, "F16", x.shape, "t"), h.astype(np.float32))
    bf = gguf_quantize(x, QT.BF16)
    np.testing.assert_array_equal(dequantize_tensor(bf, "BF16", x.shape, "t"),
                                  x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_unsupported_type_is_refused_by_name():
    assert "IQ4_NL" not in SUPPORTED_TYPES
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_q\.weight'.*IQ4_NL"):
        dequantize_tensor(np.zeros(18, np.uint8), "IQ4_NL", (32,), "blk.0.attn_q.weight")


# ---------------------------------------------------------------------------------------------------------------
# q/k permutation


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape,n_head", [((64, 8), 4), ((96, 5), 3), ((32,), 2)])
def test_unpermute_inverts_llama_cpp(shape, n_head, rng):
    w = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
    # and it is not the identity: rows really move
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_unpermute_rejects_bad_rows():
    with pytest.raises(GGUFError, match="multiple"):
        unpermute_qk(np.zeros((10, 4)), 4)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic GGUF files

TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 128, "layers": 2, "theta": 10000.0}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Pruning removes heads, neurons and layers.",
    "Distillation trains the student on the teacher's logits.", "Numbers like 1234 and 3.14 appear too!",
    "Llamas live in the Andes; alpacas are smaller.", "Hello hello world world, the the end.",
] * 20


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A small byte-level BPE (gpt2 style) trained here, and its GGUF metadata fields."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    vocab = tok.get_vocab_size()
    tokens = [tok.id_to_token(i) for i in range(vocab)]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in specials else 1 for t in tokens]  # llama.cpp: 1 normal, 3 control
    return tok, {"tokens": tokens, "merges": merges, "types": types, "bos": tokens.index("<s>"),
                 "eos": tokens.index("</s>")}


def tiny_hf_tensors(rng, vocab: int, tied: bool, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128,
                    layers=2, **_) -> dict[str, np.ndarray]:
    def r(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    t = {"model.embed_tokens.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": 1 + r(hidden) * 0.1,
            p + "self_attn.q_proj.weight": r(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": r(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": r(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": r(hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": 1 + r(hidden) * 0.1,
            p + "mlp.gate_proj.weight": r(ffn, hidden),
            p + "mlp.up_proj.weight": r(ffn, hidden),
            p + "mlp.down_proj.weight": r(hidden, ffn),
        })
    t["model.norm.weight"] = 1 + r(hidden) * 0.1
    if not tied:
        t["lm_head.weight"] = r(vocab, hidden)
    return t


def hf_to_gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        i, rest = hf[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{_HF_TO_GGUF_LAYER[rest]}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def write_tiny_gguf(path, hf: dict[str, np.ndarray], tok_fields: dict | None, types: dict[str, str] | None = None,
                    arch="llama", extra_meta=None, extra_tensors=None, hidden=64, heads=4, kv_heads=2,
                    head_dim=16, ffn=128, layers=2, theta=10000.0):
    """Write a llama.cpp-style GGUF: llama.cpp names, q/k rows permuted, tensors stored as ``types[gguf_name]``
    (default F32). Returns what a correct reader must give back for each HF name."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(hf["model.embed_tokens.weight"].shape[0])
    for key, value in (extra_meta or {}).items():
        getattr(w, key)(value)
    if tok_fields:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tok_fields["tokens"])
        w.add_token_types(tok_fields["types"])
        w.add_token_merges(tok_fields["merges"])
        w.add_bos_token_id(tok_fields["bos"])
        w.add_eos_token_id(tok_fields["eos"])
        w.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for name, arr in hf.items():
        gname = hf_to_gguf_name(name)
        stored = arr
        if name.endswith("q_proj.weight"):
            stored = llama_cpp_permute(arr, heads)
        elif name.endswith("k_proj.weight"):
            stored = llama_cpp_permute(arr, kv_heads)
        kind = types.get(gname, "F32")
        if kind == "F32":
            w.add_tensor(gname, stored)
            expected[name] = arr
        elif kind == "F16":
            w.add_tensor(gname, stored.astype(np.float16))
            expected[name] = arr.astype(np.float16).astype(np.float32)
        else:  # quantized along rows, which the q/k row permutation does not mix: quantization commutes with it
            w.add_tensor(gname, gguf_quantize(stored, QT[kind]), raw_dtype=QT[kind])
            expected[name] = gguf_dequantize(gguf_quantize(arr, QT[kind]), QT[kind])
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


MIXED_TYPES = {  # layer 0 all F32 (exact), layer 1 and the embeddings exercise every written type
    "token_embd.weight": "Q8_0", "output.weight": "Q4_0",
    "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "Q4_0", "blk.1.attn_v.weight": "F16",
    "blk.1.attn_output.weight": "Q4_1", "blk.1.ffn_gate.weight": "BF16", "blk.1.ffn_up.weight": "Q5_0",
    "blk.1.ffn_down.weight": "Q8_0",
}


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_round_trip(tmp_path, rng, tiny_tokenizer, tied):
    _, fields = tiny_tokenizer
    vocab = len(fields["tokens"])
    hf = tiny_hf_tensors(rng, vocab, tied, **TINY)
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, hf, fields, MIXED_TYPES, **TINY)

    model = read_gguf(path)
    cfg = model.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        vocab, 64, 128, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0  # float32 metadata, clean decimals
    assert cfg["bos_token_id"] == fields["bos"] and cfg["eos_token_id"] == fields["eos"]
    assert cfg["torch_dtype"] == "float32" and "rope_scaling" not in cfg
    assert model.tensor_types["model.layers.1.self_attn.k_proj.weight"] == "Q4_0"

    # streaming yields exactly the HF tensors, in HF order, with [out, in] shapes
    names = []
    for name, arr in model.iter_tensors():
        names.append(name)
        assert arr.dtype == np.float32 and arr.shape == hf[name].shape, name
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)
    assert names == list(hf)  # tiny_hf_tensors builds them in HF state-dict order
    assert ("lm_head.weight" in names) is not tied
    # F32 layer: q/k come back bit-exact, so the permutation is undone exactly
    for proj in ("q_proj", "k_proj"):
        np.testing.assert_array_equal(model.tensors[f"model.layers.0.self_attn.{proj}.weight"],
                                      hf[f"model.layers.0.self_attn.{proj}.weight"])

    # dtype argument
    bf = read_gguf(path, dtype=np.float16)
    assert bf.hf_config["torch_dtype"] == "float16"
    assert bf.get_tensor("model.norm.weight").dtype == np.float16

    # the config is one our own config module accepts
    from minitron_jax.config import LlamaConfig

    ours = LlamaConfig.from_hf(cfg)
    assert (ours.num_kv_heads, ours.head_dim, ours.tie_word_embeddings) == (2, 16, tied)


def test_synthetic_matches_transformers_loader(tmp_path, rng, tiny_tokenizer):
    """transformers' own GGUF loader (independent un-permutation) agrees with us on a mixed-type file."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, fields = tiny_tokenizer
    hf = tiny_hf_tensors(rng, len(fields["tokens"]), False, **TINY)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf, fields, MIXED_TYPES, **TINY)
    model = read_gguf(path)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig.from_dict(model.hf_config))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(theirs) == set(model.tensor_names)
    for name, arr in model.iter_tensors():
        np.testing.assert_allclose(arr, theirs[name].float().numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_synthetic_tokenizer(tmp_path, rng, tiny_tokenizer):
    from transformers import AutoTokenizer

    tok, fields = tiny_tokenizer
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_hf_tensors(rng, len(fields["tokens"]), True, **TINY), fields, **TINY)
    out = tmp_path / "hf"
    (out).mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")  # an existing file in out_dir must survive
    written = save_tokenizer(path, out)
    assert {p.name for p in written} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert (out / "model.safetensors").read_bytes() == b"keep me"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # staging dir cleaned up

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and hf_tok.chat_template == CHAT_TEMPLATE
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["bos_token"] == "<s>" and special["eos_token"] == "</s>"
    for text in _CORPUS[:6] + ["unseen wörds, 42 <|endoftext|> and <s>"]:
        # identical to the BPE the vocabulary was trained with
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids, text
        assert hf_tok.decode(hf_tok(text)["input_ids"]) == text


# ---------------------------------------------------------------------------------------------------------------
# RoPE scaling metadata


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, rng):
    """Llama-3.1 GGUFs carry RoPE scaling as a ``rope_freqs`` tensor; we recover the HF dict from it."""
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dims = {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 64, "ffn": 64, "layers": 1, "theta": 500000.0}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    freqs = llama3_rope_freqs(500000.0, 64, 8.0, 1.0, 4.0, 8192)
    # our divisors reproduce transformers' llama3 frequencies
    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=64, rope_theta=500000.0,
                         rope_scaling=dict(scaling), max_position_embeddings=131072)  # it mutates the dict
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(base / freqs, inv_freq.numpy(), rtol=1e-5)

    path = tmp_path / "rope.gguf"
    write_tiny_gguf(path, tiny_hf_tensors(rng, 64, True, **dims), None,
                    extra_tensors={"rope_freqs.weight": freqs}, **dims)
    model = read_gguf(path)
    assert model.hf_config["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in model.tensor_names
    from minitron_jax.config import LlamaConfig as OurConfig

    assert OurConfig.from_hf(model.hf_config).rope_scaling.rope_type == "llama3"


def test_linear_rope_scaling_from_metadata(tmp_path, rng):
    path = tmp_path / "linear.gguf"
    write_tiny_gguf(path, tiny_hf_tensors(rng, 64, True, **TINY), None,
                    extra_meta={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                "add_rope_scaling_factor": 2.0}, **TINY)
    assert read_gguf(path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 100)
    with pytest.raises(GGUFError, match="model.safetensors.*not a GGUF"):
        read_gguf(p)
    with pytest.raises(GGUFError, match="not a GGUF"):
        save_tokenizer(p, tmp_path / "out")


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(tmp_path, rng, keep):
    full = tmp_path / "full.gguf"
    write_tiny_gguf(full, tiny_hf_tensors(rng, 64, True, **TINY), None, **TINY)
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="cut.gguf"):
        read_gguf(cut)


def test_unknown_architecture(tmp_path, rng):
    p = tmp_path / "other.gguf"
    write_tiny_gguf(p, tiny_hf_tensors(rng, 64, True, **TINY), None, arch="gpt2", **TINY)
    with pytest.raises(ValueError, match="'gpt2'"):
        read_gguf(p)


def test_unsupported_tensor_type_in_file(tmp_path, rng):
    p = tmp_path / "iq.gguf"
    _write_with_raw_type(p, tiny_hf_tensors(rng, 64, True, **TINY), "blk.0.ffn_up.weight", QT.IQ4_NL)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL"):
        read_gguf(p)


def _write_with_raw_type(path, hf, gname, qtype):
    """Write the tiny model with one tensor stored as raw bytes of an arbitrary ggml type."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    for name, arr in hf.items():
        g = hf_to_gguf_name(name)
        if g == gname:
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8)
            w.add_tensor(g, raw, raw_dtype=qtype)
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_tensor_name(tmp_path, rng):
    p = tmp_path / "extra.gguf"
    write_tiny_gguf(p, tiny_hf_tensors(rng, 64, True, **TINY), None,
                    extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)}, **TINY)
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.bias"):
        read_gguf(p)


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smol_path(smollm2_assets):
    return smollm2_assets["smollm2_gguf"]


@pytest.fixture(scope="module")
def smol(smol_path):
    return read_gguf(smol_path)


def test_smollm2_config(smol):
    cfg = smol.hf_config
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (576, 1536, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert "lm_head.weight" not in smol.tensor_names and len(smol.tensor_names) == 2 + 9 * 30
    assert set(smol.tensor_types.values()) == {"Q4_1", "Q8_0", "F32"}
    assert smol.metadata["tokenizer.ggml.model"] == "gpt2" and smol.metadata["tokenizer.ggml.pre"] == "smollm"


def _meta_llama(config):
    """A transformers LlamaForCausalLM with no storage (instant to build, even for 135M parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_smollm2_matches_transformers_tensor_processing(smol):
    """Every tensor equals what transformers' GGUF loader makes of the same bytes: names from gguf-py's own
    tensor-name map (which transformers uses too), q/k rows from transformers' ``LlamaTensorProcessor``."""
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for name, arr in smol.iter_tensors():
        raw = smol.raw_tensor(name)
        assert name_map.get_name(name.removesuffix(".weight")) + ".weight" == raw.gguf_name
        ref = processor.process(weights=gguf_dequantize(raw.data, QT[raw.type_name]), name=raw.gguf_name).weights
        assert arr.shape == ref.shape, name
        assert np.abs(arr - ref).max() <= 1e-6, name


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smol, smol_path):
    """The whole transformers GGUF path (config parsing + ``load_gguf_checkpoint``) agrees with us. Slow: it
    decodes the full vocabulary and merges metadata twice in Python (~30 s)."""
    pytest.importorskip("torch")
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "max_position_embeddings"):
        assert getattr(config, key) == smol.hf_config[key], key
    assert config.rms_norm_eps == pytest.approx(smol.hf_config["rms_norm_eps"], rel=1e-6)
    theirs = load_gguf_checkpoint(str(smol_path), return_tensors=True, model_to_load=_meta_llama(config))["tensors"]
    assert set(theirs) == set(smol.tensor_names)
    for name, arr in smol.iter_tensors():
        assert np.abs(arr - theirs.pop(name).numpy()).max() <= 1e-6, name


def test_smollm2_blocks_match_reference_dequantizer(smol):
    """Real Q4_1 and Q8_0 bytes through our reference dequantizer (no gguf-py code in the expectation)."""
    v = smol.raw_tensor("model.layers.3.self_attn.v_proj.weight")  # v is not permuted: rows map 1:1
    assert v.type_name == "Q4_1"
    np.testing.assert_array_equal(smol.get_tensor("model.layers.3.self_attn.v_proj.weight")[:8],
                                  ref_dequant(np.asarray(v.data[:8]), "Q4_1").reshape(8, 576))
    e = smol.raw_tensor("model.embed_tokens.weight")
    assert e.type_name == "Q8_0"
    rows = [0, 1, 2, 1000, 49151]
    np.testing.assert_array_equal(smol.get_tensor("model.embed_tokens.weight")[rows],
                                  ref_dequant(np.asarray(e.data[rows]), "Q8_0").reshape(len(rows), 576))


@pytest.fixture(scope="module")
def smol_tokenizer_dir(smol_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol_tokenizer")
    save_tokenizer(smol_path, out)
    return out


@pytest.fixture(scope="module")
def smol_reference_tokenizer(smol_path):
    """transformers' tokenizer built straight from the GGUF (``AutoTokenizer`` with ``gguf_file=``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.mark.slow
def test_smollm2_layout_gives_low_perplexity(smol, smol_tokenizer_dir):
    """Semantic check of the q/k layout, independent of any conversion code: the converted weights in
    transformers' LlamaForCausalLM predict real text well, and re-applying llama.cpp's permutation ruins it."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from minitron_jax.data.assets import load_texts

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    ids = torch.tensor([tokenizer(load_texts("wikipedia", 1)[0])["input_ids"][:64]])
    config = LlamaConfig.from_dict(smol.hf_config)

    def loss(tensors):
        model = _meta_llama(config)
        state = {k: torch.from_numpy(v) for k, v in tensors.items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # a non-persistent buffer: not in the state
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    good = loss(smol.tensors)
    scrambled = dict(smol.tensors)
    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", 9), ("k_proj", 3)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            scrambled[name] = llama_cpp_permute(scrambled[name], heads)
    bad = loss(scrambled)
    assert good < 3.0, good  # measured 2.61 nats/token on this passage; the scrambled layout gives 3.87
    assert bad > good + 0.5, (good, bad)


def test_smollm2_tokenizer_round_trip(smol_tokenizer_dir, smol_reference_tokenizer):
    from transformers import AutoTokenizer

    from minitron_jax.data.assets import load_texts

    ours = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    reference = smol_reference_tokenizer
    assert {p.name for p in smol_tokenizer_dir.iterdir()} >= {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert ours.chat_template and ours.chat_template == reference.chat_template
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in load_texts("wikipedia", 20) + load_texts("owt", 20):
        ids = ours(text)["input_ids"]
        assert ids == reference(text)["input_ids"]
        assert ours.decode(ids) == text  # byte-level BPE is lossless
    assert ours("Hello")["input_ids"] == [19556]  # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token false)
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
