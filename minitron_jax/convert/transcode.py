"""Convert a model between formats: any source ``load_model`` reads (a ``.gguf`` file, an HF directory, a
minitron_jax Orbax checkpoint) to an HF directory, an Orbax checkpoint or a llama.cpp GGUF file
(:mod:`~minitron_jax.convert.gguf_export`). An HF directory is a Llama for a uniform model and the Nemotron-NAS
(DeciLM) layout, with its modeling files, for a heterogeneous one (:mod:`~minitron_jax.convert.deci_hf`). Writes are
atomic: the destination appears whole or not at all. The command is ``python -m minitron_jax.convert``
(:mod:`minitron_jax.cli.convert`)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from minitron_jax.convert import detect_format, hf_tensor_count, load_model, read_source_config
from minitron_jax.exitcodes import BadInputError
from minitron_jax.fsutil import check_destination

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
TARGETS = ("hf", "orbax", "gguf")


def infer_target(dst: str | Path, to: str | None) -> str:
    """The destination format: ``to`` when given, else ``gguf`` for a ``.gguf`` path and ``hf`` otherwise."""
    if to is not None:
        return to
    return "gguf" if Path(dst).suffix.lower() == ".gguf" else "hf"


def _progress(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    task = progress.add_task(description, total=total)
    return progress, (lambda _name: progress.advance(task))


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = None,
            overwrite: bool = False, max_shard_bytes: int | None = None, quiet: bool = False,
            quant: str | None = None, card: bool = False) -> dict:
    """Convert SRC to DST and return a summary dict (params, dtype, bytes, seconds, formats).

    ``to``: ``hf``, ``orbax`` or ``gguf`` (None: ``gguf`` for a ``.gguf`` DST, else ``hf``); ``dtype``: a key of
    :data:`DTYPES` to cast to (None keeps the source's; not for gguf, whose storage ``quant`` decides);
    ``quant``: GGUF tensor type, a key of ``gguf_export.QUANT_TYPES`` (default f16; only for gguf);
    ``max_shard_bytes``: HF safetensors shard size (default ``hf.DEFAULT_SHARD_BYTES``); ``quiet``: no progress
    bars (they go to the terminal through rich). An HF destination gets a ``README.md`` model card
    (:func:`conversion_card`); ``card``: also write one beside a GGUF destination (refused if a README.md is
    already there: it is not ours to replace)."""
    import jax

    from minitron_jax.arch import count_params  # either kind of model
    from minitron_jax.convert import orbax as checkpoint
    from minitron_jax.convert import save_hf
    from minitron_jax.convert.hf import DEFAULT_SHARD_BYTES

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    to = infer_target(dst, to)
    if to not in TARGETS:
        raise BadInputError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if to == "gguf":
        return _convert_gguf(src, dst, dtype=dtype, quant=quant, overwrite=overwrite, quiet=quiet,
                             max_shard_bytes=max_shard_bytes, t0=t0, card=card)
    if card:
        raise BadInputError("--card is for GGUF output: an HF directory always gets its README.md card")
    if quant is not None:
        raise BadInputError(f"--quant is for GGUF output only; {dst} is written as {to} (use --dtype, or a .gguf "
                            "destination / --to gguf)")
    np_dtype = DTYPES[dtype] if dtype else None
    # Before minutes of loading; checked again under the destination's lock when writing.
    check_destination(dst, overwrite=overwrite, sources=[src])
    fmt = detect_format(src)

    n_tensors = hf_tensor_count(read_source_config(src, fmt))
    progress, tick = _progress(f"reading {fmt}", n_tensors)
    with progress if not quiet else contextlib.nullcontext():
        m = load_model(src, dtype=np_dtype, progress=None if quiet else tick)
    if to == "hf":
        progress, tick = _progress("writing hf", n_tensors)
        card = conversion_card(src, fmt, dst, m.config, m.tokenizer, quantized=dtype is not None, form="hf")
        with progress if not quiet else contextlib.nullcontext():
            save_hf(dst, m.config, m.params, tokenizer=m.tokenizer, overwrite=overwrite, sources=[src],
                    max_shard_bytes=DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
                    progress=None if quiet else tick, card=card)
    else:
        checkpoint.save_model(dst, m.config, m.params, tokenizer=m.tokenizer, overwrite=overwrite, sources=[src])
    leaves = [np.asarray(x) for x in jax.tree.leaves(m.params)]
    return {
        "source": str(src), "source_format": fmt, "destination": str(dst), "destination_format": to,
        "params": count_params(m.config), "dtype": str(leaves[0].dtype),
        "bytes": int(sum(x.nbytes for x in leaves)), "seconds": time.perf_counter() - t0,
        "config": m.config.describe(), "tokenizer": m.tokenizer is not None,
    }


def conversion_card(src: Path, fmt: str, dst: Path, config, tokenizer, *, quantized: bool, form: str,
                    gguf_file: str | None = None):
    """The model card of a plain conversion: the source's license and base model carried over, the architecture,
    and no method (nothing was pruned or trained). ``quantized``: the weights lost precision (a cast or a quant
    type below f32), which the Hub calls relation ``quantized``; a lossless conversion leaves the relation out."""
    from minitron_jax.convert.model_card import ModelCard, architecture_of, is_remote_code, source_card_fields

    fields = source_card_fields(src) if fmt in ("gguf", "hf") else {}
    return ModelCard(name=dst.stem if form == "gguf" else dst.name, **fields,
                     architecture_after=architecture_of(config), remote_code=form == "hf" and is_remote_code(config),
                     files={"gguf": gguf_file} if gguf_file else {}, format=form, tags=("minitron_jax",),
                     base_model_relation="quantized" if quantized else None,
                     chat_template=bool(getattr(tokenizer, "chat_template", None)),
                     description=f"`{src.name}` converted to {form.upper()} by `python -m minitron_jax.convert` "
                                 "(weights unchanged" + (", stored at lower precision)." if quantized else ")."))


def _convert_gguf(src: Path, dst: Path, *, dtype: str | None, quant: str | None, overwrite: bool, quiet: bool,
                  max_shard_bytes: int | None, t0: float, card: bool = False) -> dict:
    """SRC → a llama.cpp GGUF file. A GGUF source's description (name, license...) and llama.cpp pre-tokenizer
    name are carried over (:func:`gguf_export.gguf_source_metadata`)."""
    from minitron_jax.convert.gguf_export import QUANT_TYPES, check_gguf_destination, gguf_source_metadata, save_gguf

    quant = "f16" if quant is None else quant
    if quant not in QUANT_TYPES:
        raise BadInputError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if dtype is not None:
        raise BadInputError("--dtype does not apply to GGUF output: --quant chooses how tensors are stored")
    if max_shard_bytes is not None:
        raise BadInputError("--max-shard-size is for HF output; a GGUF is written as one file")
    check_gguf_destination(dst, overwrite=overwrite, sources=[src])  # before minutes of loading
    readme = dst.absolute().parent / "README.md"
    if card and readme.exists():
        raise BadInputError(f"--card: {readme} already exists; not replacing it (move it, or leave out --card)")
    fmt = detect_format(src)
    n_tensors = hf_tensor_count(read_source_config(src, fmt))
    progress, tick = _progress(f"reading {fmt}", n_tensors)
    with progress if not quiet else contextlib.nullcontext():
        m = load_model(src, dtype=np.float32, progress=None if quiet else tick)
    metadata = gguf_source_metadata(src) if fmt == "gguf" else {"name": src.name}
    summary = save_gguf(dst, m.config, m.params, tokenizer=m.tokenizer, quant=quant, metadata=metadata,
                        overwrite=overwrite, sources=[src])
    if card:
        from minitron_jax.convert.model_card import write_model_card

        write_model_card(readme.parent, conversion_card(src, fmt, dst, m.config, m.tokenizer, form="gguf",
                                                        quantized=quant != "f32", gguf_file=dst.name),
                         overwrite=False)
    return {
        "source": str(src), "source_format": fmt, "destination": str(dst), "destination_format": "gguf",
        "params": summary["params"], "dtype": quant, "bytes": summary["bytes"],
        "tensor_types": summary["tensor_types"], "seconds": time.perf_counter() - t0,
        "config": m.config.describe(), "tokenizer": m.tokenizer is not None,
    }
