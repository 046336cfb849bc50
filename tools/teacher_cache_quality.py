"""Distilling from the cached top-k teacher vs the online teacher: step speed and student quality, one run.

    python tools/teacher_cache_quality.py [--steps 40] [--ks 16,64,256] [--seeds 0,1,2] [--out DIR] [--json]

On the embedded SmolLM2-135M (the demo's width student: hidden 576 → 480, FFN 1536 → 1024, activation importance
from one calibration pass on OpenWebText), with the demo's distillation settings (Wikipedia, 4 × 128 tokens per
step, forward KL at T=1, fp32, AdamW 3e-4 → 3e-5):

1. the teacher's top-K log-probs are written once per K (``train/teacher_cache.write_teacher_cache``, float16 by
   default) over the training rows, each timed, with the bytes per token;
2. the student is distilled ``--steps`` steps from the ONLINE teacher once per ``--seeds`` seed (the seed shuffles
   the training rows; the seed-to-seed spread is the noise floor) and from each cache with seed 0 (the same rows in
   the same order as online seed 0), each timed (median step seconds, from the run's metrics.jsonl);
3. every student's held-out NLL per window (the last 100 Wikipedia passages, never trained on: 256-token windows,
   the pipeline's contract), compared PAIRED with online seed 0's on the same windows (``tools/findings.py``'s
   ``paired``): a cache's student is "within the spread" when its |mean ΔNLL| is at most the largest |mean ΔNLL|
   between online seeds.

Resumable: finished caches, runs and evaluations are read back from ``--out``. Prints a markdown table (and
``--json``: everything) for docs/distillation.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from findings import paired  # noqa: E402

HELDOUT_DOCS = 100


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def prepare(out: Path, train_docs: int | None) -> dict:
    """Teacher HF dir, train/held-out texts and the pruned width student, once."""
    import jax
    import numpy as np

    from minitron_jax.compress import prune
    from minitron_jax.compress.importance_cache import CalibrationSettings, Importance
    from minitron_jax.compress.spec import PruneSpec
    from minitron_jax.convert import load_model
    from minitron_jax.convert.hf import save_hf
    from minitron_jax.data import read_text
    from minitron_jax.data.assets import fetch_assets

    paths = {"teacher": out / "teacher", "student": out / "student", "train": out / "train.jsonl",
             "heldout": out / "heldout.jsonl"}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    assets = fetch_assets(quiet=True)
    out.mkdir(parents=True, exist_ok=True)
    lines = Path(assets["wikipedia"]).read_text().splitlines()
    # The cache covers every training row, so fewer documents than the asset's 900 keep its write short; the
    # runs read steps × 4 rows of them.
    paths["train"].write_text("\n".join(lines[:-HELDOUT_DOCS][:train_docs]) + "\n")
    paths["heldout"].write_text("\n".join(lines[-HELDOUT_DOCS:]) + "\n")
    m = load_model(assets["smollm2_gguf"])
    save_hf(paths["teacher"], m.config, m.params, tokenizer=m.tokenizer, overwrite=True)
    importance = Importance.calibrate(m.config, m.params, m.tokenizer, read_text(assets["owt"]),
                                      CalibrationSettings(calib_samples=16, seq_len=256, depth_samples=2))
    spec = PruneSpec(hidden=480, ffn=1024)
    keep = prune.plan(m.config, spec, importance.width())
    config, params = prune.apply_plan(m.config, m.params, keep)
    save_hf(paths["student"], config, jax.tree.map(np.asarray, params), tokenizer=m.tokenizer, overwrite=True)
    return {k: str(v) for k, v in paths.items()}


def run_config(paths: dict, out: Path, name: str, steps: int, seed: int, cache: str | None = None):
    from minitron_jax.train.config import from_dict

    return from_dict({
        "mode": "distill", "run_dir": str(out / "runs" / name),
        "teacher": {"path": paths["teacher"], "dtype": "float32", "logits_cache": cache},
        "student": {"path": paths["student"]},
        "data": {"sources": [paths["train"]], "seq_len": 128, "batch_size": 4, "val_rows": 16, "val_batches": 2,
                 "seed": seed, "cache_dir": str(out / "tokens")},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0, "chunk_size": 512},
        "optim": {"peak_lr": 3e-4, "min_lr": 3e-5, "warmup_steps": min(4, steps - 1)},
        "train": {"steps": steps, "compute_dtype": "float32", "param_dtype": "float32", "eval_every": steps,
                  "log_every": 1, "seed": 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every": steps, "keep": 1, "async_save": False},
        "export": {"at_end": True, "dtype": "float32"},
    })


def write_cache(paths: dict, out: Path, k: int, dtype: str, steps: int) -> dict:
    from minitron_jax.train.teacher_cache import write_teacher_cache

    cache = out / f"cache_k{k}_{dtype}"
    done = cache / "timing.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    summary = write_teacher_cache(run_config(paths, out, f"cache_k{k}", steps, 0), cache, top_k=k, dtype=dtype,
                                  log=log)
    record = {"path": str(cache), "seconds": time.perf_counter() - t0, "summary": summary}
    done.write_text(json.dumps(record, indent=2))
    return record


def distill(paths: dict, out: Path, name: str, steps: int, seed: int, cache: str | None) -> dict:
    from minitron_jax.train import loop

    run_dir = out / "runs" / name
    done = run_dir / "arm.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    result = loop.run(run_config(paths, out, name, steps, seed, cache))
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [r["step_seconds"] for r in records if "step_seconds" in r and r.get("step", 0) > 2]
    record = {"name": name, "seed": seed, "cache": cache, "wall_seconds": wall,
              "median_step_seconds": statistics.median(step_s) if step_s else None,
              "tokens_per_s": 4 * 128 / statistics.median(step_s) if step_s else None,
              "export": str(result.export_path), "final_train_loss": records[-1].get("loss") if records else None}
    done.write_text(json.dumps(record, indent=2))
    return record


def evaluate(model_path: str, heldout: str, out_file: Path) -> dict:
    if out_file.is_file():
        return json.loads(out_file.read_text())
    import numpy as np

    from minitron_jax.convert import load_model
    from minitron_jax.data import read_text, token_windows
    from minitron_jax.evaluate.perplexity import nll_sum

    m = load_model(model_path)
    windows = token_windows(m.tokenizer, read_text(heldout), 256, 4096)
    window_nll = []
    for i in range(len(windows)):
        total, count = nll_sum(m.config, m.params, windows[i:i + 1], batch_size=1)
        window_nll.append(float(total / count))
    record = {"model": model_path, "perplexity": math.exp(float(np.mean(window_nll))), "window_nll": window_nll}
    out_file.write_text(json.dumps(record))
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/teacher_cache_quality"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ks", type=_ints, default=[16, 64, 256])
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="online-teacher seeds; the first pairs the caches")
    ap.add_argument("--dtype", default="float16", help="cached log-prob dtype")
    ap.add_argument("--train-docs", type=int, default=None,
                    help="distil on the first N of the 900 training passages (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = args.out.absolute()

    paths = prepare(out, args.train_docs)
    caches = {k: write_cache(paths, out, k, args.dtype, args.steps) for k in args.ks}
    arms = [distill(paths, out, f"online_seed{s}", args.steps, s, None) for s in args.seeds]
    arms += [distill(paths, out, f"cached_k{k}", args.steps, args.seeds[0], caches[k]["path"]) for k in args.ks]
    evals = {a["name"]: evaluate(a["export"], paths["heldout"], out / "runs" / a["name"] / "heldout.json")
             for a in arms}
    teacher_eval = evaluate(paths["teacher"], paths["heldout"], out / "teacher_heldout.json")

    ref = f"online_seed{args.seeds[0]}"
    rows = []
    for a in arms:
        p = paired(evals[ref]["window_nll"], evals[a["name"]]["window_nll"]) if a["name"] != ref else None
        rows.append({**a, "perplexity": evals[a["name"]]["perplexity"], "vs_ref": p})
    spread = max((abs(r["vs_ref"]["mean"]) for r in rows if r["cache"] is None and r["vs_ref"]), default=None)
    online_step = statistics.median(r["median_step_seconds"] for r in rows if r["cache"] is None)
    for r in rows:
        if r["cache"] is not None:
            k = int(r["name"].removeprefix("cached_k"))
            r.update(top_k=k, bytes_per_token=caches[k]["summary"]["array_bytes_per_token"],
                     cache_seconds=caches[k]["seconds"], speedup=online_step / r["median_step_seconds"],
                     within_spread=(spread is not None and abs(r["vs_ref"]["mean"]) <= spread))
    within = [r["top_k"] for r in rows if r.get("within_spread")]
    report = {"steps": args.steps, "seeds": args.seeds, "train_docs": args.train_docs, "dtype": args.dtype,
              "teacher_perplexity": teacher_eval["perplexity"], "seed_spread_nll": spread, "rows": rows,
              "smallest_k_within_spread": min(within) if within else None}
    if args.json:
        print(json.dumps(report, indent=2))
    lines = [f"teacher held-out perplexity {teacher_eval['perplexity']:.2f}; {args.steps} steps × 4 × 128 tokens; "
             f"reference {ref}; seed-to-seed spread (max |mean ΔNLL| between online seeds) "
             f"{'—' if spread is None else f'{spread:.4f}'} nats/token", "",
             "| student | teacher | bytes/token | cache write s | median step s | step speed-up | held-out ppl | "
             "ΔNLL vs ref ± s.e. | windows ref wins | within spread |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        p = r["vs_ref"]
        lines.append(
            f"| {r['name']} | {'online' if r['cache'] is None else 'top-' + str(r['top_k']) + ' cache'} | "
            f"{r.get('bytes_per_token', '—')} | {r.get('cache_seconds', 0):.0f} | {r['median_step_seconds']:.3f} | "
            f"{r.get('speedup', 1.0):.2f}× | {r['perplexity']:.2f} | "
            + ("(reference) | | |" if p is None else
               f"{p['mean']:+.4f} ± {p['se']:.4f} | {p['a_wins']}/{p['windows']} | "
               f"{'—' if r['cache'] is None else ('yes' if r['within_spread'] else 'no')} |"))
    lines.append("")
    lines.append(f"smallest K within the seed-to-seed spread: {report['smallest_k_within_spread']}")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
