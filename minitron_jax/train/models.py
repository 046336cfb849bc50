"""The models of a run: which model is trained, which one teaches, and the tokenizer they share.

==================== ============================== ======================= ==============================
mode                 trained model                  teacher                 tokenizer (data + export)
==================== ============================== ======================= ==============================
distill              ``student.path``, or the        ``teacher.path``        the teacher's
                     teacher pruned by
                     ``student.prune``
teacher_correction   the teacher itself (CE)        none                    the teacher's
sft                  ``student.path`` (CE on        none; for KD-SFT        the student's
                     assistant tokens; with a       ``teacher.path`` (same
                     teacher, the loss section's    tokenizer)
                     KD on those tokens)
==================== ============================== ======================= ==============================

A resumed run does not load (or re-prune) the trained model: its config comes from the run directory and its
params from the checkpoint.

Pruning is not done here: ``train/`` never imports ``compress/``. A student given as ``student.prune`` is built by
the ``prune_student`` function the caller passes (:data:`StudentPruner`; the distill command passes
``minitron_jax.compress.prune.prune_student``), and only on a fresh start.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from minitron_jax.arch import AnyConfig, is_hetero
from minitron_jax.model import Params
from minitron_jax.train.config import RunConfig, RunConfigError, resolve_path


@dataclasses.dataclass
class RunModels:
    student_config: AnyConfig
    student_params: Params | None  # host numpy; None when resuming (the checkpoint has them)
    teacher_config: AnyConfig | None
    teacher_params: Params | None
    tokenizer: Any
    prune_report: Any = None


def check_compatible(teacher_config: AnyConfig, student_config: AnyConfig, teacher_tokenizer: Any,
                     student_tokenizer: Any, *, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Refuse to distill across vocabularies: the logit losses compare distributions over the same token ids."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise RunConfigError(f"{teacher_name} and {student_name} have different vocabularies "
                             f"({teacher_config.vocab_size} vs {student_config.vocab_size} tokens): logit "
                             "distillation needs the same tokenizer; prune the student from this teacher or pick "
                             "models of one family")
    if teacher_tokenizer is not None and student_tokenizer is not None:
        from minitron_jax.data import tokenizer_fingerprint

        if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(student_tokenizer):
            raise RunConfigError(f"{teacher_name} and {student_name} use different tokenizers (same vocabulary "
                                 "size, different tokenization): logit distillation needs identical token ids")


def _load(path: str, what: str, progress: Callable[[str], None] | None = None):
    from minitron_jax.convert import load_model

    resolved = resolve_path(path)
    try:
        return load_model(resolved)
    except (FileNotFoundError, ValueError) as e:
        raise RunConfigError(f"cannot load {what} from {path}: {e}") from None


def _describe(path: str, what: str):
    """A model's config and tokenizer without its weights (a ``LoadedModel`` with ``params=None``)."""
    from minitron_jax.convert import (
        LoadedModel,
        detect_format,
        gguf_tokenizer_dir,
        load_tokenizer,
        read_source_config,
    )

    resolved = Path(resolve_path(path))
    try:
        fmt = detect_format(resolved)
        config = read_source_config(resolved, fmt)
        tokenizer = load_tokenizer(gguf_tokenizer_dir(resolved) if fmt == "gguf" else resolved)
    except (FileNotFoundError, ValueError) as e:
        raise RunConfigError(f"cannot load {what} from {path}: {e}") from None
    return LoadedModel(config, None, tokenizer, resolved, fmt)


def load_teacher(rc: RunConfig, *, weights: bool = True):
    """The run's teacher with its tokenizer (the data is tokenized with it); ``weights=False`` reads only its config
    and tokenizer (a run whose teacher outputs come from ``teacher.logits_cache``)."""
    teacher = _load(rc.teacher.path, "teacher") if weights else _describe(rc.teacher.path, "teacher")
    if teacher.tokenizer is None:
        raise RunConfigError(f"the teacher at {rc.teacher.path} carries no tokenizer; the data is tokenized with it")
    return teacher


