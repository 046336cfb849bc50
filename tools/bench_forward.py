"""Forward throughput (tokens/s): our jitted forward vs transformers + torch, same model, same shapes, same run.

The model defaults to the embedded SmolLM2-135M-Instruct GGUF (dequantized to float32). Torch gets the very same
weights: our params are exported with ``save_hf`` into a temporary directory and loaded with
``LlamaForCausalLM.from_pretrained``. Both sides compute full float32 logits [B, T, V] from token ids.

Per shape: one warm-up call each (ours includes compilation), then ``--repeats`` timed calls, alternating ours and
torch so that load from other processes on a shared machine hits both alike; the table reports medians.

    python tools/bench_forward.py                                  # 4×256 and 1×1024, fp32, CPU
    python tools/bench_forward.py --batch 8 --seq-len 512 --repeats 10
    python tools/bench_forward.py --dtype bfloat16                 # on a GPU: jax bf16, torch bf16 on CUDA
    python tools/bench_forward.py --json
    python tools/bench_forward.py --random-config configs/models/Llama-3.2-1B.json --dtype bfloat16 --batch 8 \
        --seq-len 2048            # random weights of a named shape: no asset, no network (the GPU check)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def at_least(low: int):
    """An argparse ``type`` for integers >= ``low``: ``--steps 0`` used to end in a StatisticsError traceback, and
    ``--batch 0`` silently became the default batch."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def require_torch(tool: str, hint: str = "") -> None:
    """Exit 2 with one line before any timing when the torch side cannot run: the comparison tools used to time
    our side for minutes and only then fail on ``import torch`` with a traceback (a venv with ``pip install -e .``
    alone has neither torch nor, usually, a working transformers model class)."""
    import importlib.util

    def installed(name: str) -> bool:  # sys.modules[name] = None is how a test (or a user) blocks an import
        return sys.modules[name] is not None if name in sys.modules else importlib.util.find_spec(name) is not None

    missing = [m for m in ("torch", "transformers") if not installed(m)]
    if missing:
        print(f"error: tools/{tool} compares with transformers + torch, and {' and '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not installed here: pip install -e '.[test]'{hint}",
              file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None):
    from minitron_jax.attention import ATTENTION_IMPLS  # the model's own list of attention kinds

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file, HF directory or checkpoint (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--random-config", metavar="CONFIG_JSON",
                   help="random weights of this HF config.json's shape instead of --model (nothing to fetch)")
    p.add_argument("--batch", type=at_least(1), nargs="+", default=[4, 1], help="batch sizes, paired with --seq-len")
    p.add_argument("--seq-len", type=at_least(2), nargs="+", default=[256, 1024], help="sequence lengths")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed calls per side and shape (median reported)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed calls per side and shape before timing")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch intra-op threads (default: all cores, which is what XLA:CPU uses)")
    p.add_argument("--attention", choices=tuple(ATTENTION_IMPLS), default="einsum",
                   help="our attention (model.hidden_states(attention=...)); fused: cuDNN's kernel on a GPU in bf16")
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if len(args.batch) != len(args.seq_len):
        if len(args.batch) == 1:
            args.batch = args.batch * len(args.seq_len)
        elif len(args.seq_len) == 1:
            args.seq_len = args.seq_len * len(args.batch)
        else:
            p.error("--batch and --seq-len need the same number of values (or one of them a single value)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_torch:
        require_torch("bench_forward.py", " (or --no-torch: ours only)")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from minitron_jax import model as M
    from minitron_jax.convert import load_model

    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.random_config:
        from types import SimpleNamespace

        from minitron_jax.config import LlamaConfig

        config = LlamaConfig.from_json_file(args.random_config)
        log(f"random weights of {config.describe()} ({args.random_config})")
        # Host numpy weights, as load_model returns them, so both sides get the very same values.
        with jax.default_device(jax.devices("cpu")[0]):
            loaded = SimpleNamespace(config=config,
                                     params=jax.tree.map(np.asarray, M.init_params(config, jax.random.key(0))))
    elif args.model is None:
        from minitron_jax.data.assets import fetch_assets

        args.model = str(fetch_assets(quiet=True)["smollm2_gguf"])
    if not args.random_config:
        log(f"loading {args.model}")
        loaded = load_model(args.model, with_tokenizer=False)
    config = loaded.config
    jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jdtype), loaded.params))
    fwd = jax.jit(lambda p, t: M.forward(config, p, t, dtype=jdtype, attention=args.attention))

    torch_model = torch = None
    if not args.no_torch:
        import torch
        import transformers

        if args.threads:
            torch.set_num_threads(args.threads)
        else:
            torch.set_num_threads(os.cpu_count() or 1)
        device = "cuda" if args.dtype == "bfloat16" and torch.cuda.is_available() else "cpu"
        tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        from minitron_jax.convert.hf import save_hf

        with tempfile.TemporaryDirectory() as tmp:
            log("exporting to HF for torch")
            save_hf(Path(tmp) / "m", config, loaded.params)
            torch_model = transformers.LlamaForCausalLM.from_pretrained(
                Path(tmp) / "m", dtype=tdtype).to(device).eval()
    del loaded

    def run_ours(tokens):
        return fwd(params, tokens).block_until_ready()

    def run_torch(tokens):
        with torch.inference_mode():
            out = torch_model(tokens).logits
            if out.is_cuda:
                torch.cuda.synchronize()
            return out

    def timed(fn, x):
        t0 = time.perf_counter()
        fn(x)
        return time.perf_counter() - t0

    results = []
    rng = np.random.default_rng(0)
    for B, T in zip(args.batch, args.seq_len):
        toks = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
        jt = jax.device_put(jnp.asarray(toks))
        t0 = time.perf_counter()
        ours_logits = run_ours(jt)
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            run_ours(jt)
        row = {"batch": B, "seq_len": T, "tokens": B * T, "ours_first_call_s": compile_s}
        ours_t, torch_t = [], []
        if torch_model is not None:
            tt = torch.as_tensor(toks, dtype=torch.long, device=next(torch_model.parameters()).device)
            for _ in range(args.warmup):
                ref = run_torch(tt)
            diff = np.abs(np.asarray(ours_logits, np.float32) - ref.float().cpu().numpy()).max()
            row["max_abs_logit_diff"] = float(diff)
            del ref
        del ours_logits
        for _ in range(args.repeats):
            ours_t.append(timed(run_ours, jt))
            if torch_model is not None:
                torch_t.append(timed(run_torch, tt))
        row["ours_s"] = statistics.median(ours_t)
        row["ours_tok_s"] = B * T / row["ours_s"]
        if torch_t:
            row["torch_s"] = statistics.median(torch_t)
            row["torch_tok_s"] = B * T / row["torch_s"]
            row["ratio"] = row["ours_tok_s"] / row["torch_tok_s"]
        results.append(row)
        log(f"  {B}x{T}: ours {row['ours_tok_s']:.0f} tok/s" +
            (f", torch {row['torch_tok_s']:.0f} tok/s" if torch_t else ""))

    env = {
        "model": config.describe(),
        "dtype": args.dtype,
        "attention": args.attention,
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0]),
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if torch_model is not None:
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   torch_device=str(next(torch_model.parameters()).device),
                   torch_attn=getattr(torch_model.config, "_attn_implementation", None))
    if args.json:
        print(json.dumps({"env": env, "results": results}, indent=2))
        return 0

    print(f"model: {env['model']}  dtype: {args.dtype}  repeats: {args.repeats} (median)")
    print(f"jax {env['jax']} on {env['jax_device']}; CPU: {env['cpu']} ({env['cores']} cores)"
          + (f"; torch {env['torch']} on {env['torch_device']}, {env['torch_threads']} threads, "
             f"attn={env['torch_attn']}" if torch_model is not None else ""))
    head = (f"| {'batch × seq':>11} | {'ours tok/s':>10} | {'torch tok/s':>11} | {'ours/torch':>10} "
            f"| {'max abs Δlogit':>14} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in results:
        print(f"| {str(r['batch']) + ' × ' + str(r['seq_len']):>11} | {r['ours_tok_s']:>10.0f} | "
              f"{r.get('torch_tok_s', float('nan')):>11.0f} | {r.get('ratio', float('nan')):>10.2f} | "
              f"{r.get('max_abs_logit_diff', float('nan')):>14.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
