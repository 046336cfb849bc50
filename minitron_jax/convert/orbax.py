"""Orbax checkpoints of a model: params + config (+ tokenizer files), in one directory.

Layout of a model checkpoint directory::

    DIR/minitron_jax.json   marker: format name and version (how `convert.load_model` recognizes it)
    DIR/config.json         the HF config (so the architecture is readable without JAX)
    DIR/params/             the params pytree, written by Orbax
    DIR/tokenizer*.json     tokenizer files, when known

The directory is assembled in a temporary sibling and renamed into place, so an interrupted save never leaves a
checkpoint that looks complete. Training checkpoints (params + optimizer state + data position) live in
``distill.py`` on top of Orbax's CheckpointManager.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from minitron_jax.arch import AnyConfig, abstract_params, check_params, config_from_json_file
from minitron_jax.fsutil import atomic_directory, quiet_refusal_logs
from minitron_jax.model import Params

MARKER = "minitron_jax.json"
FORMAT = {"format": "minitron_jax.model", "version": 1}


def is_model_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_model(path: str | Path, config: AnyConfig, params: Params, *, tokenizer: Any = None,
               tokenizer_dir: str | Path | None = None, overwrite: bool = False,
               sources: Sequence[str | Path | None] = ()) -> Path:
    """``sources`` (the inputs) must not be, contain or lie inside ``path``: see ``fsutil.check_destination``."""
    from minitron_jax.convert.hf import copy_tokenizer_files

    check_params(config, params)
    path = Path(path).absolute()
    quiet_refusal_logs()  # a full disk is reported once, as one line, not as Orbax's absl tracebacks
    with atomic_directory(path, overwrite=overwrite, sources=[*sources, tokenizer_dir]) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        (tmp / MARKER).write_text(json.dumps(FORMAT) + "\n")
    return path


def load_model(path: str | Path, dtype=None, shardings: Params | None = None) -> tuple[AnyConfig, Params]:
    """Restore (config, params). ``shardings`` (a tree of NamedSharding) restores each array straight onto its
    devices; ``dtype`` casts on restore."""
    path = Path(path).absolute()
    if not is_model_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a minitron_jax model checkpoint (no {MARKER})")
    marker = json.loads((path / MARKER).read_text())
    if marker.get("format") != FORMAT["format"] or marker.get("version", 0) > FORMAT["version"]:
        raise ValueError(f"{path}: unsupported checkpoint format {marker}")
    config = config_from_json_file(path / "config.json")  # a DeciLM config.json is a heterogeneous model
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "params").item_metadata

        def abstract(key_path, leaf):
            node = stored
            for k in key_path:  # the stored tree is a mapping, not a pytree: walk it by key (or list index)
                node = node[k.idx if isinstance(k, jax.tree_util.SequenceKey) else k.key]
            if tuple(node.shape) != tuple(leaf.shape):
                raise ValueError(f"{path}: {jax.tree_util.keystr(key_path)} stored with shape {tuple(node.shape)}, "
                                 f"config expects {tuple(leaf.shape)}")
            return jax.ShapeDtypeStruct(leaf.shape, dtype or node.dtype)

        try:
            target = jax.tree_util.tree_map_with_path(abstract, abstract_params(config))
        except KeyError as e:
            raise ValueError(f"{path}: parameter {e.args[0]!r} missing from the checkpoint") from None
        if shardings is not None:
            target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
        params = ckptr.restore(path / "params", target)
    return config, params
