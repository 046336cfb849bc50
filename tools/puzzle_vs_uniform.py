"""Uniform Minitron width pruning vs the layer-by-layer (Puzzle) search at one parameter budget; writes the
comparison into docs/puzzle.md.

    python tools/puzzle_vs_uniform.py [--seeds 1,2] [key=value ...]   # overrides apply to every run

Runs ``minitron_jax.pipeline`` on ``configs/smollm2_135m_puzzle.yaml`` (students ``uniform`` and ``puzzle``, the
same distillation tokens) once, then once more per extra distillation seed (``distill.seed``: another training-data
order; the held-out windows stay the same). A seed's run reuses the first run's data, teacher, importance, pruning
and search stages (their done-markers are copied: their keys do not depend on the distillation seed), so the search
runs once. Per seed it compares the two distilled students by held-out NLL paired per window (as
``tools/findings.py`` does), and across seeds it sets the gap between them against each student's own
seed-to-seed spread. The table goes between the markers of ``docs/puzzle.md``; the searched architecture's picture
is copied to ``docs/figures/puzzle_architecture.png`` and the numbers to ``docs/figures/puzzle_vs_uniform.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from findings import SIGMAS, _seed_list, paired, verdict, write_results_md  # noqa: E402

CONFIG = REPO / "configs" / "smollm2_135m_puzzle.yaml"
BEGIN = "<!-- BEGIN PUZZLE VS UNIFORM (written by tools/puzzle_vs_uniform.py) -->"
END = "<!-- END PUZZLE VS UNIFORM -->"
UPSTREAM = ("data", "teacher", "importance", "prune.", "puzzle.")  # stages a distillation seed does not change


def run_all(config: Path, out: Path, overrides: list[str], seeds: list[int]) -> dict[int, dict]:
    from minitron_jax.pipeline import Pipeline, load_pipeline_config

    reports = {}
    for seed in [0, *seeds]:
        run_dir = out / ("base" if seed == 0 else f"seed{seed}")
        pc = load_pipeline_config(config, overrides + [f"run_dir={run_dir}", f"distill.seed={seed}"])
        missing = {"uniform", "puzzle"} - set(pc.students)
        if missing:
            raise SystemExit(f"{config} lacks the student(s) {', '.join(sorted(missing))} this compares")
        if seed:
            (run_dir / "stages").mkdir(parents=True, exist_ok=True)
            # A run directory is recognised by its pipeline.yaml (the pipeline rewrites it at the start).
            if not (run_dir / "pipeline.yaml").exists():
                shutil.copy2(out / "base" / "pipeline.yaml", run_dir / "pipeline.yaml")
            for marker in (out / "base" / "stages").glob("*.json"):
                if marker.stem.startswith(UPSTREAM) and not (run_dir / "stages" / marker.name).exists():
                    shutil.copy2(marker, run_dir / "stages" / marker.name)
        t0 = time.perf_counter()
        report = Pipeline(pc).run()
        report["driver_wall_seconds"] = time.perf_counter() - t0
        reports[seed] = report
    return reports


def _row(report: dict, model: str) -> dict:
    return next(r for r in report["rows"] if r["model"] == model)


def compare(reports: dict[int, dict]) -> dict:
    per_seed = []
    for seed, rep in sorted(reports.items()):
        u, p = _row(rep, "uniform"), _row(rep, "puzzle")
        d = paired(p["window_nll"], u["window_nll"])  # > 0: the puzzle student is better
        per_seed.append({"seed": seed, "ppl_uniform": u["ppl"], "ppl_puzzle": p["ppl"], "paired": d,
                         "verdict": verdict(d)})
    ppl_u = [s["ppl_uniform"] for s in per_seed]
    ppl_p = [s["ppl_puzzle"] for s in per_seed]
    spread = max(max(ppl_u) - min(ppl_u), max(ppl_p) - min(ppl_p))
    gap = sum(ppl_u) / len(ppl_u) - sum(ppl_p) / len(ppl_p)
    held_each = all(s["verdict"] == "held" for s in per_seed)
    overall = ("held" if held_each and (len(per_seed) > 1 and gap > spread) else
               "held in every seed, but the seeds are too few to measure a spread" if held_each and len(per_seed) == 1
               else "did not hold" if all(s["verdict"] == "did not hold" for s in per_seed) else "inconclusive")
    return {"per_seed": per_seed, "mean_ppl_gap": gap, "seed_spread": spread, "verdict": overall}


def markdown(result: dict, reports: dict[int, dict], command: str, meta: dict) -> str:
    base = reports[0]
    u, p, t = _row(base, "uniform"), _row(base, "puzzle"), _row(base, "teacher")
    d = base["distill"]
    lines = [BEGIN, "",
             f"Command: `{command}` ({meta['when']}; {meta['machine']}; {meta['load']}; all runs' stages: "
             f"{meta['wall_min']:.0f} min).", "",
             f"Budget per student: {d['steps']} steps × {d['batch_size']} × {d['seq_len']} tokens = "
             f"{d['steps'] * d['batch_size'] * d['seq_len']:,} distillation tokens (forward KL from the teacher, "
             f"the same rows in the same order for both within a seed). Held-out perplexity on "
             f"{base['eval']['heldout_tokens']:,} tokens of Wikipedia passages never trained on or searched on. "
             f"Teacher: {t['params'] / 1e6:.1f}M params, perplexity {t['ppl']:.2f}.", "",
             "| student | params | architecture | ppl after pruning/search | ppl after distillation | MMLU |",
             "|---|---:|---|---:|---:|---:|"]
    for name, r in (("uniform (Minitron width)", u), ("puzzle (layer-by-layer search)", p)):
        a = r["arch"]
        arch = a.get("blocks") or f"L{a['layers']} D{a['hidden']} F{a['ffn']} H{a['heads']} K{a['kv_heads']}"
        mmlu = "–" if r.get("mmlu") is None else f"{r['mmlu']:.3f}"
        lines.append(f"| {name} | {r['params']:,} | {arch} | {r['ppl_pruned']:.1f} | {r['ppl']:.2f} | {mmlu} |")
    lines += ["",
              "| seed | ppl uniform | ppl puzzle | ΔNLL (uniform − puzzle) ± s.e. | windows puzzle wins | verdict |",
              "|---:|---:|---:|---:|---:|---|"]
    for s in result["per_seed"]:
        q = s["paired"]
        lines.append(f"| {s['seed']} | {s['ppl_uniform']:.2f} | {s['ppl_puzzle']:.2f} | {q['mean']:+.3f} ± "
                     f"{q['se']:.3f} | {q['a_wins']}/{q['windows']} | {s['verdict']} |")
    lines += ["", f"**{result['verdict']}**: mean perplexity gap (uniform − puzzle) {result['mean_ppl_gap']:+.2f} "
                  f"against a seed-to-seed spread of {result['seed_spread']:.2f} (the larger of the two students' "
                  f"max − min over seeds). Per seed, *held*: ΔNLL beyond {SIGMAS:g} standard errors in the "
                  "puzzle student's favour over the same held-out windows.", "",
              "![searched architecture](figures/puzzle_architecture.png)", "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="pipeline overrides for every run, e.g. distill.steps=400")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--out", default=str(REPO / "runs" / "puzzle_vs_uniform"))
    ap.add_argument("--seeds", type=_seed_list, default=[], help="extra distillation seeds, e.g. 1,2")
    ap.add_argument("--docs", default=str(REPO / "docs"))
    ap.add_argument("--load", default="machine otherwise idle")
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    reports = run_all(Path(args.config), out, args.overrides, args.seeds)
    result = compare(reports)
    docs = Path(args.docs)
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    picture = out / "base" / "puzzle" / "puzzle" / "architecture.png"
    if picture.is_file():
        shutil.copy2(picture, figures / "puzzle_architecture.png")
    command = ("python tools/puzzle_vs_uniform.py" + (f" --config {args.config}" if Path(args.config) != CONFIG else "")
               + (f" --seeds {','.join(map(str, args.seeds))}" if args.seeds else "")
               + "".join(f" {o}" for o in args.overrides))
    meta = {"when": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "wall_min": sum(r.get("wall_seconds_all_stages", 0.0) for r in reports.values()) / 60, "load": args.load}
    block = markdown(result, reports, command, meta)
    write_results_md(docs / "puzzle.md", block)
    search_report = out / "base" / "puzzle" / "puzzle" / "report.json"
    (figures / "puzzle_vs_uniform.json").write_text(json.dumps(
        {"command": command, "meta": meta, "result": result,
         "search": json.loads(search_report.read_text()) if search_report.is_file() else None,
         "rows": {seed: rep["rows"] for seed, rep in reports.items()}}, indent=1, default=str) + "\n")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