# (teacher LoadedModel, student.prune options, student.calib resolved to a path, log) → (student config, params,
# pruning report); raises ValueError / FileNotFoundError for a bad spec or calibration text.
StudentPruner = Callable[[Any, dict, str, Callable[[str], None]], tuple[AnyConfig, Params, Any]]


def _pruned_student(rc: RunConfig, teacher, prune_student: StudentPruner | None, log: Callable[[str], None]):
    """The teacher pruned by ``student.prune`` (PruneSpec fields), with ``student.calib`` as calibration text."""
    if prune_student is None:
        raise RunConfigError("student.prune: this trainer was given no pruning function (prune_student); run "
                             "python -m minitron_jax.distill, or pass minitron_jax.compress.prune.prune_student")
    if is_hetero(teacher.config):
        # Minitron pruning slices one stack of identical layers; a heterogeneous teacher has none.
        raise RunConfigError(f"student.prune: the teacher at {rc.teacher.path} is heterogeneous "
                             f"({teacher.config.describe()}); Minitron pruning needs a uniform Llama teacher "
                             "(give the student as student.path)")
    try:
        return prune_student(teacher, rc.student.prune, resolve_path(rc.student.calib), log)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        raise RunConfigError(f"student.prune: {e}") from None


def load_run_models(rc: RunConfig, resume_from: Path | None, log: Callable[[str], None] = print, *,
                    prune_student: StudentPruner | None = None) -> RunModels:
    """Load (or, when resuming from the run dir ``resume_from``, only describe) the models of a run;
    ``prune_student`` builds a student given as ``student.prune`` (see :data:`StudentPruner`)."""
    from minitron_jax.convert import load_tokenizer
    from minitron_jax.train.checkpoints import STUDENT_DIR, read_run_models

    if rc.mode == "sft":
        if resume_from is not None:
            config, _ = read_run_models(resume_from)
            params, tokenizer = None, load_tokenizer(resume_from / STUDENT_DIR)
        else:
            student = _load(rc.student.path, "student")
            if student.tokenizer is None:
                raise RunConfigError(f"sft needs the student's tokenizer (chat template); {rc.student.path} has none")
            config, params, tokenizer = student.config, student.params, student.tokenizer
        if not rc.uses_teacher:
            return RunModels(config, params, None, None, tokenizer)
        # KD-SFT: the teacher's distribution on the same assistant tokens (the chat rows' loss_mask), so the same
        # vocabulary and tokenization as the student's are required; the rows are rendered with the student's
        # chat template.
        teacher = load_teacher(rc)
        check_compatible(teacher.config, config, teacher.tokenizer, tokenizer)
        return RunModels(config, params, teacher.config, teacher.params, tokenizer)

    if resume_from is not None and rc.mode == "teacher_correction":
        config, _ = read_run_models(resume_from)
        return RunModels(config, None, None, None, load_tokenizer(resume_from / STUDENT_DIR))

    # With teacher.logits_cache the teacher's outputs come from disk: its weights are read only to prune a student.
    cached = rc.mode == "distill" and rc.teacher.logits_cache is not None
    teacher = load_teacher(rc, weights=not cached or (resume_from is None and rc.student.prune is not None))
    if rc.mode == "teacher_correction":
        return RunModels(teacher.config, teacher.params, None, None, teacher.tokenizer)

    report = None
    if resume_from is not None:
        student_config, _ = read_run_models(resume_from)
        student_params, student_tokenizer = None, load_tokenizer(resume_from / STUDENT_DIR)
    elif rc.student.path is not None:
        student = _load(rc.student.path, "student")
        student_config, student_params, student_tokenizer = student.config, student.params, student.tokenizer
    else:
        student_config, student_params, report = _pruned_student(rc, teacher, prune_student, log)
        student_tokenizer = teacher.tokenizer
    check_compatible(teacher.config, student_config, teacher.tokenizer, student_tokenizer)
    return RunModels(student_config, student_params, teacher.config, None if cached else teacher.params,
                     teacher.tokenizer, report)
