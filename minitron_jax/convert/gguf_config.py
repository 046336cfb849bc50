"""GGUF metadata → a transformers ``LlamaConfig`` dict (used by :func:`minitron_jax.convert.gguf.read_gguf`), or a
DeciLM (Nemotron-NAS) one with per-layer ``block_configs`` for llama.cpp's heterogeneous ``deci`` architecture.

Every hyperparameter is read from ``llama.*`` (``deci.*``) metadata with its type checked, not coerced (GGUF files
are untrusted
input: a string "12", a float 2.5 or a zero head count must fail here, naming the key, not later as a crash).
Llama-3.1-style RoPE scaling is not stored as metadata but as a ``rope_freqs.weight`` tensor of per-frequency
divisors; :func:`build_hf_config` recovers the ``llama3`` ``rope_scaling`` dict from it and checks that it
reproduces the tensor (:func:`llama3_rope_freqs` is the forward direction llama.cpp uses to write it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from minitron_jax.blocks import AttentionSpec, BlockSpec, FFNSpec, to_decilm
from minitron_jax.convert.gguf_header import GGUFError

# What the per-layer arrays of a ``deci`` GGUF mean (llama.cpp's llm_build_deci and its converter's DeciModel):
#   head_count 0                      attention removed (DeciLM no_op): no tensors, no norm, no residual
#   head_count H, head_count_kv 0     linear attention (replace_with_linear): attn_norm + attn_output [D, D]
#   head_count H, head_count_kv K     GQA with K KV heads
#   feed_forward_length 0             FFN removed (no_op); llama.cpp has no linear FFN
DECI_ARCHITECTURE_NAME = "DeciLMForCausalLM"
DECI_MODEL_TYPE = "nemotron-nas"


def _f32(x: float) -> float:
    """The shortest decimal that is the same float32. GGUF stores floats as float32, so 1e-5 comes back as
    9.999999747378752e-06; writing 1e-05 keeps config.json identical to the original model's."""
    return float(str(np.float32(x)))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # a GGUF BOOL comes back as a Python bool


