"""Our GGUF export in llama.cpp: file size, and perplexity in llama.cpp vs ours on the same tokens, per quant type.

    python tools/gguf_vs_llama_cpp.py [--model PATH] [--quants f32,f16,bf16,q8_0,q4_0,q4_1] [--windows 4]
                                      [--window 256] [--out DIR]

Exports the embedded SmolLM2-135M (or ``--model``: any path ``convert.load_model`` reads) once per quant type with
``convert.gguf_export.save_gguf``, then for each file:

- ``ours``: our perplexity (``evaluate.perplexity``, float32) on the weights the file holds, read back by our GGUF
  reader (so the quantization error is in both numbers, and the difference is the runtimes');
- ``llama_cpp``: llama.cpp's perplexity (the llama-cpp-cffi wheel's CPU build, ``tests/llama_cpp_runtime.py``)
  on the same token ids: every next-token prediction of ``--windows`` consecutive windows of ``--window`` tokens of
  held-out Wikipedia text, logits for all positions of a window from one batch;
- ``rel_diff`` = (llama_cpp − ours) / ours.

Prints one JSON line per quant type (and the machine, llama.cpp's system info, first). llama.cpp's quantized
matrix products also quantize the activations (to Q8 blocks), which our dequantized float32 forward pass does not:
that, not the file, is where quantized types differ by more than F32/F16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model to export (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--quants", default="f32,f16,bf16,q8_0,q4_0,q4_1")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", default=None, help="directory for the exported files (default: a temporary one)")
    args = ap.parse_args(argv)

    from llama_cpp_runtime import UNAVAILABLE, load_runtime

    from minitron_jax.convert import detect_format, load_model
    from minitron_jax.convert.gguf_export import gguf_source_metadata, save_gguf
    from minitron_jax.data.assets import load_texts, smollm2_gguf
    from minitron_jax.evaluate.perplexity import perplexity

    rt = load_runtime()
    if rt is None:
        print(f"llama.cpp runtime unavailable: {UNAVAILABLE}", file=sys.stderr)
        return 2
    src = Path(args.model) if args.model else smollm2_gguf()
    m = load_model(src)
    if m.tokenizer is None:
        print(f"{src} carries no tokenizer", file=sys.stderr)
        return 2
    meta = gguf_source_metadata(src) if detect_format(src) == "gguf" else {"name": src.name}
    # Held-out text: the last Wikipedia passages (the demo trains on the first ones).
    texts = load_texts("wikipedia")
    ids = m.tokenizer("\n\n".join(texts[-100:]), add_special_tokens=False)["input_ids"]
    n = args.windows * args.window
    if len(ids) < n:
        print(f"held-out text has {len(ids)} tokens, fewer than {n}", file=sys.stderr)
        return 2
    windows = np.asarray(ids[:n], np.int32).reshape(args.windows, args.window)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "llama_cpp": rt.ffi.string(rt.lib.llama_print_system_info()).decode().strip(),
                      "model": str(src), "windows": args.windows, "window": args.window}), flush=True)

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gguf_vs_llama_cpp-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for quant in args.quants.split(","):
        path = out_dir / f"{src.stem}.{quant}.gguf"
        summary = save_gguf(path, m.config, m.params, tokenizer=m.tokenizer, quant=quant, metadata=meta,
                            overwrite=True, sources=[src])
        back = load_model(path, with_tokenizer=False)
        t0 = time.perf_counter()
        ours = perplexity(back.config, back.params, windows, batch_size=min(4, args.windows))
        t_ours = time.perf_counter() - t0
        row = {"quant": quant, "bytes": summary["bytes"], "MiB": round(summary["bytes"] / 2**20, 1),
               "bits_per_param": round(8 * summary["bytes"] / summary["params"], 2),
               "tensor_types": summary["tensor_types"], "ours": ours, "seconds_ours": round(t_ours, 1)}
        try:
            t0 = time.perf_counter()
            with rt.load(path, n_ctx=args.window) as lm:
                theirs = lm.perplexity(windows)
            row.update(llama_cpp=theirs, rel_diff=(theirs - ours) / ours,
                       seconds_llama_cpp=round(time.perf_counter() - t0, 1))
        except RuntimeError as e:  # e.g. a type this llama.cpp build cannot run
            row.update(llama_cpp=None, error=str(e))
        print(json.dumps(row), flush=True)
        if not args.out:
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
