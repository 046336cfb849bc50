"""(config, params, tokenizer) → a llama.cpp GGUF file (``llama`` architecture, or ``deci`` for a heterogeneous
model), F32 / F16 / BF16 or block-quantized.

    summary = save_gguf("student.Q8_0.gguf", config, params, tokenizer=tok, quant="q8_0",
                        metadata={"name": "SmolLM2 pruned", "license": "apache-2.0"})

The inverse of :mod:`minitron_jax.convert.gguf` (which reads such a file back), written the way llama.cpp's own
``convert_hf_to_gguf.py`` + ``llama-quantize`` write a Llama:

- **Tensors**: HF-layout arrays from :func:`~minitron_jax.convert.hf.iter_hf_tensors`, renamed with the importer's
  own name table (``gguf.GLOBAL_NAMES`` / ``gguf.LAYER_NAMES``, inverted), q/k rows re-permuted into llama.cpp's
  adjacent-pair RoPE order (:func:`~minitron_jax.convert.gguf.permute_qk`: q per query head, k per KV head).
- **Types**: 1-D tensors (the norms) stay F32, as llama.cpp requires for its norm kernels and as both tools do.
  For the 4/5-bit types the token embedding and output matrix are kept at Q8_0: they are the tensors quantization
  hurts most (llama-quantize keeps the output at Q6_K, or Q8_0 when rows are not a multiple of 256 — SmolLM2's
  576 — and the embedded SmolLM2 Q4_1 file has ``token_embd`` at Q8_0). gguf-py has numpy quantizers only for
  the 32-element block types, so K-quants are not offered (quantize an F16 export with ``llama-quantize``).
- **Metadata**: every ``llama.*`` hyperparameter our importer and llama.cpp read, ``key_length``/``value_length``
  when head_dim ≠ hidden/heads (pruned students), Llama-3.1 RoPE scaling as a ``rope_freqs.weight`` tensor (what
  llama.cpp reads; the importer recovers the ``rope_scaling`` dict from it), linear scaling as metadata.
- **Tokenizer**: the full byte-level BPE vocabulary built from the transformers fast tokenizer the way
  ``convert_hf_to_gguf``'s ``get_vocab_base`` does (tokens, token types, merges, special ids, add-BOS/EOS flags,
  chat template). ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer regex: taken from ``metadata`` when given
  (:func:`gguf_source_metadata` reads it from a source GGUF), else recognized from the tokenizer's pre-tokenizer.

- **Heterogeneous models** (a :class:`~minitron_jax.hetero.HeteroConfig`) are written in llama.cpp's ``deci``
  architecture (Nemotron-NAS / DeciLM): per-layer arrays ``deci.attention.head_count`` (0: attention removed),
  ``deci.attention.head_count_kv`` (0 with query heads: linear attention, its [D, D] matrix stored as the layer's
  ``attn_output``) and ``deci.feed_forward_length`` (0: FFN removed); each layer has only its own block's tensors
  (:func:`~minitron_jax.convert.gguf.deci_layer_tensors`). Blocks llama.cpp would not run as we do are refused
  before anything is written (:func:`deci_problems`). A uniform :class:`~minitron_jax.config.LlamaConfig` is
  written as ``llama``, as before.

The file is written to a temporary sibling and renamed into place, under the destination's lock; nothing is
written when a check fails (NaN/inf params, a quant type whose block does not divide a tensor's rows, an
unsupported tokenizer), and a failure while writing leaves no file behind.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minitron_jax.blocks import DECI_FFN_MULTIPLE
from minitron_jax.config import LlamaConfig
from minitron_jax.convert.gguf import GLOBAL_NAMES, LAYER_NAMES, GGUFError, deci_layer_tensors, permute_qk
from minitron_jax.convert.gguf_config import llama3_rope_freqs
from minitron_jax.convert.gguf_header import GGUF_MAGIC
from minitron_jax.convert.gguf_tokenizer import PRE_TOKENIZER_SPLITS
from minitron_jax.convert.hf import TOP_NAMES as HF_TOP_NAMES
from minitron_jax.convert.hf import first_nonfinite, hf_tensor_specs, iter_hf_tensors
from minitron_jax.exitcodes import BadInputError, NonFiniteError
from minitron_jax.fsutil import atomic_file, check_file_destination, lock_file
from minitron_jax.hetero import HeteroConfig
from minitron_jax.model import Params

# --quant name → (GGML tensor type of the 2-D weights, general.file_type). Only types gguf-py can quantize in numpy.
QUANT_TYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9),
}
# Below 8 bits, the embedding and output matrix stay at this type (see the module docstring).
EMBEDDING_TYPE_BELOW_8_BITS = "Q8_0"
_LOW_BIT = frozenset({"q4_0", "q4_1", "q5_0", "q5_1"})
_EMBEDDING_NAMES = frozenset({"token_embd.weight", "output.weight"})

# HF name → llama.cpp name: the importer's tables inverted, so both directions share one map.
_HF_TO_GGUF_GLOBAL = {hf: gg for gg, hf in GLOBAL_NAMES.items()}
_HF_TO_GGUF_LAYER = {hf: gg for gg, hf in LAYER_NAMES.items()}
_QK = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k"}

# llama.cpp's token types (llama_token_type / gguf.TokenType).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# Metadata a caller may not set: it is derived from the config, tensors and tokenizer, and a caller's value would
# describe a different file. (``tokenizer.ggml.pre`` is the one tokenizer key a caller may give.)
_DERIVED_GENERAL = frozenset({"general.architecture", "general.file_type", "general.quantization_version",
                              "general.parameter_count", "general.alignment"})


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for an HF Llama parameter name."""
    if hf_name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.{i}.rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_TO_GGUF_LAYER:
        return f"blk.{parts[2]}.{_HF_TO_GGUF_LAYER[parts[3]]}"
    raise BadInputError(f"tensor {hf_name} has no llama.cpp 'llama' counterpart (biases are not supported)")


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """The GGML type a tensor is stored as under ``quant`` (see the module docstring for the rules)."""
    if len(shape) == 1:
        return "F32"
    if quant in _LOW_BIT and name in _EMBEDDING_NAMES:
        return EMBEDDING_TYPE_BELOW_8_BITS
    return QUANT_TYPES[quant][0]


