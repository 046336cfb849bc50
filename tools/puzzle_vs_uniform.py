"""Uniform Minitron width pruning vs the layer-by-layer (Puzzle) search at the uniform student's budget; writes the
comparison into docs/puzzle.md.

    python tools/puzzle_vs_uniform.py [--seeds 1,2] [key=value ...]   # overrides apply to every run

Runs ``minitron_jax.pipeline`` on ``configs/smollm2_135m_puzzle.yaml`` (the student ``uniform`` and one or more
searched students whose names start with ``puzzle``, e.g. one at the uniform student's parameter count and one at
its serving memory; the same distillation tokens) once, then once more per extra distillation seed
(``distill.seed``: another training-data order; the held-out windows stay the same). A seed's run reuses the first
run's data, teacher, importance, pruning and search stages (their done-markers are copied: their keys do not depend
on the distillation seed), so each search runs once. Per seed it compares each searched student with the uniform one
by held-out NLL paired per window (as ``tools/findings.py`` does), and across seeds it sets the gap between them
against each student's own seed-to-seed spread. Each student's serving memory (weights + KV cache,
``compress.puzzle.costs``, at ``--context`` tokens, batch 1, bf16) is printed beside its parameter count. The tables
go between the markers of ``docs/puzzle.md``; each search's picture is copied to
``docs/figures/<student>_architecture.png`` and the numbers to ``docs/figures/puzzle_vs_uniform.json``.
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
        if "uniform" not in pc.students or not searched(pc.students):
            raise SystemExit(f"{config} needs a student 'uniform' and at least one whose name starts with 'puzzle'")
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


def searched(students) -> list[str]:
    return sorted(s for s in students if s.startswith("puzzle"))


def _row(report: dict, model: str) -> dict:
    return next(r for r in report["rows"] if r["model"] == model)


def serving_memory(row: dict, context: int) -> float | None:
    """Weights + KV cache in bytes (bf16, batch 1, ``context`` tokens) of a row's distilled model, read from its
    saved config; None when the directory is gone."""
    from minitron_jax.arch import base_config, is_hetero
    from minitron_jax.blocks import uniform_blocks
    from minitron_jax.compress.puzzle.costs import model_cost
    from minitron_jax.compress.puzzle.targets import CostSettings
    from minitron_jax.hetero import config_from_json_file

    path = Path(row.get("export") or "") / "config.json"
    if not path.is_file():
        return None
    cfg = config_from_json_file(path)
    blocks = cfg.blocks if is_hetero(cfg) else uniform_blocks(cfg)
    return model_cost(base_config(cfg), blocks, **CostSettings(context=context).block_kwargs()).memory_bytes


def compare_one(reports: dict[int, dict], student: str) -> dict:
    per_seed = []
    for seed, rep in sorted(reports.items()):
        u, p = _row(rep, "uniform"), _row(rep, student)
        d = paired(p["window_nll"], u["window_nll"])  # > 0: the searched student is better
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


def compare(reports: dict[int, dict]) -> dict[str, dict]:
    return {s: compare_one(reports, s) for s in searched({r["model"] for r in reports[0]["rows"]})}


def markdown(results: dict[str, dict], reports: dict[int, dict], command: str, meta: dict, context: int) -> str:
    base = reports[0]
    t = _row(base, "teacher")
    d = base["distill"]
    lines = [BEGIN, "",
             f"Command: `{command}` ({meta['when']}; {meta['machine']}; {meta['load']}; all runs' stages: "
             f"{meta['wall_min']:.0f} min).", "",
             f"Budget per student: {d['steps']} steps × {d['batch_size']} × {d['seq_len']} tokens = "
             f"{d['steps'] * d['batch_size'] * d['seq_len']:,} distillation tokens (forward KL from the teacher, "
             f"the same rows in the same order for every student within a seed). Held-out perplexity on "
             f"{base['eval']['heldout_tokens']:,} tokens of Wikipedia passages never trained on or searched on. "
             f"Teacher: {t['params'] / 1e6:.1f}M params, perplexity {t['ppl']:.2f}. Memory: weights + KV cache "
             f"in bf16 at batch 1 and a {context:,}-token context (`compress.puzzle.costs`).", "",
             "| student | params | memory | architecture | ppl after pruning/search | ppl after distillation | MMLU |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name in ["uniform", *results]:
        r = _row(base, name)
        a = r["arch"]
        arch = a.get("blocks") or f"L{a['layers']} D{a['hidden']} F{a['ffn']} H{a['heads']} K{a['kv_heads']}"
        mmlu = "–" if r.get("mmlu") is None else f"{r['mmlu']:.3f}"
        mem = serving_memory(r, context)
        mem_s = "–" if mem is None else f"{mem / 1e6:,.1f} MB"
        lines.append(f"| {name} | {r['params']:,} | {mem_s} | {arch} | {r['ppl_pruned']:.1f} | {r['ppl']:.2f} "
                     f"| {mmlu} |")
    for name, result in results.items():
        lines += ["", f"**{name}** against **uniform**:", "",
                  f"| seed | ppl uniform | ppl {name} | ΔNLL (uniform − {name}) ± s.e. | windows {name} wins "
                  "| verdict |",
                  "|---:|---:|---:|---:|---:|---|"]
        for s in result["per_seed"]:
            q = s["paired"]
            lines.append(f"| {s['seed']} | {s['ppl_uniform']:.2f} | {s['ppl_puzzle']:.2f} | {q['mean']:+.3f} ± "
                         f"{q['se']:.3f} | {q['a_wins']}/{q['windows']} | {s['verdict']} |")
        lines += ["", f"**{result['verdict']}**: mean perplexity gap (uniform − {name}) "
                      f"{result['mean_ppl_gap']:+.2f} against a seed-to-seed spread of {result['seed_spread']:.2f} "
                      f"(the larger of the two students' max − min over seeds). Per seed, *held*: ΔNLL beyond "
                      f"{SIGMAS:g} standard errors in the searched student's favour over the same held-out windows."]
    lines += ["", *[f"![{n}'s architecture](figures/{n}_architecture.png)" for n in results], "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="pipeline overrides for every run, e.g. distill.steps=400")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--out", default=str(REPO / "runs" / "puzzle_vs_uniform"))
    ap.add_argument("--seeds", type=_seed_list, default=[], help="extra distillation seeds, e.g. 1,2")
    ap.add_argument("--docs", default=str(REPO / "docs"))
    ap.add_argument("--load", default="machine otherwise idle")
    ap.add_argument("--context", type=int, default=4096, help="context of the memory column (tokens)")
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    reports = run_all(Path(args.config), out, args.overrides, args.seeds)
    results = compare(reports)
    docs = Path(args.docs)
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name in results:
        picture = out / "base" / "puzzle" / name / "architecture.png"
        if picture.is_file():
            shutil.copy2(picture, figures / f"{name}_architecture.png")
    command = ("python tools/puzzle_vs_uniform.py" + (f" --config {args.config}" if Path(args.config) != CONFIG else "")
               + (f" --seeds {','.join(map(str, args.seeds))}" if args.seeds else "")
               + "".join(f" {o}" for o in args.overrides))
    meta = {"when": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "wall_min": sum(r.get("wall_seconds_all_stages", 0.0) for r in reports.values()) / 60, "load": args.load}
    block = markdown(results, reports, command, meta, args.context)
    write_results_md(docs / "puzzle.md", block, BEGIN, END)
    searches = {}
    for name in results:
        f = out / "base" / "puzzle" / name / "report.json"
        searches[name] = json.loads(f.read_text()) if f.is_file() else None
    memory = {name: serving_memory(_row(reports[0], name), args.context) for name in ["uniform", *results]}
    (figures / "puzzle_vs_uniform.json").write_text(json.dumps(
        {"command": command, "meta": meta, "results": results, "searches": searches,
         "memory_bytes": {"context": args.context, **memory},
         "rows": {seed: rep["rows"] for seed, rep in reports.items()}}, indent=1, default=str) + "\n")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
