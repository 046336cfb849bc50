"""Check the Minitron paper's findings on SmolLM2-135M at equal token budgets, and write docs/results.md.

    python tools/findings.py [key=value ...]        # overrides apply to both pipeline runs (e.g. distill.steps=400)

Runs ``minitron_jax.pipeline`` twice on ``configs/smollm2_135m_findings.yaml``:

- ``<out>/base`` (or ``--base-run-dir``): four students with one distillation budget: width-pruned + KD (the
  paper's recipe), the same with plain next-token cross-entropy, the same architecture from random weights + KD,
  and depth-pruned + KD;
- ``<out>/corrected``: teacher correction first (the teacher fine-tuned on the distillation text), then the
  width-pruned student pruned from and distilled by the corrected teacher.

Both are ordinary resumable pipeline runs (rerunning this script skips finished stages). Then it compares

1. distillation (KL) vs plain cross-entropy for the same pruned student;
2. pruned vs random initialization of the same architecture;
3. width vs depth pruning at (about) the same parameter count;
4. with vs without teacher correction,

by held-out perplexity (the lower the better) and the final validation loss, and writes the table between the
markers of ``docs/results.md``, ``docs/figures/results_curves.png``, ``docs/figures/results_ppl.png`` and
``docs/figures/results_findings.json``. The text around the markers (what held, what did not) is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_135m_findings.yaml"
BEGIN, END = "<!-- BEGIN FINDINGS (written by tools/findings.py) -->", "<!-- END FINDINGS -->"

# (finding, arm A: the paper's choice, arm B: the alternative, what the paper says)
COMPARISONS = [
    ("1. distillation vs cross-entropy", ("base", "width"), ("base", "width_ce"),
     "KD with forward KL recovers more than training on the ground-truth next token with the same tokens"),
    ("2. pruned vs random initialization", ("base", "width"), ("base", "width_random"),
     "starting from the pruned weights is far better than training the same architecture from scratch"),
    ("3. width vs depth pruning", ("base", "width"), ("base", "depth"),
     "at the same size, width pruning ends better after distillation than depth pruning (depth is faster)"),
    ("4. with vs without teacher correction", ("corrected", "width"), ("base", "width"),
     "correcting the teacher on the distillation data first gives a better student"),
]
REPLICATED = (0, 2, 3)  # indices into COMPARISONS rerun with other seeds (--seeds): the close calls
REPLICATED_STUDENTS = ("width", "width_ce", "depth")
SIGMAS = 2.0  # a paired difference within this many standard errors of zero is called inconclusive


def run_pipelines(config: Path, out: Path, base_dir: Path, overrides: list[str],
                  seeds: Sequence[int] = ()) -> dict[str, dict]:
    import dataclasses

    from minitron_jax.pipeline import Pipeline, load_pipeline_config

    base = load_pipeline_config(config, overrides + [f"run_dir={base_dir}"])
    missing = {"width", "width_ce", "width_random", "depth"} - set(base.students)
    if missing:
        raise SystemExit(f"{config} lacks the student(s) {', '.join(sorted(missing))} the findings compare")
    corrected = dataclasses.replace(
        base, run_dir=str(out / "corrected"), students={"width": base.students["width"]},
        teacher_correction=dataclasses.replace(base.teacher_correction, enabled=True))
    # Replicates: the students of the findings that are close calls, distilled again with another data order
    # (distill.seed shuffles the training rows; the held-out validation documents stay the same, data.split_seed);
    # pruning is deterministic.
    runs = [("base", base), ("corrected", corrected)]
    for seed in seeds:
        runs.append((f"seed{seed}", dataclasses.replace(
            base, run_dir=str(out / f"seed{seed}"), distill=dataclasses.replace(base.distill, seed=seed),
            students={k: base.students[k] for k in REPLICATED_STUDENTS})))
        runs.append((f"corrected_seed{seed}", dataclasses.replace(
            corrected, run_dir=str(out / f"corrected_seed{seed}"),
            distill=dataclasses.replace(corrected.distill, seed=seed))))
    reports = {}
    for name, pc in runs:
        t0 = time.perf_counter()
        report = Pipeline(pc).run()
        report["driver_wall_seconds"] = time.perf_counter() - t0
        reports[name] = report
    return reports


def _row(reports, run: str, model: str) -> dict:
    for r in reports[run]["rows"]:
        if r["model"] == model:
            return r
    raise KeyError(f"{run}/{model} not in the pipeline report")


def _final_val(reports, run: str, model: str) -> float | None:
    val = reports[run]["curves"][model]["val"]
    return val[-1][1] if val else None


def paired(a: list[float], b: list[float]) -> dict:
    """Per-window NLL difference b − a over the same held-out windows: mean, standard error, windows where a wins."""
    import numpy as np

    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "a_wins": int((d > 0).sum()), "windows": int(len(d))}


def verdict(p: dict) -> str:
    if abs(p["mean"]) <= SIGMAS * p["se"]:
        return "inconclusive"
    return "held" if p["mean"] > 0 else "did not hold"


def _seed_run(run: str, seed: int) -> str:
    """The run holding ``run``'s students distilled with ``seed`` (seed 0: the run itself)."""
    if seed == 0:
        return run
    return f"seed{seed}" if run == "base" else f"{run}_seed{seed}"