def check_quant(config: LlamaConfig | HeteroConfig, quant: str) -> None:
    """Raise BadInputError (naming the tensor, or the layer and block) if a model of this config cannot be stored
    as ``quant`` or run by llama.cpp: a caller that will export at the end of a long run (the pipeline) asks before
    it starts, not after."""
    if quant not in QUANT_TYPES:
        raise BadInputError(f"GGUF quant type {quant!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")
    _plan(config, quant)


def deci_problems(hcfg: HeteroConfig) -> list[str]:
    """Why llama.cpp's ``deci`` graph (or our reader) cannot hold each layer that it cannot, one line per layer:

    - a linear FFN: llama.cpp has no tensor for it (its converter turns ``replace_with_linear`` FFNs into width 0,
      i.e. a removed FFN, and cannot map the weight);
    - an FFN removed below a kept attention (gqa or linear): llama.cpp ends such a layer early (``n_ff == 0`` →
      ``continue`` before ``inpL = cur``), so the attention's output is dropped and the layer does nothing;
    - an MLP width that is not a multiple of 256: llama.cpp would run it, but DeciLM writes widths as ``ffn_mult``,
      from which only multiples of 256 come back, so the file would not read back as the same model.

    (Removed attention, linear attention and GQA with any KV-head count are what llama.cpp's deci runs. A removed
    layer, none/none, is the identity and is left out of the file (:func:`_exported`), so it needs no llama.cpp
    support: the same early exit would otherwise skip a last layer's output-row selection, and builds before the
    Nemotron-Ultra support, 2025-04, refuse a layer without FFN tensors.)"""
    out = []
    for i, b in enumerate(hcfg.blocks):
        a, f = b.attention.kind, b.ffn.kind
        where = f"layer {i} ({b.describe()})"
        if f == "linear":
            out.append(f"{where}: llama.cpp's deci architecture has no linear FFN (DeciLM replace_with_linear)")
        elif f == "none" and a != "none":
            out.append(f"{where}: llama.cpp's deci graph drops the attention output of a layer without FFN "
                       "(it skips the rest of the layer when feed_forward_length is 0); remove the attention too "
                       "or keep an FFN")
        elif f == "mlp" and b.ffn.width % DECI_FFN_MULTIPLE:
            out.append(f"{where}: FFN width {b.ffn.width} is not a multiple of {DECI_FFN_MULTIPLE}, which the "
                       "DeciLM layout (ffn_mult) needs to read the file back")
    return out


