"""The end-to-end pipeline on a tiny random teacher: every stage runs, a rerun skips them all, an interrupted
distillation resumes from its checkpoint to the same result, changed settings redo only what they affect, and bad
configs are refused with a message and a non-zero exit."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from utils import save_tiny_hf, tiny_tokenizer

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the tiny
# pipeline run (~45 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("pipeline_tiny_run")

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the quick brown fox jumps over lazy dog pruning removes least important heads neurons channels "
          "distillation teaches student match teacher distribution").split()


def make_tiny_setup(root: Path) -> Path:
    """A tiny teacher (HF dir with tokenizer), train/calib texts, a tiny MMLU file and a pipeline YAML."""
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_hf(root / "teacher", tokenizer=tiny_tokenizer(), max_position_embeddings=512)
    rng = random.Random(0)

    def doc(n):
        return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."

    for name, n in (("train", 60), ("calib", 20)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name} {i}: " + doc(rng.randint(20, 60))}) + "\n")
    with open(root / "mmlu.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answer_a": str(2 * i), "answer_b": str(i),
                                "answer_c": "0", "answer_d": "7", "correct_answer": "A",
                                "topic": "astronomy" if i % 2 else "elementary mathematics"}) + "\n")
    cfg = root / "tiny.yaml"
    cfg.write_text(f"""
name: tiny
teacher: {root / 'teacher'}
texts: {{train: {root / 'train.jsonl'}, calib: {root / 'calib.jsonl'}, heldout_docs: 8}}
importance: {{calib_samples: 4, seq_len: 32, batch_size: 4, depth_samples: 2}}
students:
  width: {{prune: {{hidden: 48, ffn: 64, heads_per_group: 3}}}}
  depth: {{prune: {{drop_layers: 1}}}}
distill: {{steps: 6, seq_len: 32, batch_size: 2, eval_every: 3, val_rows: 4, val_batches: 1, checkpoint_every: 2,
          warmup_steps: 1, peak_lr: 1.0e-3, min_lr: 1.0e-4}}
eval: {{seq_len: 32, max_tokens: 256, mmlu_limit: 4, mmlu_shots: 1, mmlu_data: {root / 'mmlu.jsonl'},
       mmlu_batch_size: 2}}
