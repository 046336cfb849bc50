"""Model I/O in every format we read: a ``.gguf`` file, an HF directory, or a minitron_jax Orbax checkpoint.

``load_model`` infers the format from the path, so every CLI (convert, eval, prune, distill) takes any of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from minitron_jax.config import LlamaConfig
from minitron_jax.hetero import HeteroConfig, config_from_hf, config_from_json_file
from minitron_jax.model import Params

AnyConfig = LlamaConfig | HeteroConfig

FORMATS = ("gguf", "hf", "orbax")


@dataclass
class LoadedModel:
    config: AnyConfig  # a LlamaConfig, or a HeteroConfig for a heterogeneous (DeciLM) model
    params: Params
    tokenizer: Any  # a transformers tokenizer, or None when the source carries none
    source: Path
    format: str


def detect_format(path: str | Path) -> str:
    from minitron_jax.convert.orbax import is_model_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{path} is a file but not a .gguf; give an HF model directory, a .gguf file or a "
                         "minitron_jax checkpoint directory")
    if is_model_checkpoint(path):
        return "orbax"
    if (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{path} is neither an HF model directory (no config.json) nor a minitron_jax checkpoint")


def load_model(path: str | Path, dtype=None, *, with_tokenizer: bool = True,
               progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load (config, params as host numpy arrays, tokenizer) from any supported format."""
    path = Path(path)
    fmt = detect_format(path)
    tokenizer_dir: Path | None = path
    if fmt == "hf":
        config = config_from_json_file(path / "config.json")
        if isinstance(config, HeteroConfig):  # a DeciLM (nemotron-nas) directory: per-layer blocks
            from minitron_jax.convert.deci_hf import load_deci_hf

            config, params = load_deci_hf(path, dtype=dtype, progress=progress, config=config)
        else:
            from minitron_jax.convert.hf import load_hf_params

            config, params = load_hf_params(path, config=config, dtype=dtype, progress=progress)
    elif fmt == "orbax":
        from minitron_jax.convert.orbax import load_model as load_orbax

        config, params = load_orbax(path, dtype=dtype)
        params = _to_numpy(params)
    else:
        config, params = load_gguf_params(path, dtype=dtype, progress=progress)
        tokenizer_dir = gguf_tokenizer_dir(path) if with_tokenizer else None
    tokenizer = load_tokenizer(tokenizer_dir) if with_tokenizer and tokenizer_dir is not None else None
    return LoadedModel(config, params, tokenizer, path, fmt)


def save_hf(path: str | Path, config: AnyConfig, params: Params, **kwargs) -> Path:
    """An HF directory of either kind of model: ``LlamaForCausalLM`` for a :class:`LlamaConfig`
    (:func:`minitron_jax.convert.hf.save_hf`); the Nemotron-NAS (``DeciLMForCausalLM``) layout with its modeling
    files for a :class:`~minitron_jax.hetero.HeteroConfig` (:func:`minitron_jax.convert.deci_hf.save_deci_hf`).
    Keyword arguments are ``hf.save_hf``'s (tokenizer, dtype, overwrite, sources, card, ...): atomic, refusing NaN."""
    if isinstance(config, HeteroConfig):
        from minitron_jax.convert.deci_hf import save_deci_hf

        return save_deci_hf(path, config, params, **kwargs)
    from minitron_jax.convert.hf import save_hf as save_llama_hf

    return save_llama_hf(path, config, params, **kwargs)


def load_gguf_params(path: Path, dtype=None, progress=None) -> tuple[AnyConfig, Params]:
    """A GGUF's (config, params): its metadata read as an HF config dict (Llama, or DeciLM for llama.cpp's
    ``deci``) and its tensors served under HF names, so the HF readers build the params."""
    from minitron_jax.convert.gguf import read_gguf

    gg = read_gguf(path, dtype=np.dtype(dtype) if dtype is not None else np.float32)
    config = config_from_hf(gg.hf_config)
    return config, params_from_hf_tensors(config, gg.get_tensor, dtype=dtype, progress=progress)


def params_from_hf_tensors(config: AnyConfig, get_tensor, dtype=None, progress=None) -> Params:
    """Our params from tensors named as in an HF checkpoint: Llama names for a uniform config, DeciLM's for a
    heterogeneous one."""
    if isinstance(config, HeteroConfig):
        from minitron_jax.convert.deci_hf import params_from_hf_tensors as from_tensors
    else:
        from minitron_jax.convert.hf import params_from_hf_tensors as from_tensors
    return from_tensors(config, get_tensor, dtype=dtype, progress=progress)


def hf_tensor_count(config: AnyConfig) -> int:
    """How many HF-named tensors a model of ``config`` has (Llama names, or DeciLM's for a heterogeneous model):
    the length of a conversion's progress bar."""
    if isinstance(config, HeteroConfig):
        from minitron_jax.convert.deci_hf import deci_tensor_specs as specs
    else:
        from minitron_jax.convert.hf import hf_tensor_specs as specs
    return sum(1 for _ in specs(config))


def read_source_config(path: str | Path, fmt: str | None = None) -> AnyConfig:
    """The config of any supported source, without reading its weights: a :class:`LlamaConfig`, or a
    :class:`~minitron_jax.hetero.HeteroConfig` for a heterogeneous (DeciLM) model."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "gguf":
        from minitron_jax.convert.gguf import read_gguf

        return config_from_hf(read_gguf(path).hf_config)
    return config_from_json_file(path / "config.json")


def gguf_tokenizer_dir(path: Path) -> Path:
    """Tokenizer files built from a GGUF's metadata, cached beside our other assets (keyed by file identity)."""
    from minitron_jax.convert.gguf import save_tokenizer
    from minitron_jax.convert.gguf_tokenizer import TOKENIZER_BUILD_VERSION
    from minitron_jax.data.assets import cache_dir

    stat = path.stat()
    # The builder's version is in the key so that a tokenizer saved by older code (which may split text
    # differently, e.g. SmolLM2 before the digit split) is rebuilt, never reused. "tok2" was the last unversioned
    # key (our own GGUF reader; earlier caches came from transformers' converter).
    version = f"tok{TOKENIZER_BUILD_VERSION}"
    key = hashlib.sha1(f"{version}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf_tokenizers" / key
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(path, out)
    return out


def load_tokenizer(path: str | Path):
    """A transformers tokenizer from a directory, or None when the directory holds no tokenizer files."""
    from minitron_jax.convert.hf import TOKENIZER_FILES

    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _is_deci_dir(path) and (path / "tokenizer.json").is_file():
        # AutoTokenizer falls back to config.json to pick a class, and a DeciLM config.json (auto_map: our shipped
        # modeling file) makes it ask whether to run remote code — a prompt that a script answers with EOF and a
        # crash. The tokenizer itself is a plain fast tokenizer (tokenizer.json): load it as one.
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def _is_deci_dir(path: Path) -> bool:
    import json

    from minitron_jax.hetero import is_deci_config

    try:
        return is_deci_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def _to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)
