"""Pruning ablation on SmolLM2-135M: perplexity right after pruning, with no retraining.

    python tools/prune_ablation.py [--calib-samples 64] [--seq-len 256] [--eval-tokens 4096]
                                   [--depth-calib-samples 4] [--hidden 480] [--ffn 1024] [--drop 6,12]

Calibration text is ``owt`` (OpenWebText passages) and evaluation text ``wikipedia``: disjoint sources, both from
``minitron_jax.data.assets``. Compared, all at the same target sizes:

- width (hidden + FFN, heads kept, ~90M params): activation importance vs weight magnitude vs random; every
  (sequence, batch) aggregation pair of the activation importance; the gate pre-activation neuron variant;
- depth: the three layer metrics (contiguous block by perplexity, single-layer perplexity, Block Importance) at
  each number of dropped layers.

One calibration pass gives every activation variant and BI (see ``compress.importance``); the layer-perplexity
scans use the first ``--depth-calib-samples`` calibration windows. Results go to ``docs/figures/prune_ablation.json``
and ``.png``, and a markdown section replaces the one between the ABLATION markers in ``docs/pruning.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from minitron_jax.compress import importance as imp
from minitron_jax.compress import prune
from minitron_jax.compress.spec import PruneSpec, target_config
from minitron_jax.evaluate.perplexity import perplexity
from minitron_jax.model import count_params

ROOT = Path(__file__).resolve().parents[1]
OUTLIER_FACTOR = 10.0  # a channel is an outlier when its importance exceeds this multiple of the median
BEGIN, END = "<!-- BEGIN ABLATION (written by tools/prune_ablation.py) -->", "<!-- END ABLATION -->"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model path (default: the embedded SmolLM2-135M GGUF)")
    ap.add_argument("--calib-text", help="calibration text (default: the embedded owt.jsonl)")
    ap.add_argument("--eval-text", help="evaluation text (default: the embedded wikipedia.jsonl)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--depth-calib-samples", type=int, default=4,
                    help="calibration windows for the layer-perplexity scans (one pass per window of layers)")
    ap.add_argument("--hidden", type=int, default=480)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--drop", type=lambda s: [int(x) for x in s.split(",")], default=[6, 12],
                    help="numbers of layers to drop, comma-separated")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "pruning.md")
    ap.add_argument("--out-prefix", type=Path, default=ROOT / "docs" / "figures" / "prune_ablation")
    ap.add_argument("--render-only", action="store_true",
                    help="redraw the figure and the markdown section from the saved json, without running anything")
    return ap.parse_args(argv)


class Clock:
    """Named wall-clock and CPU-time durations (the CPU is shared, so both are worth recording)."""

    def __init__(self):
        self.records: dict[str, dict[str, float]] = {}

    def __call__(self, name):
        clock = self

        class _Span:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.records[name] = {"wall_s": time.perf_counter() - self.t, "cpu_s": time.process_time() - self.c}

        return _Span()


def load_inputs(args):
    from minitron_jax.convert import load_model
    from minitron_jax.data import read_text, token_windows
    from minitron_jax.data.assets import smollm2_gguf, text_path

    m = load_model(args.model or smollm2_gguf())
    calib_path, eval_path = args.calib_text or text_path("owt"), args.eval_text or text_path("wikipedia")
    calib = token_windows(m.tokenizer, read_text(calib_path), args.seq_len, args.calib_samples * args.seq_len)
    evalw = token_windows(m.tokenizer, read_text(eval_path), args.seq_len, args.eval_tokens)
    return m, calib, evalw, str(calib_path), str(eval_path)


def run(args) -> dict:
    clock = Clock()
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with clock("load"):
        m, calib, evalw, calib_path, eval_path = load_inputs(args)
    # On device once: every slice below stays there (no host copy of the weights per evaluation batch).
    config, params, bs = m.config, jax.device_put(m.params), args.batch_size
    log(f"{config.describe()}: calibration {calib.shape}, evaluation {evalw.shape}")

    def ppl_of(c, p):
        return perplexity(c, p, evalw, batch_size=bs)

    with clock("eval_base"):
        base = ppl_of(config, params)
    log(f"base perplexity {base:.3f}")
    with clock("calibration_pass"):
        stats = imp.collect_activation_stats(config, params, calib, batch_size=bs)
    log(f"calibration pass {clock.records['calibration_pass']['wall_s']:.1f}s")

    width_spec = PruneSpec(hidden=args.hidden, ffn=args.ffn)
    width_params = count_params(target_config(config, width_spec))

    # Residual-stream channels whose activation importance dwarfs the rest ("massive activations"): whether a
    # ranking keeps them turns out to decide most of the width results.
    act_channels = stats.scores("channels")
    outliers = np.flatnonzero(act_channels > OUTLIER_FACTOR * np.median(act_channels))

    def width_row(group, label, scores, spec=width_spec):
        keep = prune.plan(config, spec, scores)
        c, p = prune.apply_plan(config, params, keep)
        lost = [] if keep["hidden"] is None else sorted(set(outliers.tolist()) - set(keep["hidden"].tolist()))
        row = {"group": group, "variant": label, "params": count_params(c), "ppl": ppl_of(c, p),
               "outlier_channels_dropped": lost}
        log(f"{group:<12} {label:<34} ppl {row['ppl']:.3f}  outlier channels dropped {lost}")
        return row

    rows = []
    with clock("eval_width"):
        agg = {}
        for s in imp.SEQ_AGGS:
            for b in imp.BATCH_AGGS:
                agg[(s, b)] = width_row("aggregation", f"activation seq={s} batch={b}", stats.width_scores(s, b))
        rows += list(agg.values())
        rows.append(dict(agg[("mean", "l2")], group="method", variant="activation (seq=mean, batch=l2)"))
        rows.append(width_row("method", "activation, gate pre-activation",
                              stats.width_scores("mean", "l2", preact=True)))
        rows.append(width_row("method", "weight magnitude", imp.width_importance(config, params, "magnitude")))
        for seed in (0, 1):
            rows.append(width_row("method", f"random (seed {seed})",
                                  imp.width_importance(config, params, "random", seed=seed)))
        # Which dimension does the damage: each one alone, for the activation and magnitude rankings.
        for method, scores in (("activation", stats.width_scores()),
                               ("magnitude", imp.width_importance(config, params, "magnitude"))):
            for dim, spec in (("hidden", PruneSpec(hidden=args.hidden)), ("ffn", PruneSpec(ffn=args.ffn))):
                rows.append(width_row("dimension", f"{method}, {dim} only", scores, spec))

    depth_calib = calib[: args.depth_calib_samples]
    per_layer = {"bi": stats.block_importance()}
    def scan_progress(phase, done, total):
        if done == total:
            log(f"{phase}: {total} windows scanned")

    with clock("layer_scans"):
        per_layer["ppl"] = imp.layer_importance(config, params, "ppl", windows=depth_calib, batch_size=bs,
                                                progress=scan_progress)
        blocks = {k: imp.layer_importance(config, params, "contiguous", windows=depth_calib, block_size=k,
                                          batch_size=bs, progress=scan_progress) for k in args.drop}
    scan_passes = config.num_layers + sum(config.num_layers - k + 1 for k in args.drop)
    log(f"layer scans {clock.records['layer_scans']['wall_s']:.1f}s ({scan_passes} passes)")
    with clock("eval_depth"):
        for k in args.drop:
            for metric, scores in (("contiguous", blocks[k]), ("ppl", per_layer["ppl"]), ("bi", per_layer["bi"])):
                drop = prune.layers_to_drop(scores, k, metric)
                c, p = prune.drop_layers(config, params, drop)
                rows.append({"group": "depth", "variant": metric, "drop": k, "layers_dropped": drop,
                             "params": count_params(c), "ppl": ppl_of(c, p)})
                log(f"depth -{k:<3} {metric:<11} {drop} ppl {rows[-1]['ppl']:.3f}")

    calib_wall = clock.records["calibration_pass"]["wall_s"]
    return {
        "model": str(args.model or "SmolLM2-135M-Instruct (embedded GGUF, Q4_1 dequantized to float32)"),
        "config": config.describe(), "params": count_params(config), "width_params": width_params,
        "targets": {"hidden": args.hidden, "ffn": args.ffn, "drop": args.drop},
        "calibration": {"text": Path(calib_path).name, "windows": int(len(calib)), "seq_len": args.seq_len,
                        "depth_windows": int(len(depth_calib))},
        "evaluation": {"text": Path(eval_path).name, "windows": int(len(evalw)), "tokens": int(evalw.size)},
        "base_ppl": base,
        "outlier_channels": {"factor": OUTLIER_FACTOR, "channels": outliers.tolist(),
                             "importance_over_median": (act_channels[outliers] / np.median(act_channels)).tolist()},
        "rows": rows,
        "per_layer": {k: v.tolist() for k, v in per_layer.items()},
        "block_ppl": {str(k): v.tolist() for k, v in blocks.items()},
        "importance_tokens_per_s": calib.size / calib_wall,
        "importance_tokens_per_cpu_s": calib.size / clock.records["calibration_pass"]["cpu_s"],
        "layer_scan_tokens_per_s": scan_passes * depth_calib.size / clock.records["layer_scans"]["wall_s"],
        "timings": clock.records,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), "
                   f"jax {jax.__version__} on {jax.default_backend()}",
    }


# ------------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    rows, base, oc = res["rows"], res["base_ppl"], res["outlier_channels"]
    total_wall = sum(t["wall_s"] for t in res["timings"].values())
    out = [
        f"Model: {res['model']} ({res['config']}, {res['params'] / 1e6:.1f}M params). "
        f"Calibration: {res['calibration']['windows']} × {res['calibration']['seq_len']} tokens of "
        f"`{res['calibration']['text']}` (layer-perplexity scans: the first {res['calibration']['depth_windows']} "
        f"windows). Evaluation: perplexity on {res['evaluation']['tokens']} tokens of `{res['evaluation']['text']}` "
        f"({res['evaluation']['windows']} windows). **Unpruned perplexity: {base:.2f}.** No retraining.",
        "",
        f"Width target: hidden {res['targets']['hidden']}, FFN {res['targets']['ffn']}, heads kept "
        f"({res['width_params'] / 1e6:.1f}M params).",
        "",
        f"Outlier channels (activation importance > {oc['factor']:g}× the median): {oc['channels']} "
        f"({', '.join(f'{x:.0f}×' for x in oc['importance_over_median'])}).",
        "",
        "| importance | params | perplexity | × unpruned | outlier channels dropped |",
        "|---|---:|---:|---:|---|",
    ]
    out += [f"| {r['variant']} | {r['params'] / 1e6:.1f}M | {r['ppl']:.2f} | {r['ppl'] / base:.2f} | "
            f"{r['outlier_channels_dropped'] or '–'} |" for r in rows if r["group"] in ("method", "dimension")]
    out += ["", "Aggregation of activation importance (rows: over the sequence; columns: over the batch):", "",
            "| seq \\ batch | " + " | ".join(imp.BATCH_AGGS) + " |", "|---|" + "---:|" * len(imp.BATCH_AGGS)]
    agg = {r["variant"]: r["ppl"] for r in rows if r["group"] == "aggregation"}
    for s in imp.SEQ_AGGS:
        cells = [f"{agg[f'activation seq={s} batch={b}']:.2f}" for b in imp.BATCH_AGGS]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    out += ["", "Depth (layers removed by each metric):", "",
            "| layers dropped | metric | layers removed | params | perplexity | × unpruned |",
            "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if r["group"] == "depth":
            out.append(f"| {r['drop']} | {r['variant']} | {r['layers_dropped']} | {r['params'] / 1e6:.1f}M | "
                       f"{r['ppl']:.2f} | {r['ppl'] / base:.2f} |")
    t = res["timings"]
    total_cpu = sum(v["cpu_s"] for v in t.values())
    out += ["", f"Importance estimation speed on this machine ({res['machine']}): the calibration pass (forward "
                f"plus every statistic) ran at **{res['importance_tokens_per_s']:.0f} tokens/s** wall clock, "
                f"{res['importance_tokens_per_cpu_s']:.0f} tokens per CPU-second (the time of both cores counted, so "
                "two idle cores would give up to twice that); the layer-perplexity scans ran at "
                f"{res['layer_scan_tokens_per_s']:.0f} tokens/s. Whole run: {total_wall / 60:.1f} min wall clock on "
                f"the shared machine, {total_cpu / 60:.1f} CPU-minutes ("
                + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in t.items()) + ").",
            "", f"![pruning ablation](figures/{Path(res['figure']).name})"]
    return "\n".join(out)


def figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, base = res["rows"], res["base_ppl"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))

    methods = [r for r in rows if r["group"] in ("method", "dimension")]
    a = ax[0, 0]
    a.barh([r["variant"] for r in methods], [r["ppl"] for r in methods],
           color=["tab:blue" if r["group"] == "method" else "tab:gray" for r in methods])
    a.axvline(base, color="k", ls="--", label=f"unpruned {base:.1f}")
    a.set_xscale("log")
    a.set_xlabel("perplexity (log)")
    a.set_title(f"width → {res['width_params'] / 1e6:.0f}M params (gray: one dimension only)")
    a.invert_yaxis()
    a.legend()

    agg = {r["variant"]: r["ppl"] for r in rows if r["group"] == "aggregation"}
    grid = np.array([[agg[f"activation seq={s} batch={b}"] for b in imp.BATCH_AGGS] for s in imp.SEQ_AGGS])
    a = ax[0, 1]
    im = a.imshow(grid, cmap="viridis_r")
    for i in range(3):
        for j in range(3):
            a.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w")
    a.set_xticks(range(3), [f"batch {b}" for b in imp.BATCH_AGGS])
    a.set_yticks(range(3), [f"seq {s}" for s in imp.SEQ_AGGS])
    a.set_title("width: activation aggregation (perplexity)")
    fig.colorbar(im, ax=a)

    a = ax[1, 0]
    L = int(res["config"].split("L=")[1].split()[0])
    for metric, style in (("contiguous", "o-"), ("ppl", "s--"), ("bi", "^:")):  # styles: lines may coincide
        pts = [(L, base)] + [(L - r["drop"], r["ppl"]) for r in rows
                             if r["group"] == "depth" and r["variant"] == metric]
        a.plot(*zip(*pts), style, label=metric, alpha=0.8)
    a.set_yscale("log")
    a.set_xlabel("layers kept")
    a.set_ylabel("perplexity (log)")
    a.set_title("depth: layer metric")
    a.invert_xaxis()
    a.legend()

    a = ax[1, 1]
    layers = np.arange(L)
    a.bar(layers, res["per_layer"]["ppl"], color="tab:orange", label="calib. perplexity with the layer dropped")
    a.set_yscale("log")
    a.set_xlabel("layer")
    a.set_ylabel("perplexity (log)")
    b = a.twinx()
    b.plot(layers, res["per_layer"]["bi"], color="tab:green", marker=".", label="Block Importance")
    b.set_ylabel("1 − cos(in, out)")
    a.set_title("per-layer importance")
    handles = a.get_legend_handles_labels()[0] + b.get_legend_handles_labels()[0]
    a.legend(handles, [h.get_label() for h in handles], loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def update_doc(doc: Path, section: str) -> None:
    """Replace the text between the ABLATION markers (or append a section) so the prose around it survives."""
    text = doc.read_text() if doc.exists() else "# Pruning\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Ablation\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        res = json.loads(args.out_prefix.with_suffix(".json").read_text())
    else:
        res = run(args)
        res["figure"] = str(args.out_prefix.with_suffix(".png"))
        args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
        args.out_prefix.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    figure(res, args.out_prefix.with_suffix(".png"))
    section = markdown(res)
    update_doc(args.doc, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