export: {{gguf: f16}}   # hidden 48 is not a multiple of q8_0's 32-wide blocks
""")
    return cfg


_SUBPROCESS_XLA_CACHE = Path(tempfile.gettempdir()) / f"minitron_jax_test_xla_{os.getuid()}"


def _env() -> dict[str, str]:
    """The pipeline in a subprocess sees the machine's real devices (not the 8 fake ones of conftest)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # One persistent XLA cache for every pipeline subprocess of the test session: a rerun (resume, changed
    # setting) and the trainer run that stands for an interrupted stage compile the same steps again.
    env["JAX_COMPILATION_CACHE_DIR"] = str(_SUBPROCESS_XLA_CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def run_pipeline(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minitron_jax.pipeline", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _rows(run_dir: Path) -> dict[str, dict]:
    return {r["model"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}


def _stage_lines(out: str, word: str) -> set[str]:
    """Stage names whose status line contains ``word`` ("skipped" or "finished")."""
    names = set()
    for line in out.splitlines():
        if word in line and ("✓" in line):
            parts = line.split()
            names.add(parts[1])
    return names


ALL_STAGES = {"data", "teacher", "importance", "prune.width", "prune.depth", "distill.width", "distill.depth",
              "eval.teacher", "eval.width.pruned", "eval.width.distilled", "eval.depth.pruned",
              "eval.depth.distilled", "export.width", "export.depth"}


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def tiny_run(tiny_cfg):
    cfg = tiny_cfg
    run_dir = cfg.parent / "run"
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return cfg, run_dir, proc


def test_end_to_end_outputs(tiny_run):
    cfg, run_dir, proc = tiny_run
    assert _stage_lines(proc.stdout, "finished") == ALL_STAGES
    rows = _rows(run_dir)
    assert set(rows) == {"teacher", "width", "depth"}
    assert rows["width"]["arch"] == {"layers": 3, "hidden": 48, "ffn": 64, "heads": 6, "kv_heads": 2}
    assert rows["depth"]["arch"]["layers"] == 2
    for s in ("width", "depth"):
        r = rows[s]
        assert r["ppl_pruned"] > 1 and r["ppl"] > 1
        assert r["tokens"] == 6 * 2 * 32
        assert len(r["window_nll"]) == 8 and r["ppl"] == pytest.approx(np.exp(np.mean(r["window_nll"])))
        assert 0.0 <= r["mmlu"] <= 1.0
        assert (Path(r["export"]) / "config.json").is_file()
        assert (run_dir / "stages" / f"distill.{s}.json").is_file()
        # The finished distillation's checkpoints are gone (keep_checkpoints is false): its export is the output.
        assert not (run_dir / "distill" / s / "checkpoints").exists()
        assert f"removed {run_dir / 'distill' / s / 'checkpoints'} (" in proc.stdout
    assert rows["teacher"]["mmlu"] is not None
    for name in ("results.md", "results.json", "results.png"):
        assert (run_dir / name).stat().st_size > 0
    md = (run_dir / "results.md").read_text()
    assert "| width |" in md and "| depth |" in md
    # The held-out text is disjoint from training and calibration text.
    docs = {n: (run_dir / "data" / f"{n}.jsonl").read_text().splitlines() for n in ("train", "calib", "heldout")}
    assert len(docs["heldout"]) == 8 and not set(docs["heldout"]) & (set(docs["train"]) | set(docs["calib"]))
    # The exported students load in transformers.
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(rows["width"]["export"])
    assert m.config.hidden_size == 48


def test_disk_floor_is_below_what_the_run_keeps_and_close_to_it(tiny_run):
    """The preflight's floor (the models the run keeps, from the configs alone) is at most what the finished run's
    weight files take, and not far below it (safetensors headers, GGUF metadata and f32 norms make the rest). Right
    after the run: later tests of this module redo stages in it."""
    cfg, run_dir, proc = tiny_run
    line = next(x for x in proc.stdout.splitlines() if x.startswith("disk: "))
    assert "at its end" in line and "free" in line
    kept = sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in run_dir.rglob(pattern))
    floor = _disk_floor(cfg)
    assert 0.75 * kept < floor <= kept, (floor, kept)


def test_export_stage_hands_over_hf_gguf_and_cards(tiny_run):
    """export/<s>/: the final student's HF directory (same bytes as the trainer's export), a GGUF that our reader
    loads back to the same weights (f16-rounded), and a card beside each whose evaluation table carries the
    numbers of results.json; the run's last lines say where they are."""
    import jax

    from minitron_jax.convert import load_model

    cfg, run_dir, proc = tiny_run
    report = json.loads((run_dir / "results.json").read_text())
    rows = _rows(run_dir)
    for s in ("width", "depth"):
        e = report["exports"][s]
        out = run_dir / "export" / s
        assert e["hf"] == str(out / "hf") and e["gguf"] == str(out / f"tiny-{s}-f16.gguf") and e["quant"] == "f16"
        assert f"student {s}: transformers/vLLM {e['hf']}" in " ".join(proc.stdout.split())
        trained = Path(rows[s]["export"])
        assert (out / "hf" / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
        hf, gguf = load_model(out / "hf"), load_model(e["gguf"])
        assert gguf.config.describe() == hf.config.describe()
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(hf.params)[0], jax.tree.leaves(gguf.params)):
            # Norms stay F32 in a GGUF (llama.cpp's convention); the matrices are stored as f16.
            a = np.asarray(a, np.float32) if "norm" in jax.tree_util.keystr(path) else \
                np.asarray(a, np.float16).astype(np.float32)
            np.testing.assert_array_equal(a, np.asarray(b, np.float32))
        for card_path, fmt in ((out / "README.md", "gguf"), (out / "hf" / "README.md", "hf")):
            text = card_path.read_text()
            meta = yaml.safe_load(text.split("---")[1])
            assert ("library_name" in meta) == (fmt == "hf") and ("gguf" in meta["tags"]) == (fmt == "gguf")
            # The card's evaluation rows are the pipeline's own numbers.
            assert f"| {s}: distilled |" in text and f"{rows[s]['ppl']:.2f}" in text
            assert f"{rows[s]['ppl_pruned']:.2f}" in text and f"{rows['teacher']['ppl']:.2f}" in text
    assert "| Hidden size | 64 | **48** |" in (run_dir / "export" / "width" / "README.md").read_text()


def test_gguf_quant_that_does_not_fit_a_student_is_refused_before_any_work(tiny_cfg, tmp_path):
    run_dir = tmp_path / "refused"
    proc = run_pipeline("--config", str(tiny_cfg), f"run_dir={run_dir}", "export.gguf=q8_0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "export.gguf for student width" in proc.stderr and "not a multiple of the Q8_0 block" in proc.stderr
    assert not (run_dir / "stages").exists() and not (run_dir / "data").exists()


def test_rerun_skips_every_stage(tiny_run):
    cfg, run_dir, _ = tiny_run
    before = _rows(run_dir)
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _stage_lines(proc.stdout, "skipped") == ALL_STAGES
    assert _stage_lines(proc.stdout, "finished") == set()
    after = _rows(run_dir)
    assert {k: v["ppl"] for k, v in after.items()} == {k: v["ppl"] for k, v in before.items()}


def interrupt_after_checkpoint(run_dir: Path, markers, trainer_dir: Path, step: int) -> None:
    """Leave ``run_dir`` as a kill during the trainer run in ``trainer_dir`` would, just after its checkpoint at
    ``step``: the stage ``markers``, results.json and the trainer's export gone, and its checkpoints those of a run
    stopped at ``step``. A finished stage has removed its checkpoints (``keep_checkpoints``), so the trainer is run
    again from its own config.yaml up to ``step``, as the pipeline had run it."""
    for marker in markers:
        (run_dir / "stages" / f"{marker}.json").unlink()
    (run_dir / "results.json").unlink()
    shutil.rmtree(trainer_dir / "hf")
    assert not (trainer_dir / "checkpoints").exists()  # removed when the stage finished
    proc = subprocess.run([sys.executable, "-m", "minitron_jax.distill", "--config", str(trainer_dir / "config.yaml"),
                           f"train.stop_at={step}", "export.at_end=false"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert [p.name for p in (trainer_dir / "checkpoints").iterdir()] == [str(step)]


def test_interrupted_distillation_resumes_to_the_same_result(tiny_run):
    """Simulate a kill during the depth student's distillation after its step-4 checkpoint: the step-6 checkpoint,
    the export and every later marker are gone. The rerun skips what was done, resumes the trainer at step 4 and
    ends with the same student (exact resume) and the same table."""
    cfg, run_dir, _ = tiny_run
    before = _rows(run_dir)
    interrupt_after_checkpoint(run_dir, ["distill.depth", "eval.depth.pruned", "eval.depth.distilled"],
                               run_dir / "distill" / "depth", 4)
    # keep_checkpoints is no stage setting (nothing is redone for it) and keeps the finished run's last checkpoint.
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}", "keep_checkpoints=true")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "from its checkpoint at step 4" in proc.stdout
    assert [p.name for p in (run_dir / "distill" / "depth" / "checkpoints").iterdir()] == ["6"]
    # export.depth is not redone: its marker and directory are whole, and its key (settings, not results) holds.
    redone = {"distill.depth", "eval.depth.pruned", "eval.depth.distilled"}
    assert _stage_lines(proc.stdout, "finished") == redone
    assert _stage_lines(proc.stdout, "skipped") == ALL_STAGES - redone
    after = _rows(run_dir)
    for s in ("teacher", "width", "depth"):
        assert after[s]["ppl"] == pytest.approx(before[s]["ppl"], rel=1e-6), s
        assert after[s]["mmlu"] == before[s]["mmlu"]


def test_changed_setting_redoes_only_what_it_affects(tiny_run, tmp_path):
    cfg, original, _ = tiny_run
    # On a copy: the shared run must keep its default-setting stages for the tests after this one.
    run_dir = tmp_path / "changed_run"
    shutil.copytree(original, run_dir)
    # How often a trainer stage saves changes nothing it trains (a resume is exact): no trainer stage is redone.
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}", "eval.max_tokens=128",
                        "distill.checkpoint_every=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The exports too: their cards show the evaluations.
    evals = {s for s in ALL_STAGES if s.startswith(("eval.", "export."))}
    assert _stage_lines(proc.stdout, "finished") == evals
    assert _stage_lines(proc.stdout, "skipped") == ALL_STAGES - evals
    assert json.loads((run_dir / "results.json").read_text())["eval"]["heldout_tokens"] == 128


@pytest.mark.slow
def test_killed_pipeline_resumes(tmp_path):
    """A real SIGKILL in the middle of a distillation, then a rerun: same results as an uninterrupted run."""
    cfg = make_tiny_setup(tmp_path / "setup")
    ref = tmp_path / "ref"
    assert run_pipeline("--config", str(cfg), f"run_dir={ref}", "students.depth.prune.drop_layers=2").returncode == 0
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "minitron_jax.pipeline", "--config", str(cfg), f"run_dir={killed}",
            "students.depth.prune.drop_layers=2"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = killed / "distill" / "width" / "checkpoints"

    def saved() -> bool:  # the pipeline keeps one checkpoint: step 2's is replaced by step 4's
        return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())

    deadline = time.time() + 600
    while not saved() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "stages" / "distill.width.json").exists()
    rerun = run_pipeline("--config", str(cfg), f"run_dir={killed}", "students.depth.prune.drop_layers=2")
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert "skipped" in rerun.stdout
    a, b = _rows(ref), _rows(killed)
    for s in a:
        assert b[s]["ppl"] == pytest.approx(a[s]["ppl"], rel=1e-6), s


# ----------------------------------------------------------------------------------------------------------------------
# Bad configs: refused before any work, with the problem named and a non-zero exit
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("distill.stepz=3", "did you mean distill.steps"),
    ("distill.steps=many", "expected an integer"),
    ("distill.steps=0", "distill.steps must be >= 1"),
    ("students.width.prune.hiden=3", "unknown key(s) hiden"),
    ("students.width.init=zeros", "students.width.init must be one of"),
    ("students.width.prune.hidden=4096", "exceeds the model's hidden size"),
    ("students.depth.prune.heads=5", "not divisible across the 2 KV groups"),
    ("students={}", "students is empty"),
    ("eval.max_tokens=8", "eval.max_tokens must be >= eval.seq_len"),
    ("distill.trainer.loss.kind=mse", "loss.kind must be one of"),
    ("teacher=/nonexistent/model", "does not exist"),
])
def test_bad_config_is_refused(tiny_cfg, tmp_path, capsys, override, message):
    from minitron_jax.cli.pipeline import main

    rc = main(["--config", str(tiny_cfg), f"run_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert not (tmp_path / "run" / "stages").exists()


def test_stage_names_and_stop_after(tiny_cfg, tmp_path, capsys):
    from minitron_jax.cli.pipeline import main
    from minitron_jax.pipeline import load_pipeline_config, stage_names

    pc = load_pipeline_config(tiny_cfg)
    assert stage_names(pc) == ["data", "teacher", "importance", "prune.width", "prune.depth", "distill.width",
                               "distill.depth", "eval.teacher", "eval.width.pruned", "eval.width.distilled",
                               "eval.depth.pruned", "eval.depth.distilled", "export.width", "export.depth"]
    assert set(stage_names(pc)) == ALL_STAGES
    assert main(["--config", str(tiny_cfg), f"run_dir={tmp_path / 'run'}", "--stop-after", "prune.wide"]) == 2
    assert "not a stage of this run" in capsys.readouterr().err
    # Stopping after the data stage: its outputs and marker only.
    assert main(["--config", str(tiny_cfg), f"run_dir={tmp_path / 'run'}", "--stop-after", "data"]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "stages").iterdir()) == ["data.json"]
    assert (tmp_path / "run" / "data" / "heldout.jsonl").is_file()


def test_missing_config_file(tmp_path, capsys):
    from minitron_jax.cli.pipeline import main

    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_config_is_valid_and_students_match_in_size():
    """The README's main command reads this file; its two students have about the same parameter count."""
    from minitron_jax.compress.spec import target_config
    from minitron_jax.config import LlamaConfig
    from minitron_jax.model import count_params
    from minitron_jax.pipeline import load_pipeline_config
    from minitron_jax.pipeline import prune_spec as _prune_spec

    pc = load_pipeline_config(REPO / "configs" / "smollm2_135m_demo.yaml")
    assert pc.run_path == Path("runs/smollm2_135m_demo")
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    counts = {s: count_params(target_config(smollm2, _prune_spec(pc, spec))) for s, spec in pc.students.items()}
    assert set(counts) == {"width", "depth"}
    assert max(counts.values()) / min(counts.values()) < 1.05
    assert all(85e6 < n < 100e6 for n in counts.values()), counts


def _disk_floor(cfg: Path) -> int:
    from minitron_jax.compress.spec import target_config
    from minitron_jax.convert import read_source_config
    from minitron_jax.model import count_params
    from minitron_jax.pipeline import load_pipeline_config
    from minitron_jax.pipeline import prune_spec as _prune_spec
    from minitron_jax.pipeline.disk import disk_plan, hf_itemsize

    pc = load_pipeline_config(cfg)
    teacher = read_source_config(pc.teacher)
    students = {s: count_params(target_config(teacher, _prune_spec(pc, spec))) for s, spec in pc.students.items()}
    return disk_plan(pc, count_params(teacher), hf_itemsize(pc.teacher), False, students).end


def test_a_run_its_disk_cannot_hold_is_refused_before_any_stage(tiny_cfg, tmp_path, capsys, monkeypatch):
    """Less free space than the models the run keeps: one line naming the run directory and the sizes, exit 6,
    before any stage (a rerun counts what its directory already holds as room)."""
    from minitron_jax import fsutil
    from minitron_jax.cli.pipeline import main

    floor = _disk_floor(tiny_cfg)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: floor - 100_000)
    assert main(["--config", str(tiny_cfg), f"run_dir={run_dir}"]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run_dir}: this run's models need at least "), err
    assert " is free" in err[0] and "; free some space" in err[0] and "distill.depth" in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == ["pipeline.yaml"]  # no stage ran
    # The same free space with what an earlier run left in the directory is enough to start.
    (run_dir / "prune").mkdir()
    (run_dir / "prune" / "old.bin").write_bytes(b"\0" * 100_001)
    assert main(["--config", str(tiny_cfg), f"run_dir={run_dir}", "--stop-after", "data"]) == 0
    assert "disk: the models this run keeps take" in capsys.readouterr().out


