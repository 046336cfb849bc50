"""``python -m minitron_jax.assets [--json] [--only NAME ...] [--quiet]``: fetch the embedded default model and texts
(:mod:`minitron_jax.data.assets`) into the cache, once, and print their paths."""

from __future__ import annotations

import argparse
import json
import sys

from minitron_jax.data.assets import ASSET_NAMES, AssetFetchError, fetch_assets
from minitron_jax.exitcodes import ExitCode, cli_exit


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m minitron_jax.assets",
        description="Fetch the embedded default model and texts into the cache (once) and print their paths.",
    )
    ap.add_argument("--json", action="store_true", help="print {name: path} as JSON")
    ap.add_argument("--only", nargs="+", choices=ASSET_NAMES, metavar="NAME",
                    help=f"fetch only these assets ({', '.join(ASSET_NAMES)})")
    ap.add_argument("--quiet", action="store_true", help="no status output on stderr")
    return ap


@cli_exit
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        paths = fetch_assets(args.only, quiet=args.quiet)
    except AssetFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.SYSTEM
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    else:
        for k, v in paths.items():
            print(f"{k}\t{v}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
