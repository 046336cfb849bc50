"""The whole Minitron method end to end, resumable: ``python -m minitron_jax.pipeline --config FILE [key=value ...]``.

Stages, in order (each one's outputs live under the run directory, ``runs/<name>/`` unless ``run_dir=`` says
otherwise):

==================  ==============================  ===========================================================
stage               writes                          does
==================  ==============================  ===========================================================
``data``            ``data/``                       fetch the assets; split the texts into training, calibration
                                                    and a held-out evaluation text (disjoint, checked)
``teacher``         ``teacher/``                    the teacher as an HF directory (a GGUF is converted once)
``correction``      ``correction/``                 optional teacher correction (the teacher fine-tuned with CE on
                                                    the distillation text); later stages then use it
``importance``      ``importance/``                 ONE calibration pass (width scores + Block Importance) and the
                                                    depth scans the students need, shared by every student
``prune.<s>``       ``prune/<s>/``                  student ``s``: the teacher sliced by the shared importance (or a
                                                    random init of the same shape, for the ablation)
``distill.<s>``     ``distill/<s>/``                the trainer (:mod:`minitron_jax.train`) run: Orbax checkpoints,
                                                    exact resume, the student exported to ``distill/<s>/hf``
``eval.<m>``        ``eval/<m>.json``               held-out perplexity (``evaluate.perplexity`` rules) and MMLU
``report``          ``results.{md,json,png}``       the comparison table (printed with rich) and the plot
==================  ==============================  ===========================================================

**Resume.** Every stage writes its outputs atomically (a temporary sibling renamed into place) and then a
done-marker ``stages/<stage>.json`` holding a key: a hash of the stage's own settings and of the keys of the stages
it reads. A rerun skips every stage whose marker key matches, so an interrupted pipeline continues where it
stopped; the distillation stage itself resumes from its latest Orbax checkpoint. Changing a setting (say
``distill.steps=400``) changes the keys of the stages it affects, and only those are redone (their old outputs are
replaced): the teacher, the importance pass and the pruned students are reused.

**Config** (YAML; every key typed and checked, unknown keys refused with a suggestion; ``key=value`` overrides on
the command line are dotted paths with YAML values, e.g. ``distill.steps=400 students.width.prune.hidden=512
run_dir=/tmp/run``)::

    name: smollm2_135m_demo
    teacher: asset:smollm2_gguf           # HF dir, .gguf or minitron_jax checkpoint; asset:NAME = data.assets
    texts: {train: asset:wikipedia, calib: asset:owt, heldout_docs: 100}
    teacher_correction: {enabled: false, steps: 40}
    importance: {calib_samples: 16, seq_len: 256, depth_samples: 3}
    students:
      width: {prune: {hidden: 480, ffn: 1024}}
      depth: {prune: {drop_layers: 12, depth_metric: contiguous}}
      # also: init: random (same shape, random weights), loss: ce (next-token CE instead of KD)
    distill: {steps: 60, seq_len: 128, batch_size: 4, peak_lr: 3.0e-4, trainer: {any RunConfig sections}}
    eval: {seq_len: 256, max_tokens: 4096, mmlu_limit: 32, mmlu_shots: 0}

Exit codes: 0 done, 2 bad config or inputs, 3 a distillation produced a non-finite loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.progress import PhaseProgress

EXIT_CONFIG, EXIT_NONFINITE = ExitCode.BAD_INPUT, ExitCode.NON_FINITE
STAGES_DIR = "stages"
STUDENT_INITS = ("pruned", "random")
STUDENT_LOSSES = ("kd", "ce")
DTYPE_NAMES = ("float32", "bfloat16")


class PipelineConfigError(ValueError):
    """A pipeline config that is malformed or cannot be run (unknown key, wrong type, impossible size, ...)."""


# ======================================================================================================================
# Config
# ======================================================================================================================
@dataclasses.dataclass(frozen=True)
class TextsConfig:
    """Where the texts come from (files, or ``asset:NAME``).

    ``train`` feeds distillation and teacher correction; ``calib`` the importance pass. The held-out evaluation
    text is ``heldout`` when given, else the last ``heldout_docs`` documents of ``train`` (never trained on). The
    data stage refuses a held-out document that also appears in the training or calibration text."""

    train: str = "asset:wikipedia"
    calib: str = "asset:owt"
    heldout: str | None = None
    heldout_docs: int = 100


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """Teacher correction: fine-tune the teacher with next-token CE on ``texts.train`` before pruning."""

    enabled: bool = False
    steps: int = 40
    peak_lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 4


@dataclasses.dataclass(frozen=True)
class ImportanceConfig:
    """The shared importance pass. ``depth_samples`` windows (the first ones of the calibration set) feed the depth
    scans (``contiguous``/``ppl`` metrics cost one pass per candidate block; ``bi`` is free)."""

    calib_samples: int = 16
    seq_len: int = 256
    batch_size: int = 8
    depth_samples: int = 3
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    preact: bool = False
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """One student: target sizes (``PruneSpec`` fields: ``hidden``, ``ffn``, ``heads_per_group``/``heads``,
    ``drop_layers`` + ``depth_metric`` or ``layers``), how it starts (``pruned``: sliced from the teacher by
    importance; ``random``: the same shape with random weights) and how it is trained (``kd``: forward KL to the
    teacher, the paper's loss; ``ce``: next-token cross-entropy on the same tokens, no teacher signal)."""

    prune: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str = "pruned"
    loss: str = "kd"
    seed: int = 0  # random init seed


@dataclasses.dataclass(frozen=True)
class DistillSection:
    """The distillation budget and optimizer (the same for every student). ``trainer`` holds any further
    :class:`minitron_jax.train.config.RunConfig` sections, merged last (e.g. ``{loss: {top_k: 64}}``)."""

    steps: int = 60
    seq_len: int = 128
    batch_size: int = 4
    peak_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 4
    weight_decay: float = 0.1
    eval_every: int = 10
    val_rows: int = 16  # at least this many validation rows' worth of training-text documents, held out whole
    val_batches: int = 2
    checkpoint_every: int = 10
    compute_dtype: str = "float32"  # XLA:CPU runs bf16 matmuls slower than fp32; bfloat16 on GPU/TPU
    teacher_dtype: str = "float32"
    seed: int = 0
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out perplexity (``max_tokens`` tokens in ``seq_len`` windows) and MMLU (``mmlu_limit`` questions, 0
    to skip; on the teacher and the distilled students, and on the pruned ones too with ``mmlu_before``)."""

    seq_len: int = 256
    max_tokens: int | None = 4096
    dtype: str = "float32"
    mmlu_limit: int = 32
    mmlu_shots: int = 0
    mmlu_batch_size: int = 8
    mmlu_data: str | None = None  # default: the embedded MMLU asset
    mmlu_before: bool = False


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str = "pipeline"
    run_dir: str | None = None  # default runs/<name>
    teacher: str = "asset:smollm2_gguf"
    texts: TextsConfig = dataclasses.field(default_factory=TextsConfig)
    teacher_correction: CorrectionConfig = dataclasses.field(default_factory=CorrectionConfig)
    importance: ImportanceConfig = dataclasses.field(default_factory=ImportanceConfig)
    students: dict[str, StudentSpec] = dataclasses.field(default_factory=dict)
    distill: DistillSection = dataclasses.field(default_factory=DistillSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    export_dtype: str = "float32"

    def __post_init__(self):
        validate(self)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir if self.run_dir else Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(pc: PipelineConfig) -> None:
    from minitron_jax.compress import importance as imp

    def need(ok: bool, message: str):
        if not ok:
            raise PipelineConfigError(message)

    need(bool(pc.name) and "/" not in pc.name, f"name must be a non-empty string without '/', got {pc.name!r}")
    need(len(pc.students) > 0, "students is empty: give at least one student (e.g. width: {prune: {hidden: 480}})")
    for s, spec in pc.students.items():
        need(bool(s) and all(c.isalnum() or c in "_-" for c in s),
             f"student name {s!r} must be letters, digits, '_' or '-'")
        need(spec.init in STUDENT_INITS, f"students.{s}.init must be one of {STUDENT_INITS}, got {spec.init!r}")
        need(spec.loss in STUDENT_LOSSES, f"students.{s}.loss must be one of {STUDENT_LOSSES}, got {spec.loss!r}")
        need(bool(spec.prune), f"students.{s}.prune is empty: give target sizes (hidden, ffn, drop_layers, ...)")
        try:
            _prune_spec(pc, spec)
        except ValueError as e:
            raise PipelineConfigError(f"students.{s}.prune: {e}") from None
    t = pc.texts
    need(t.heldout is not None or t.heldout_docs >= 1, "texts.heldout_docs must be >= 1 (or give texts.heldout)")
    i = pc.importance
    for name in ("calib_samples", "batch_size", "depth_samples"):
        need(getattr(i, name) >= 1, f"importance.{name} must be >= 1, got {getattr(i, name)}")
    need(i.seq_len >= 2, f"importance.seq_len must be >= 2, got {i.seq_len}")
    need(i.depth_samples <= i.calib_samples, "importance.depth_samples must be <= importance.calib_samples")
    need(i.seq_agg in imp.SEQ_AGGS, f"importance.seq_agg must be one of {imp.SEQ_AGGS}")
    need(i.batch_agg in imp.BATCH_AGGS, f"importance.batch_agg must be one of {imp.BATCH_AGGS}")
    need(i.dtype in DTYPE_NAMES, f"importance.dtype must be one of {DTYPE_NAMES}")
    d = pc.distill
    for name in ("steps", "batch_size", "checkpoint_every", "val_batches"):
        need(getattr(d, name) >= 1, f"distill.{name} must be >= 1, got {getattr(d, name)}")
    need(d.seq_len >= 2, f"distill.seq_len must be >= 2, got {d.seq_len}")
    need(d.eval_every >= 0 and d.val_rows >= 1, "distill.eval_every must be >= 0 and distill.val_rows >= 1")
    need(set(d.mesh) <= {"data", "fsdp", "tensor"}, f"distill.mesh keys are data, fsdp, tensor; got {sorted(d.mesh)}")
    c = pc.teacher_correction
    need(c.steps >= 1, f"teacher_correction.steps must be >= 1, got {c.steps}")
    e = pc.eval
    need(e.seq_len >= 2, f"eval.seq_len must be >= 2, got {e.seq_len}")
    need(e.max_tokens is None or e.max_tokens >= e.seq_len, "eval.max_tokens must be >= eval.seq_len (or null)")
    need(e.mmlu_batch_size >= 1, "eval.mmlu_batch_size must be >= 1")
    need(e.mmlu_limit >= 0 and e.mmlu_shots >= 0, "eval.mmlu_limit and eval.mmlu_shots must be >= 0")
    need(e.dtype in DTYPE_NAMES, f"eval.dtype must be one of {DTYPE_NAMES}")
    need(pc.export_dtype in ("float32", "bfloat16", "float16"), "export_dtype must be float32, bfloat16 or float16")
    # The trainer checks its own sections: build every run config once now, so a bad one fails before any work.
    for s in pc.students:
        _distill_run_config(pc, s, Path("/nonexistent"), "teacher", "student", "train.jsonl")
    if c.enabled:
        _correction_run_config(pc, Path("/nonexistent"), "teacher", "train.jsonl")


def _prune_spec(pc: PipelineConfig, student: StudentSpec):
    """The PruneSpec of a student: its sizes plus the shared importance settings."""
    from minitron_jax.compress.prune import PruneSpec

    sizes = {k.replace("-", "_"): v for k, v in student.prune.items()}
    allowed = {"hidden", "ffn", "heads_per_group", "heads", "drop_layers", "layers", "depth_metric"}
    unknown = sorted(set(sizes) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (a student's prune section takes "
                         f"{', '.join(sorted(allowed))}; importance settings live in the importance section)")
    i = pc.importance
    return PruneSpec.from_dict({**sizes, "importance": "activation", "seq_agg": i.seq_agg, "batch_agg": i.batch_agg,
                                "preact": i.preact, "calib_samples": i.calib_samples, "seq_len": i.seq_len,
                                "batch_size": i.batch_size, "dtype": i.dtype})


# ----------------------------------------------------------------------------------------------------------------------
# Building the dataclasses from YAML data, with type checks
# ----------------------------------------------------------------------------------------------------------------------
def config_from_dict(data: Mapping[str, Any]) -> PipelineConfig:
    if not isinstance(data, Mapping):
        raise PipelineConfigError(f"a pipeline config must be a mapping, got {type(data).__name__}")
    return _build(PipelineConfig, data, "")


def _build(cls, data: Mapping[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise PipelineConfigError(f"unknown config key {where}{key}{hint}; valid keys here: "
                                      f"{', '.join(sorted(fields))}")
    return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()})


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise PipelineConfigError(f"{where}: may not be null")
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except PipelineConfigError as e:
                errors.append(str(e))
        raise PipelineConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, Mapping):
            raise PipelineConfigError(f"{where}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return _build(tp, value, f"{where}.")
    if origin is dict:
        _, val_t = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise PipelineConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise PipelineConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PipelineConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise PipelineConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise PipelineConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    raise PipelineConfigError(f"{where}: unsupported config type {tp}")


def load_pipeline_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a YAML pipeline config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    from minitron_jax.train.config import RunConfigError, apply_overrides, read_yaml_sections

    data = read_yaml_sections(path, PipelineConfigError)
    try:
        data = apply_overrides(data, list(overrides))
    except RunConfigError as e:
        raise PipelineConfigError(str(e)) from None
    try:
        return config_from_dict(data)
    except PipelineConfigError as e:
        raise PipelineConfigError(f"{path or 'config'}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's run configs
# ----------------------------------------------------------------------------------------------------------------------
def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _common_run_dict(pc: PipelineConfig, run_dir: Path, train_text: str, steps: int) -> dict[str, Any]:
    d = pc.distill
    return {
        "run_dir": str(run_dir),
        "data": {"sources": [str(train_text)], "seq_len": d.seq_len, "batch_size": d.batch_size,
                 "val_rows": d.val_rows, "val_batches": d.val_batches, "seed": d.seed,
                 "cache_dir": str(pc.run_path.absolute() / "tokens")},
        "train": {"steps": steps, "compute_dtype": d.compute_dtype, "param_dtype": "float32", "remat": "none",
                  "eval_every": d.eval_every, "log_every": max(1, steps // 20), "seed": d.seed},
        "mesh": dict(d.mesh),
        "checkpoint": {"every": d.checkpoint_every, "keep": 2, "async_save": True},
        "export": {"at_end": True, "dtype": pc.export_dtype},
        "log": {"progress": True, "tensorboard": False},
    }


def _distill_run_config(pc: PipelineConfig, student: str, run_dir: Path, teacher_path: str, student_path: str,
                        train_text: str):
    from minitron_jax.train.config import RunConfigError, from_dict

    d, spec = pc.distill, pc.students[student]
    data = _common_run_dict(pc, run_dir, train_text, d.steps)
    data.update(mode="distill", teacher={"path": str(teacher_path), "dtype": d.teacher_dtype},
                student={"path": str(student_path)},
                loss={"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0 if spec.loss == "kd" else 0.0},
                optim={"peak_lr": d.peak_lr, "min_lr": d.min_lr, "warmup_steps": d.warmup_steps,
                       "weight_decay": d.weight_decay})
    try:
        return from_dict(_deep_merge(data, d.trainer))
    except RunConfigError as e:
        raise PipelineConfigError(f"distill (student {student}): {e}") from None


def _correction_run_config(pc: PipelineConfig, run_dir: Path, teacher_path: str, train_text: str):
    from minitron_jax.train.config import RunConfigError, from_dict

    c = pc.teacher_correction
    data = _common_run_dict(pc, run_dir, train_text, c.steps)
    data.update(mode="teacher_correction", teacher={"path": str(teacher_path), "dtype": pc.distill.teacher_dtype},
                optim={"peak_lr": c.peak_lr, "min_lr": c.min_lr, "warmup_steps": c.warmup_steps,
                       "weight_decay": pc.distill.weight_decay})
    trainer = {k: v for k, v in pc.distill.trainer.items() if k not in ("loss", "student")}
    try:
        return from_dict(_deep_merge(data, trainer))
    except RunConfigError as e:
        raise PipelineConfigError(f"teacher_correction: {e}") from None


# ======================================================================================================================
# Stage bookkeeping
# ======================================================================================================================
def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def nondefault(obj: Any) -> Any:
    """The settings of a (nested) config dataclass that differ from their defaults, as plain data.

    Stage keys hash this rather than every field, so a new config field added with a default (here or in the
    trainer) leaves the keys of finished stages, and thus the stages, as they were."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if default is not dataclasses.MISSING and value == default:
                continue
            out[f.name] = nondefault(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): nondefault(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nondefault(v) for v in obj]
    return obj


def write_json_atomic(path: Path, data: Any) -> None:
    """A small JSON file written to a temporary name and renamed: whole or absent.

    Strict JSON: a NaN/inf number (a metric that could not be computed, e.g. the perplexity of a broken candidate)
    is written as null (``exitcodes.finite_or_none``), never as the ``NaN`` that strict readers reject."""
    from minitron_jax.exitcodes import finite_or_none

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(finite_or_none(data), indent=1, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _file_id(path: str | Path) -> list:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return [str(p.resolve())]


@dataclasses.dataclass
class StageRecord:
    name: str
    key: str
    result: dict[str, Any]
    seconds: float
    skipped: bool
    cpu_seconds: float = 0.0


class Pipeline:
    """One pipeline run. ``run()`` executes (or skips) every stage and returns the report dict."""

    def __init__(self, pc: PipelineConfig, *, console=None, stop_after: str | None = None):
        from rich.console import Console

        self.pc = pc
        self.run_dir = pc.run_path.absolute()
        # rich wraps at 80 columns when stdout is not a terminal (logs); the table wants more.
        self.console = console or (Console() if sys.stdout.isatty() else Console(width=150))
        self.stop_after = stop_after
        self.records: dict[str, StageRecord] = {}
        self._teacher_cache: dict[str, Any] = {}
        self.t_start = time.perf_counter()

    # -------------------------------------------------------------------------------------------------------------
    def stage(self, name: str, key_parts: Any, fn: Callable[[], dict[str, Any]],
              on_redo: Callable[[], None] | None = None) -> StageRecord:
        """Run ``fn`` unless ``stages/<name>.json`` holds the same key; record and return the result."""
        key = _key(key_parts)
        marker = self.run_dir / STAGES_DIR / f"{name}.json"
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())
            except json.JSONDecodeError:
                done = {}
            if done.get("key") == key:
                self.console.print(f"[green]✓[/green] [bold]{name}[/bold] done earlier "
                                   f"({done.get('seconds', 0):.0f}s), skipped")
                rec = StageRecord(name, key, done["result"], float(done.get("seconds", 0.0)), True,
                                  float(done.get("cpu_seconds", 0.0)))
                self.records[name] = rec
                self._maybe_stop(name)
                return rec
            self.console.print(f"[yellow]↻[/yellow] [bold]{name}[/bold]: settings changed since the last run, redoing")
            marker.unlink()
            if on_redo is not None:
                on_redo()
        self.console.rule(f"[bold]{name}")
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        seconds = time.perf_counter() - t0
        # CPU seconds (all threads) next to wall seconds: on a shared machine the wall time says little.
        write_json_atomic(marker, {"stage": name, "key": key, "result": result, "seconds": seconds,
                                   "cpu_seconds": time.process_time() - c0, "finished": time.time()})
        self.console.print(f"[green]✓[/green] [bold]{name}[/bold] finished in {seconds:.1f}s")
        rec = StageRecord(name, key, result, seconds, False, time.process_time() - c0)
        self.records[name] = rec
        self._maybe_stop(name)
        return rec

    def _maybe_stop(self, name: str) -> None:
        if self.stop_after is not None and name == self.stop_after:
            raise _StopAfter(name)

    # -------------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        # One pipeline per run directory at a time: a second one would redo and delete the first one's stages
        # under it. It gets BusyError (exit 5) before anything is written.
        from minitron_jax.fsutil import lock_directory

        with lock_directory(self.run_dir):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        pc = self.pc
        # A pipeline deletes and redoes stage directories under its run dir; pointed at a directory it did not
        # make (run_dir=$HOME by mistake) that could delete the user's files. Our run dirs carry pipeline.yaml.
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()) and not (self.run_dir / "pipeline.yaml").is_file():
            from minitron_jax.exitcodes import BadInputError

            raise BadInputError(f"run_dir {self.run_dir} is not empty and holds no pipeline.yaml, so it is not a "
                                "pipeline run directory; refusing to write stages into it (choose a new run_dir)")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            from minitron_jax.exitcodes import BadInputError

            raise BadInputError(f"run_dir {self.run_dir} is a file, not a directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (self.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(pc.to_dict(), sort_keys=False))
        self.console.print(f"[bold]minitron pipeline[/bold] {pc.name} → {self.run_dir}")
        self._preflight()
        try:
            data = self.stage("data", ["data", nondefault(pc.texts), self._text_ids()], self._data)
            teacher = self.stage("teacher", ["teacher", pc.teacher, _file_id(self._resolve(pc.teacher))],
                                 self._teacher)
            active = teacher
            if pc.teacher_correction.enabled:
                corr_dir = self.run_dir / "correction"
                rc = _correction_run_config(pc, corr_dir, teacher.result["path"], data.result["train"])
                parts = ["correction", teacher.key, data.key, self._run_key(rc)]
                active = self.stage("correction", parts, lambda: self._correction(rc, _key(parts)),
                                    on_redo=lambda: shutil.rmtree(corr_dir, ignore_errors=True))
            imp_rec = self.stage("importance", ["importance", active.key, data.key,
                                                nondefault(pc.importance), self._depth_needs()],
                                 lambda: self._importance(active.result["path"], data.result["calib"]))
            pruned, distilled = {}, {}
            for s, spec in pc.students.items():
                pruned[s] = self.stage(f"prune.{s}", ["prune", imp_rec.key, nondefault(spec)],
                                       lambda s=s: self._prune(s, active.result["path"], imp_rec.result))
            for s in pc.students:
                run_dir = self.run_dir / "distill" / s
                rc = _distill_run_config(pc, s, run_dir, active.result["path"], pruned[s].result["path"],
                                         data.result["train"])
                parts = ["distill", pruned[s].key, active.key, data.key, self._run_key(rc)]
                key = _key(parts)
                distilled[s] = self.stage(
                    f"distill.{s}", parts, lambda s=s, rc=rc, k=key: self._distill(s, rc, k),
                    on_redo=lambda run_dir=run_dir: shutil.rmtree(run_dir, ignore_errors=True))
            evals = {}
            models = [("teacher", teacher, "teacher", True)]
            if pc.teacher_correction.enabled:
                models.append(("teacher_corrected", active, "teacher", True))
            for s in pc.students:
                models.append((f"{s}.pruned", pruned[s], s, pc.eval.mmlu_before))
                models.append((f"{s}.distilled", distilled[s], s, True))
            for label, rec, _, mmlu in models:
                evals[label] = self.stage(f"eval.{label}",
                                          ["eval", rec.key, data.key, nondefault(pc.eval), mmlu, "per-window"],
                                          lambda rec=rec, mmlu=mmlu: self._evaluate(rec.result["path"],
                                                                                   data.result["heldout"], mmlu))
        except _StopAfter as stop:
            self.console.print(f"stopped after stage {stop.args[0]} (--stop-after)")
            return {}
        return self._report(teacher, active, pruned, distilled, evals)

    def _preflight(self) -> None:
        """Refuse sizes the teacher cannot be pruned to before any work (reads the teacher's config only)."""
        from minitron_jax.compress.prune import check_spec, target_config
        from minitron_jax.convert import read_source_config
        from minitron_jax.model import count_params

        try:
            teacher = read_source_config(self._resolve(self.pc.teacher))
        except (FileNotFoundError, ValueError) as e:
            raise PipelineConfigError(f"teacher {self.pc.teacher}: {e}") from None
        for s, spec in self.pc.students.items():
            ps = _prune_spec(self.pc, spec)
            try:
                check_spec(teacher, ps)
            except ValueError as e:
                raise PipelineConfigError(f"students.{s}.prune: {e}") from None
            self.console.print(f"student {s}: {count_params(target_config(teacher, ps)) / 1e6:.2f}M params "
                               f"(teacher {count_params(teacher) / 1e6:.2f}M), init {spec.init}, loss {spec.loss}")

    # -------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(value: str) -> str:
        from minitron_jax.train.config import resolve_path

        return resolve_path(value)

    def _text_ids(self) -> list:
        t = self.pc.texts
        return [_file_id(self._resolve(p)) for p in (t.train, t.calib, t.heldout) if p is not None]

    def _depth_needs(self) -> list:
        """The depth scans the students need: sorted unique (metric, number of layers dropped)."""
        needs = set()
        for spec in self.pc.students.values():
            ps = _prune_spec(self.pc, spec)
            if ps.ranks_layers and spec.init == "pruned":
                needs.add((ps.depth_metric, int(ps.drop_layers)))
        return sorted(needs)

    @staticmethod
    def _run_key(rc) -> dict:
        """A trainer config's non-default settings, less the paths (upstream stage keys cover what they hold)."""
        d = nondefault(rc)
        for section, key in (("teacher", "path"), ("student", "path"), ("data", "sources"), ("run_dir", None),
                             ("data", "cache_dir")):
            if key is None:
                d.pop(section, None)
            else:
                d.get(section, {}).pop(key, None)
        return d

    def _load(self, path: str):
        """A model loaded once per process (the teacher is read by several stages)."""
        from minitron_jax.convert import load_model

        if path not in self._teacher_cache:
            with self.console.status(f"loading {path} ..."):
                self._teacher_cache.clear()
                self._teacher_cache[path] = load_model(path)
        return self._teacher_cache[path]

    # -------------------------------------------------------------------------------------------------------------
    # Stages
    # -------------------------------------------------------------------------------------------------------------
    def _data(self) -> dict[str, Any]:
        from minitron_jax.data import read_documents
        from minitron_jax.fsutil import atomic_directory

        t = self.pc.texts
        with self.console.status("fetching assets and splitting the texts ..."):
            train_src, calib_src = Path(self._resolve(t.train)), Path(self._resolve(t.calib))
            train_docs = [d for d in read_documents(train_src) if d.strip()]
            calib_docs = [d for d in read_documents(calib_src) if d.strip()]
            if t.heldout is not None:
                heldout_docs = [d for d in read_documents(self._resolve(t.heldout)) if d.strip()]
            else:
                if t.heldout_docs >= len(train_docs):
                    raise PipelineConfigError(f"texts.heldout_docs={t.heldout_docs} leaves no training documents "
                                              f"({train_src} has {len(train_docs)})")
                heldout_docs = train_docs[-t.heldout_docs:]
                train_docs = train_docs[:-t.heldout_docs]
            seen = set(train_docs) | set(calib_docs)
            overlap = sum(d in seen for d in heldout_docs)
            if overlap:
                raise PipelineConfigError(f"{overlap} held-out document(s) also appear in the training or "
                                          "calibration text: evaluation must use unseen text")
            out = self.run_dir / "data"
            with atomic_directory(out, overwrite=True) as tmp:
                for name, docs in (("train", train_docs), ("calib", calib_docs), ("heldout", heldout_docs)):
                    with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                        for d in docs:
                            f.write(json.dumps({"text": d}) + "\n")
        result = {"train": str(out / "train.jsonl"), "calib": str(out / "calib.jsonl"),
                  "heldout": str(out / "heldout.jsonl"), "documents": {"train": len(train_docs),
                                                                       "calib": len(calib_docs),
                                                                       "heldout": len(heldout_docs)}}
        self.console.print(f"documents: {len(train_docs)} train, {len(calib_docs)} calibration, "
                           f"{len(heldout_docs)} held-out (disjoint)")
        return result

    def _teacher(self) -> dict[str, Any]:
        from minitron_jax.convert import detect_format
        from minitron_jax.convert.hf import save_hf
        from minitron_jax.model import count_params

        src = self._resolve(self.pc.teacher)
        fmt = detect_format(src)
        if fmt == "hf":
            path = str(Path(src).absolute())
            m = self._load(path)
        else:
            m = self._load(src)
            if m.tokenizer is None:
                raise PipelineConfigError(f"the teacher at {src} carries no tokenizer")
            path = str(self.run_dir / "teacher")
            with self.console.status(f"writing the teacher as an HF directory to {path} ..."):
                save_hf(path, m.config, m.params, tokenizer=m.tokenizer, overwrite=True, sources=[src])
            self._teacher_cache[path] = m
        if m.tokenizer is None:
            raise PipelineConfigError(f"the teacher at {src} carries no tokenizer")
        self.console.print(f"teacher {m.config.describe()} ({count_params(m.config):,} params) from {fmt}")
        return {"path": path, "params": count_params(m.config), "arch": _arch(m.config), "source": src}

    def _correction(self, rc, key: str) -> dict[str, Any]:
        res = self._train(rc, key)
        from minitron_jax.model import count_params

        cfg = self._read_config(res["path"])
        return {**res, "params": count_params(cfg), "arch": _arch(cfg)}

    def _importance(self, teacher_path: str, calib_text: str) -> dict[str, Any]:
        from minitron_jax.compress import importance as imp
        from minitron_jax.data import read_text, token_windows
        from minitron_jax.evaluate.perplexity import DTYPES
        from minitron_jax.fsutil import atomic_directory

        i = self.pc.importance
        m = self._load(teacher_path)
        windows = token_windows(m.tokenizer, read_text(calib_text), i.seq_len, i.calib_samples * i.seq_len)
        dtype = DTYPES[i.dtype]
        timings = {}
        with PhaseProgress(self.console) as progress:
            t0 = time.perf_counter()
            stats = imp.collect_activation_stats(m.config, m.params, windows, batch_size=i.batch_size, dtype=dtype,
                                                 progress=progress)
            timings["calibration_pass_s"] = time.perf_counter() - t0
            arrays = dict(stats.width_scores(i.seq_agg, i.batch_agg, i.preact))
            arrays["bi"] = stats.block_importance()
            for metric, k in self._depth_needs():
                t0 = time.perf_counter()
                depth_windows = windows[: i.depth_samples]  # a batch no larger than them: no padded rows
                arrays[f"layers_{metric}_{k}"] = imp.layer_importance(
                    m.config, m.params, metric, windows=depth_windows, stats=stats, block_size=k,
                    batch_size=min(i.batch_size, len(depth_windows)), dtype=dtype, progress=progress)
                timings[f"layers_{metric}_{k}_s"] = time.perf_counter() - t0
        out = self.run_dir / "importance"
        with atomic_directory(out, overwrite=True) as tmp:
            np.savez(tmp / "importance.npz", **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        self.console.print(f"calibration: {len(windows)} windows × {windows.shape[1]} tokens "
                           f"({timings['calibration_pass_s']:.1f}s); depth scans on "
                           f"{min(len(windows), i.depth_samples)}"
                           f" windows: {', '.join(f'{m} k={k}' for m, k in self._depth_needs()) or 'none'}")
        return {"path": str(out / "importance.npz"), "windows": int(len(windows)), "seq_len": int(windows.shape[1]),
                "timings": timings}

    def _prune(self, student: str, teacher_path: str, importance: dict[str, Any]) -> dict[str, Any]:
        from minitron_jax.compress import prune
        from minitron_jax.convert.hf import save_hf
        from minitron_jax.fsutil import atomic_directory
        from minitron_jax.model import count_params, init_params

        spec_cfg = self.pc.students[student]
        spec = _prune_spec(self.pc, spec_cfg)
        m = self._load(teacher_path)
        t0 = time.perf_counter()
        try:
            prune.check_spec(m.config, spec)
        except ValueError as e:
            raise PipelineConfigError(f"students.{student}.prune: {e}") from None
        kept = None
        if spec_cfg.init == "random":
            import jax

            config = prune.target_config(m.config, spec)
            params = jax.tree.map(np.asarray, init_params(config, jax.random.key(spec_cfg.seed)))
        else:
            with np.load(importance["path"]) as z:
                scores = {k: z[k] for k in ("heads", "neurons", "channels")}
                if spec.ranks_layers:
                    scores["layers"] = z[f"layers_{spec.depth_metric}_{spec.drop_layers}"]
            keep = prune.plan(m.config, spec, scores)
            config, params = prune.apply_plan(m.config, m.params, keep)
            kept = {"dropped_layers": [int(x) for x in keep["drop_layers"]]}
        out = self.run_dir / "prune" / student
        with atomic_directory(out, overwrite=True) as tmp:
            save_hf(tmp / "hf", config, params, tokenizer=m.tokenizer)
        n = count_params(config)
        self.console.print(f"{student}: {m.config.describe()} → {config.describe()}  "
                           f"({count_params(m.config):,} → {n:,} params, init {spec_cfg.init})"
                           + (f"; dropped layers {kept['dropped_layers']}" if kept and kept["dropped_layers"] else ""))
        return {"path": str(out / "hf"), "params": n, "arch": _arch(config), "init": spec_cfg.init,
                "kept": kept, "seconds": time.perf_counter() - t0}

    def _distill(self, student: str, rc, key: str) -> dict[str, Any]:
        res = self._train(rc, key)
        cfg = self._read_config(res["path"])
        from minitron_jax.model import count_params

        return {**res, "params": count_params(cfg), "arch": _arch(cfg), "loss": self.pc.students[student].loss}

    def _train(self, rc, key: str) -> dict[str, Any]:
        """Run (or resume) one trainer run; its export is the stage output.

        The run directory carries the stage key: checkpoints left by an interrupted run with other settings are
        discarded rather than resumed."""
        from minitron_jax.train.checkpoints import Checkpointer
        from minitron_jax.train.loop import run
        from minitron_jax.train.observe import read_metrics

        run_dir = Path(rc.run_dir)
        key_file = run_dir / "pipeline_key.txt"
        if run_dir.exists() and not (key_file.is_file() and key_file.read_text().strip() == key):
            self.console.print(f"discarding {run_dir} (left by a run with other settings)")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n")
        self._teacher_cache.clear()  # the trainer loads its own copies
        latest = None
        if (run_dir / "checkpoints").is_dir():
            ck = Checkpointer(run_dir / "checkpoints", rc.checkpoint)
            latest = ck.latest_step()
            ck.close()
        if latest is not None:
            self.console.print(f"resuming {run_dir} from its checkpoint at step {latest}")
        result = run(rc)
        if result.export_path is None:
            raise RuntimeError(f"the trainer run in {run_dir} ended at step {result.step} without an export")
        train = read_metrics(run_dir, "train")
        train = list({r["step"]: r for r in train}.values())  # a resumed run re-logs nothing, but be safe
        return {"path": str(result.export_path), "run_dir": str(run_dir), "steps": result.step,
                "tokens": int(rc.train.steps * rc.data.batch_size * rc.data.seq_len),
                "loss_tokens": int(sum(r.get("tokens", 0) for r in train)),
                "train_seconds": float(sum(r.get("step_seconds", 0.0) for r in train)),
                "resumed_from": latest}

    @staticmethod
    def _read_config(path: str):
        from minitron_jax.convert import read_source_config

        return read_source_config(path)

    def _evaluate(self, model_path: str, heldout: str, mmlu: bool) -> dict[str, Any]:
        from minitron_jax.data import read_text, token_windows
        from minitron_jax.evaluate.perplexity import DTYPES, nll_sum

        e = self.pc.eval
        m = self._load(model_path)
        windows = token_windows(m.tokenizer, read_text(heldout), e.seq_len, e.max_tokens)
        t0 = time.perf_counter()
        with PhaseProgress(self.console) as progress:
            # Window by window (one compiled [1, T] shape): the per-window NLLs make paired comparisons between
            # models possible (same windows), and their sum is exactly the perplexity contract's total.
            window_nll = []
            for i in range(len(windows)):
                total_i, count_i = nll_sum(m.config, m.params, windows[i:i + 1], batch_size=1,
                                           dtype=DTYPES[e.dtype])
                window_nll.append(total_i / count_i)
                progress("held-out perplexity", i + 1, len(windows))
            count = len(windows) * (windows.shape[1] - 1)
            nll = float(np.mean(window_nll))
            out = {"perplexity": math.exp(nll), "nll": nll, "tokens": int(windows.size),
                   "windows": int(len(windows)), "window_nll": [float(x) for x in window_nll],
                   "predicted_tokens": int(count), "perplexity_seconds": time.perf_counter() - t0, "mmlu": None}
            if mmlu and e.mmlu_limit > 0:
                from minitron_jax.evaluate.mmlu import default_data_path, load_mmlu, mmlu_eval

                rows = load_mmlu(self._resolve(e.mmlu_data) if e.mmlu_data else default_data_path())
                res = mmlu_eval(m.config, m.params, m.tokenizer, rows, shots=e.mmlu_shots, limit=e.mmlu_limit,
                                batch_size=e.mmlu_batch_size, dtype=DTYPES[e.dtype],
                                progress=lambda d, n: progress(f"MMLU {e.mmlu_shots}-shot", d, n))
                out["mmlu"] = {k: res[k] for k in ("accuracy", "n", "correct", "shots", "seconds")}
        self.console.print(f"held-out perplexity {out['perplexity']:.2f} ({out['tokens']} tokens)"
                           + (f", MMLU {out['mmlu']['accuracy']:.3f} on {out['mmlu']['n']}" if out["mmlu"] else ""))
        return out

    # -------------------------------------------------------------------------------------------------------------
    # Report
    # -------------------------------------------------------------------------------------------------------------
    def _report(self, teacher, active, pruned, distilled, evals) -> dict[str, Any]:
        from minitron_jax.train.observe import read_metrics

        pc = self.pc
        teacher_ppl = evals["teacher"].result["perplexity"]
        ref_label = "teacher_corrected" if pc.teacher_correction.enabled else "teacher"
        ref_nll = evals[ref_label].result["nll"]
        rows = []
        for label in ["teacher"] + (["teacher_corrected"] if pc.teacher_correction.enabled else []):
            rec = teacher if label == "teacher" else active
            ev = evals[label].result
            rows.append({"model": label, "arch": rec.result["arch"], "params": rec.result["params"],
                         "ppl_pruned": None, "ppl": ev["perplexity"], "gap_closed": None,
                         "mmlu": (ev["mmlu"] or {}).get("accuracy"), "mmlu_n": (ev["mmlu"] or {}).get("n"),
                         "tokens": rec.result.get("tokens", 0), "seconds": rec.seconds, "init": None,
                         "loss": None, "export": rec.result["path"], "window_nll": ev.get("window_nll")})
        curves = {}
        for s, spec in pc.students.items():
            before, after = evals[f"{s}.pruned"].result, evals[f"{s}.distilled"].result
            d = distilled[s].result
            lost = before["nll"] - ref_nll
            gap = (before["nll"] - after["nll"]) / lost if lost > 1e-9 else None
            rows.append({"model": s, "arch": d["arch"], "params": d["params"], "ppl_pruned": before["perplexity"],
                         "ppl": after["perplexity"], "gap_closed": gap,
                         "mmlu": (after["mmlu"] or {}).get("accuracy"), "mmlu_n": (after["mmlu"] or {}).get("n"),
                         "mmlu_pruned": (before["mmlu"] or {}).get("accuracy"),
                         "tokens": d["tokens"], "seconds": pruned[s].seconds + distilled[s].seconds,
                         "train_seconds": d["train_seconds"], "init": spec.init, "loss": spec.loss,
                         "export": d["path"], "window_nll": after.get("window_nll"),
                         "window_nll_pruned": before.get("window_nll")})
            curves[s] = {"train": [(r["step"], r["loss"], r.get("ce")) for r in read_metrics(d["run_dir"], "train")],
                         "val": [(r["step"], r["ce"], r.get("kl")) for r in read_metrics(d["run_dir"], "val")]}
        report = {"name": pc.name, "run_dir": str(self.run_dir), "teacher_perplexity": teacher_ppl,
                  "reference": ref_label, "rows": rows, "curves": curves,
                  "eval": {"heldout_tokens": evals["teacher"].result["tokens"], "seq_len": pc.eval.seq_len,
                           "mmlu_shots": pc.eval.mmlu_shots, "mmlu_limit": pc.eval.mmlu_limit},
                  "distill": {"steps": pc.distill.steps, "batch_size": pc.distill.batch_size,
                              "seq_len": pc.distill.seq_len},
                  "stages": {n: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "skipped": r.skipped}
                             for n, r in self.records.items()},
                  "wall_seconds_this_invocation": time.perf_counter() - self.t_start,
                  "wall_seconds_all_stages": sum(r.seconds for r in self.records.values())}
        write_json_atomic(self.run_dir / "results.json", report)
        md = results_markdown(report)
        tmp = self.run_dir / ".results.md.tmp"
        tmp.write_text(md)
        os.replace(tmp, self.run_dir / "results.md")
        plot_results(report, self.run_dir / "results.png")
        self.console.print(results_table(report))
        self.console.print(f"wrote {self.run_dir / 'results.md'}, results.json and results.png "
                           f"(stages took {report['wall_seconds_all_stages']:.0f}s in all; this invocation "
                           f"{report['wall_seconds_this_invocation']:.0f}s)")
        return report


class _StopAfter(Exception):
    pass


def stage_names(pc: PipelineConfig) -> list[str]:
    """The stages of a run, in order."""
    names = ["data", "teacher"] + (["correction"] if pc.teacher_correction.enabled else []) + ["importance"]
    names += [f"prune.{s}" for s in pc.students] + [f"distill.{s}" for s in pc.students]
    names += ["eval.teacher"] + (["eval.teacher_corrected"] if pc.teacher_correction.enabled else [])
    for s in pc.students:
        names += [f"eval.{s}.pruned", f"eval.{s}.distilled"]
    return names


def _arch(config) -> dict[str, int]:
    return {"layers": config.num_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
            "heads": config.num_heads, "kv_heads": config.num_kv_heads}


def _arch_str(a: Mapping[str, int]) -> str:
    return f"L{a['layers']} D{a['hidden']} F{a['ffn']} H{a['heads']}"


# ======================================================================================================================
# Table and plot
# ======================================================================================================================
def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _table_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        mmlu = _fmt(r["mmlu"], ".3f")
        if r.get("mmlu_pruned") is not None:
            mmlu = f"{r['mmlu_pruned']:.3f} → {mmlu}"
        out.append([r["model"] + ("" if r["init"] in (None, "pruned") else f" ({r['init']} init)")
                    + ("" if r["loss"] in (None, "kd") else f" [{r['loss']}]"),
                    _arch_str(r["arch"]), _fmt_params(r["params"]), _fmt(r["ppl_pruned"], ".2f"),
                    f"{r['ppl']:.2f}", _fmt(None if r["gap_closed"] is None else 100 * r["gap_closed"], ".0f") +
                    ("%" if r["gap_closed"] is not None else ""), mmlu,
                    f"{r['tokens']:,}" if r["tokens"] else "–", f"{r['seconds']:.0f}s"])
    return out


TABLE_HEADER = ["model", "architecture", "params", "ppl pruned", "ppl final", "gap closed", "MMLU", "train tokens",
                "wall time"]


def results_table(report: dict[str, Any]):
    from rich.table import Table

    t = Table(title=f"{report['name']}: held-out perplexity ({report['eval']['heldout_tokens']:,} tokens) and MMLU "
                    f"({report['eval']['mmlu_shots']}-shot, first {report['eval']['mmlu_limit']})")
    for h in TABLE_HEADER:
        t.add_column(h, justify="left" if h in ("model", "architecture") else "right")
    for row in _table_rows(report):
        t.add_row(*row)
    return t


def results_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['name']}", "",
             f"Held-out perplexity on {report['eval']['heldout_tokens']:,} tokens ({report['eval']['seq_len']}-token "
             f"windows); MMLU {report['eval']['mmlu_shots']}-shot on the first {report['eval']['mmlu_limit']} "
             f"questions; distillation {report['distill']['steps']} steps × {report['distill']['batch_size']} × "
             f"{report['distill']['seq_len']} tokens. *Gap closed*: the share of the loss lost to pruning "
             f"(held-out NLL of the pruned student minus the {report['reference']}'s) recovered by distillation. "
             "*Wall time*: pruning + distillation (students) or conversion/correction (teacher), compilation "
             "included.", "",
             "| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join("---" if h in ("model", "architecture") else "---:" for h in TABLE_HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(report)]
    return "\n".join(lines) + "\n"


