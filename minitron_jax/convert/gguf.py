"""GGUF (llama.cpp) → Hugging Face Llama layout: config dict, dequantized tensors, tokenizer files.

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.hf_config                       # a transformers LlamaConfig-compatible config.json dict
    for name, array in model.iter_tensors():   # HF names and [out, in] shapes, one tensor at a time
        ...
    save_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf", "out_dir")   # tokenizer.json & co.

What differs between a llama.cpp GGUF and an HF Llama checkpoint, and how each is undone here:

- **Names**: ``blk.{i}.attn_q.weight`` ↔ ``model.layers.{i}.self_attn.q_proj.weight`` etc. (:data:`LAYER_NAMES`).
- **Quantization**: weights are stored in blocks (Q4_1, Q8_0, K-quants, …); :func:`dequantize_tensor` turns them
  into float32 with ``gguf.quants.dequantize`` (numpy). Only the types in :data:`SUPPORTED_TYPES` are accepted.
- **Shapes**: GGUF lists dimensions fastest-first (``[in, out]``); the bytes are the same row-major ``[out, in]``
  array HF uses, so only the shape is reversed, never the data.
- **RoPE layout**: llama.cpp rotates adjacent pairs (GPT-J style) while HF rotates halves (``rotate_half``), so
  llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` within each head (:func:`permute_qk`). We apply
  the exact inverse (:func:`unpermute_qk`) — for ``k_proj`` per *KV* head.
- **Heterogeneous models** (llama.cpp's ``deci`` architecture, Nemotron-NAS / DeciLM): per-layer arrays
  ``deci.attention.head_count`` / ``head_count_kv`` / ``feed_forward_length`` become a DeciLM ``block_configs``
  config dict (:func:`~minitron_jax.convert.gguf_config.build_hf_config`) and each layer's tensors are served under
  DeciLM's HF names (:func:`deci_layer_tensors`; a linear attention's ``attn_output`` is
  ``self_attn.linear_attn.weight``).
- **Config**: read from ``llama.*`` metadata (:mod:`~minitron_jax.convert.gguf_config`). Llama-3.1-style RoPE
  scaling is not stored as metadata but as a ``rope_freqs.weight`` tensor of per-frequency divisors; we recover the
  ``llama3`` ``rope_scaling`` dict from it and check that it reproduces the tensor.
- **Tokenizer**: GGUF stores vocabulary, merges and special ids as metadata. :func:`save_tokenizer` builds the
  tokenizer with the ``tokenizers`` library (:mod:`~minitron_jax.convert.gguf_tokenizer`: transformers' own GGUF
  route imports torch, which we do not depend on), saves it, and checks the saved files tokenize like the
  in-memory tokenizer; the tests check both against transformers' conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minitron_jax.blocks import BlockSpec, from_decilm

# The header checker is the lowest GGUF module: it owns the magic and the error type, re-exported here.
from minitron_jax.convert.gguf_config import build_hf_config
from minitron_jax.convert.gguf_header import GGUF_MAGIC, GGUFError

# ---------------------------------------------------------------------------------------------------------------
# Tensor types

# Types gguf-py can dequantize in numpy *and* that our tests check against an independent implementation (own
# reference for the 32-element block types, transformers' torch dequantizer for the K-quants). Anything else is
# refused rather than trusted blindly.
SUPPORTED_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)


def dequantize_tensor(data: np.ndarray, type_name: str, shape: tuple[int, ...], tensor_name: str) -> np.ndarray:
    """Raw GGUF tensor data (as ``GGUFReader`` gives it) → a new float32 array of ``shape`` (numpy order)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if type_name not in SUPPORTED_TYPES:
        raise GGUFError(
            f"tensor {tensor_name!r} has GGUF type {type_name}, which is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
        )
    out = dequantize(data, GGMLQuantizationType[type_name])
    # F32 comes back as a read-only view of the memory-mapped file: copy so callers own their arrays.
    return np.array(out, dtype=np.float32, copy=True).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Names and the q/k permutation

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-layer names, in the order tensors are yielded (HF's own state-dict order).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors that carry config, not weights.
CONFIG_TENSORS = ("rope_freqs.weight",)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_to_hf_name(name: str) -> str | None:
    """The HF parameter name for a llama.cpp tensor name; ``None`` if it is not a known Llama weight."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of HF q/k rows (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``): within each head,
    row ``j`` of the first half and row ``j`` of the second half become rows ``2j`` and ``2j+1``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: back to HF's half-split (``rotate_half``) row order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot undo the q/k permutation: {rows} rows is not a multiple of 2 × {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# DeciLM's (vLLM ``nemotron_nas``, transformers ``modeling_decilm``) names of its ``replace_with_linear`` sub-blocks,
# torch [out, in]. llama.cpp's ``deci`` stores the linear attention as the layer's ``attn_output`` [D, D] (its
# converter maps ``self_attn.linear_attn`` to ATTN_OUT) and has no tensor for a linear FFN.
DECI_LINEAR_ATTN = "self_attn.linear_attn.weight"
DECI_LINEAR_MLP = "mlp.linear_mlp.weight"
# Our per-layer param key → llama.cpp tensor suffix, for the keys a deci layer can hold.
DECI_GGUF_SUFFIX = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
    "o": "attn_output.weight", "attn_linear": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight", "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
}


def deci_layer_tensors(i: int, spec: BlockSpec, *, heads: int, head_dim: int, hidden: int
                       ) -> list[tuple[str, str, str, tuple[int, ...], int | None]]:
    """Layer ``i``'s tensors in a ``deci`` GGUF: (our param key, llama.cpp name, DeciLM HF name, HF [out, in] shape,
    heads its q/k rows are permuted over or None). A removed sub-block has none (llama.cpp: head_count 0 /
    feed_forward_length 0); a linear FFN has no llama.cpp tensor at all, so it is refused (GGUFError)."""
    d, a, f = hidden, spec.attention, spec.ffn
    hf, gg = f"model.layers.{i}.", f"blk.{i}."
    out = []
    if a.kind == "gqa":
        q, kv = heads * head_dim, a.kv_heads * head_dim
        out += [("attn_norm", (d,), "input_layernorm.weight", None), ("q", (q, d), "self_attn.q_proj.weight", heads),
                ("k", (kv, d), "self_attn.k_proj.weight", a.kv_heads), ("v", (kv, d), "self_attn.v_proj.weight", None),
                ("o", (d, q), "self_attn.o_proj.weight", None)]
    elif a.kind == "linear":
        out += [("attn_norm", (d,), "input_layernorm.weight", None), ("attn_linear", (d, d), DECI_LINEAR_ATTN, None)]
    if f.kind == "mlp":
        w = f.width
        out += [("mlp_norm", (d,), "post_attention_layernorm.weight", None),
                ("gate", (w, d), "mlp.gate_proj.weight", None), ("up", (w, d), "mlp.up_proj.weight", None),
                ("down", (d, w), "mlp.down_proj.weight", None)]
    elif f.kind == "linear":
        raise GGUFError(f"layer {i} ({spec.describe()}): llama.cpp's deci architecture has no linear FFN "
                        "(DeciLM replace_with_linear) tensor")
    return [(key, gg + DECI_GGUF_SUFFIX[key], hf + name, shape, qk) for key, shape, name, qk in out]


# ---------------------------------------------------------------------------------------------------------------
# Opening the file


def _open_reader(path: Path):
    """A ``GGUFReader`` for ``path``, with every failure turned into an error that names the file."""
    from gguf import GGUFReader

    from minitron_jax.convert.gguf_header import check_gguf_file

    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"{path} is not a file")
    # GGUFReader believes every declared count (a 133-byte file can make it allocate until the OOM killer comes):
    # the header is checked against the file size first, so the reader only ever sees a possible file. The check
    # also covers what the reader lets through: big-endian files, tensor data past the end of the file.
    check_gguf_file(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # a header the check accepts but the reader does not: keep the message, name the file
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    return reader


def _read_metadata(reader, max_array: int = 64) -> dict[str, Any]:
    """Metadata as plain Python values. Long arrays (the vocabulary, merges) are left out: they are the
    tokenizer's business and decoding them costs seconds. The architecture's own keys are kept whatever their
    length: a heterogeneous (``deci``) model has one head count and FFN width per layer (162 in Nemotron Ultra)."""
    from gguf import GGUFValueType

    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    own = f"{arch}." if isinstance(arch, str) and arch else None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > max_array \
                and not (own and key.startswith(own)):
            continue
        meta[key] = field.contents()
    return meta


# ---------------------------------------------------------------------------------------------------------------
# The tensors a config implies (the config itself is built from metadata in gguf_config)


def _expected_hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a Llama with this config has, in state-dict order, with its [out, in] shape."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = {
        "input_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    shapes["model.norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass(frozen=True)
class GGUFTensorRef:
    """Where one HF tensor lives in the GGUF, still quantized."""

    gguf_name: str
    type_name: str
    shape: tuple[int, ...]  # HF / numpy order
    data: Any  # GGUFReader's memory-mapped view; nothing is read until dequantized
    qk_heads: int | None  # heads to un-permute over (q: all heads, k: KV heads), None for other tensors


@dataclasses.dataclass
class GGUFModel:
    """A Llama GGUF seen through HF's eyes. Tensors stay memory-mapped and quantized until asked for."""

    path: Path
    hf_config: dict[str, Any]
    metadata: dict[str, Any]  # GGUF metadata, minus the long tokenizer arrays
    dtype: np.dtype
    _refs: dict[str, GGUFTensorRef] = dataclasses.field(repr=False)

    @property
    def tensor_names(self) -> list[str]:
        """HF names of all tensors, in the order :meth:`iter_tensors` yields them."""
        return list(self._refs)

    @property
    def tensor_types(self) -> dict[str, str]:
        """HF name → GGUF storage type (``"Q4_1"``, ``"F32"``, …)."""
        return {k: r.type_name for k, r in self._refs.items()}

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.shape for k, r in self._refs.items()}

    def raw_tensor(self, hf_name: str) -> GGUFTensorRef:
        """The GGUF-side view of one HF tensor: llama.cpp name, storage type and the raw (quantized) data."""
        try:
            return self._refs[hf_name]
        except KeyError:
            raise KeyError(f"{hf_name!r} is not a tensor of {self.path.name}") from None

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantized, un-permuted, in HF shape and ``self.dtype``."""
        ref = self.raw_tensor(hf_name)
        w = dequantize_tensor(ref.data, ref.type_name, ref.shape, ref.gguf_name)
        if ref.qk_heads is not None:
            w = unpermute_qk(w, ref.qk_heads)
        return np.ascontiguousarray(w, dtype=self.dtype)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(hf_name, array)`` one at a time, in HF state-dict order; peak memory stays near one tensor."""
        for name in self._refs:
            yield name, self.get_tensor(name)

    @functools.cached_property
    def tensors(self) -> dict[str, np.ndarray]:
        """All tensors at once (dequantized on first access; for big models prefer :meth:`iter_tensors`)."""
        return dict(self.iter_tensors())


