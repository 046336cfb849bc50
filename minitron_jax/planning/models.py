"""The models a dry run plans for, from configs alone: never a weight is read.

A model reference is a local path (HF directory, ``.gguf``, minitron_jax checkpoint, or a ``config.json``), an
``asset:NAME``, or a name (an HF repo id such as ``meta-llama/Llama-3.1-8B``) looked up in
``configs/models/<name>.json`` beside the recipe or in the repository's ``configs/models``. A distillation's student
given as a pruning spec is that spec applied to the teacher's config (``compress.spec.target_config``).
"""

from __future__ import annotations

from pathlib import Path

REPO_MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"


class DryRunError(ValueError):
    """A recipe that cannot be planned (unknown model, a mesh that does not match the devices, ...)."""


def model_dirs(recipe: str | None) -> list[Path]:
    dirs = []
    if recipe:
        dirs.append(Path(recipe).resolve().parent / "models")
    dirs.append(REPO_MODELS)
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def known_models(recipe: str | None = None) -> list[str]:
    return sorted({p.stem for d in model_dirs(recipe) for p in d.glob("*.json")})


def _model_key(name: str) -> str:
    """Names compare case-insensitively and without Meta's old ``Meta-`` prefix (Meta-Llama-3.1-8B ≡ Llama-3.1-8B)."""
    key = name.lower()
    return key[5:] if key.startswith("meta-") else key


def resolve_model_config(ref: str, what: str, recipe: str | None = None, explicit: str | None = None):
    """The config of a model reference (path, HF repo id, ``asset:NAME``) without reading its weights: a
    LlamaConfig, or a HeteroConfig for a heterogeneous (DeciLM ``block_configs``) model."""
    from minitron_jax.arch import config_from_json_file

    if explicit:
        return config_from_json_file(explicit)
    if ref.endswith(".json") and Path(ref).is_file():
        return config_from_json_file(ref)
    path = Path(ref).expanduser()
    if path.exists():
        from minitron_jax.convert import read_source_config

        return read_source_config(path)
    name = path.name[:-5] if path.name.endswith(".gguf") else path.name
    for d in model_dirs(recipe):
        for p in d.glob("*.json"):
            if _model_key(p.stem) == _model_key(name):
                return config_from_json_file(p)
    if ref.startswith("asset:"):
        from minitron_jax.convert import read_source_config
        from minitron_jax.train.config import resolve_path

        try:
            return read_source_config(resolve_path(ref))
        except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
            raise DryRunError(f"cannot read the config of {what} {ref} ({e})") from None
    raise DryRunError(f"{what} {ref!r} is not a local model and no configs/models/{name}.json describes it; add "
                      f"that file (the model's HF config.json) or pass --{what}-config FILE "
                      f"(known: {', '.join(known_models(recipe)) or 'none'})")


def run_models(rc, recipe: str | None, teacher_config: str | None = None, student_config: str | None = None):
    """(student config, teacher config or None) of a run config, from configs only."""
    from minitron_jax.compress.spec import PruneSpec, check_spec, target_config

    if rc.mode == "teacher_correction":
        return resolve_model_config(rc.teacher.path, "teacher", recipe, teacher_config), None
    if rc.mode == "sft":
        student = resolve_model_config(rc.student.path, "student", recipe, student_config)
        # KD-SFT (a teacher given) runs the teacher forward every step: its weights and activations are planned too.
        teacher = resolve_model_config(rc.teacher.path, "teacher", recipe, teacher_config) if rc.uses_teacher else None
        return student, teacher
    teacher = resolve_model_config(rc.teacher.path, "teacher", recipe, teacher_config)
    if rc.student.prune is not None:
        from minitron_jax.arch import is_hetero

        if is_hetero(teacher):
            raise DryRunError(f"student.prune: the teacher {rc.teacher.path} is heterogeneous ({teacher.describe()}); "
                              "Minitron pruning needs a uniform Llama teacher (give the student as student.path)")
        spec = PruneSpec.from_dict(rc.student.prune)
        check_spec(teacher, spec)
        student = target_config(teacher, spec)
    else:
        student = resolve_model_config(rc.student.path, "student", recipe, student_config)
    return student, teacher

