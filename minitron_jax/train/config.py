"""The run config of ``python -m minitron_jax.distill``: typed dataclasses, YAML in, dotted overrides, validation.

A run is described by one YAML file whose sections map one-to-one onto the dataclasses below; every key is typed,
so a typo or a wrong type fails before anything is loaded::

    mode: distill                      # distill | teacher_correction | sft (with teacher.path: KD on assistant tokens)
    run_dir: runs/demo
    teacher: {path: asset:smollm2_gguf, dtype: bfloat16}
    student: {prune: {...PruneSpec fields...}, calib: asset:wikipedia}   # or {path: ...}
    data:    {sources: [asset:wikipedia], seq_len: 256, batch_size: 8, val_rows: 16}
    loss:    {kind: forward_kl, temperature: 1.0, alpha: 1.0}
    optim:   {peak_lr: 1.0e-4, min_lr: 1.0e-5, warmup_steps: 40}
    train:   {steps: 100, grad_accum: 1, compute_dtype: bfloat16, remat: none}
    mesh:    {data: 1, fsdp: -1, tensor: 1}
    checkpoint: {every: 50, keep: 3}

CLI overrides are ``section.key=value`` with the value parsed as YAML (``train.steps=20``, ``loss.top_k=null``,
``data.sources=[a.txt,b.txt]``); floats may be written the C way (``optim.peak_lr=3e-4``).

Values of the form ``asset:NAME`` in model and data paths are resolved through :mod:`minitron_jax.data.assets`
(``asset:smollm2_gguf``, ``asset:wikipedia``, ``asset:owt``) when the run starts, not when the config is read,
so reading or printing a config never touches the network.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from minitron_jax.dtypes import STORAGE_DTYPES
from minitron_jax.train.optim import OptimConfig, OptimSection
from minitron_jax.typed_config import (  # noqa: F401  (re-exported: the YAML helpers of every config)
    apply_overrides,
    build,
    float_fields,
    load,
    parse_override,
    read_yaml_sections,
    yaml_problem,
)

MODES = ("distill", "teacher_correction", "sft")
DTYPES = STORAGE_DTYPES
ASSET_PREFIX = "asset:"


class RunConfigError(ValueError):
    """A run config that is malformed (unknown key, wrong type) or inconsistent."""


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher: an HF directory, a ``.gguf`` file or a minitron_jax Orbax checkpoint."""

    path: str | None = None
    dtype: str = "bfloat16"  # storage and compute dtype of the forward-only teacher
    # A directory written by `python -m minitron_jax.teacher_logits` (train/teacher_cache.py): the teacher's top-k
    # log-probs over this run's rows, read instead of running (or loading) the teacher; loss: sparse forward KL.
    logits_cache: str | None = None


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The student: a model path, or ``prune`` (PruneSpec fields) applied to the teacher at start-up.

    In ``teacher_correction`` mode the trained model is the teacher itself and this section stays empty."""

    path: str | None = None
    prune: dict[str, Any] | None = None
    calib: str | None = None  # calibration text for importance estimation when pruning on the fly


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training text (packed documents) or, in ``sft`` mode, chat jsonl records in any layout of
    :mod:`minitron_jax.data.chat` (``messages``, or ``input`` + ``ideal``); records marked ``"split": "eval"``
    are held out and never trained on."""

    sources: list[str] = dataclasses.field(default_factory=list)
    seq_len: int = 2048
    batch_size: int = 8  # global rows per optimizer update (all micro-batches, all hosts)
    # Validation holds whole documents out before packing (never a passage trained on): an int is at least that many
    # rows' worth of documents, a float in (0, 1) that fraction of the documents, 0 none. (sft: rows = conversations.)
    val_rows: int | float = 0.01
    val_batches: int | None = 8  # cap on validation batches per evaluation (None: the whole split)
    seed: int = 0  # shuffling seed
    # Which documents are held out (a seeded hash of their text); apart from `seed` so runs that differ only in
    # their shuffling seed validate on the same documents.
    split_seed: int = 0
    cache_dir: str | None = None  # tokenized-shard cache; default: <minitron_jax cache>/tokens


