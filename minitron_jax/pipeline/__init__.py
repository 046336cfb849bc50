"""The whole Minitron method end to end, resumable: ``python -m minitron_jax.pipeline --config FILE [key=value ...]``.

data → teacher → (teacher correction) → importance → prune.<student> → (teacher_logits) → distill.<student> →
(sft_data → sft.<student>) → eval.<model> → (chat.<model>) → export.<student> → report, each stage's outputs under
the run directory (``runs/<name>/`` unless ``run_dir=`` says otherwise); ``export/<student>/`` is what a user takes
away (HF directory, GGUF, model cards: :mod:`~minitron_jax.pipeline.export`).

**Resume.** Every stage writes its outputs atomically (a temporary sibling renamed into place) and then a
done-marker ``stages/<stage>.json`` holding a key: a hash of the stage's own settings and of the keys of the stages
it reads. A rerun skips every stage whose marker key matches, so an interrupted pipeline continues where it
stopped; the distillation stage itself resumes from its latest Orbax checkpoint. Changing a setting (say
``distill.steps=400``) changes the keys of the stages it affects, and only those are redone (their old outputs are
replaced): the teacher, the importance pass and the pruned students are reused.

The package, bottom-up: :mod:`~minitron_jax.pipeline.config` (the YAML schema, loading, validation, the trainer's
run configs), :mod:`~minitron_jax.pipeline.store` (stage keys and done-markers), :mod:`~minitron_jax.pipeline.report`
(table, markdown, JSON, plot), :mod:`~minitron_jax.pipeline.export` (a student handed over),
:mod:`~minitron_jax.pipeline.stages` (:class:`Pipeline`: the stages in order). The command is
:mod:`minitron_jax.cli.pipeline`.

Exit codes: 0 done, 2 bad config or inputs, 3 a distillation produced a non-finite loss.
"""

from minitron_jax.fsutil import write_json_atomic
from minitron_jax.pipeline.config import (
    CorrectionConfig,
    DistillSection,
    EvalSection,
    ImportanceConfig,
    PipelineConfig,
    PipelineConfigError,
    StudentSpec,
    TextsConfig,
    config_from_dict,
    load_pipeline_config,
    prune_spec,
)
from minitron_jax.pipeline.report import plot_results, results_markdown, results_table
from minitron_jax.pipeline.stages import Pipeline, stage_names
from minitron_jax.pipeline.store import StageRecord, nondefault

__all__ = ["Pipeline", "PipelineConfig", "PipelineConfigError", "load_pipeline_config", "config_from_dict",
           "stage_names", "prune_spec", "StageRecord", "nondefault", "write_json_atomic", "results_table",
           "results_markdown", "plot_results", "TextsConfig", "CorrectionConfig", "ImportanceConfig",
           "StudentSpec", "DistillSection", "EvalSection"]
