"""Run directories, training checkpoints (Orbax ``CheckpointManager``) and HF export of any checkpoint.

Layout of a run directory::

    RUN/config.yaml              the resolved run config (rewritten at every start)
    RUN/student/                 the student's config.json + tokenizer files (what export and resume need)
    RUN/teacher/config.json      the teacher's config (distill mode), for restoring a hidden-loss projection
    RUN/checkpoints/<step>/      Orbax: state (params, optimizer state, step, RNG), data (iterator state), meta
    RUN/metrics.jsonl            one JSON line per logged step and per validation
    RUN/tb/                      TensorBoard event files
    RUN/hf/                      the exported student (default export path)

A checkpoint holds everything a resumed run needs to continue bit-exactly: the whole train state and the data
iterator's position. Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save (even with SIGKILL) leaves the previous checkpoints intact and the partial one is
ignored (and cleaned up) by the next run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from minitron_jax import hostmem
from minitron_jax.arch import AnyConfig, config_from_json_file
from minitron_jax.exitcodes import SystemRefusedError
from minitron_jax.fsutil import check_destination, quiet_refusal_logs, refusals_named
from minitron_jax.train.config import CheckpointConfig, RunConfigError, load_config
from minitron_jax.train.state import TrainState

CONFIG_FILE = "config.yaml"
STUDENT_DIR = "student"
TEACHER_DIR = "teacher"
CHECKPOINT_DIR = "checkpoints"
# Orbax writes step N into "N.orbax-checkpoint-tmp..." and renames it to "N" once complete.
PARTIAL_SAVE = ".orbax-checkpoint-tmp"


class Checkpointer:
    """A thin wrapper over Orbax's CheckpointManager that knows what a training checkpoint holds."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.directory = Path(directory).absolute()
        # A finished save leaves its serialization buffers (~1 GB for a 90M-parameter state with Adam moments)
        # freed but kept by glibc in the arenas of tensorstore's threads; without a trim the next training step's
        # temporaries come on top of them (measured: +0.9 GB peak RSS per save, docs/pipeline.md "Host memory").
        self.async_save = cfg.async_save
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        quiet_refusal_logs()  # a full disk is reported once, as one line (see _refusals), not as absl tracebacks

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Start saving (asynchronously when configured). Device arrays are copied to host before this returns,
        so the caller may donate ``state`` to the next step right away."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        with self._refusals():
            self.manager.save(step, args=args, force=True)
        if not self.async_save:
            hostmem.trim()

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        """(state placed by the shardings in ``abstract_state``, data iterator state, meta)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data, restored.meta

    def wait(self) -> None:
        with self._refusals():
            self.manager.wait_until_finished()
        hostmem.trim()

    def close(self) -> None:
        with self._refusals():
            self.manager.wait_until_finished()
            self.manager.close()

    @contextlib.contextmanager
    def _refusals(self):
        """A full disk or read-only file system under Orbax surfaces as a ValueError carrying the errno in its
        text (from a background thread when saving asynchronously): make it the one-line, exit-6 kind, and remove
        the refused save's temporary directory, which would otherwise hold the disk space it did get until the
        next run's start cleans it (the finished checkpoints are kept)."""
        try:
            with refusals_named(self.directory):
                yield
        except SystemRefusedError:
            for partial in self.directory.glob(f"*{PARTIAL_SAVE}*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise


# ----------------------------------------------------------------------------------------------------------------
# Export of a run's checkpoint (or of a model checkpoint) to an HF directory
# ----------------------------------------------------------------------------------------------------------------
def locate_run(path: str | Path) -> tuple[Path, int | None]:
    """``RUN`` or ``RUN/checkpoints/<step>`` → (run dir, step or None for "latest")."""
    path = Path(path).absolute()
    if (path / CONFIG_FILE).is_file():
        return path, None
    if path.parent.name == CHECKPOINT_DIR and (path.parent.parent / CONFIG_FILE).is_file() and path.name.isdigit():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(f"{path} is neither a run directory (no {CONFIG_FILE}) nor RUN/{CHECKPOINT_DIR}/<step>")


def read_run_models(run_dir: Path) -> tuple[AnyConfig, AnyConfig | None]:
    # config_from_json_file reads either kind: a heterogeneous model's description is a DeciLM config.json.
    student = config_from_json_file(run_dir / STUDENT_DIR / "config.json")
    teacher_file = run_dir / TEACHER_DIR / "config.json"
    return student, (config_from_json_file(teacher_file) if teacher_file.is_file() else None)


def restore_student_params(run_dir: Path, step: int | None = None):
    """(run config, student config, student params as host numpy, step) from a run's checkpoint, restored on one
    device whatever mesh it was trained on."""
    import numpy as np

    from minitron_jax.sharding import make_mesh
    from minitron_jax.train.state import abstract_train_state

    rc = load_config(run_dir / CONFIG_FILE)
    student, teacher = read_run_models(run_dir)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, rc.checkpoint)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR} has no finished checkpoint"
                                    + ("" if step is None else f" for step {step}"))
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        state, _, _ = ckpt.restore(step, abstract_train_state(rc, mesh, student, teacher))
    finally:
        ckpt.close()
    params = jax.tree.map(np.asarray, jax.device_get(state.params["model"]))
    return rc, student, params, step