@dataclasses.dataclass(frozen=True)
class HiddenLossConfig:
    """Optional intermediate-state loss between chosen layer outputs (``layer_out`` of the decoder blocks).

    ``pairs`` are ``[student_layer, teacher_layer]``; when hidden sizes differ a learned projection
    ``[Ds, Dt]`` per pair is trained along with the student (and dropped at export)."""

    pairs: list[list[int]] = dataclasses.field(default_factory=list)
    weight: float = 0.0
    kind: str = "mse"  # mse | cosine


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The logit loss (see :mod:`minitron_jax.train.losses`): ``alpha * kd + (1 - alpha) * ce``; alpha=1 is pure KD."""

    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    alpha: float = 1.0
    top_k: int | None = None
    jsd_beta: float = 0.5
    chunk_size: int = 1024  # tokens per logits chunk: bounds the [tokens × vocab] memory
    naive: bool = False  # materialize full logits instead (a reference for small models and tests)
    hidden: HiddenLossConfig = dataclasses.field(default_factory=HiddenLossConfig)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer updates
    grad_accum: int = 1  # micro-batches per update, accumulated inside the one jitted step
    compute_dtype: str = "bfloat16"  # student (and loss matmul) compute dtype; master weights stay param_dtype
    param_dtype: str = "float32"
    remat: str = "none"  # a key of model.REMAT_POLICIES
    # einsum | blockwise (online softmax over key blocks: no [T, T] scores; long rows) | fused (cuDNN's fused
    # attention on a GPU in bf16/fp16, XLA's jax.nn.dot_product_attention elsewhere)
    attention: str = "einsum"
    resume: bool = True  # continue from the run dir's latest checkpoint when there is one
    stop_at: int | None = None  # end this job early at that step (after a checkpoint), e.g. to fit a time slot
    eval_every: int = 0  # validation every N steps (0: only at the end)
    log_every: int = 1
    seed: int = 0  # RNG carried in the train state (and the projection init of the hidden loss)
    compile_cache: str | None = None  # persistent XLA compilation cache dir: a resumed job skips compiling


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A (data, fsdp, tensor) mesh; one size may be -1 (the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, str | None] = dataclasses.field(default_factory=dict)  # overrides of sharding.DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize`` arguments; None lets JAX detect them (SLURM, TPU pods, ...)."""

    initialize: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (the last step is always saved)
    keep: int = 3  # newest checkpoints kept
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    at_end: bool = True  # write the student as an HF directory when the run finishes
    path: str | None = None  # default: <run_dir>/hf
    dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # rich progress bar (plain lines when stdout is not a terminal)
    tensorboard: bool = True  # tensorboardX event files in <run_dir>/tb


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str
    mode: str = "distill"
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def __post_init__(self):
        validate(self)

    @property
    def uses_teacher(self) -> bool:
        """``distill`` runs a teacher forward; so does ``sft`` given a ``teacher.path`` (the logit loss on the
        assistant tokens: KD-SFT); ``teacher_correction`` and ``sft`` without a teacher train with cross-entropy."""
        return self.mode == "distill" or (self.mode == "sft" and self.teacher.path is not None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=110)

    def replace(self, **sections) -> RunConfig:
        return dataclasses.replace(self, **sections)


