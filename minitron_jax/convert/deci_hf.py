"""Heterogeneous models ↔ HF directories in the Nemotron-NAS ("DeciLM") layout.

The layout is the one NVIDIA's Puzzle models (Llama-3.1-Nemotron-51B, -Super-49B, -Ultra-253B) ship and that vLLM
loads natively (``DeciLMForCausalLM`` in ``vllm/model_executor/models/nemotron_nas.py``): a Llama whose
``config.json`` carries one ``block_configs`` entry per layer (:meth:`~minitron_jax.hetero.HeteroConfig.to_hf`),
and whose tensors keep Llama's names for every sub-block that is still a Llama sub-block:

=================  ===============================================================================================
gqa attention      ``input_layernorm`` + ``self_attn.{q,k,v,o}_proj`` with this layer's KV heads (``k/v_proj`` are
                   [kv_heads * head_dim, D])
linear attention   ``input_layernorm`` + ``self_attn.linear_attn.weight`` [D, D] (no bias)
no-op attention    nothing: no norm either (the sub-block is skipped, residual untouched)
mlp ffn            ``post_attention_layernorm`` + ``mlp.{gate,up,down}_proj`` with this layer's width
linear ffn         ``post_attention_layernorm`` + ``mlp.linear_mlp.weight`` [D, D] (no bias)
no-op ffn          nothing
=================  ===============================================================================================

(all under ``model.layers.{i}.``; embedding, final norm and ``lm_head`` as in Llama). Linear weights are torch's
``[out, in]``; ours are ``[in, out]`` used as ``rms_norm(h) @ W``, so every matrix is transposed, exactly as
:mod:`~minitron_jax.convert.hf` does for the Llama names (no q/k permutation: RoPE stays half-split).

transformers has no DeciLM class of its own, so an exported directory also carries our modeling code
(``configuration_decilm.py``, ``modeling_decilm.py`` from :mod:`minitron_jax.convert.deci_modeling`) named by
``auto_map``: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs it. vLLM reads the same
``config.json`` through that configuration class and its own ``nemotron_nas`` model; vLLM's model builds only
GQA, MLP and no-op sub-blocks, so a model with *linear* sub-blocks runs in transformers but not (yet) in vLLM.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from minitron_jax.blocks import DECI_FFN_MULTIPLE
from minitron_jax.convert.hf import (
    DEFAULT_SHARD_BYTES,
    LAYER_NAMES,
    TOP_NAMES,
    ConversionError,
    HFName,
    SafetensorsDir,
    hf_shape,
    to_hf,
    to_ours,
    write_hf_directory,
)
from minitron_jax.exitcodes import BadInputError
from minitron_jax.hetero import HeteroConfig, config_from_json_file, param_shapes
from minitron_jax.model import Params

# The two [D, D] replacements; every other per-layer name is the Llama one (hf.LAYER_NAMES).
DECI_LAYER_NAMES = {
    **LAYER_NAMES,
    "attn_linear": HFName("model.layers.{i}.self_attn.linear_attn.weight", 1),
    "ffn_linear": HFName("model.layers.{i}.mlp.linear_mlp.weight", 1),
}

MODELING_PACKAGE = "minitron_jax.convert.deci_modeling"
MODELING_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}


def deci_tensor_specs(hcfg: HeteroConfig) -> Iterator[tuple[str, str, int | None, int | None, tuple[int, ...]]]:
    """``(hf_name, our key, segment index, layer within the segment, HF shape)`` for every tensor of the model,
    layer by layer; top-level tensors have segment and layer None."""
    shapes = param_shapes(hcfg)
    yield TOP_NAMES["embed"].template, "embed", None, None, hf_shape(shapes["embed"], TOP_NAMES["embed"])
    for s, ((start, stop, _), seg) in enumerate(zip(hcfg.segments(), shapes["segments"])):
        for j in range(stop - start):
            for key, shape in seg.items():
                name = DECI_LAYER_NAMES[key]
                yield name.template.format(i=start + j), key, s, j, hf_shape(shape[1:], name)
    for key in ("final_norm", "lm_head"):
        if key in shapes:
            yield TOP_NAMES[key].template, key, None, None, hf_shape(shapes[key], TOP_NAMES[key])


def params_from_hf_tensors(hcfg: HeteroConfig, get_tensor: Callable[[str], np.ndarray], dtype=None,
                           progress: Callable[[str], None] | None = None) -> Params:
    """Our params (``segments`` stacked per run of equal blocks) from DeciLM-named tensors fetched one at a time by
    ``get_tensor(hf_name)``: a safetensors directory or a GGUF served under HF names. Each segment's arrays are
    allocated once and filled layer by layer, so peak memory stays near one copy of the model."""
    shapes = param_shapes(hcfg)
    out: Params = {"segments": [{} for _ in shapes["segments"]]}
    for hf_name, key, seg, j, want in deci_tensor_specs(hcfg):
        arr = get_tensor(hf_name)
        if tuple(arr.shape) != want:
            raise ConversionError(f"{hf_name}: checkpoint shape {tuple(arr.shape)}, config "
                                  f"({hcfg.describe()}) expects {want}")
        target = dtype or arr.dtype
        if seg is None:
            out[key] = np.ascontiguousarray(to_ours(arr, TOP_NAMES[key], shapes[key]), dtype=target)
        else:
            stacked = out["segments"][seg].get(key)
            if stacked is None:
                stacked = out["segments"][seg][key] = np.empty(shapes["segments"][seg][key], dtype=target)
            stacked[j] = to_ours(arr, DECI_LAYER_NAMES[key], shapes["segments"][seg][key][1:])
        if progress:
            progress(hf_name)
    return out


def hf_tensors(hcfg: HeteroConfig, params: Params, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) for every tensor, one at a time (export never holds a second full copy): the
    inverse of :func:`params_from_hf_tensors`."""
    for hf_name, key, seg, j, _ in deci_tensor_specs(hcfg):
        if seg is None:
            arr, name = params[key], TOP_NAMES[key]
        else:
            arr, name = params["segments"][seg][key][j], DECI_LAYER_NAMES[key]
        arr = np.asarray(arr)
        if dtype is not None:
            arr = arr.astype(dtype)
        yield hf_name, np.ascontiguousarray(to_hf(arr, name))