def test_foreign_run_dir_is_refused(tiny_cfg, tmp_path, capsys):
    """A run_dir the pipeline did not make (say $HOME by mistake) is never written into: the pipeline deletes and
    redoes stage directories under its run dir, which there could be the user's own."""
    from minitron_jax.cli.pipeline import main

    home = tmp_path / "home"
    (home / "distill" / "width").mkdir(parents=True)
    (home / "distill" / "width" / "thesis.tex").write_text("years of work")
    assert main(["--config", str(tiny_cfg), f"run_dir={home}", "--stop-after", "data"]) == 2
    err = capsys.readouterr().err
    assert "not a pipeline run directory" in err and len(err.strip().splitlines()) == 1
    assert (home / "distill" / "width" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in home.iterdir()) == ["distill"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["--config", str(tiny_cfg), f"run_dir={afile}", "--stop-after", "data"]) == 2
    assert afile.read_text() == "x"


def test_no_model_outlives_its_stage(tiny_cfg, tmp_path, monkeypatch):
    """Every model a stage loads (and every jax array it makes) is gone once the stage returns: the pipeline keeps
    no teacher across stages, so one stage's models never sit under the next stage's (the demo's peak host memory,
    docs/pipeline.md "Host memory"). Each stage also records the process's host memory."""
    import weakref

    import jax

    import minitron_jax.convert as convert
    from minitron_jax.pipeline import Pipeline, load_pipeline_config

    loaded: list[tuple[str, weakref.ref]] = []
    real_load = convert.load_model

    def load_model(path, *args, **kwargs):
        m = real_load(path, *args, **kwargs)
        loaded.extend((str(path), weakref.ref(leaf)) for leaf in jax.tree.leaves(m.params))
        return m

    monkeypatch.setattr(convert, "load_model", load_model)
    alive_after: dict[str, list[str]] = {}

    class Checked(Pipeline):
        def stage(self, name, key_parts, fn, on_redo=None):
            try:
                return super().stage(name, key_parts, fn, on_redo)
            finally:  # also after the --stop-after stage, which raises StopAfter
                alive_after[name] = sorted({p for p, ref in loaded if ref() is not None})
                alive_after[name] += [f"jax array {a.shape}" for a in jax.live_arrays() if id(a) not in earlier]

    # In-process, so under conftest's 8 fake devices: the distillation's batch splits over all eight.
    pc = load_pipeline_config(tiny_cfg, [f"run_dir={tmp_path / 'run'}", "distill.batch_size=8"])
    earlier = {id(a) for a in jax.live_arrays()}  # other tests' arrays (module globals) in a whole-suite run
    p = Checked(pc, stop_after="distill.width")
    p.run()
    assert list(alive_after) == ["data", "teacher", "importance", "prune.width", "prune.depth", "distill.width"]
    assert len({path for path, _ in loaded}) >= 2  # the teacher and the pruned student were loaded
    assert alive_after == {name: [] for name in alive_after}
    if Path("/proc/self/status").is_file():
        for name, rec in p.records.items():
            assert 0 < rec.memory["rss_gb"] <= rec.memory["peak_rss_gb"], name