# ----------------------------------------------------------------------------------------------------------------
# Validation of values (types are checked while building, see `from_dict`)
# ----------------------------------------------------------------------------------------------------------------
def validate(rc: RunConfig) -> None:
    from minitron_jax.model import ATTENTION_IMPLS, REMAT_POLICIES
    from minitron_jax.train.losses import HIDDEN_LOSS_KINDS, KD_KINDS

    def need(ok: bool, message: str):
        if not ok:
            raise RunConfigError(message)

    # YAML reads .nan, .inf and 1e999 as floats, and NaN compares false with every bound, so it would slip past
    # checks written as "refuse when < 0": every float of the config must be finite, checked first.
    for key, value in float_fields(rc):
        need(math.isfinite(value), f"{key}={value} is not a finite number")
    need(rc.mode in MODES, f"mode must be one of {MODES}, got {rc.mode!r}")
    need(bool(rc.run_dir), "run_dir must be set")
    if rc.mode == "distill":
        need(rc.teacher.path is not None, "distill needs teacher.path (HF dir, .gguf file or Orbax checkpoint)")
        need((rc.student.path is None) != (rc.student.prune is None),
             "distill needs exactly one of student.path or student.prune")
    elif rc.mode == "teacher_correction":
        need(rc.teacher.path is not None, "teacher_correction fine-tunes teacher.path; set it")
        need(rc.student.path is None and rc.student.prune is None,
             "teacher_correction trains the teacher itself; leave the student section empty")
    else:  # sft: cross-entropy on the assistant tokens, or with teacher.path the loss section's KD on them
        need(rc.student.path is not None, "sft fine-tunes student.path; set it")
        need(rc.student.prune is None, "sft takes a trained student (student.path), not a pruning spec")
    need(rc.student.prune is None or rc.student.calib is not None,
         "student.prune needs student.calib (calibration text for importance estimation)")
    need(rc.teacher.dtype in DTYPES, f"teacher.dtype must be one of {DTYPES}, got {rc.teacher.dtype!r}")
    need(rc.train.compute_dtype in DTYPES, f"train.compute_dtype must be one of {DTYPES}")
    need(rc.train.param_dtype in DTYPES, f"train.param_dtype must be one of {DTYPES}")
    need(rc.export.dtype in DTYPES, f"export.dtype must be one of {DTYPES}")

    need(len(rc.data.sources) > 0, "data.sources is empty: give text/jsonl/parquet files, directories or globs")
    need(rc.data.seq_len >= 2, f"data.seq_len must be >= 2, got {rc.data.seq_len}")
    need(rc.data.batch_size >= 1, f"data.batch_size must be >= 1, got {rc.data.batch_size}")
    need(rc.data.val_rows >= 0, f"data.val_rows must be >= 0, got {rc.data.val_rows}")
    need(not isinstance(rc.data.val_rows, float) or rc.data.val_rows < 1,
         f"data.val_rows: a fraction of the documents must be < 1, got {rc.data.val_rows} (a row count is an integer)")
    need(rc.data.val_batches is None or rc.data.val_batches >= 1, "data.val_batches must be >= 1 or null")

    need(rc.loss.kind in KD_KINDS, f"loss.kind must be one of {KD_KINDS}, got {rc.loss.kind!r}")
    need(rc.loss.temperature > 0, f"loss.temperature must be > 0, got {rc.loss.temperature}")
    need(0.0 <= rc.loss.alpha <= 1.0, f"loss.alpha must be in [0, 1], got {rc.loss.alpha}")
    need(rc.loss.top_k is None or (rc.loss.top_k >= 1 and rc.loss.kind == "forward_kl"),
         "loss.top_k must be a positive int and needs loss.kind=forward_kl")
    need(rc.loss.chunk_size >= 1, f"loss.chunk_size must be >= 1, got {rc.loss.chunk_size}")
    h = rc.loss.hidden
    need(h.kind in HIDDEN_LOSS_KINDS, f"loss.hidden.kind must be one of {HIDDEN_LOSS_KINDS}, got {h.kind!r}")
    need(h.weight >= 0, f"loss.hidden.weight must be >= 0, got {h.weight}")
    need(all(len(p) == 2 and min(p) >= 0 for p in h.pairs),
         f"loss.hidden.pairs must be [student_layer, teacher_layer] pairs of layer indices, got {h.pairs}")
    need(not (h.weight > 0 and not h.pairs), "loss.hidden.weight > 0 needs loss.hidden.pairs")
    need(not (h.weight > 0 and not rc.uses_teacher), "loss.hidden needs a teacher (mode: distill, or sft with "
         "teacher.path)")
    if rc.teacher.logits_cache is not None:
        need(rc.mode == "distill", f"teacher.logits_cache is for mode: distill ({rc.mode} runs no teacher)")
        need(rc.loss.kind == "forward_kl" and rc.loss.top_k is None,
             "teacher.logits_cache trains with the sparse forward KL of the cached top-k: it needs "
             f"loss.kind=forward_kl and loss.top_k=null (got {rc.loss.kind}, top_k={rc.loss.top_k})")
        need(rc.loss.temperature == 1.0, "teacher.logits_cache holds the teacher's log-probs at T=1: loss.temperature "
             f"must be 1 (got {rc.loss.temperature}); a temperature needs the teacher's full logits")
        need(not rc.loss.naive, "loss.naive (full-logits reference) needs the online teacher, not teacher.logits_cache")
        need(h.weight == 0, "loss.hidden needs the teacher's hidden states, which teacher.logits_cache does not hold")

    t = rc.train
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(rc.data.batch_size % t.grad_accum == 0,
         f"data.batch_size ({rc.data.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})")
    need(t.remat in REMAT_POLICIES, f"train.remat must be one of {tuple(REMAT_POLICIES)}, got {t.remat!r}")
    need(t.attention in ATTENTION_IMPLS,
         f"train.attention must be one of {tuple(ATTENTION_IMPLS)}, got {t.attention!r}")
    need(t.stop_at is None or 1 <= t.stop_at <= t.steps, f"train.stop_at must be in [1, train.steps={t.steps}]")
    need(t.eval_every >= 0 and t.log_every >= 1, "train.eval_every must be >= 0 and train.log_every >= 1")
    need(rc.checkpoint.every >= 1 and rc.checkpoint.keep >= 1, "checkpoint.every and checkpoint.keep must be >= 1")
    _check_lr_range(rc)
    # The optimizer validates its own fields (warmup < steps, min_lr <= peak_lr, ...): reuse it, re-labelled.
    try:
        optim_config(rc)
    except ValueError as e:
        raise RunConfigError(f"optim: {e}") from None


