"""Convert a model between formats: any source ``load_model`` reads (a ``.gguf`` file, an HF directory, a
minitron_jax Orbax checkpoint) to an HF directory or an Orbax checkpoint. Writes are atomic: the destination
appears whole or not at all. The command is ``python -m minitron_jax.convert`` (:mod:`minitron_jax.cli.convert`)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from minitron_jax.convert import detect_format, load_model, read_source_config
from minitron_jax.convert.hf import hf_tensor_specs
from minitron_jax.fsutil import check_destination

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
TARGETS = ("hf", "orbax")


def _progress(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    task = progress.add_task(description, total=total)
    return progress, (lambda _name: progress.advance(task))


def convert(src: str | Path, dst: str | Path, *, to: str = "hf", dtype: str | None = None,
            overwrite: bool = False, max_shard_bytes: int | None = None, quiet: bool = False) -> dict:
    """Convert SRC to DST and return a summary dict (params, dtype, bytes, seconds, formats).

    ``to``: ``hf`` or ``orbax``; ``dtype``: a key of :data:`DTYPES` to cast to (None keeps the source's);
    ``max_shard_bytes``: HF safetensors shard size (default ``hf.DEFAULT_SHARD_BYTES``); ``quiet``: no progress
    bars (they go to the terminal through rich)."""
    import jax

    from minitron_jax.convert import orbax as checkpoint
    from minitron_jax.convert.hf import DEFAULT_SHARD_BYTES, save_hf
    from minitron_jax.model import count_params

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise ValueError(f"--to must be hf or orbax, got {to!r}")
    np_dtype = DTYPES[dtype] if dtype else None
    # Before minutes of loading; checked again under the destination's lock when writing.
    check_destination(dst, overwrite=overwrite, sources=[src])
    fmt = detect_format(src)

    n_tensors = sum(1 for _ in hf_tensor_specs(read_source_config(src, fmt)))
    progress, tick = _progress(f"reading {fmt}", n_tensors)
    with progress if not quiet else contextlib.nullcontext():
        m = load_model(src, dtype=np_dtype, progress=None if quiet else tick)
    if to == "hf":
        progress, tick = _progress("writing hf", n_tensors)
        with progress if not quiet else contextlib.nullcontext():
            save_hf(dst, m.config, m.params, tokenizer=m.tokenizer, overwrite=overwrite, sources=[src],
                    max_shard_bytes=DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
                    progress=None if quiet else tick)
    else:
        checkpoint.save_model(dst, m.config, m.params, tokenizer=m.tokenizer, overwrite=overwrite, sources=[src])
    leaves = [np.asarray(x) for x in jax.tree.leaves(m.params)]
    return {
        "source": str(src), "source_format": fmt, "destination": str(dst), "destination_format": to,
        "params": count_params(m.config), "dtype": str(leaves[0].dtype),
        "bytes": int(sum(x.nbytes for x in leaves)), "seconds": time.perf_counter() - t0,
        "config": m.config.describe(), "tokenizer": m.tokenizer is not None,
    }