def _exported(hcfg: HeteroConfig, params: Params | None = None) -> tuple[HeteroConfig, Params | None]:
    """What a deci GGUF holds of a heterogeneous model: its layers without the ``none/none`` ones. Each is the
    identity, so the file computes the same function; llama.cpp builds before its Nemotron-Ultra support (such as
    the one llama-cpp-cffi 0.4.42 ships) refuse a layer without FFN tensors, and an empty last layer would skip the
    output-row selection (see :func:`deci_problems`). Reading the file back gives the model without them."""
    from minitron_jax import hetero

    try:
        return hetero.without_identity_layers(hcfg, params)
    except ValueError as e:
        raise BadInputError(f"cannot export to llama.cpp's deci GGUF: {e}") from None


def _deci_specs(hcfg: HeteroConfig) -> list[tuple[str, str | None, int | None, str, tuple[int, ...], int | None]]:
    """(our key, HF name, layer, gguf name, HF shape, q/k heads) of every tensor of a ``deci`` export, in file order:
    embedding, then layer by layer, then final norm and output."""
    b = hcfg.base
    d, v = b.hidden_size, b.vocab_size
    specs = [("embed", HF_TOP_NAMES["embed"].template, None, "token_embd.weight", (v, d), None)]
    for i, spec in enumerate(hcfg.blocks):
        try:
            layer = deci_layer_tensors(i, spec, heads=b.num_heads, head_dim=b.head_dim, hidden=d)
        except GGUFError as e:
            raise BadInputError(str(e)) from None
        specs += [(key, hf, i, gg, shape, qk) for key, gg, hf, shape, qk in layer]
    specs.append(("final_norm", HF_TOP_NAMES["final_norm"].template, None, "output_norm.weight", (d,), None))
    if not b.tie_word_embeddings:
        specs.append(("lm_head", HF_TOP_NAMES["lm_head"].template, None, "output.weight", (v, d), None))
    return specs


def _plan(config: LlamaConfig | HeteroConfig, quant: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(hf name, gguf name, HF shape, GGML type) for every weight, refusing a block size that does not divide a row
    (and, for a heterogeneous model, a block llama.cpp cannot run) — before anything is computed or written."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    base = config.base if isinstance(config, HeteroConfig) else config
    if base.attention_bias or base.mlp_bias:
        raise BadInputError("GGUF export of a Llama with attention/MLP biases is not supported (llama.cpp's "
                            "'llama' layout and our GGUF reader have no bias tensors)")
    if isinstance(config, HeteroConfig):
        problems = deci_problems(config)
        if problems:
            more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
            raise BadInputError(f"cannot export to llama.cpp's deci GGUF: {problems[0]}{more}")
        specs = [(hf, gg, shape) for _key, hf, _layer, gg, shape, _qk in _deci_specs(_exported(config)[0])]
    else:
        specs = [(hf, gguf_name(hf), shape) for hf, _key, _layer, shape in hf_tensor_specs(config)]
    plan = []
    for hf_name, name, shape in specs:
        ttype = tensor_type(name, shape, quant)
        block = GGML_QUANT_SIZES[GGMLQuantizationType[ttype]][0]
        if shape[-1] % block:
            raise BadInputError(f"--quant {quant}: tensor {name} has shape {list(shape)} (rows of {shape[-1]}), "
                                f"not a multiple of the {ttype} block of {block}; choose f32/f16/bf16 or a width "
                                "divisible by 32")
        plan.append((hf_name, name, tuple(shape), ttype))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special``: added tokens spelled like control tokens are control."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>"))