def _is_deci(cfg: dict) -> bool:
    return "block_configs" in cfg


def deci_blocks(cfg: dict) -> tuple[BlockSpec, ...]:
    """The per-layer blocks of a DeciLM config dict (as :func:`~minitron_jax.convert.gguf_config.build_hf_config`
    builds it for a ``deci`` GGUF)."""
    from types import SimpleNamespace

    base = SimpleNamespace(num_heads=cfg["num_attention_heads"], hidden_size=cfg["hidden_size"])
    try:
        return from_decilm(base, cfg["block_configs"])
    except ValueError as e:
        raise GGUFError(str(e)) from None


def _expected_tensors(cfg: dict) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    """HF name → (llama.cpp name, HF [out, in] shape, heads to un-permute q/k rows over or None) for every tensor
    a model of this config has, in the order they are served."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": ("token_embd.weight", (v, d), None)}
    if _is_deci(cfg):
        heads, head_dim = cfg["num_attention_heads"], cfg["head_dim"]
        for i, spec in enumerate(deci_blocks(cfg)):
            for _key, gg, hf, shape, qk in deci_layer_tensors(i, spec, heads=heads, head_dim=head_dim, hidden=d):
                out[hf] = (gg, shape, qk)
    else:
        # q rows are permuted per query head, k rows per KV head (llama.cpp permutes k with n_head_kv).
        qk_heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        hf_to_gguf_layer = {hf: gg for gg, hf in LAYER_NAMES.items()}
        for hf, shape in _expected_hf_shapes(cfg).items():
            if hf.startswith("model.layers."):
                _, _, i, rest = hf.split(".", 3)
                out[hf] = (f"blk.{i}.{hf_to_gguf_layer[rest]}", shape, qk_heads.get(hf.split(".")[-2]))
    out["model.norm.weight"] = ("output_norm.weight", (d,), None)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = ("output.weight", (v, d), None)
    return out


def _tensor_refs(reader_tensors, cfg: dict, path: Path) -> dict[str, GGUFTensorRef]:
    """Map the file's tensors to HF names in state-dict order, checking names, shapes and types up front so a bad
    file fails before any dequantization work."""
    expected = _expected_tensors(cfg)
    gguf_to_hf = {gg: hf for hf, (gg, _, _) in expected.items()}
    by_hf, extra = {}, []
    for t in reader_tensors:
        if t.name in CONFIG_TENSORS:
            continue
        hf = gguf_to_hf.get(t.name)
        if hf is None:
            known = gguf_to_hf_name(t.name)
            if known is None:
                kind = "deci (Nemotron-NAS)" if _is_deci(cfg) else "Llama"
                raise GGUFError(f"{path}: tensor {t.name!r} is not part of a {kind} model (unsupported variant?)")
            extra.append(known)
            continue
        by_hf[hf] = t
    missing = [n for n in expected if n not in by_hf]
    if missing or extra:
        raise GGUFError(f"{path}: tensors do not match the config "
                        f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]})")
    refs = {}
    for hf, (_gg, shape, qk) in expected.items():
        t = by_hf[hf]
        got = tuple(int(x) for x in reversed(t.shape.tolist()))
        if got != shape:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {got} (HF order), expected {shape} for {hf}")
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name!r} has GGUF type {type_name}, which is not supported "
                            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        refs[hf] = GGUFTensorRef(t.name, type_name, shape, t.data, qk)
    return refs


def read_gguf(path: str | os.PathLike, dtype=np.float32) -> GGUFModel:
    """Open a Llama (``llama``) or heterogeneous (``deci``) GGUF: parse metadata into an HF config (a DeciLM one
    with ``block_configs`` for ``deci``) and check every tensor's name, type and shape.

    Tensors are not dequantized here (see :class:`GGUFModel`). Raises ``FileNotFoundError`` for a missing file and
    :class:`GGUFError` (a ``ValueError``) for a non-GGUF/truncated file, an architecture other than ``llama`` or
    ``deci``, an unsupported tensor type, or tensors that do not match the config.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    reader = _open_reader(path)
    meta = _read_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if "rope_freqs.weight" in by_name:
        t = by_name["rope_freqs.weight"]
        rope_freqs = dequantize_tensor(t.data, t.tensor_type.name, (int(t.n_elements),), t.name)
    try:
        cfg = build_hf_config(meta, by_name, rope_freqs, dtype, path)
    except GGUFError as e:  # the metadata helpers name the key; the one-line CLI error should name the file too
        if str(path) in str(e):
            raise
        raise GGUFError(f"{path}: {e}") from None
    refs = _tensor_refs(reader.tensors, cfg, path)
    return GGUFModel(path=path, hf_config=cfg, metadata=meta, dtype=dtype, _refs=refs)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