def test_teacher_runs_once_for_all_students(tiny_run, tmp_path):
    """``distill.teacher_top_k``: one ``teacher_logits`` stage writes the teacher's top-K once and both students
    train from it. With K = the whole vocabulary in float32 the sparse KL is the full forward KL, so the students
    end where the online teacher's did; only the cache, the distillations, their evaluations and exports are
    redone."""
    cfg, run_dir, _ = tiny_run
    copy = tmp_path / "cached_run"
    shutil.copytree(run_dir, copy)
    vocab = json.loads((cfg.parent / "teacher" / "config.json").read_text())["vocab_size"]
    proc = run_pipeline("--config", str(cfg), f"run_dir={copy}", f"distill.teacher_top_k={vocab}",
                        "distill.teacher_logits_dtype=float32")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    redone = {"teacher_logits", "distill.width", "distill.depth", "eval.width.distilled", "eval.depth.distilled",
              "export.width", "export.depth"}
    assert _stage_lines(proc.stdout, "finished") == redone
    assert _stage_lines(proc.stdout, "skipped") == ALL_STAGES - redone
    index = json.loads((copy / "teacher_logits" / "index.json").read_text())
    assert index["top_k"] == vocab
    for s in ("width", "depth"):
        config = yaml.safe_load((copy / "distill" / s / "config.yaml").read_text())
        assert config["teacher"]["logits_cache"] == str(copy / "teacher_logits")
    online, cached = _rows(run_dir), _rows(copy)
    for s in ("width", "depth"):
        np.testing.assert_allclose(cached[s]["window_nll"], online[s]["window_nll"], rtol=2e-4)
    bad = run_pipeline("--config", str(cfg), f"run_dir={copy}", "distill.teacher_top_k=0")
    assert bad.returncode == 2 and "distill.teacher_top_k must be a positive integer" in bad.stderr