def _check_lr_range(rc: RunConfig) -> None:
    """Refuse an LR that overflows the params' dtype.

    Adam's update is about ``lr`` per parameter per step whatever the gradient's scale, so the LR is a step size in
    parameter units. At or above the largest finite value of the param dtype (or of float32, which the schedule is
    computed in) the first full-LR update turns every param into inf/NaN, which no training survives; such a value
    is a typo (1e39 for 1e-39, 3e4 for 3e-4), refused here, naming the key. An LR below that but still absurd
    (say 1e10) is representable and diverges quickly: the loop's finite checks stop it with exit 3 and keep the
    last good checkpoint."""
    import ml_dtypes
    import numpy as np

    limits = {name: float(ml_dtypes.finfo(getattr(ml_dtypes, name, None) or np.dtype(name)).max)
              for name in {"float32", rc.train.param_dtype}}
    name = min(limits, key=limits.get)
    for key in ("peak_lr", "min_lr"):
        value = getattr(rc.optim, key)
        if not abs(value) < limits[name]:
            raise RunConfigError(f"optim.{key}={value:g} overflows {name} (train.param_dtype is "
                                 f"{rc.train.param_dtype}, largest finite value {limits[name]:.3g}); a learning rate "
                                 "is a step size in parameter units, typically 1e-5 to 1e-3")


def optim_config(rc: RunConfig):
    """The :class:`minitron_jax.train.optim.OptimConfig` of a run.

    Gradient accumulation happens inside the jitted step (see ``train/step.py``), so the optimizer itself never
    accumulates (``accumulate_steps=1``) and one ``train.steps`` is one optimizer update."""
    return OptimConfig.of(rc.optim, total_steps=rc.train.steps)


# ----------------------------------------------------------------------------------------------------------------
# Building from plain data, with type checks
# ----------------------------------------------------------------------------------------------------------------
def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from nested plain data (parsed YAML); unknown keys and wrong types raise RunConfigError."""
    if not isinstance(data, Mapping):
        raise RunConfigError(f"a run config must be a mapping of sections, got {type(data).__name__}")
    return build(RunConfig, data, error=RunConfigError)


# ----------------------------------------------------------------------------------------------------------------
# YAML and dotted overrides (the helpers live in :mod:`minitron_jax.typed_config`, shared by every config)
# ----------------------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from defaults when ``path`` is None) and apply dotted overrides."""
    return load(RunConfig, path, overrides, error=RunConfigError)


def resolve_path(value: str | None) -> str | None:
    """``asset:NAME`` → the fetched asset's path; anything else is returned unchanged."""
    if value is None or not value.startswith(ASSET_PREFIX):
        return value
    from minitron_jax.data.assets import fetch_assets

    name = value[len(ASSET_PREFIX):]
    return str(fetch_assets([name], quiet=True)[name])