def vllm_problems(hcfg: HeteroConfig) -> list[str]:
    """Why vLLM's ``nemotron_nas`` model cannot build each layer that it cannot, one line per layer: it builds GQA,
    MLP and no-op sub-blocks only, so a *linear* attention or FFN (``replace_with_linear``) has no module there
    (transformers runs it through our modeling file)."""
    out = []
    for i, b in enumerate(hcfg.blocks):
        linear = [part for part, kind in (("attention", b.attention.kind), ("FFN", b.ffn.kind)) if kind == "linear"]
        if linear:
            out.append(f"layer {i} ({b.describe()}): vLLM's nemotron_nas builds no linear {' or '.join(linear)} "
                       "(replace_with_linear)")
    return out


def deci_hf_config(hcfg: HeteroConfig) -> dict[str, Any]:
    """``config.json`` of an exported directory: the DeciLM config plus ``auto_map`` naming the shipped modeling
    files (what ``trust_remote_code`` loads)."""
    out = hcfg.to_hf()
    out["auto_map"] = dict(AUTO_MAP)
    return out


def modeling_sources() -> dict[str, str]:
    """The shipped modeling files' text by file name (package data of :data:`MODELING_PACKAGE`)."""
    root = resources.files(MODELING_PACKAGE)
    return {name: root.joinpath(name).read_text(encoding="utf-8") for name in MODELING_FILES}


def _write_modeling_files(directory: Path) -> None:
    for name, text in modeling_sources().items():
        (directory / name).write_text(text, encoding="utf-8")


def save_deci_hf(path: str | Path, hcfg: HeteroConfig, params: Params, *, tokenizer: Any = None,
                 tokenizer_dir: str | Path | None = None, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, generation_config: dict | None = None,
                 progress: Callable[[str], None] | None = None, sources: Sequence[str | Path | None] = (),
                 card: Any = None) -> Path:
    """Write a DeciLM HF directory: ``config.json`` (with ``auto_map``), safetensors (sharded above
    ``max_shard_bytes``), ``generation_config.json``, the tokenizer (an object or copied from ``tokenizer_dir``),
    the modeling files and ``card`` as ``README.md`` — atomically, refusing NaN/inf params, exactly as
    :func:`minitron_jax.convert.save_hf` calls this for a :class:`HeteroConfig` (and hf.save_hf for a Llama)."""
    if not isinstance(hcfg, HeteroConfig):
        raise TypeError(f"save_deci_hf needs a HeteroConfig, got {type(hcfg).__name__}")
    for i, block in enumerate(hcfg.blocks):
        # DeciLM stores a width as ffn_mult and rounds what it derives up to a multiple of 256: any other width
        # would load as a different model. Refused before anything is written, naming the layer.
        if block.ffn.kind == "mlp" and block.ffn.width % DECI_FFN_MULTIPLE:
            raise BadInputError(f"not exporting to {path}: layer {i} has FFN width {block.ffn.width}, which the "
                                f"DeciLM layout cannot express (its widths are multiples of {DECI_FFN_MULTIPLE})")
    return write_hf_directory(path, deci_hf_config(hcfg), hf_tensors(hcfg, params, dtype), params,
                              tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite, generation_config=generation_config, progress=progress,
                              sources=sources, card=card, extra_files=_write_modeling_files)