def llama_cpp_pre(pre_tokenizer: dict | None) -> str | None:
    """The ``tokenizer.ggml.pre`` whose regex llama.cpp applies for a tokenizer.json ``pre_tokenizer``, or None
    when it is none we recognize. Recognized: GPT-2's (ByteLevel with its own regex), SmolLM's (single digits,
    then GPT-2's) and the Split regexes :mod:`~minitron_jax.convert.gguf_tokenizer` knows (Llama 3, Qwen2, Tekken)."""
    if not isinstance(pre_tokenizer, dict):
        return None
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    if kind != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers") or []
    if len(steps) != 2 or steps[1].get("type") != "ByteLevel":
        return None
    first, byte_regex = steps[0], steps[1].get("use_regex", True)
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_regex:
        return "smollm"  # llama.cpp's SMOLLM pre-type: \p{N} split, then GPT-2's regex
    if first.get("type") == "Split" and not byte_regex:
        pattern = (first.get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2", "tekken"):  # the names llama.cpp's converter writes for these regexes
            if PRE_TOKENIZER_SPLITS.get(name) == pattern:
                return name
    return None


def tokenizer_metadata(tokenizer: Any, config: LlamaConfig, pre: str | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata for a byte-level BPE transformers fast tokenizer, as ``convert_hf_to_gguf``
    builds it for a ``gpt2`` vocabulary: every id below the embedding's rows gets a token (``[PAD{i}]``, type
    unused, where the tokenizer has none), added tokens are control when special (or spelled like one) else
    user-defined. Raises BadInputError for a tokenizer llama.cpp's ``gpt2`` model cannot represent."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadInputError(f"GGUF export needs a transformers fast tokenizer (tokenizer.json), got "
                            f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or \
        "ByteLevel" in json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise BadInputError(f"GGUF export supports byte-level BPE tokenizers (llama.cpp 'gpt2': Llama 3, SmolLM2, "
                            f"...); this one is {model.get('type')} without a ByteLevel step")
    if pre is None:
        pre = llama_cpp_pre(spec.get("pre_tokenizer"))
        if pre is None:
            raise BadInputError("cannot tell which llama.cpp pre-tokenizer matches this tokenizer's pre_tokenizer "
                                f"{json.dumps(spec.get('pre_tokenizer'))[:120]}; pass "
                                "metadata={'tokenizer.ggml.pre': NAME}")

    vocab = tokenizer.get_vocab()
    n = config.vocab_size
    if max(vocab.values()) >= n:
        raise BadInputError(f"the tokenizer has token id {max(vocab.values())} but the model's embedding has only "
                            f"{n} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            special = added[i].special or _looks_special(token)
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(TOKEN_CONTROL if special else TOKEN_USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL)

    merges = model.get("merges") or []
    # tokenizer.json's newer format is [left, right] pairs; GGUF stores "left right" with a space inside a part
    # written as U+0120, as gguf-py's SpecialVocab does.
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m) for m in merges]

    extra = config.extra_dict
    ids: dict[str, int] = {}
    for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is None:
            value = extra.get(attr)
        if isinstance(value, list):  # HF allows several EOS ids; llama.cpp stores one
            value = value[0] if value else None
        if value is not None:
            ids[kind] = int(value)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = "bos" in ids and len(full) > len(plain) and full[0] == ids["bos"]
    add_eos = "eos" in ids and len(full) > len(plain) and full[-1] == ids["eos"]
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        **{f"tokenizer.ggml.{'padding' if k == 'pad' else 'unknown' if k == 'unk' else k}_token_id": v
           for k, v in ids.items()},
        "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": add_eos,
        "tokenizer.ggml.add_space_prefix": False,  # byte-level BPE spells the space itself
    }
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: gguf-py writes "default" plus tokenizer.chat_template.NAME
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        out["tokenizer.chat_template"] = template
    return out