def replicates(reports) -> list[dict]:
    """The close calls once per distillation seed (seed 0 is the base and corrected runs)."""
    seeds = [0] + sorted(int(r[4:]) for r in reports if r.startswith("seed"))
    out = []
    for i in REPLICATED:
        title, a, b, _ = COMPARISONS[i]
        for seed in seeds:
            runs = (_seed_run(a[0], seed), _seed_run(b[0], seed))
            if not all(r in reports for r in runs):
                continue
            ra, rb = _row(reports, runs[0], a[1]), _row(reports, runs[1], b[1])
            p = paired(ra["window_nll"], rb["window_nll"])
            out.append({"finding": title, "seed": seed, "a": _label({"run": a[0], "model": a[1]}),
                        "b": _label({"run": b[0], "model": b[1]}), "ppl_a": ra["ppl"], "ppl_b": rb["ppl"],
                        "paired": p, "verdict": verdict(p)})
    return out


def compare(reports) -> list[dict]:
    out = []
    for title, a, b, claim in COMPARISONS:
        ra, rb = _row(reports, *a), _row(reports, *b)
        rel = rb["ppl"] / ra["ppl"] - 1.0  # > 0: the paper's choice (A) is better
        p = paired(ra["window_nll"], rb["window_nll"])
        verdict_ = verdict(p)
        out.append({"finding": title, "claim": claim, "a": {"run": a[0], **ra, "val_ce": _final_val(reports, *a)},
                    "b": {"run": b[0], **rb, "val_ce": _final_val(reports, *b)}, "relative_ppl_gap": rel,
                    "paired": p, "verdict": verdict_})
    return out


def _label(side: dict) -> str:
    name = side["model"]
    if side["run"] == "corrected":
        name += " (corrected teacher)"
    return name