# The block_configs keys we read. Newer Nemotron-NAS models add others (Mamba mixers, MoE FFNs, Llama-4
# attention...): one we do not know is refused when it is set, since reading the block without it would build a
# different network; a key present but off (false, null, 0) changes nothing and is accepted.
BLOCK_KEYS = {"attention": {"no_op", "replace_with_linear", "n_heads_in_group", "sparsify", "window_length",
                            "num_sink_tokens"},
              "ffn": {"no_op", "replace_with_linear", "ffn_mult", "sparsify"}}
# Set keys that state what we run anyway.
HARMLESS_BLOCK_VALUES = {("ffn", "hidden_act"): "silu", ("ffn", "gated"): True}


def check_block_keys(hf: dict[str, Any], where: str | Path) -> None:
    """ConfigError naming ``where`` (the config.json) and the first ``block_configs`` key that is set but that
    this reader does not implement."""
    from minitron_jax.config import ConfigError

    blocks = hf.get("block_configs") if isinstance(hf, dict) else None
    for i, bc in enumerate(blocks if isinstance(blocks, list) else []):
        if not isinstance(bc, dict):
            continue  # HeteroConfig.from_hf reports the shape of a malformed entry
        for key, value in bc.items():
            if key not in BLOCK_KEYS and value:
                raise ConfigError(f"{where}: block_configs[{i}].{key} = {value!r} is not supported")
        for part, known in BLOCK_KEYS.items():
            sub = bc.get(part)
            for key, value in (sub.items() if isinstance(sub, dict) else ()):
                if key not in known and value and HARMLESS_BLOCK_VALUES.get((part, key)) != value:
                    raise ConfigError(f"{where}: block_configs[{i}].{part}.{key} = {value!r} is not supported "
                                      f"(known {part} keys: {', '.join(sorted(known))})")


def read_deci_config(path: str | Path) -> HeteroConfig:
    """The :class:`HeteroConfig` of an HF directory; ConfigError naming ``config.json`` for anything else, or for
    a block key that is set and not implemented here (:func:`check_block_keys`)."""
    from minitron_jax.config import ConfigError

    cfg_path = Path(path) / "config.json"
    config = config_from_json_file(cfg_path)
    if not isinstance(config, HeteroConfig):
        raise ConfigError(f"{cfg_path}: not a DeciLM (nemotron-nas) config: no block_configs")
    check_block_keys(json.loads(cfg_path.read_text()), cfg_path)
    return config


def load_deci_hf(path: str | Path, dtype=None, progress: Callable[[str], None] | None = None,
                 config: HeteroConfig | None = None) -> tuple[HeteroConfig, Params]:
    """DeciLM HF directory → (HeteroConfig, params as host numpy arrays). ``dtype`` casts (default: keep the
    checkpoint's). Tensors the config does not use (``rotary_emb.inv_freq``...) are ignored; a missing tensor or a
    shape that disagrees with ``block_configs`` is a ConversionError naming the directory and the tensor."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    if config is None:
        config = read_deci_config(path)
    else:
        check_block_keys(json.loads((path / "config.json").read_text()), path / "config.json")
    st = SafetensorsDir(path)
    if config.base.tie_word_embeddings and "lm_head.weight" in st and "model.embed_tokens.weight" not in st:
        raise ConversionError(f"{path}: tied config but only lm_head.weight present")
    try:
        return config, params_from_hf_tensors(config, st.get, dtype=dtype, progress=progress)
    except ConversionError as e:
        # As hf.load_hf_params: the tensor readers name the tensor, the one line also says which model.
        raise ConversionError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
