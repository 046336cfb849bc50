"""tools/findings.py: the paired statistics and verdicts behind docs/results.md, on hand-made pipeline reports."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
from utils import load_tool

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def F():
    return load_tool("findings")


def _row(model, window_nll, ppl_pruned=300.0):
    return {"model": model, "params": 9e7, "ppl_pruned": ppl_pruned, "ppl": math.exp(float(np.mean(window_nll))),
            "mmlu": 0.25, "mmlu_n": 32, "tokens": 20480, "window_nll": list(window_nll)}


def _reports(seed_runs=("seed1",)):
    rng = np.random.default_rng(0)
    base_nll = 4.0 + 0.3 * rng.standard_normal(40)
    width = base_nll
    rows = {
        "teacher": _row("teacher", base_nll - 1.0),
        "width": _row("width", width),
        "width_ce": _row("width_ce", width + 0.05 + 0.01 * rng.standard_normal(40)),  # clearly worse
        "width_random": _row("width_random", width + 3.0),
        "depth": _row("depth", width + 0.002 * rng.standard_normal(40)),  # indistinguishable
    }
    curves = {k: {"train": [], "val": [(10, 5.0, None), (20, 4.5, None)]} for k in rows}

    def report(models, extra=()):
        return {"rows": [rows[m] for m in models] + list(extra), "curves": {m: curves[m] for m in models},
                "distill": {"steps": 40, "batch_size": 4, "seq_len": 128},
                "eval": {"heldout_tokens": 40 * 256, "mmlu_shots": 0}}

    reports = {"base": report(["teacher", "width", "width_ce", "width_random", "depth"]),
               "corrected": report(["teacher", "width"], [_row("teacher_corrected", base_nll - 1.1)])}
    # In the corrected run the width student is better than the base one: the paper's direction.
    reports["corrected"]["rows"][1] = _row("width", width - 0.04 + 0.005 * rng.standard_normal(40))
    for run in seed_runs:
        reports[run] = report(["teacher", "width", "width_ce", "depth"])
        # This seed flips finding 3: depth clearly better.
        reports[run]["rows"][3] = _row("depth", width - 0.08 + 0.01 * rng.standard_normal(40))
        reports[f"corrected_{run}"] = report(["teacher", "width"], [_row("teacher_corrected", base_nll - 1.1)])
        reports[f"corrected_{run}"]["rows"][1] = _row("width", width + 0.001 * rng.standard_normal(40))
    return reports


def test_paired_matches_a_hand_computation(F):
    p = F.paired([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 3.5, 5.0])
    d = np.array([0.5, 0.0, 0.5, 1.0])
    assert p["mean"] == pytest.approx(d.mean())
    assert p["se"] == pytest.approx(d.std(ddof=1) / 2.0)
    assert p["a_wins"] == 3 and p["windows"] == 4


def test_verdict_thresholds(F):
    assert F.verdict({"mean": 0.05, "se": 0.01}) == "held"
    assert F.verdict({"mean": -0.05, "se": 0.01}) == "did not hold"
    assert F.verdict({"mean": 0.015, "se": 0.01}) == "inconclusive"  # 1.5 s.e. < 2


def test_compare_and_replicates_on_hand_made_reports(F):
    reports = _reports()
    results = {r["finding"][:1]: r for r in F.compare(reports)}
    assert results["1"]["verdict"] == "held" and results["1"]["paired"]["mean"] == pytest.approx(0.05, abs=0.01)
    assert results["2"]["verdict"] == "held" and results["2"]["paired"]["a_wins"] == 40
    assert results["3"]["verdict"] == "inconclusive"
    assert results["4"]["verdict"] == "held"  # corrected-teacher width beats the base width
    assert results["1"]["relative_ppl_gap"] == pytest.approx(results["1"]["b"]["ppl"] / results["1"]["a"]["ppl"] - 1)

    reps = F.replicates(reports)
    by = {(r["finding"][:1], r["seed"]): r for r in reps}
    assert set(by) == {("1", 0), ("1", 1), ("3", 0), ("3", 1), ("4", 0), ("4", 1)}
    assert by[("3", 0)]["verdict"] == "inconclusive" and by[("3", 1)]["verdict"] == "did not hold"
    assert by[("1", 1)]["verdict"] == "held"
    # Finding 4 pairs the corrected run of a seed with the base run of the same seed.
    assert by[("4", 0)]["verdict"] == "held" and by[("4", 1)]["verdict"] == "inconclusive"
    assert by[("4", 1)]["a"] == "width (corrected teacher)" and by[("4", 1)]["b"] == "width"
    # A seed whose corrected run is missing just has no finding-4 row.
    partial = {k: v for k, v in reports.items() if k != "corrected_seed1"}
    assert ("4", 1) not in {(r["finding"][:1], r["seed"]) for r in F.replicates(partial)}

    md = F.markdown(F.compare(reports), reports, "python tools/findings.py --seeds 1",
                    {"when": "today", "machine": "m", "wall_min": 1.0, "load": "idle"}, reps)
    assert md.startswith(F.BEGIN) and md.rstrip().endswith(F.END)
    assert "Replicates" in md and "| 1 | " in md and "did not hold" in md
    # Without replicate runs there is no replicate table.
    no_seed = _reports(seed_runs=())
    assert "Replicates" not in F.markdown(F.compare(no_seed), no_seed, "c", {"when": "t", "machine": "m",
                                                                             "wall_min": 1.0, "load": "idle"},
                                          F.replicates(no_seed))


def test_results_md_block_is_replaced_between_the_markers_only(F, tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"# Title\n\nhand-written intro\n\n{F.BEGIN}\nold numbers\n{F.END}\n\n## What held\nprose\n")
    F.write_results_md(path, f"{F.BEGIN}\nnew numbers\n{F.END}")
    text = path.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.startswith("# Title\n\nhand-written intro") and text.endswith("## What held\nprose\n")


@pytest.mark.parametrize("bad", ["x", "0,1", "1,1", "1,a"])
def test_bad_seed_lists_are_refused(F, bad):
    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        F._seed_list(bad)
    assert F._seed_list("1,2") == [1, 2]