def plot_results(report: dict[str, Any], path: Path) -> None:
    """Validation loss curves (left) and held-out perplexity before/after distillation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, c) in enumerate(report["curves"].items()):
        color = colors[i % len(colors)]
        if c["train"]:
            steps, loss, _ = zip(*c["train"])
            ax1.plot(steps, loss, color=color, alpha=0.3, lw=1)
        if c["val"]:
            steps, ce, kl = zip(*c["val"])
            ax1.plot(steps, ce, "o-", color=color, label=f"{s}: validation CE")
            if all(k is not None for k in kl):
                ax1.plot(steps, kl, "s--", color=color, label=f"{s}: validation KL to teacher")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("distillation (faint: training loss)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    rows = report["rows"]
    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    before = [r["ppl_pruned"] if r["ppl_pruned"] is not None else np.nan for r in rows]
    after = [r["ppl"] for r in rows]
    ax2.bar(x - 0.2, before, 0.4, label="after pruning", color="#d62728", alpha=0.7)
    ax2.bar(x + 0.2, after, 0.4, label="final (distilled / teacher)", color="#2ca02c", alpha=0.8)
    for xi, (b, a) in enumerate(zip(before, after)):
        if not np.isnan(b):
            ax2.text(xi - 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=7)
        ax2.text(xi + 0.2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xticks(x, names, rotation=20, fontsize=8)
    ax2.set_ylabel("held-out perplexity (log scale)")
    ax2.set_title("held-out perplexity")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ======================================================================================================================
# CLI
# ======================================================================================================================
@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m minitron_jax.pipeline",
        description="Importance → width/depth pruning → distillation → evaluation → export → comparison table, "
                    "resumable stage by stage.")
    ap.add_argument("--config", required=True, help="pipeline YAML (e.g. configs/smollm2_135m_demo.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides with YAML values, e.g. distill.steps=400 run_dir=/tmp/run")
    ap.add_argument("--stop-after", metavar="STAGE", help="stop after this stage (e.g. importance, prune.width)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    try:
        pc = load_pipeline_config(args.config, args.overrides)
    except PipelineConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.stop_after is not None and args.stop_after not in stage_names(pc):
        print(f"error: --stop-after {args.stop_after!r} is not a stage of this run "
              f"({', '.join(stage_names(pc))})", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        import yaml

        print(yaml.safe_dump(pc.to_dict(), sort_keys=False))
        return 0
    from minitron_jax.train.loop import NonFiniteLossError

    try:
        Pipeline(pc, stop_after=args.stop_after).run()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (PipelineConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as e:  # RunConfigError, ConfigError, bad texts ... : an input problem, named
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
