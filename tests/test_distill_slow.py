"""Slow distillation tests (``pytest -m slow``): SIGKILL mid-run/mid-save and resume in subprocesses; real
SmolLM2 teacher with a student pruned on the fly.

The subprocesses inherit ``XLA_FLAGS`` from tests/conftest.py (8 fake devices), so they build the same mesh and
compile the same step as the in-process reference run: their results must match it bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_distill import compile_cache, make_rc, tiny  # noqa: F401  (fixtures)

from minitron_jax.train.checkpoints import Checkpointer, restore_student_params
from minitron_jax.train.loop import run
from minitron_jax.train.observe import read_metrics

pytestmark = pytest.mark.slow


def _start(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "minitron_jax.distill", "--config", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(__file__).parent.parent)


def _kill_when(proc: subprocess.Popen, marker: str, timeout: float = 600) -> str:
    """Read the child's output until a line starts with ``marker``, then SIGKILL it (no cleanup of any kind)."""
    seen = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return "".join(seen)
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"never saw {marker!r}; output:\n{''.join(seen)}")


def test_sigkill_during_training_and_saving_then_resume_is_exact(tiny, tmp_path, compile_cache):  # noqa: F811
    """Kill -9 right after step 3 is reported (async checkpoints still being written) and again after step 6; the
    third start finishes. Every checkpoint left behind restores, and the final params and every logged loss
    (replayed steps included) equal an uninterrupted run's, bitwise."""
    overrides = ["checkpoint.every=1", "checkpoint.async_save=true", "checkpoint.keep=2", "train.stop_at=8",
                 f"train.compile_cache={compile_cache}"]
    reference = run(make_rc(tiny, tmp_path / "ref", *overrides), keep_state=True)

    rc = make_rc(tiny, tmp_path / "run", *overrides)
    config = tmp_path / "run.yaml"
    config.write_text(rc.to_yaml())
    _kill_when(_start(config), "step 3/12")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", rc.checkpoint)
    # Async saves of steps 2 and 3 may still have been in flight when the process died: whichever finished is the
    # latest, the unfinished ones are invisible (and cleaned up on the next start).
    assert 1 <= ckpt.latest_step() <= 3
    ckpt.close()
    _kill_when(_start(config), "step 6/12")
    proc = _start(config)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resumed" in out

    _, _, params, step = restore_student_params(tmp_path / "run")
    assert step == 8
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(reference.state.params["model"]))
    expected = {h["step"]: h["loss"] for h in reference.history}
    logged = read_metrics(tmp_path / "run")
    assert {r["step"] for r in logged} == set(range(1, 9))
    for record in logged:  # including the steps that ran twice because they were killed before their checkpoint
        assert record["loss"] == expected[record["step"]], record


def test_smollm2_distillation_into_pruned_student_reduces_kl(smollm2_assets, tmp_path):
    """The real thing at toy scale: SmolLM2-135M (GGUF) teaches a width-pruned copy of itself on Wikipedia."""
    from minitron_jax.compress.prune import prune_student
    from minitron_jax.train.config import load_config

    rc = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "teacher.path=asset:smollm2_gguf", "teacher.dtype=float32",
        "student.prune={hidden: 384, ffn: 768, calib_samples: 8, seq_len: 128, batch_size: 4}",
        "student.calib=asset:owt", "data.sources=asset:wikipedia", "data.seq_len=64", "data.batch_size=8",
        "data.val_rows=16", "data.val_batches=2", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=12",
        "train.eval_every=12", "optim.warmup_steps=2", "optim.peak_lr=5e-4", "train.compute_dtype=float32",
        "loss.chunk_size=256", "checkpoint.every=12", "log.progress=false", "export.at_end=false"])
    result = run(rc, prune_student=prune_student)  # on the 8 fake devices: FSDP at real shapes too
    kd = [h["kd"] for h in result.history]
    assert np.mean(kd[-3:]) < 0.8 * np.mean(kd[:3]), kd
    assert result.validation and np.isfinite(result.validation[-1]["ppl"])
