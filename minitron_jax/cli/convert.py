"""``python -m minitron_jax.convert SRC DST``: convert between GGUF, HF directories and minitron_jax checkpoints.

The source format is inferred from SRC (a ``.gguf`` file, an HF directory, a minitron_jax Orbax checkpoint); the
destination is a llama.cpp GGUF file when DST ends in ``.gguf`` (or ``--to gguf``; tensor types by ``--quant``),
an Orbax checkpoint with ``--to orbax``, else an HF directory (a Llama; for a heterogeneous model the
Nemotron-NAS / DeciLM layout with its modeling files, loaded with ``trust_remote_code=True``). Writes are atomic:
DST appears whole or not at all (:func:`minitron_jax.convert.transcode.convert`).
"""

from __future__ import annotations

import argparse
import math
import sys

from minitron_jax.convert.gguf_export import QUANT_TYPES
from minitron_jax.convert.transcode import DTYPES, TARGETS, convert, infer_target
from minitron_jax.exitcodes import BadInputError, ExitCode, cli_exit

# Below this a shard holds one small tensor or less: hundreds of files and nothing gained (1 MiB, in GB).
MIN_SHARD_GB = 1 / 1024


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a .gguf file, an HF model directory, or a minitron_jax checkpoint directory")
    ap.add_argument("dst", help="output directory, or a .gguf file (must not exist unless --overwrite)")
    ap.add_argument("--to", choices=TARGETS, default=None,
                    help="destination format (default: gguf for a .gguf DST, else hf)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="cast parameters, hf/orbax only (default: keep)")
    ap.add_argument("--quant", choices=list(QUANT_TYPES), default=None,
                    help="GGUF tensor type of the weight matrices (default f16; norms stay f32; below 8 bits the "
                         "embedding/output stay q8_0); GGUF output only")
    ap.add_argument("--max-shard-size", type=float, default=None, metavar="GB",
                    help="split HF safetensors above this many GB (default 2)")
    ap.add_argument("--card", action="store_true",
                    help="GGUF output: also write a README.md model card beside the file (an HF directory always "
                         "gets one)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


@cli_exit
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    to = infer_target(args.dst, args.to)
    if args.quant is not None and to != "gguf":
        raise BadInputError(f"--quant is for GGUF output only; {args.dst} would be written as {to} "
                            "(give a .gguf destination or --to gguf, or use --dtype)")
    shard = args.max_shard_size
    if shard is not None and not (math.isfinite(shard) and shard >= MIN_SHARD_GB):  # nan fails both comparisons
        raise BadInputError(f"--max-shard-size must be a size in GB of at least {MIN_SHARD_GB:.6f} (1 MiB), "
                            f"got {shard:g}")
    summary = convert(args.src, args.dst, to=to, dtype=args.dtype, overwrite=args.overwrite,
                      max_shard_bytes=int(shard * 1024**3) if shard is not None else None, quiet=args.quiet,
                      quant=args.quant, card=args.card)
    types = summary.get("tensor_types")
    stored = f"{summary['dtype']} ({', '.join(f'{n} {t}' for t, n in types.items())})" if types else summary["dtype"]
    print(f"{summary['source_format']} → {summary['destination_format']}: {summary['destination']}\n"
          f"  {summary['config']}\n"
          f"  {summary['params'] / 1e6:.1f}M params, {stored}, {summary['bytes'] / 2**20:.1f} MiB, "
          f"tokenizer {'yes' if summary['tokenizer'] else 'no'}, {summary['seconds']:.1f}s")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