def _uniform_int(meta: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer hyperparameter of at least ``minimum``; per-layer arrays are accepted only when all layers agree.

    The type is checked, not coerced: ``int()`` would take the string "12" or the float 2.5, and a zero head count
    would only fail later as a division by zero."""
    if key not in meta:
        if default is None:
            raise GGUFError(f"GGUF metadata has no {key!r}")
        return default
    value = meta[key]
    if isinstance(value, list):
        if not value or not all(_is_int(v) for v in value):
            raise GGUFError(f"GGUF metadata {key!r} must be an integer or an array of integers, "
                            f"got {_describe(value)}")
        if len(set(value)) != 1:
            raise GGUFError(f"{key} varies per layer ({value[:8]}...), which a Llama config cannot express")
        value = value[0]
    if not _is_int(value):
        raise GGUFError(f"GGUF metadata {key!r} must be an integer, got {_describe(value)}")
    if value < minimum:
        raise GGUFError(f"GGUF metadata {key!r} is {value}, must be at least {minimum}")
    return value


def _positive_float(meta: dict, key: str, default: float | None = None) -> float:
    """A positive, finite float hyperparameter (an integer is accepted: GGUF writers differ), as :func:`_f32`."""
    if key not in meta:
        if default is None:
            raise GGUFError(f"GGUF metadata has no {key!r}")
        return default
    value = meta[key]
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or not math.isfinite(value) \
            or value <= 0:
        raise GGUFError(f"GGUF metadata {key!r} must be a positive number, got {_describe(value)}")
    return _f32(value)


_TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _torch_dtype_name(dtype: np.dtype) -> str:
    try:
        return _TORCH_DTYPE_NAMES[dtype.name]
    except KeyError:
        raise GGUFError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16") from None


def _rope_scaling(meta: dict, arch: str, rope_freqs: np.ndarray | None, theta: float, head_dim: int
                  ) -> dict | None:
    """HF ``rope_scaling`` from GGUF metadata (linear/yarn) or from a ``rope_freqs`` tensor (llama3)."""
    p = f"{arch}.rope."
    kind = meta.get(p + "scaling.type")
    factor_key = p + "scaling.factor"
    if kind is None and meta.get(p + "scale_linear") is not None:  # the pre-2024 key for linear scaling
        kind, factor_key = "linear", p + "scale_linear"
    if kind is not None and not isinstance(kind, str):
        raise GGUFError(f"GGUF metadata {p}scaling.type must be a string, got {_describe(kind)}")
    if kind not in (None, "none") and rope_freqs is not None:
        raise GGUFError(f"both {p}scaling.type={kind!r} and a rope_freqs tensor: ambiguous RoPE scaling")
    if kind in (None, "none"):
        return None if rope_freqs is None else _llama3_scaling_from_freqs(rope_freqs, theta, head_dim)
    if meta.get(factor_key) is None:
        raise GGUFError(f"{p}scaling.type is {kind!r} but {p}scaling.factor is missing")
    factor = _positive_float(meta, factor_key)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        if meta.get(p + "scaling.original_context_length") is not None:
            out["original_max_position_embeddings"] = _uniform_int(meta, p + "scaling.original_context_length")
        if meta.get(p + "scaling.attn_factor") is not None:
            out["attention_factor"] = _positive_float(meta, p + "scaling.attn_factor")
        return out
    raise GGUFError(f"unsupported RoPE scaling type {kind!r} in {p}scaling.type")


def llama3_rope_freqs(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                      high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp writes for Llama-3.1 RoPE scaling: one divisor per frequency
    (1 for high frequencies, ``factor`` for low ones, a smooth blend between)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    ctx = original_max_position_embeddings
    smooth = (ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blend = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < ctx / high_freq_factor, 1.0, np.where(wavelen > ctx / low_freq_factor, factor, blend))
    return out.astype(np.float32)


def _llama3_scaling_from_freqs(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover ``llama3`` rope_scaling parameters from llama.cpp's ``rope_freqs`` divisors.

    In the blend region the divisor ``r`` satisfies ``1/r = (1-s)/factor + s`` with ``s`` linear in the frequency:
    ``s = a·freq/2π + b``, ``a = orig/(high-low)``, ``b = -low/(high-low)``. Only the ratios are identifiable
    (scaling orig, low and high together gives the same frequencies), so we fix ``low_freq_factor = 1`` — the
    value every Llama 3.x uses — solve for the rest, and verify the result reproduces the tensor.
    """
    r = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if r.shape[0] != head_dim // 2:
        raise GGUFError(f"rope_freqs has {r.shape[0]} entries, expected head_dim/2 = {head_dim // 2}")
    factor = float(r.max())
    if not np.isclose(r.min(), 1.0, rtol=1e-4) or factor <= 1.0:
        raise GGUFError(f"rope_freqs {r[:4]}... is not Llama-3 RoPE scaling (divisors should run from 1 to factor)")
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    mid = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
    if mid.sum() < 2:
        raise GGUFError("rope_freqs has fewer than two blended frequencies: cannot recover llama3 rope scaling")
    s = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(freqs[mid] / (2 * math.pi), s, 1)
    high = 1 - 1 / b
    orig = round(float(-a / b))
    scaling = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": 1.0,
               "high_freq_factor": float(round(high, 4)), "original_max_position_embeddings": orig}
    check = llama3_rope_freqs(theta, head_dim, scaling["factor"], 1.0, scaling["high_freq_factor"], orig)
    if not np.allclose(check, r, rtol=1e-4):
        raise GGUFError(f"rope_freqs does not match any llama3 rope scaling (best fit {scaling})")
    return scaling


def _per_layer_ints(meta: dict, key: str, layers: int, default: list[int] | None = None) -> list[int]:
    """A per-layer hyperparameter (an integer for every layer, or one array entry per layer), each at least 0."""
    if key not in meta:
        if default is None:
            raise GGUFError(f"GGUF metadata has no {key!r}")
        return default
    value = meta[key]
    if _is_int(value):
        value = [value] * layers
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise GGUFError(f"GGUF metadata {key!r} must be an integer or an array of integers, got {_describe(value)}")
    if len(value) != layers:
        raise GGUFError(f"GGUF metadata {key!r} has {len(value)} entries for {layers} layers")
    if min(value) < 0:
        raise GGUFError(f"GGUF metadata {key!r} holds {min(value)}; counts cannot be negative")
    return value