def markdown(results: list[dict], reports: dict, command: str, meta: dict, reps: list[dict] = ()) -> str:
    base = reports["base"]
    corr_teacher = _row(reports, "corrected", "teacher_corrected")
    teacher = _row(reports, "base", "teacher")
    d = base["distill"]
    lines = [
        BEGIN, "",
        f"Command: `{command}` ({meta['when']}; {meta['machine']}; all stages' wall times summed: "
        f"{meta['wall_min']:.0f} min; {meta['load']}).",
        "",
        f"Budget per student: {d['steps']} steps × {d['batch_size']} × {d['seq_len']} tokens = "
        f"{d['steps'] * d['batch_size'] * d['seq_len']:,} training tokens. Held-out perplexity on "
        f"{base['eval']['heldout_tokens']:,} tokens of Wikipedia passages never trained on; validation CE on "
        f"whole documents held out of the training text. Teacher (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized): "
        f"{teacher['params'] / 1e6:.1f}M params, held-out perplexity {teacher['ppl']:.2f}, MMLU "
        f"{base['eval']['mmlu_shots']}-shot {teacher['mmlu']:.3f} on {teacher['mmlu_n']} questions; corrected teacher "
        f"({corr_teacher['tokens']:,} tokens of CE): perplexity {corr_teacher['ppl']:.2f}.",
        "",
        "| finding | student | params | ppl after pruning | ppl after distillation | val CE | MMLU | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        p = r["paired"]
        verdict_text = (f"**{r['verdict']}**: ppl {r['relative_ppl_gap']:+.1%}; ΔNLL {p['mean']:+.3f} ± "
                        f"{p['se']:.3f}, {p['a_wins']}/{p['windows']} windows")
        for side, verdict in ((r["a"], ""), (r["b"], verdict_text)):
            lines.append(f"| {r['finding'] if side is r['a'] else ''} | {_label(side)} | {side['params'] / 1e6:.1f}M | "
                         f"{side['ppl_pruned']:.1f} | {side['ppl']:.2f} | "
                         f"{'–' if side['val_ce'] is None else format(side['val_ce'], '.3f')} | "
                         f"{'–' if side['mmlu'] is None else format(side['mmlu'], '.3f')} | {verdict} |")
    lines += ["", "Verdict: for each finding the first-listed student is the paper's choice. *ppl*: how much higher "
                  "the alternative's held-out perplexity is. *ΔNLL*: the alternative's minus the paper's choice's "
                  "mean NLL (nats/token) per held-out window, paired over the same "
                  f"{results[0]['paired']['windows']} windows, ± its standard error, and on how many windows the "
                  f"paper's choice was better. *held* / *did not hold*: ΔNLL beyond {SIGMAS:g} standard errors in "
                  "the paper's / the other direction; otherwise *inconclusive*. *val CE*: the trainer's validation "
                  "rows: whole training-text documents held out before packing, so no validation row continues a "
                  "passage trained on (see finding 1 below).", "",
              *_replicate_lines(reps),
              "![validation curves](figures/results_curves.png)", "",
              "![held-out perplexity](figures/results_ppl.png)", "", END]
    return "\n".join(lines)


def _replicate_lines(reps: Sequence[dict]) -> list[str]:
    if not any(r["seed"] for r in reps):
        return []
    lines = ["Replicates: the close calls distilled again with other seeds (another training-data order, for finding 4 "
             "also in the teacher correction; the same held-out windows). Seed 0 is the table above.", "",
             "| finding | seed | ppl, paper's choice | ppl, alternative | ΔNLL ± s.e. | windows won | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in reps:
        p = r["paired"]
        lines.append(f"| {r['finding']} ({r['a']} vs {r['b']}) | {r['seed']} | {r['ppl_a']:.2f} | {r['ppl_b']:.2f} | "
                     f"{p['mean']:+.3f} ± {p['se']:.3f} | {p['a_wins']}/{p['windows']} | {r['verdict']} |")
    return lines + [""]


def plots(results: list[dict], reports: dict, figures: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 4, figsize=(18, 4), sharey=False)
    for ax, r in zip(axs, results):
        for side, color in ((r["a"], "#1f77b4"), (r["b"], "#d62728")):
            curve = reports[side["run"]]["curves"][side["model"]]["val"]
            if curve:
                steps, ce, _ = zip(*curve)
                ax.plot(steps, ce, "o-", color=color, label=f"{_label(side)}")
        ax.set_title(r["finding"], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("validation CE (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "results_curves.png", dpi=110)
    plt.close(fig)

    names, before, after = [], [], []
    seen = set()
    for r in results:
        for side in (r["a"], r["b"]):
            key = (side["run"], side["model"])
            if key in seen:
                continue
            seen.add(key)
            names.append(_label(side).replace(" (corrected teacher)", "\n(corr. teacher)"))
            before.append(side["ppl_pruned"])
            after.append(side["ppl"])
    teacher = _row(reports, "base", "teacher")["ppl"]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], before, 0.4, label="before distillation", color="#d62728", alpha=0.7)
    ax.bar([i + 0.2 for i in x], after, 0.4, label="after distillation", color="#2ca02c", alpha=0.8)
    for i, (b, a) in enumerate(zip(before, after)):
        ax.text(i - 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=7)
        ax.text(i + 0.2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.1f}")
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("held-out perplexity (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "results_ppl.png", dpi=110)
    plt.close(fig)


def write_results_md(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` by ``block`` (append it when the
    markers are absent)."""
    text = path.read_text() if path.is_file() else "# Results\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None
    if 0 in seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: distinct seeds other than 0 (the base run's), got {text!r}")
    return seeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="pipeline overrides for both runs, e.g. distill.steps=400")
    ap.add_argument("--config", default=str(CONFIG), help="pipeline config with the four students")
    ap.add_argument("--out", default=str(REPO / "runs" / "findings"), help="where the two pipeline runs go")
    ap.add_argument("--base-run-dir", default=None,
                    help="run directory of the base run (default <out>/base); runs/smollm2_135m_demo reuses a "
                         "finished demo run, whose width and depth students are the same")
    ap.add_argument("--seeds", type=_seed_list, default=[],
                    help="comma-separated extra distillation seeds (e.g. 1,2): findings 1, 3 and 4 rerun per seed")
    ap.add_argument("--docs", default=str(REPO / "docs"), help="where results.md and figures/ are written")
    ap.add_argument("--load", default="machine otherwise idle",
                    help="a note on the machine's load, printed beside the wall time")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out).absolute()
    base_dir = Path(args.base_run_dir).absolute() if args.base_run_dir else out / "base"
    reports = run_pipelines(Path(args.config), out, base_dir, args.overrides, args.seeds)
    results = compare(reports)
    reps = replicates(reports)
    docs = Path(args.docs)
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plots(results, reports, figures)
    command = ("python tools/findings.py" + ("" if Path(args.config) == CONFIG else f" --config {args.config}")
               + (f" --base-run-dir {args.base_run_dir}" if args.base_run_dir else "")
               + (f" --seeds {','.join(map(str, args.seeds))}" if args.seeds else "")
               + "".join(f" {o}" for o in args.overrides))
    meta = {"when": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                                                          f"Python {platform.python_version()}",
            "wall_min": sum(r.get("wall_seconds_all_stages", 0.0) for r in reports.values()) / 60,
            "load": args.load}
    block = markdown(results, reports, command, meta, reps)
    write_results_md(docs / "results.md", block)
    (figures / "results_findings.json").write_text(json.dumps(
        {"command": command, "meta": meta, "comparisons": results, "replicates": reps,
         "stages": {k: v["stages"] for k, v in reports.items()}}, indent=1, default=str) + "\n")
    print(block)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min (this invocation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
