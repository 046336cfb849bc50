"""Hugging Face safetensors ↔ params.

The name map is one small table: for each of our parameters, HF's name and how many of its leading axes are HF's
input dimension. Every HF Linear weight is [out, in]; ours is [in..., out...] (``x @ W``), so conversion is a
transpose plus a reshape and nothing else (RoPE is kept in HF's half-split layout, so no q/k permutation).

Loading streams tensor by tensor from memory-mapped files, filling one stacked [L, ...] array per parameter, so
peak host memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from minitron_jax.config import LlamaConfig
from minitron_jax.exitcodes import BadInputError, NonFiniteError
from minitron_jax.fsutil import atomic_directory
from minitron_jax.model import Params, param_axes, param_shapes


class ConversionError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


@dataclass(frozen=True)
class HFName:
    template: str  # "{i}" stands for the layer index
    # Leading axes of our (per-layer) array that form HF's input dim of a Linear weight (transpose + reshape);
    # 0: a vector (bias or norm) that HF stores flat; None: stored exactly as we store it (the embedding).
    n_in: int | None


# Our param name → HF tensor name (layer params are per-layer slices of the stacked array).
TOP_NAMES = {
    "embed": HFName("model.embed_tokens.weight", None),  # both [V, D]: no transpose
    "final_norm": HFName("model.norm.weight", 0),
    "lm_head": HFName("lm_head.weight", 1),
}
LAYER_NAMES = {
    "attn_norm": HFName("model.layers.{i}.input_layernorm.weight", 0),
    "mlp_norm": HFName("model.layers.{i}.post_attention_layernorm.weight", 0),
    "q": HFName("model.layers.{i}.self_attn.q_proj.weight", 1),
    "k": HFName("model.layers.{i}.self_attn.k_proj.weight", 1),
    "v": HFName("model.layers.{i}.self_attn.v_proj.weight", 1),
    "o": HFName("model.layers.{i}.self_attn.o_proj.weight", 3),
    "gate": HFName("model.layers.{i}.mlp.gate_proj.weight", 1),
    "up": HFName("model.layers.{i}.mlp.up_proj.weight", 1),
    "down": HFName("model.layers.{i}.mlp.down_proj.weight", 1),
    "q_bias": HFName("model.layers.{i}.self_attn.q_proj.bias", 0),
    "k_bias": HFName("model.layers.{i}.self_attn.k_proj.bias", 0),
    "v_bias": HFName("model.layers.{i}.self_attn.v_proj.bias", 0),
    "o_bias": HFName("model.layers.{i}.self_attn.o_proj.bias", 0),
    "gate_bias": HFName("model.layers.{i}.mlp.gate_proj.bias", 0),
    "up_bias": HFName("model.layers.{i}.mlp.up_proj.bias", 0),
    "down_bias": HFName("model.layers.{i}.mlp.down_proj.bias", 0),
}

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def to_ours(hf_array: np.ndarray, name: HFName, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor → our (per-layer) array of ``shape``."""
    arr = hf_array.T if name.n_in else hf_array
    return arr.reshape(shape)


def to_hf(array: np.ndarray, name: HFName) -> np.ndarray:
    """Our (per-layer) array → HF tensor ([out, in] for Linear weights)."""
    if name.n_in is None:
        return array
    if name.n_in == 0:
        return array.reshape(-1)
    n_in = int(np.prod(array.shape[: name.n_in]))
    return array.reshape(n_in, -1).T


def hf_tensor_specs(config: LlamaConfig) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """(hf_name, our top-level or layer key, layer index or None, HF shape) for every tensor the model has."""
    shapes = param_shapes(config)
    for key in param_axes(config):
        if key == "layers":
            continue
        yield TOP_NAMES[key].template, key, None, hf_shape(shapes[key], TOP_NAMES[key])
    for key, shape in shapes["layers"].items():
        for i in range(config.num_layers):
            yield LAYER_NAMES[key].template.format(i=i), key, i, hf_shape(shape[1:], LAYER_NAMES[key])


def hf_shape(shape: tuple[int, ...], name: HFName) -> tuple[int, ...]:
    """HF's shape of the tensor that holds our (per-layer) array of ``shape``."""
    if name.n_in is None:
        return shape
    if name.n_in == 0:
        return (int(np.prod(shape)),)
    return int(np.prod(shape[name.n_in:])), int(np.prod(shape[: name.n_in]))


