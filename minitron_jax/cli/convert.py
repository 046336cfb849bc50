"""``python -m minitron_jax.convert SRC DST``: convert between GGUF, HF directories and minitron_jax checkpoints.

The source format is inferred from SRC (a ``.gguf`` file, an HF directory, a minitron_jax Orbax checkpoint); the
destination is an HF directory unless ``--to orbax``. Writes are atomic: DST appears whole or not at all.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from minitron_jax.config import ConfigError
from minitron_jax.convert.hf import ConversionError, hf_tensor_specs
from minitron_jax.exitcodes import BadInputError, cli_exit
from minitron_jax.fsutil import check_destination

# Below this a shard holds one small tensor or less: hundreds of files and nothing gained (1 MiB, in GB).
MIN_SHARD_GB = 1 / 1024
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _progress(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    task = progress.add_task(description, total=total)
    return progress, (lambda _name: progress.advance(task))


def convert(src: str | Path, dst: str | Path, *, to: str = "hf", dtype: str | None = None,
            overwrite: bool = False, max_shard_bytes: int | None = None, quiet: bool = False) -> dict:
    """Convert SRC to DST and return a summary dict (params, dtype, bytes, seconds, formats)."""
    from minitron_jax.convert import detect_format, load_model
    from minitron_jax.convert import orbax as checkpoint
    from minitron_jax.convert.hf import DEFAULT_SHARD_BYTES, save_hf
    from minitron_jax.model import count_params

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if to not in ("hf", "orbax"):
        raise ValueError(f"--to must be hf or orbax, got {to!r}")
    np_dtype = DTYPES[dtype] if dtype else None
    # Before minutes of loading; checked again under the destination's lock when writing.
    check_destination(dst, overwrite=overwrite, sources=[src])
    fmt = detect_format(src)

    from minitron_jax.convert import read_source_config

    n_tensors = sum(1 for _ in hf_tensor_specs(read_source_config(src, fmt)))
    progress, tick = _progress(f"reading {fmt}", n_tensors)
    with progress if not quiet else _nullcontext():
        m = load_model(src, dtype=np_dtype, progress=None if quiet else tick)
    if to == "hf":
        progress, tick = _progress("writing hf", n_tensors)
        with progress if not quiet else _nullcontext():
            save_hf(dst, m.config, m.params, tokenizer=m.tokenizer, overwrite=overwrite, sources=[src],
                    max_shard_bytes=DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
                    progress=None if quiet else tick)
    else:
        checkpoint.save_model(dst, m.config, m.params, tokenizer=m.tokenizer, overwrite=overwrite, sources=[src])
    leaves = [np.asarray(x) for x in _leaves(m.params)]
    return {
        "source": str(src), "source_format": fmt, "destination": str(dst), "destination_format": to,
        "params": count_params(m.config), "dtype": str(leaves[0].dtype),
        "bytes": int(sum(x.nbytes for x in leaves)), "seconds": time.perf_counter() - t0,
        "config": m.config.describe(), "tokenizer": m.tokenizer is not None,
    }


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@cli_exit
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a .gguf file, an HF model directory, or a minitron_jax checkpoint directory")
    ap.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--to", choices=("hf", "orbax"), default="hf", help="destination format (default: hf)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast parameters (default: keep)")
    ap.add_argument("--max-shard-size", type=float, default=None, metavar="GB",
                    help="split HF safetensors above this many GB (default 2)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    shard = args.max_shard_size
    if shard is not None and not (math.isfinite(shard) and shard >= MIN_SHARD_GB):  # nan fails both comparisons
        raise BadInputError(f"--max-shard-size must be a size in GB of at least {MIN_SHARD_GB:.6f} (1 MiB), "
                            f"got {shard:g}")
    try:
        summary = convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                          max_shard_bytes=int(shard * 1024**3) if shard is not None else None,
                          quiet=args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError, ConfigError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['source_format']} → {summary['destination_format']}: {summary['destination']}\n"
          f"  {summary['config']}\n"
          f"  {summary['params'] / 1e6:.1f}M params, {summary['dtype']}, {summary['bytes'] / 2**20:.1f} MiB, "
          f"tokenizer {'yes' if summary['tokenizer'] else 'no'}, {summary['seconds']:.1f}s")
    return 0