def export_to_hf(source: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the student of a run checkpoint (``RUN`` → latest, or ``RUN/checkpoints/<step>``), or any model
    ``load_model`` reads, as an HF directory with its tokenizer."""
    import jax.numpy as jnp

    from minitron_jax.convert import save_hf

    try:
        run_dir, step = locate_run(source)
    except FileNotFoundError:
        from minitron_jax.convert import load_model

        check_destination(out, overwrite=overwrite, sources=[source])  # before loading
        loaded = load_model(source)
        return save_hf(out, loaded.config, loaded.params, tokenizer=loaded.tokenizer,
                       dtype=jnp.dtype(dtype) if dtype else None, overwrite=overwrite, sources=[source])
    # What is read, not the whole run directory: the default export lives inside it (RUN/hf).
    sources = [run_dir / CHECKPOINT_DIR, run_dir / STUDENT_DIR, run_dir / CONFIG_FILE]
    check_destination(out, overwrite=overwrite, sources=sources)  # before restoring the checkpoint
    rc, student, params, step = restore_student_params(run_dir, step)
    _refuse_nonfinite(run_dir, step, params)
    return save_hf(out, student, params, tokenizer_dir=run_dir / STUDENT_DIR,
                   dtype=jnp.dtype(dtype or rc.export.dtype), overwrite=overwrite,
                   generation_config=None, sources=sources)


def _refuse_nonfinite(run_dir: Path, step: int, params) -> None:
    """A checkpoint with NaN/inf params (written before the loop checked every state, or by hand) is not exported;
    the message names the tensor and the run's other checkpoints."""
    from minitron_jax.convert.hf import first_nonfinite
    from minitron_jax.exitcodes import NonFiniteError

    bad = first_nonfinite(params)
    if bad is None:
        return
    others = sorted(int(p.name) for p in (run_dir / CHECKPOINT_DIR).iterdir() if p.name.isdigit() and
                    int(p.name) != step)
    raise NonFiniteError(f"checkpoint step {step} of {run_dir} holds NaN/inf values (tensor {bad}); not exporting "
                         f"it. Other checkpoints: {', '.join(map(str, others)) or 'none'} (export one with "
                         f"--export-from {run_dir / CHECKPOINT_DIR}/STEP)")


def write_json(path: Path, data: Any) -> None:
    """Small metadata files: written to a temporary name and renamed, so they are whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


__all__ = ["Checkpointer", "export_to_hf", "locate_run", "restore_student_params", "read_run_models",
           "RunConfigError"]
