"""The pipeline config: its schema (typed dataclasses), loading, validation, and the trainer run configs it implies.

YAML; every key typed and checked by :mod:`minitron_jax.typed_config` (unknown keys refused with a suggestion);
``key=value`` overrides on the command line are dotted paths with YAML values, e.g. ``distill.steps=400
students.width.prune.hidden=512 run_dir=/tmp/run``::

    name: smollm2_135m_demo
    teacher: asset:smollm2_gguf           # HF dir, .gguf or minitron_jax checkpoint; asset:NAME = data.assets
    texts: {train: asset:wikipedia, calib: asset:owt, heldout_docs: 100}
    teacher_correction: {enabled: false, steps: 40}
    importance: {calib_samples: 16, seq_len: 256, depth_samples: 3}
    students:
      width: {prune: {hidden: 480, ffn: 1024}}
      depth: {prune: {drop_layers: 12, depth_metric: contiguous}}
      # also: init: random (same shape, random weights), loss: ce (next-token CE instead of KD)
    distill: {steps: 60, seq_len: 128, batch_size: 4, optim: {peak_lr: 3.0e-4}, trainer: {any RunConfig sections}}
    eval: {seq_len: 256, max_tokens: 4096, mmlu_limit: 32, mmlu_shots: 0}
    sft: {enabled: true, steps: 20, loss: ce, data: asset:chat, eval_records: 32, students: [width]}
    keep_checkpoints: false               # a finished trainer stage removes its checkpoints (its export stays)

The optimizer of ``distill``, ``teacher_correction`` and ``sft`` is an ``optim:`` section (the trainer's
:class:`~minitron_jax.train.config.OptimSection`); its keys may also be written flat in the section
(``distill: {peak_lr: 3.0e-4, warmup_steps: 4}``, as the files in configs/ do, and ``distill.peak_lr=1e-4`` on the
command line). The correction shares the distillation's optimizer settings except its own schedule (``peak_lr``,
``min_lr``, ``warmup_steps``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from minitron_jax.dtypes import COMPUTE_DTYPES, STORAGE_DTYPES
from minitron_jax.train.config import MeshConfig
from minitron_jax.train.optim import OptimSection
from minitron_jax.typed_config import build, load

STUDENT_INITS = ("pruned", "random")
STUDENT_LOSSES = ("kd", "ce")


class PipelineConfigError(ValueError):
    """A pipeline config that is malformed or cannot be run (unknown key, wrong type, impossible size, ...)."""


# ----------------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------------
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
    """Teacher correction: fine-tune the teacher with next-token CE on ``texts.train`` before pruning.

    ``optim`` defaults to the paper's LR (1e-4 → 1e-5) with a warmup short enough for ``steps``; its fields other
    than the schedule follow ``distill.optim`` unless given here."""

    enabled: bool = False
    steps: int = 40
    optim: OptimSection = dataclasses.field(default_factory=lambda: OptimSection(warmup_steps=4))


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
    # Instead of ``prune``: the layer-by-layer (Puzzle) search (``compress.puzzle``), each layer its own block, for
    # targets (``target_params``, ``target_memory`` GB, ``target_flops``) — keys of :func:`puzzle_plan`.
    puzzle: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str = "pruned"
    loss: str = "kd"
    seed: int = 0  # random init seed


@dataclasses.dataclass(frozen=True)
class DistillSection:
    """The distillation budget and optimizer (the same for every student). ``trainer`` holds any further
    :class:`minitron_jax.train.config.RunConfig` sections, merged last (e.g. ``{loss: {top_k: 64}}``).

    ``optim`` defaults to a schedule for a few dozen steps (3e-4 → 3e-5, 4 warmup steps), above the paper's
    1e-4 → 1e-5 with 40 warmup steps (the :class:`OptimSection` defaults) that a long run would use."""

    steps: int = 60
    seq_len: int = 128
    batch_size: int = 4
    optim: OptimSection = dataclasses.field(
        default_factory=lambda: OptimSection(peak_lr=3e-4, min_lr=3e-5, warmup_steps=4))
    eval_every: int = 10
    val_rows: int = 16  # at least this many validation rows' worth of training-text documents, held out whole
    val_batches: int = 2
    checkpoint_every: int = 10
    compute_dtype: str = "float32"  # XLA:CPU runs bf16 matmuls slower than fp32; bfloat16 on GPU/TPU
    teacher_dtype: str = "float32"
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)
    # K: the teacher runs ONCE over the training (and validation) rows, its top-K log-probs cached in
    # <run_dir>/teacher_logits (stage "teacher_logits"), and every student trains from the cache (sparse forward
    # KL) instead of its own teacher forward per step. Pays off when the students together read more rows than
    # the data holds (docs/distillation.md); null: each student runs the teacher online.
    teacher_top_k: int | None = None
    teacher_logits_dtype: str = "float16"


SFT_LOSSES = ("ce", "kd")


@dataclasses.dataclass(frozen=True)
class SftSection:
    """Optional chat fine-tuning of the distilled students (stage ``sft.<s>``), loss on assistant tokens only.

    ``data``: chat jsonl in any layout of :mod:`minitron_jax.data.chat` (default: the embedded ``chat`` asset,
    whose records carry a fixed train/eval split; a file without one has ``heldout_records`` prompts held out by a
    seeded hash). ``loss``: ``ce`` (cross-entropy on the answers) or ``kd`` (forward KL to the pipeline's teacher
    on the same tokens). ``eval_records``: how many held-out records the chat evaluation scores (assistant-token
    NLL, exact match), before (the distilled student) and after. ``students``: which students (default all)."""

    enabled: bool = False
    steps: int = 20
    loss: str = "ce"
    data: str = "asset:chat"
    heldout_records: int = 64  # held out of a file without a `split` field
    eval_records: int = 32
    students: list[str] | None = None
    seq_len: int = 128
    batch_size: int = 4
    optim: OptimSection = dataclasses.field(
        default_factory=lambda: OptimSection(peak_lr=1e-4, min_lr=1e-5, warmup_steps=2))
    val_rows: int = 0  # validation rows split off the training records (0: none; the chat eval is the measure)
    checkpoint_every: int = 10
    max_new_tokens: int = 8  # exact match: greedy tokens generated per answer
    eval_batch_size: int = 8
    seed: int = 0
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """What each student is handed over as (stage ``export.<s>``, :mod:`minitron_jax.pipeline.export`):
    ``export/<s>/`` with the final student's HF directory, a llama.cpp GGUF of type ``gguf`` (a key of
    ``convert.gguf_export.QUANT_TYPES``; null: no GGUF) and a README.md model card beside each. ``name``: the
    model's name in the cards and the GGUF's file name (default ``<run name>-<student>``)."""

    enabled: bool = True
    gguf: str | None = "q8_0"
    name: str | None = None


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
    sft: SftSection = dataclasses.field(default_factory=SftSection)
    export: ExportSection = dataclasses.field(default_factory=ExportSection)
    export_dtype: str = "float32"
    # A trainer stage (correction, distill.<s>, sft.<s>) checkpoints for its own resume; once it has exported its
    # model nothing of the pipeline reads those checkpoints again (a changed setting redoes the stage from its
    # start), and they are the bulk of a run's disk (~1 GB per stage for the 135M demo: fp32 params + Adam moments).
    # True keeps the last one, e.g. to continue a student with python -m minitron_jax.distill.
    keep_checkpoints: bool = False

    @property
    def sft_students(self) -> list[str]:
        """The students fine-tuned by the sft stage (none when it is off), in the order of ``students``."""
        if not self.sft.enabled:
            return []
        wanted = self.students if self.sft.students is None else set(self.sft.students)
        return [s for s in self.students if s in wanted]

    def __post_init__(self):
        validate(self)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir if self.run_dir else Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------
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
        need(not (spec.prune and spec.puzzle), f"students.{s} has both prune and puzzle: give one (prune: uniform "
             "sizes; puzzle: a layer-by-layer search for a target)")
        if spec.puzzle:
            need(spec.init == "pruned", f"students.{s}.init must be pruned for a puzzle student (its blocks are "
                 f"trained from the teacher's layers), got {spec.init!r}")
            try:
                puzzle_plan(spec)
            except ValueError as e:
                raise PipelineConfigError(f"students.{s}.puzzle: {e}") from None
            continue
        need(bool(spec.prune), f"students.{s}.prune is empty: give target sizes (hidden, ffn, drop_layers, ...)")
        try:
            prune_spec(pc, spec)
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
    need(i.dtype in COMPUTE_DTYPES, f"importance.dtype must be one of {COMPUTE_DTYPES}")
    d = pc.distill
    for name in ("steps", "batch_size", "checkpoint_every", "val_batches"):
        need(getattr(d, name) >= 1, f"distill.{name} must be >= 1, got {getattr(d, name)}")
    need(d.seq_len >= 2, f"distill.seq_len must be >= 2, got {d.seq_len}")
    need(d.eval_every >= 0 and d.val_rows >= 1, "distill.eval_every must be >= 0 and distill.val_rows >= 1")
    need(d.teacher_top_k is None or (not isinstance(d.teacher_top_k, bool) and d.teacher_top_k >= 1),
         f"distill.teacher_top_k must be a positive integer or null, got {d.teacher_top_k!r}")
    need(d.teacher_logits_dtype in ("float16", "bfloat16", "float32"),
         f"distill.teacher_logits_dtype must be float16, bfloat16 or float32, got {d.teacher_logits_dtype!r}")
    c = pc.teacher_correction
    need(c.steps >= 1, f"teacher_correction.steps must be >= 1, got {c.steps}")
    e = pc.eval
    need(e.seq_len >= 2, f"eval.seq_len must be >= 2, got {e.seq_len}")
    need(e.max_tokens is None or e.max_tokens >= e.seq_len, "eval.max_tokens must be >= eval.seq_len (or null)")
    need(e.mmlu_batch_size >= 1, "eval.mmlu_batch_size must be >= 1")
    need(e.mmlu_limit >= 0 and e.mmlu_shots >= 0, "eval.mmlu_limit and eval.mmlu_shots must be >= 0")
    need(e.dtype in COMPUTE_DTYPES, f"eval.dtype must be one of {COMPUTE_DTYPES}")
    need(pc.export_dtype in STORAGE_DTYPES, "export_dtype must be float32, bfloat16 or float16")
    from minitron_jax.convert.gguf_export import QUANT_TYPES

    need(pc.export.gguf is None or pc.export.gguf in QUANT_TYPES,
         f"export.gguf must be one of {', '.join(QUANT_TYPES)} or null, got {pc.export.gguf!r}")
    need(pc.export.name is None or (bool(pc.export.name) and all(c.isalnum() or c in "._-" for c in pc.export.name)),
         f"export.name must be letters, digits, '.', '_' or '-' (it names files), got {pc.export.name!r}")
    f = pc.sft
    need(f.loss in SFT_LOSSES, f"sft.loss must be one of {SFT_LOSSES}, got {f.loss!r}")
    for name in ("steps", "batch_size", "checkpoint_every", "eval_records", "max_new_tokens", "eval_batch_size"):
        need(getattr(f, name) >= 1, f"sft.{name} must be >= 1, got {getattr(f, name)}")
    need(f.seq_len >= 2, f"sft.seq_len must be >= 2, got {f.seq_len}")
    need(f.heldout_records >= 1 and f.val_rows >= 0, "sft.heldout_records must be >= 1 and sft.val_rows >= 0")
    unknown = sorted(set(f.students or ()) - set(pc.students))
    need(not unknown, f"sft.students names {', '.join(unknown)}, not a student of this run "
         f"({', '.join(pc.students)})")
    need(f.students is None or len(f.students) > 0, "sft.students is empty: leave it out for all, or set "
         "sft.enabled=false")
    # The trainer checks its own sections: build every run config once now, so a bad one fails before any work.
    for s in pc.students:
        distill_run_config(pc, s, Path("/nonexistent"), "teacher", "student", "train.jsonl")
    if c.enabled:
        correction_run_config(pc, Path("/nonexistent"), "teacher", "train.jsonl")
    for s in pc.sft_students:
        sft_run_config(pc, s, Path("/nonexistent"), "teacher", "student", "chat.jsonl")


def prune_spec(pc: PipelineConfig, student: StudentSpec):
    """The PruneSpec of a student: its sizes plus the shared importance settings."""
    from minitron_jax.compress.spec import PruneSpec

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


PUZZLE_TARGET_KEYS = {"target_params": "params", "target_memory": "memory_gb", "target_flops": "flops_per_token",
                      "target_latency_ms": "latency_s", "target_throughput": "throughput"}
PUZZLE_TIMED_TARGETS = ("target_latency_ms", "target_throughput")  # priced on a described ``accelerator`` only
PUZZLE_COST_KEYS = ("context", "batch", "weight_dtype", "kv_dtype")
PUZZLE_SEARCH_KEYS = ("seq_len", "calib_tokens", "eval_windows", "scoring", "runner_ups", "importance")
PUZZLE_BLOCKWISE_KEYS = ("steps", "batch_windows", "lr", "warmup_steps", "seed", "linear_init")


def puzzle_plan(student: StudentSpec) -> dict[str, Any]:
    """A puzzle student's search, from its section: ``targets`` (:class:`~minitron_jax.compress.puzzle.targets.
    Targets`), ``cost`` (CostSettings: the serving point of the memory/FLOPs targets), ``settings``
    (SearchSettings), the ``attention`` / ``ffn`` option strings (None: derived from the teacher) and ``runtime``
    (None: vLLM and llama.cpp; ``any``; see ``compress.puzzle.runtimes``). Latency and throughput targets
    (``target_latency_ms``, ``target_throughput``) need an ``accelerator`` (``planning.capacity.ACCELERATORS``):
    priced as a decode step's roofline there, they are the same on every machine; timed on the host they are left
    to ``python -m minitron_jax.puzzle``, since a pipeline stage's result must not depend on how busy the machine
    was."""
    from minitron_jax.compress.puzzle.blockwise import BlockwiseSettings
    from minitron_jax.compress.puzzle.search import SearchSettings
    from minitron_jax.compress.puzzle.targets import CostSettings, Targets
    from minitron_jax.dtypes import dtype as dtype_of

    sec = {k.replace("-", "_"): v for k, v in student.puzzle.items()}
    allowed = {*PUZZLE_TARGET_KEYS, *PUZZLE_COST_KEYS, *PUZZLE_SEARCH_KEYS, *PUZZLE_BLOCKWISE_KEYS, "attention", "ffn",
               "runtime", "accelerator", "latency_phase"}
    unknown = sorted(set(sec) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (a puzzle section takes {', '.join(sorted(allowed))})")
    targets = {}
    for key, field in PUZZLE_TARGET_KEYS.items():
        if sec.get(key) is not None:
            v = sec[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{key} must be a positive number, got {v!r}")
            targets[field] = float(v) / (1e3 if key == "target_latency_ms" else 1.0)
    if not targets:
        raise ValueError(f"give at least one target: {', '.join(PUZZLE_TARGET_KEYS)}")
    timed = [k for k in PUZZLE_TIMED_TARGETS if sec.get(k) is not None]
    if timed and sec.get("accelerator") is None:
        raise ValueError(f"{', '.join(timed)} needs an accelerator (e.g. accelerator: h100) to be priced on; a "
                         "pipeline does not time on this host (python -m minitron_jax.puzzle does)")
    if sec.get("latency_phase") is not None and sec.get("accelerator") is None:
        raise ValueError("latency_phase prices a latency on an accelerator; give accelerator too")
    if sec.get("accelerator") is not None and not timed:
        raise ValueError("accelerator prices target_latency_ms / target_throughput; give one of them")
    cost = CostSettings(**{k: sec[k] for k in PUZZLE_COST_KEYS if k in sec})
    if sec.get("accelerator") is not None:
        from minitron_jax.planning.capacity import accelerator

        cost = cost.priced_on(accelerator(str(sec["accelerator"])), str(sec.get("latency_phase", "decode")))
    for name in ("weight_dtype", "kv_dtype"):
        dtype_of(getattr(cost, name))
    if cost.context < 1 or cost.batch < 1:
        raise ValueError("context and batch must be >= 1")
    blockwise = BlockwiseSettings(**{k: sec[k] for k in PUZZLE_BLOCKWISE_KEYS if k in sec})
    settings = SearchSettings(**{k: sec[k] for k in PUZZLE_SEARCH_KEYS if k in sec}, blockwise=blockwise)
    settings.check()
    options = {}
    for k in ("attention", "ffn", "runtime"):
        v = sec.get(k)
        options[k] = ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v
    from minitron_jax.compress.puzzle.runtimes import parse_runtimes

    parse_runtimes(options["runtime"])  # an unknown runtime name is refused with the config, not at the stage
    return {"targets": Targets(**targets), "cost": cost, "settings": settings, **options}


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimSection))
SCHEDULE_KEYS = ("peak_lr", "min_lr", "warmup_steps")  # the correction's own; the rest follow distill.optim


def nest_optim_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """Plain config data with the optimizer keys written flat in ``distill``/``teacher_correction`` moved into
    their ``optim`` section, and the correction's optimizer completed from the distillation's (all but the
    schedule). Values of the wrong shape are left where they are, for the builder to name."""
    data = dict(data)
    for section in ("distill", "teacher_correction", "sft"):
        body = data.get(section)
        if not isinstance(body, Mapping):
            continue
        flat = {k: v for k, v in body.items() if k in OPTIM_KEYS}
        nested = {} if body.get("optim") is None else body["optim"]
        if not flat or not isinstance(nested, Mapping):
            continue
        both = sorted(set(flat) & set(nested))
        if both:
            raise PipelineConfigError(f"{section}.{both[0]} and {section}.optim.{both[0]} are both given; keep one")
        data[section] = {**{k: v for k, v in body.items() if k not in OPTIM_KEYS}, "optim": {**nested, **flat}}
    distill_optim = (data.get("distill") or {}).get("optim") if isinstance(data.get("distill"), Mapping) else None
    correction = {} if data.get("teacher_correction") is None else data["teacher_correction"]
    if isinstance(distill_optim, Mapping) and isinstance(correction, Mapping):
        shared = {k: v for k, v in distill_optim.items() if k not in SCHEDULE_KEYS}
        own = {} if correction.get("optim") is None else correction["optim"]
        if shared and isinstance(own, Mapping):
            data["teacher_correction"] = {**correction, "optim": {**shared, **own}}
    return data


def config_from_dict(data: Mapping[str, Any]) -> PipelineConfig:
    if not isinstance(data, Mapping):
        raise PipelineConfigError(f"a pipeline config must be a mapping, got {type(data).__name__}")
    return build(PipelineConfig, nest_optim_keys(data), error=PipelineConfigError)


def load_pipeline_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a YAML pipeline config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    return load(PipelineConfig, path, list(overrides), error=PipelineConfigError, prepare=nest_optim_keys)


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's run configs
# ----------------------------------------------------------------------------------------------------------------------
def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _section(obj) -> dict[str, Any]:
    """A config section as plain data for the trainer's builder."""
    return dataclasses.asdict(obj)


def _common_run_dict(pc: PipelineConfig, run_dir: Path, train_text: str, steps: int) -> dict[str, Any]:
    d = pc.distill
    return {
        "run_dir": str(run_dir),
        "data": {"sources": [str(train_text)], "seq_len": d.seq_len, "batch_size": d.batch_size,
                 "val_rows": d.val_rows, "val_batches": d.val_batches, "seed": d.seed,
                 "cache_dir": str(pc.run_path.absolute() / "tokens")},
        "train": {"steps": steps, "compute_dtype": d.compute_dtype, "param_dtype": "float32", "remat": "none",
                  "eval_every": d.eval_every, "log_every": max(1, steps // 20), "seed": d.seed},
        "mesh": _section(d.mesh),
        # Saved synchronously: an asynchronous save's host copy of the state and its serialization buffers overlap
        # the next training step (measured +1.5 GB on the demo's peak RSS, docs/pipeline.md "Host memory"), for
        # ~1 s saved per checkpoint on a small model. One kept: Orbax finishes writing the new one before it
        # deletes the old, so a kill mid-save still leaves one, and a second would only double the disk.
        "checkpoint": {"every": d.checkpoint_every, "keep": 1, "async_save": False},
        "export": {"at_end": True, "dtype": pc.export_dtype},
        "log": {"progress": True, "tensorboard": False},
    }


def distill_run_config(pc: PipelineConfig, student: str, run_dir: Path, teacher_path: str, student_path: str,
                       train_text: str):
    """The trainer's RunConfig of one student's distillation."""
    from minitron_jax.train.config import RunConfigError, from_dict

    d, spec = pc.distill, pc.students[student]
    data = _common_run_dict(pc, run_dir, train_text, d.steps)
    data.update(mode="distill", teacher={"path": str(teacher_path), "dtype": d.teacher_dtype},
                student={"path": str(student_path)},
                loss={"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0 if spec.loss == "kd" else 0.0},
                optim=_section(d.optim))
    try:
        return from_dict(_deep_merge(data, d.trainer))
    except RunConfigError as e:
        raise PipelineConfigError(f"distill (student {student}): {e}") from None


def correction_run_config(pc: PipelineConfig, run_dir: Path, teacher_path: str, train_text: str):
    """The trainer's RunConfig of the teacher correction."""
    from minitron_jax.train.config import RunConfigError, from_dict

    c = pc.teacher_correction
    data = _common_run_dict(pc, run_dir, train_text, c.steps)
    data.update(mode="teacher_correction", teacher={"path": str(teacher_path), "dtype": pc.distill.teacher_dtype},
                optim=_section(c.optim))
    trainer = {k: v for k, v in pc.distill.trainer.items() if k not in ("loss", "student")}
    try:
        return from_dict(_deep_merge(data, trainer))
    except RunConfigError as e:
        raise PipelineConfigError(f"teacher_correction: {e}") from None


def sft_run_config(pc: PipelineConfig, student: str, run_dir: Path, teacher_path: str, student_path: str,
                   chat_train: str):
    """The trainer's RunConfig of one distilled student's chat fine-tuning (``mode: sft``; with ``sft.loss: kd``
    the teacher is set, and the trainer's KD loss runs on the assistant tokens)."""
    from minitron_jax.train.config import RunConfigError, from_dict

    f, d = pc.sft, pc.distill
    data = _common_run_dict(pc, run_dir, chat_train, f.steps)
    data["data"] = {"sources": [str(chat_train)], "seq_len": f.seq_len, "batch_size": f.batch_size,
                    "val_rows": f.val_rows, "val_batches": d.val_batches, "seed": f.seed}
    data["train"].update(eval_every=0, seed=f.seed)
    data["checkpoint"]["every"] = f.checkpoint_every
    data.update(mode="sft", student={"path": str(student_path)}, optim=_section(f.optim),
                teacher={"path": str(teacher_path) if f.loss == "kd" else None, "dtype": d.teacher_dtype},
                loss={"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0})
    # The students' trainer settings (remat, attention, ...) apply here too, less the loss and model sections
    # that belong to the distillation; sft.trainer comes last.
    trainer = {k: v for k, v in d.trainer.items() if k not in ("loss", "student", "teacher", "data")}
    try:
        return from_dict(_deep_merge(_deep_merge(data, trainer), f.trainer))
    except RunConfigError as e:
        raise PipelineConfigError(f"sft (student {student}): {e}") from None


__all__ = ["PipelineConfigError", "PipelineConfig", "TextsConfig", "CorrectionConfig", "ImportanceConfig",
           "StudentSpec", "DistillSection", "EvalSection", "SftSection", "SFT_LOSSES", "STUDENT_INITS",
           "STUDENT_LOSSES", "validate",
           "prune_spec", "config_from_dict", "load_pipeline_config", "nest_optim_keys", "distill_run_config",
           "correction_run_config", "sft_run_config"]