# Text the saved tokenizer must encode exactly like the in-memory one built from the GGUF: digits, unicode,
# runs of spaces and newlines, punctuation — the places where pre-tokenizers differ.
_TOKENIZER_PROBE = (
    "Hello world! In 1938, he earned a B.Sc. (forestry) — naïve café, 東京, emoji 🙂.\n\n"
    "  Two  spaces,\ttabs\tand trailing spaces   \n"
    "def f(x):\n    return x**2 + 3.14159  # comment\n"
    "I'm sure it's what they'd've wanted; don't."
)


def _check_gguf_path(gguf_path: str | os.PathLike) -> Path:
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file")
    return path


def load_gguf_tokenizer(gguf_path: str | os.PathLike):
    """The tokenizer a GGUF's metadata describes, as a transformers ``PreTrainedTokenizerFast``, built without
    torch (:mod:`minitron_jax.convert.gguf_tokenizer`)."""
    from minitron_jax.convert.gguf_tokenizer import load_gguf_tokenizer as build

    path = _check_gguf_path(gguf_path)
    return build(path, _open_reader(path))


def _update_json(path: Path, updates: dict, drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for k in drop:
        data.pop(k, None)
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write HF tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, and
    ``chat_template.jinja`` when the GGUF has ``tokenizer.chat_template``) for a GGUF into ``out_dir``.

    :mod:`minitron_jax.convert.gguf_tokenizer` builds the tokenizer (no torch); we then make the files loadable by
    older transformers too
    (``PreTrainedTokenizerFast`` class name, chat template also inside ``tokenizer_config.json``), reload them, and
    refuse to write anything if the reloaded tokenizer encodes a probe text or renders the chat template
    differently. Files are staged in a temporary directory and moved in one by one, so ``out_dir`` may already hold
    model weights. Returns the paths written.
    """
    from transformers import AutoTokenizer

    reference = load_gguf_tokenizer(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out_dir) as tmp:
        stage = Path(tmp)
        reference.save_pretrained(stage)
        special = {k: getattr(reference, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = {k: str(v) for k, v in special.items() if v is not None}
        config_updates: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
        if reference.chat_template:
            config_updates["chat_template"] = reference.chat_template
        # `is_local`/`local_files_only`/`name_or_path` describe how *this* load happened, not the tokenizer.
        _update_json(stage / "tokenizer_config.json", config_updates,
                     drop=("is_local", "local_files_only", "name_or_path"))
        _update_json(stage / "special_tokens_map.json", special)

        reloaded = AutoTokenizer.from_pretrained(str(stage), local_files_only=True)
        _check_same_tokenizer(reference, reloaded, gguf_path)

        written = []
        for f in sorted(stage.iterdir()):
            target = out_dir / f.name
            if target.is_dir():  # save_pretrained writes only files; a same-named dir is the user's: keep it
                raise GGUFError(f"{target} is a directory; not overwriting it with a tokenizer file")
            os.replace(f, target)
            written.append(target)
    return written


def _check_same_tokenizer(reference, candidate, source) -> None:
    texts = [_TOKENIZER_PROBE]
    if reference.chat_template:
        conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
        rendered = reference.apply_chat_template(conversation, tokenize=False)
        if candidate.apply_chat_template(conversation, tokenize=False) != rendered:
            raise GGUFError(f"saved tokenizer for {source} renders the chat template differently")
        texts.append(rendered)
    for text in texts:
        want, got = reference(text)["input_ids"], candidate(text)["input_ids"]
        if want != got:
            raise GGUFError(f"saved tokenizer for {source} encodes differently from the tokenizer "
                            f"built from the GGUF: {got[:12]}... vs {want[:12]}...")
        if candidate.decode(got) != reference.decode(want):
            raise GGUFError(f"saved tokenizer for {source} decodes differently from the tokenizer built from the GGUF")
