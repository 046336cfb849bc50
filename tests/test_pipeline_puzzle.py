"""A pipeline student found by the layer-by-layer (Puzzle) search: the puzzle stage runs the search from the
teacher, distillation trains the heterogeneous model it chose, evaluation and export take it, and the report shows
it beside a uniform student. Bad puzzle sections are refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_pipeline import make_tiny_setup, run_pipeline
from utils import save_tiny_hf, tiny_tokenizer

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the tiny pipeline with
# a puzzle student (~50 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("pipeline_puzzle_run")


def _puzzle_cfg(root: Path, puzzle: dict) -> Path:
    cfg = make_tiny_setup(root)
    # An FFN of 256: the DeciLM layout (and so vLLM and llama.cpp) writes FFN widths in multiples of 256, so the
    # tiny teacher's 96 could not be kept by any exported layer.
    shutil.rmtree(root / "teacher")
    save_tiny_hf(root / "teacher", tokenizer=tiny_tokenizer(), max_position_embeddings=512, intermediate_size=256)
    data = yaml.safe_load(cfg.read_text())
    data["students"] = {"width": {"prune": {"ffn": 64}}, "puzzle": {"puzzle": puzzle}}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


SEARCH = {"calib_tokens": 256, "seq_len": 32, "eval_windows": 2, "steps": 3, "batch_windows": 2, "runner_ups": 1,
          "importance": False}


@pytest.fixture(scope="module")
def puzzle_run(tmp_path_factory):
    from minitron_jax.convert import read_source_config
    from minitron_jax.model import count_params

    root = tmp_path_factory.mktemp("pipeline_puzzle")
    cfg = _puzzle_cfg(root, SEARCH)
    target = int(0.85 * count_params(read_source_config(root / "teacher")))
    cfg = _puzzle_cfg(root, {**SEARCH, "target_params": target})
    run_dir = root / "run"
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return cfg, run_dir, proc, target


def test_puzzle_student_is_searched_distilled_evaluated_and_exported(puzzle_run):
    from minitron_jax.arch import count_params, is_hetero
    from minitron_jax.convert import load_model

    cfg, run_dir, proc, target = puzzle_run
    assert "puzzle.puzzle" in proc.stdout and "distill.puzzle" in proc.stdout
    report = json.loads((run_dir / "results.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    row = rows["puzzle"]
    assert row["arch"]["ffn"] is None and row["arch"]["blocks"]
    assert row["params"] <= target and row["ppl"] > 1 and row["ppl_pruned"] > 1
    assert "per-layer" in (run_dir / "results.md").read_text()
    search = run_dir / "puzzle" / "puzzle"
    for name in ("report.json", "report.md", "architecture.png"):
        assert (search / name).stat().st_size > 0
    # the stored activations, blocks and scores are in the shared work directory, not the student's
    (work,) = (run_dir / "puzzle" / "_search").iterdir()
    assert (work / "run.json").is_file() and (work / "acts").is_dir() and not (search / "acts").exists()
    # The distilled student is the searched architecture, trained: same blocks, other weights.
    searched = load_model(search / "model", with_tokenizer=False)
    distilled = load_model(row["export"], with_tokenizer=False)
    # (the HF export's config carries transformers' bookkeeping keys, e.g. torch_dtype, in the base's extras)
    assert is_hetero(distilled.config) and distilled.config.blocks == searched.config.blocks
    assert count_params(distilled.config) == row["params"]
    # Handed over: a DeciLM HF directory with its modeling file and a GGUF, each with a card.
    e = report["exports"]["puzzle"]
    hf = json.loads((Path(e["hf"]) / "config.json").read_text())
    assert hf["architectures"] == ["DeciLMForCausalLM"] and (Path(e["hf"]) / "modeling_decilm.py").is_file()
    # (the GGUF leaves removed layers, none/none, out: the same function without them)
    from minitron_jax.hetero import without_identity_layers

    kept = without_identity_layers(distilled.config)[0]
    assert load_model(e["gguf"], with_tokenizer=False).config.blocks == kept.blocks
    card = (run_dir / "export" / "puzzle" / "README.md").read_text()
    assert "### Layer-by-layer search" in card and row["arch"]["blocks"] in card and "### Importance" not in card


def test_students_that_differ_only_in_targets_share_one_search(tmp_path):
    """The trained blocks and scores do not depend on the targets or the serving point, so two such students
    share one work directory; another search setting gets its own."""
    from minitron_jax.pipeline.config import StudentSpec
    from minitron_jax.pipeline.stages import Pipeline

    def key(**puzzle):
        return Pipeline._search_key(StudentSpec(puzzle={**SEARCH, **puzzle}), "teacher", "data")

    shared = key(target_params=1e6)
    assert key(target_memory=0.5, context=2048) == shared and key(target_flops=1e6, runner_ups=3) == shared
    assert key(target_params=1e6, steps=4) != shared and key(target_params=1e6, runtime="any") != shared
    assert Pipeline._search_key(StudentSpec(puzzle={**SEARCH, "target_params": 1e6}), "other", "data") != shared


def test_a_latency_target_priced_on_an_accelerator_is_a_plan():
    from minitron_jax.pipeline.config import StudentSpec, puzzle_plan
    from minitron_jax.planning.capacity import accelerator

    plan = puzzle_plan(StudentSpec(puzzle={**SEARCH, "target_latency_ms": 2.5, "target_throughput": 300,
                                           "accelerator": "H100", "context": 8192, "batch": 4}))
    h100 = accelerator("h100")
    assert plan["targets"].latency_s == pytest.approx(2.5e-3) and plan["targets"].throughput == 300
    c = plan["cost"]
    assert (c.accelerator, c.peak_flops, c.memory_bandwidth) == (h100.name, h100.peak_flops, h100.hbm_bandwidth)
    assert (c.context, c.batch) == (8192, 4) and "decode roofline" in c.describe()


def test_rerun_skips_the_search(puzzle_run):
    cfg, run_dir, _, _ = puzzle_run
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" not in " ".join(line for line in proc.stdout.splitlines() if "puzzle.puzzle" in line)


@pytest.mark.parametrize("puzzle, message", [
    ({"calib_tokens": 256}, "give at least one target"),
    ({"target_params": 10}, "students.puzzle.puzzle"),  # infeasible: named before any work
    ({"target_params": 1e9, "wings": 2}, "unknown key(s) wings"),
    ({"target_params": -5}, "target_params must be a positive number"),
    ({"target_params": 1e9, "ffn": ["mlp100000"]}, "wider than the parent"),
    ({"target_latency_ms": 5}, "needs an accelerator"),  # host timing would depend on the machine's load
    ({"target_params": 1e9, "accelerator": "h100"}, "give one of them"),
    ({"target_latency_ms": 1e-9, "accelerator": "h100"}, "target-latency"),  # unreachable: before any work
    ({"target_throughput": 10, "accelerator": "tpu-v9"}, "tpu-v9"),
    ({"target_params": 1e9, "latency_phase": "prefill"}, "give accelerator too"),
])
def test_bad_puzzle_sections_are_refused_before_any_work(tmp_path, puzzle, message):
    cfg = _puzzle_cfg(tmp_path, puzzle)
    run_dir = tmp_path / "refused"
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (run_dir / "stages").exists()


def test_a_heterogeneous_teacher_with_a_pruned_student_is_refused_before_any_work(tmp_path):
    """python -m minitron_jax.prune slices a heterogeneous model's hidden size and depth, but the pipeline's pruned
    students assume a uniform teacher: refused in one line at the preflight, nothing written."""
    from test_cli_hostile import _save_tiny_hetero

    cfg = make_tiny_setup(tmp_path)
    hetero_teacher = _save_tiny_hetero(tmp_path / "hetero", tmp_path / "teacher")
    data = yaml.safe_load(cfg.read_text())
    data["teacher"] = str(hetero_teacher)
    data["students"] = {"narrow": {"prune": {"hidden": 48}}}
    cfg.write_text(yaml.safe_dump(data))
    proc = run_pipeline("--config", str(cfg), f"run_dir={tmp_path / 'refused'}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "heterogeneous" in proc.stderr and "students.narrow.prune" in proc.stderr
    assert not (tmp_path / "refused" / "stages").exists()