# ------------------------------------------------------------------------------------------------------------------
# Reading safetensors (memory-mapped; numpy's safetensors reader cannot return bfloat16)
# ------------------------------------------------------------------------------------------------------------------
# Every whole-byte dtype the safetensors format defines, with its size. Byte ranges are checked against these even for
# tensors we cannot load (not in DTYPES), so a header that lies is refused when the file is opened, not when read.
SAFETENSORS_ITEMSIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# The header is JSON read whole into memory: cap it (the safetensors library's own limit is 100 MB too).
MAX_SAFETENSORS_HEADER = 100_000_000


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false load as Python bools


def _check_safetensors_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    """Refuse a header entry whose dtype, shape or byte range is impossible, naming the file and the tensor."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ConversionError(f"{where}: header entry is {_short(entry)}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZES:
        raise ConversionError(f"{where} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_json_int(d) and d >= 0 for d in shape):
        raise ConversionError(f"{where} has shape {_short(shape)}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_json_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ConversionError(f"{where} has data_offsets {_short(offsets)}; expected [begin, end] with "
                              "0 <= begin <= end")
    if offsets[1] > data_size:
        raise ConversionError(f"{where} has data_offsets {offsets}, past the end of the {data_size} data bytes "
                              "(truncated file?)")
    n_elements = 0 if 0 in shape else 1
    for d in shape:  # stop once impossible: a long list of huge dims would otherwise build a huge integer
        n_elements *= d
        if n_elements > data_size:
            break
    n_bytes = n_elements * SAFETENSORS_ITEMSIZES[dtype]
    if n_bytes != offsets[1] - offsets[0]:
        raise ConversionError(f"{where}: shape {_short(shape)} of {dtype} needs {n_bytes} bytes but data_offsets "
                              f"{offsets} hold {offsets[1] - offsets[0]}")


class SafetensorsFile:
    """A memory-mapped safetensors file. Tensors are views into the map: reading one costs only its pages.

    The header is untrusted: its length is checked against the file before it is read, and every tensor's dtype,
    shape and byte range before any tensor is (see :func:`_check_safetensors_entry`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConversionError(f"{self.path}: corrupt safetensors header: declares {n} header bytes but only "
                                      f"{size - 8} follow")
            if n > MAX_SAFETENSORS_HEADER:
                raise ConversionError(f"{self.path}: safetensors header of {n} bytes is over the "
                                      f"{MAX_SAFETENSORS_HEADER}-byte limit")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors; deep nesting recurses
                raise ConversionError(f"{self.path}: corrupt safetensors header: {type(e).__name__}: "
                                      f"{_short(str(e), 200)}") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: corrupt safetensors header: JSON {type(header).__name__}, "
                                  "not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ConversionError(f"{self.path}: safetensors __metadata__ is {_short(metadata)}, not an object")
        self.data_start = 8 + n
        for name, entry in header.items():
            _check_safetensors_entry(self.path, name, entry, size - self.data_start)
        self.metadata = metadata
        self.entries = header
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise ConversionError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        raw = self._map[self.data_start + start: self.data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsDir:
    """Every tensor of an HF model directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (path / f).is_file():
                    raise ConversionError(f"{index} lists {f}, which is missing from {path}")
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                if list(path.glob("*.bin")) or list(path.glob("*.pth")):
                    raise ConversionError(f"{path} holds PyTorch .bin weights; only safetensors are supported "
                                          "(convert with transformers: model.save_pretrained(dir))")
                raise ConversionError(f"no *.safetensors files in {path}")
        self.files = {f: SafetensorsFile(path / f) for f in files}
        self.where = {k: f for f, sf in self.files.items() for k in sf.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConversionError(f"tensor {name} is missing from the checkpoint")
        return self.files[self.where[name]].get(name)

    def dtypes(self) -> set[str]:
        return {sf.entries[k]["dtype"] for k, f in self.where.items() for sf in [self.files[f]]}


def read_config(path: str | Path) -> LlamaConfig:
    return LlamaConfig.from_json_file(Path(path) / "config.json")


def load_hf_params(path: str | Path, config: LlamaConfig | None = None, dtype=None,
                   progress: Callable[[str], None] | None = None) -> tuple[LlamaConfig, Params]:
    """HF model directory → (config, params) as host numpy arrays.

    ``dtype`` casts every parameter (default: keep the checkpoint's dtype). Unused tensors such as
    ``rotary_emb.inv_freq`` are ignored; a missing tensor or a shape that disagrees with the config is an error
    naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    config = config or read_config(path)
    st = SafetensorsDir(path)
    if config.tie_word_embeddings and "lm_head.weight" in st and "model.embed_tokens.weight" not in st:
        raise ConversionError(f"{path}: tied config but only lm_head.weight present")
    try:
        return config, params_from_hf_tensors(config, st.get, dtype=dtype, progress=progress)
    except ConversionError as e:
        # The tensor readers name the tensor, not the directory; the one line should say which model it is.
        raise ConversionError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def params_from_hf_tensors(config: LlamaConfig, get: Callable[[str], np.ndarray], dtype=None,
                           progress: Callable[[str], None] | None = None) -> Params:
    """Assemble params from HF-named tensors fetched one at a time by ``get(hf_name)`` (safetensors or GGUF)."""
    shapes = param_shapes(config)
    out: Params = {"layers": {}}
    for hf_name, key, layer, hf_shape in hf_tensor_specs(config):
        arr = get(hf_name)
        if tuple(arr.shape) != hf_shape:
            raise ConversionError(f"{hf_name}: checkpoint shape {tuple(arr.shape)}, config "
                                  f"({config.describe()}) expects {hf_shape}")
        target_dtype = dtype or arr.dtype
        if layer is None:
            out[key] = np.ascontiguousarray(to_ours(arr, TOP_NAMES[key], shapes[key]), dtype=target_dtype)
        else:
            stacked = out["layers"].get(key)
            if stacked is None:
                stacked = out["layers"][key] = np.empty(shapes["layers"][key], dtype=target_dtype)
            stacked[layer] = to_ours(arr, LAYER_NAMES[key], shapes["layers"][key][1:])
        if progress:
            progress(hf_name)
    return out


def iter_hf_tensors(config: LlamaConfig, params: Params, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) for every tensor, one at a time (so export never holds a second full copy)."""
    for hf_name, key, layer, _ in hf_tensor_specs(config):
        if layer is None:
            arr, name = params[key], TOP_NAMES[key]
        else:
            arr, name = params["layers"][key][layer], LAYER_NAMES[key]
        arr = np.asarray(arr)
        if dtype is not None:
            arr = arr.astype(dtype)
        yield hf_name, np.ascontiguousarray(to_hf(arr, name))


# ------------------------------------------------------------------------------------------------------------------
# Writing an HF directory, atomically
# ------------------------------------------------------------------------------------------------------------------
DEFAULT_SHARD_BYTES = 2 * 1024**3
_TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                      np.dtype(np.float16): "float16"}


def first_nonfinite(tree: Any, name: str = "") -> str | None:
    """The name (``layers.q[3]``: index 3 along the first axis, the layer of a stacked param) of the first floating
    tensor in ``tree`` holding a NaN/inf, or None. Host-side, a block of rows at a time so the mask stays small."""
    if isinstance(tree, (dict, list, tuple)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for key, value in items:
            found = first_nonfinite(value, f"{name}.{key}" if name else str(key))
            if found is not None:
                return found
        return None
    arr = np.asarray(tree)
    if (arr.dtype.kind not in "fc" and arr.dtype != ml_dtypes.bfloat16) or arr.size == 0:
        return None
    if arr.ndim == 0:
        return None if np.isfinite(arr) else name
    rows = max(1, (1 << 24) // max(1, arr[0].size))
    for start in range(0, len(arr), rows):
        finite = np.isfinite(arr[start:start + rows]).reshape(min(rows, len(arr) - start), -1).all(axis=1)
        if not finite.all():
            return f"{name}[{start + int(np.argmin(finite))}]"
    return None


def save_hf(path: str | Path, config: Any, params: Params, *, tokenizer: Any = None,
            tokenizer_dir: str | Path | None = None, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False, generation_config: dict | None = None,
            progress: Callable[[str], None] | None = None, sources: Sequence[str | Path | None] = (),
            card: Any = None) -> Path:
    """Write an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads as ``LlamaForCausalLM`` (or
    Mistral, see ``LlamaConfig.hf_architecture``). Either kind of model: :func:`minitron_jax.convert.save_hf`.

    Written into a temporary sibling directory and renamed into place at the end, so a crash never leaves a
    half-written model at ``path``. Shards above ``max_shard_bytes`` with a ``model.safetensors.index.json``.
    The tokenizer comes from a transformers tokenizer object or is copied from ``tokenizer_dir``. ``sources`` (the
    inputs, e.g. the model converted) must not be, contain or lie inside ``path``: see ``fsutil.check_destination``.
    ``card``: a :class:`~minitron_jax.convert.model_card.ModelCard` written as the directory's ``README.md``, inside
    the same atomic write (a model never appears without its card)."""
    if not isinstance(config, LlamaConfig):
        # (convert.save_hf dispatches; this module stays below deci_hf, which builds on its tables.)
        raise TypeError(f"hf.save_hf writes a uniform Llama; use minitron_jax.convert.save_hf for a "
                        f"{type(config).__name__}")
    kwargs = dict(tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  overwrite=overwrite, generation_config=generation_config, progress=progress, sources=sources,
                  card=card)
    return write_hf_directory(path, config.to_hf(), iter_hf_tensors(config, params, dtype), params, **kwargs)


def write_hf_directory(path: str | Path, hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]],
                       params: Params, *, tokenizer: Any = None, tokenizer_dir: str | Path | None = None,
                       dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                       generation_config: dict | None = None, progress: Callable[[str], None] | None = None,
                       sources: Sequence[str | Path | None] = (), card: Any = None,
                       extra_files: Callable[[Path], None] | None = None) -> Path:
    """The one writer of HF directories (Llama and DeciLM alike): ``tensors`` (HF name, array), produced lazily
    from ``params``, go into safetensors shards; ``hf_config`` into ``config.json`` with the stored dtype as
    ``torch_dtype``; then ``generation_config.json``, the tokenizer, ``extra_files(tmp)`` (files a layout ships
    beside its weights, e.g. modeling code) and the card, all inside one atomic directory write. ``params`` is
    checked for NaN/inf before anything is written. ``dtype`` is only recorded here (``tensors`` are already
    cast)."""
    from safetensors.numpy import save_file

    del dtype  # the tensors come cast; kept in the signature so save_hf's keyword arguments pass straight through
    if not (isinstance(max_shard_bytes, numbers.Real) and max_shard_bytes > 0):  # <= 0 wrote one file per tensor
        raise BadInputError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    bad = first_nonfinite(params)  # a NaN/inf model loads fine and generates garbage: refuse before writing
    if bad is not None:
        raise NonFiniteError(f"not exporting to {path}: tensor {bad} holds NaN/inf values")
    with atomic_directory(path, overwrite=overwrite, sources=[*sources, tokenizer_dir]) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        shard_bytes = 0
        files: list[str] = []

        def flush():
            nonlocal shard_bytes
            if shards[-1]:
                name = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
                files.append(name)
                shards[-1] = {}
                shard_bytes = 0

        weight_map: dict[str, str] = {}
        total = 0
        out_dtype = None
        for hf_name, arr in tensors:
            out_dtype = arr.dtype
            if shard_bytes and shard_bytes + arr.nbytes > max_shard_bytes:
                flush()
            shards[-1][hf_name] = arr
            shard_bytes += arr.nbytes
            total += arr.nbytes
            weight_map[hf_name] = f"model-{len(files) + 1:05d}.safetensors"
            if progress:
                progress(hf_name)
        flush()
        if len(files) == 1:
            os.rename(tmp / files[0], tmp / "model.safetensors")
        else:
            renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
            for old, new in renamed.items():
                os.rename(tmp / old, tmp / new)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        hf_config = dict(hf_config)
        hf_config["torch_dtype"] = _TORCH_DTYPE_NAMES.get(np.dtype(out_dtype), "float32")
        hf_config.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        gen = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf_config.get(key) is not None:
                gen[key] = hf_config[key]
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if extra_files is not None:
            extra_files(tmp)
        if card is not None:
            from minitron_jax.convert.model_card import write_model_card

            write_model_card(tmp, card)

    return Path(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
