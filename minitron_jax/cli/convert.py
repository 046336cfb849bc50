"""``python -m minitron_jax.convert SRC DST``: convert between GGUF, HF directories and minitron_jax checkpoints.

The source format is inferred from SRC (a ``.gguf`` file, an HF directory, a minitron_jax Orbax checkpoint); the
destination is an HF directory unless ``--to orbax``. Writes are atomic: DST appears whole or not at all
(:func:`minitron_jax.convert.transcode.convert`).
"""

from __future__ import annotations

import argparse
import math
import sys

from minitron_jax.convert.transcode import DTYPES, TARGETS, convert
from minitron_jax.exitcodes import BadInputError, ExitCode, cli_exit

# Below this a shard holds one small tensor or less: hundreds of files and nothing gained (1 MiB, in GB).
MIN_SHARD_GB = 1 / 1024


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a .gguf file, an HF model directory, or a minitron_jax checkpoint directory")
    ap.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--to", choices=TARGETS, default="hf", help="destination format (default: hf)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast parameters (default: keep)")
    ap.add_argument("--max-shard-size", type=float, default=None, metavar="GB",
                    help="split HF safetensors above this many GB (default 2)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


@cli_exit
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    shard = args.max_shard_size
    if shard is not None and not (math.isfinite(shard) and shard >= MIN_SHARD_GB):  # nan fails both comparisons
        raise BadInputError(f"--max-shard-size must be a size in GB of at least {MIN_SHARD_GB:.6f} (1 MiB), "
                            f"got {shard:g}")
    summary = convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                      max_shard_bytes=int(shard * 1024**3) if shard is not None else None, quiet=args.quiet)
    print(f"{summary['source_format']} → {summary['destination_format']}: {summary['destination']}\n"
          f"  {summary['config']}\n"
          f"  {summary['params'] / 1e6:.1f}M params, {summary['dtype']}, {summary['bytes'] / 2**20:.1f} MiB, "
          f"tokenizer {'yes' if summary['tokenizer'] else 'no'}, {summary['seconds']:.1f}s")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