def _write_tokenizer(writer, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    if meta["tokenizer.ggml.merges"]:
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in meta:
            add(meta[f"tokenizer.ggml.{key}"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    writer.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    writer.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(meta["tokenizer.chat_template"])


# ---------------------------------------------------------------------------------------------------------------
# general.* metadata


def _general_entries(metadata: dict | None) -> tuple[list[tuple[str, Any]], str | None]:
    """(``general.*`` key, value) pairs from the caller's ``metadata``, and its ``tokenizer.ggml.pre`` if any.

    Keys may be written with or without the ``general.`` prefix; ``base_models`` (a list of dicts with name,
    organization, version, repo_url...) expands to gguf's ``general.base_model.N.*`` keys."""
    entries: list[tuple[str, Any]] = []
    pre = None
    for key, value in (metadata or {}).items():
        if value is None:
            continue
        if key == "tokenizer.ggml.pre":
            if not isinstance(value, str) or not value:
                raise BadInputError(f"metadata tokenizer.ggml.pre must be a non-empty string, got {value!r}")
            pre = value
            continue
        if key in ("base_models", "general.base_models"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(b, dict) for b in value):
                raise BadInputError(f"metadata {key} must be a list of dicts (name, organization, repo_url...)")
            entries.append(("general.base_model.count", len(value)))
            for i, base in enumerate(value):
                entries.extend((f"general.base_model.{i}.{k}", v) for k, v in base.items() if v is not None)
            continue
        full = key if key.startswith("general.") else f"general.{key}"
        if "." in key and not key.startswith("general."):
            raise BadInputError(f"metadata key {key!r} is not general.*: llama.*/tokenizer.* metadata is derived "
                                "from the model and its tokenizer")
        if full in _DERIVED_GENERAL:
            raise BadInputError(f"metadata key {full!r} is derived from the export itself and cannot be given")
        entries.append((full, value))
    return entries, pre


def _add_value(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        # gguf-py's own counts (base_model.count...) are uint32; other integers get the widest type of their sign.
        vtype = GGUFValueType.UINT32 if key.endswith(".count") else \
            GGUFValueType.UINT64 if value >= 0 else GGUFValueType.INT64
        writer.add_key_value(key, int(value), vtype)
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        writer.add_array(key, list(value))
    else:
        raise BadInputError(f"metadata {key}: {type(value).__name__} {value!r:.60} is not a GGUF value "
                            "(str, int, float, bool or a list of str)")


def gguf_source_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a source GGUF worth carrying into an export of the same model (or a model derived from
    it): its ``general.*`` description (name, organization, license, languages...) and ``tokenizer.ggml.pre``,
    which a tokenizer rebuilt from the GGUF cannot always show (SmolLM2's ``smollm``). Keys the export derives
    itself (file type, size label...) are left out."""
    from minitron_jax.convert.gguf import read_gguf

    meta = read_gguf(path).metadata
    out = {k: v for k, v in meta.items()
           if k.startswith("general.") and k not in _DERIVED_GENERAL and k != "general.size_label"
           and not k.startswith("general.base_model.")}
    if isinstance(meta.get("tokenizer.ggml.pre"), str):
        out["tokenizer.ggml.pre"] = meta["tokenizer.ggml.pre"]
    bases = _indexed(meta, "general.base_model.")
    if bases:
        out["base_models"] = bases
    return out


def _indexed(meta: dict, prefix: str) -> list[dict]:
    count = meta.get(prefix + "count")
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return []
    return [{k[len(f"{prefix}{i}."):]: v for k, v in meta.items() if k.startswith(f"{prefix}{i}.")}
            for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# The destination: checked, locked, written to a temporary sibling


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_gguf_destination(path: str | os.PathLike, *, overwrite: bool = False, sources: Sequence = ()) -> Path:
    """Refuse a ``.gguf`` destination writing to which would destroy something; returns the absolute path.

    :func:`minitron_jax.fsutil.check_file_destination`: a destination that is or lies inside a source is refused;
    an existing file only with ``overwrite``, and only when it is itself a GGUF (``--overwrite`` never replaces a
    file of another kind, nor a directory)."""
    return check_file_destination(path, overwrite=overwrite, sources=sources, is_ours=_is_gguf, what="a GGUF file")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _quantized(arr: np.ndarray, ttype: str, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if ttype == "F32":
        return arr
    if ttype == "F16":
        with np.errstate(over="ignore"):  # checked just below, with the tensor's name
            out = arr.astype(np.float16)
        if not np.isfinite(out).all():
            raise NonFiniteError(f"tensor {name} has values beyond float16's range (max |w| = "
                                 f"{float(np.abs(arr).max()):.4g}); export as bf16 or f32")
        return out
    return quantize(arr, GGMLQuantizationType[ttype])


def _size_label(n_params: int) -> str:
    from gguf.utility import size_label

    return size_label(n_params, 0, 0, 0)


def save_gguf(path: str | os.PathLike, config: LlamaConfig | HeteroConfig, params: Params, *, tokenizer: Any,
              quant: str = "f16",
              metadata: dict | None = None, overwrite: bool = False, sources: Sequence = ()) -> dict[str, Any]:
    """Write a llama.cpp GGUF of the model and return a summary: ``path``, ``quant``, ``bytes`` (file size),
    ``params``, ``tensor_types`` (GGML type → count), ``seconds``.

    ``quant``: a key of :data:`QUANT_TYPES`. ``metadata``: ``general.*`` description (keys with or without the
    prefix: name, basename, organization, license, languages, base_models=[{name, organization, repo_url}]...) and
    optionally ``tokenizer.ggml.pre``. ``sources``: the inputs, which the destination must not be or lie inside.
    A :class:`~minitron_jax.hetero.HeteroConfig` is written as llama.cpp's ``deci`` (see the module docstring).
    Raises BadInputError (a bad quant/shape/tokenizer/destination, a block llama.cpp cannot run), FileExistsError,
    NonFiniteError (NaN/inf params, or values beyond float16 for f16) before anything is written."""
    from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
    from gguf.constants import GGML_QUANT_VERSION
    from gguf.quants import quant_shape_to_byte_shape

    from minitron_jax import hetero
    from minitron_jax.model import count_params

    deci = isinstance(config, HeteroConfig)
    base = config.base if deci else config

    t0 = time.perf_counter()
    if deci:
        config, params = _exported(config, params)
    if quant not in QUANT_TYPES:
        raise BadInputError(f"GGUF quant type {quant!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")
    if tokenizer is None:
        raise BadInputError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file); the "
                            "source carries none")
    path = check_gguf_destination(path, overwrite=overwrite, sources=sources)
    plan = _plan(config, quant)
    general, pre = _general_entries(metadata)
    tok_meta = tokenizer_metadata(tokenizer, base, pre)
    bad = first_nonfinite(params)  # a NaN/inf model loads fine in llama.cpp and generates garbage
    if bad is not None:
        raise NonFiniteError(f"not exporting to {path}: tensor {bad} holds NaN/inf values")

    rs = base.rope_scaling
    rope_freqs = None
    if rs is not None and rs.rope_type == "llama3":
        rope_freqs = llama3_rope_freqs(base.rope_theta, base.head_dim, rs.factor, rs.low_freq_factor,
                                       rs.high_freq_factor, rs.original_max_position_embeddings)
    elif rs is not None and rs.rope_type != "linear":
        raise BadInputError(f"RoPE scaling {rs.rope_type!r} has no GGUF export (llama3 and linear do)")

    n_params = hetero.count_params(config) if deci else count_params(config)
    names = {key for key, _ in general}
    writer = GGUFWriter(None, "deci" if deci else "llama")
    if "general.name" not in names:
        writer.add_name(path.stem)
    if "general.type" not in names:
        writer.add_type("model")
    for key, value in general:
        _add_value(writer, key, value)
    if "general.size_label" not in names:
        writer.add_size_label(_size_label(n_params))
    writer.add_uint64("general.parameter_count", n_params)
    writer.add_file_type(QUANT_TYPES[quant][1])
    writer.add_quantization_version(GGML_QUANT_VERSION)

    writer.add_vocab_size(base.vocab_size)
    writer.add_context_length(base.max_position_embeddings)
    writer.add_embedding_length(base.hidden_size)
    writer.add_block_count(config.num_layers)
    if deci:
        # One entry per layer (what llama.cpp's deci reads): query heads 0 = attention removed, KV heads 0 with
        # query heads = linear attention, FFN width 0 = FFN removed.
        blocks = config.blocks
        writer.add_feed_forward_length([b.ffn.width if b.ffn.kind == "mlp" else 0 for b in blocks])
        writer.add_head_count([0 if b.attention.kind == "none" else base.num_heads for b in blocks])
        writer.add_head_count_kv([b.attention.kv_heads if b.attention.kind == "gqa" else 0 for b in blocks])
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(base.head_dim)
    writer.add_rope_freq_base(base.rope_theta)
    writer.add_layer_norm_rms_eps(base.rms_norm_eps)
    if deci or base.num_heads * base.head_dim != base.hidden_size:
        # llama.cpp otherwise assumes head_dim = hidden / heads (and a pruned student's 480 / 9 is not even whole);
        # deci always: it would divide by the first layer's head count, which is 0 when that attention is removed.
        writer.add_key_length(base.head_dim)
        writer.add_value_length(base.head_dim)
    if rs is not None and rs.rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rs.factor)
    _write_tokenizer(writer, tok_meta)

    types: Counter[str] = Counter()
    for _hf, name, shape, ttype in plan:
        qtype = GGMLQuantizationType[ttype]
        nbytes = int(np.prod(quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        types[ttype] += 1
    if rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
        types["F32"] += 1

    if deci:
        from minitron_jax.convert.deci_hf import hf_tensors

        # deci_hf's tensors (HF layout, one at a time), in the order of the plan (checked tensor by tensor below).
        qk = {hf: heads for _key, hf, _layer, _gg, _shape, heads in _deci_specs(config)}
        tensors = ((hf_name, arr, qk[hf_name]) for hf_name, arr in hf_tensors(config, params))
    else:
        heads = {"q": config.num_heads, "k": config.num_kv_heads}

        def llama_tensors():
            for hf_name, arr in iter_hf_tensors(config, params):
                which = _QK.get(hf_name.split(".", 3)[-1]) if hf_name.startswith("model.layers.") else None
                yield hf_name, arr, heads[which] if which is not None else None

        tensors = llama_tensors()
    # The lock creates a missing destination directory; the write goes to a temporary sibling that replaces
    # ``path`` only once whole and fsynced (a failure leaves an existing GGUF as it was, and no temporary file).
    with lock_file(path):
        check_gguf_destination(path, overwrite=overwrite, sources=sources)  # again: another writer may have finished
        with atomic_file(path) as tmp:
            try:
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                # One tensor at a time (the header already holds every size), so peak memory stays near one tensor.
                for (hf_name, arr, qk_heads), (plan_hf, name, _shape, ttype) in zip(tensors, plan):
                    assert hf_name == plan_hf, (hf_name, plan_hf)
                    if qk_heads is not None:  # q per query head, k per (this layer's) KV head
                        arr = permute_qk(np.asarray(arr), qk_heads)
                    writer.write_tensor_data(_quantized(arr, ttype, name))
                if rope_freqs is not None:
                    writer.write_tensor_data(rope_freqs)
            finally:
                writer.close()  # flushes its buffers: atomic_file fsyncs what reached the file
    return {"path": str(path), "quant": quant, "bytes": path.stat().st_size, "params": n_params,
            "tensor_types": dict(sorted(types.items())), "seconds": time.perf_counter() - t0}