def _deci_blocks(meta: dict, layers: int, hidden: int, path: Path) -> tuple[int, int, list[BlockSpec]]:
    """(query heads, head_dim, one BlockSpec per layer) from a ``deci`` GGUF's per-layer arrays."""
    p = "deci."
    arrays = [k for k in (p + "attention.head_count", p + "attention.head_count_kv", p + "feed_forward_length")
              if isinstance(meta.get(k), list)]
    if not arrays and layers > 4096:  # scalars broadcast to every layer: bound the count no array in the file does
        raise GGUFError(f"{path}: {p}block_count is {layers} with no per-layer arrays")
    n_head = _per_layer_ints(meta, p + "attention.head_count", layers)
    n_kv = _per_layer_ints(meta, p + "attention.head_count_kv", layers, n_head)
    n_ff = _per_layer_ints(meta, p + "feed_forward_length", layers)
    distinct = sorted({h for h in n_head if h > 0})
    if len(distinct) > 1:  # DeciLM keeps every layer's query heads; only the KV heads vary
        raise GGUFError(f"{path}: {p}attention.head_count varies among attention layers ({distinct}), which a DeciLM "
                        "config cannot express")
    key_length = _uniform_int(meta, p + "attention.key_length", 0, minimum=0) or None
    if distinct:
        heads = distinct[0]
        head_dim = key_length or _uniform_int(meta, p + "rope.dimension_count", hidden // heads)
    elif key_length and hidden % key_length == 0:  # no attention layer at all: the heads only fill the base config
        heads, head_dim = hidden // key_length, key_length
    else:
        raise GGUFError(f"{path}: no layer has attention and {p}attention.key_length does not give the head count")
    if _uniform_int(meta, p + "attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{path}: {p}attention.value_length differs from key_length {head_dim}")
    blocks = []
    for i, (h, kv, f) in enumerate(zip(n_head, n_kv, n_ff)):
        if h == 0 and kv:
            raise GGUFError(f"{path}: layer {i} has {kv} KV heads but no query heads")
        if kv and heads % kv:
            raise GGUFError(f"{path}: layer {i}: {kv} KV heads do not divide the {heads} query heads")
        att = AttentionSpec("none") if h == 0 else AttentionSpec("linear") if kv == 0 else AttentionSpec("gqa", kv)
        blocks.append(BlockSpec(att, FFNSpec("mlp", f) if f else FFNSpec("none")))
    return heads, head_dim, blocks


def build_hf_config(meta: dict, tensors: dict[str, Any], rope_freqs: np.ndarray | None, dtype: np.dtype,
                    path: Path) -> dict:
    """A transformers ``LlamaConfig`` dict from the metadata (a DeciLM one, with ``block_configs``, for ``deci``);
    tensor shapes fill in what metadata may omit."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "deci"):
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama' and 'deci' can be "
                        "converted)")
    p = f"{arch}."
    if _uniform_int(meta, p + "expert_count", 0, minimum=0) > 0:
        raise GGUFError(f"{path}: mixture-of-experts {arch} GGUFs are not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    hidden = _uniform_int(meta, p + "embedding_length")
    layers = _uniform_int(meta, p + "block_count")
    blocks = None
    if arch == "deci":
        heads, head_dim, blocks = _deci_blocks(meta, layers, hidden, path)
        kv_heads = intermediate = None  # per layer, in block_configs
    else:
        heads = _uniform_int(meta, p + "attention.head_count")
        kv_heads = _uniform_int(meta, p + "attention.head_count_kv", heads)
        head_dim = _uniform_int(meta, p + "attention.key_length",
                                _uniform_int(meta, p + "rope.dimension_count", hidden // heads))
        intermediate = _uniform_int(meta, p + "feed_forward_length")
        if layers > len(tensors):  # every layer has 9 tensors; an absurd count would only loop (and allocate) later
            raise GGUFError(f"{path}: llama.block_count is {layers} but the file has only {len(tensors)} tensors")
    rope_dims = _uniform_int(meta, p + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (rope dims {rope_dims} < head_dim {head_dim}) "
                        "are not supported")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF order: [hidden, vocab]
    if p + "vocab_size" in meta and _uniform_int(meta, p + "vocab_size") != vocab:
        raise GGUFError(f"{path}: {p}vocab_size {meta[p + 'vocab_size']} != token_embd rows {vocab}")
    theta = _positive_float(meta, p + "rope.freq_base", 10000.0)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _positive_float(meta, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": theta,
        "max_position_embeddings": _uniform_int(meta, p + "context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if blocks is not None:
        from types import SimpleNamespace

        config.update(architectures=[DECI_ARCHITECTURE_NAME], model_type=DECI_MODEL_TYPE)
        base = SimpleNamespace(num_heads=heads, hidden_size=hidden)
        config["block_configs"] = []
        for i, block in enumerate(blocks):
            try:  # DeciLM writes a width as ffn_mult, from which only multiples of 256 come back
                config["block_configs"] += to_decilm(base, [block])
            except ValueError as e:
                raise GGUFError(f"{path}: layer {i} ({block.describe()}): {e}") from None
    scaling = _rope_scaling(meta, arch, rope_freqs, theta, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    for hf_key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        key = f"tokenizer.ggml.{gguf_key}_token_id"
        if meta.get(key) is not None:
            token_id = _uniform_int(meta, key, minimum=0)
            if token_id >= vocab:
                raise GGUFError(f"{path}: {key} is {token_id}, outside the vocabulary of {vocab} tokens")
            config[f"{hf_key}_token_id"] = token_id
    config["torch_dtype"] = _torch_dtype_name(dtype)
    return config

