"""The optimizer for distillation: clip → AdamW with warmup + cosine LR → optional grad accumulation.

Minitron's recipe: peak LR 1e-4 decaying to 1e-5 with a cosine schedule after 40 linear warmup
steps, AdamW, global-norm clipping at 1.0. `make_optimizer` builds exactly that as one optax
``GradientTransformation`` from a small, validated `OptimConfig`.

Step counting: every schedule step is one *optimizer update*. With ``accumulate_steps = k`` the
optimizer is wrapped in ``optax.MultiSteps``, which only calls the inner chain (and so only
advances the schedule) every k micro-batches, so ``warmup_steps``/``total_steps`` never need to be
multiplied by k.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import optax

__all__ = [
    "OptimSection",
    "OptimConfig",
    "make_schedule",
    "make_optimizer",
    "learning_rate_at",
    "default_weight_decay_mask",
]



@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    """The optimizer section, declared once: the run config's ``optim``, the pipeline's ``distill.optim`` and
    ``teacher_correction.optim``, and (with the run's length) :class:`minitron_jax.train.optim.OptimConfig`, which
    adds ``total_steps`` (here ``train.steps``) and ``accumulate_steps``.

    The defaults are the paper's distillation recipe (Minitron: AdamW, LR 1e-4 → 1e-5 cosine after 40 linear
    warmup steps, clipping at global norm 1.0); a config that trains for a few dozen steps states its own schedule
    (the pipeline's defaults: 3e-4 → 3e-5, 4 warmup steps)."""

    peak_lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 40
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(OptimSection):
    """Optimizer hyper-parameters: the fields of :class:`~minitron_jax.train.config.OptimSection` (declared there
    once, with the paper's defaults: peak LR 1e-4 → min LR 1e-5 cosine after 40 warmup steps, AdamW b1 0.9,
    b2 0.95, eps 1e-8, weight decay 0.1, clip 1.0) plus the run's length.

    Attributes:
      total_steps: optimizer updates in the run (required); the cosine reaches ``min_lr`` here.
      peak_lr / min_lr: LR at the end of warmup / at ``total_steps`` (and after).
      warmup_steps: linear warmup length from LR 0; must be < ``total_steps``.
      weight_decay: decoupled (AdamW) decay, applied only where the mask says (matrices).
      b1, b2, eps: Adam moments and epsilon.
      grad_clip: max global gradient norm; None disables clipping.
      accumulate_steps: micro-batches averaged per update (``optax.MultiSteps`` when > 1).
    """

    total_steps: int
    accumulate_steps: int = 1

    @classmethod
    def of(cls, section: OptimSection, total_steps: int, accumulate_steps: int = 1) -> OptimConfig:
        """The optimizer of a config's ``optim`` section for a run of ``total_steps`` updates."""
        fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(OptimSection)}
        return cls(total_steps=total_steps, accumulate_steps=accumulate_steps, **fields)

    def __post_init__(self) -> None:
        _validate(self)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _validate(cfg: OptimConfig) -> None:
    """Reject configs that would silently train wrong (negative LR, warmup past the end, ...)."""
    for name in ("total_steps", "warmup_steps", "accumulate_steps"):
        if not _is_int(getattr(cfg, name)):
            raise ValueError(f"{name} must be an int, got {getattr(cfg, name)!r}")
    if cfg.total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {cfg.total_steps}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.warmup_steps >= cfg.total_steps:
        raise ValueError(
            f"warmup_steps ({cfg.warmup_steps}) must be < total_steps ({cfg.total_steps}) "
            "so that the cosine decay has at least one step"
        )
    if cfg.accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {cfg.accumulate_steps}")
    if not cfg.peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {cfg.peak_lr}")
    if cfg.min_lr < 0:
        raise ValueError(f"min_lr must be >= 0, got {cfg.min_lr}")
    if cfg.min_lr > cfg.peak_lr:
        raise ValueError(f"min_lr ({cfg.min_lr}) must be <= peak_lr ({cfg.peak_lr})")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not cfg.eps > 0:
        raise ValueError(f"eps must be > 0, got {cfg.eps}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {cfg.grad_clip}")


def make_schedule(peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 → ``peak_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    ``lr(0) = 0``, ``lr(warmup_steps) = peak_lr``, ``lr(total_steps) = min_lr`` and constant after.
    This is exactly ``optax.warmup_cosine_decay_schedule`` (whose ``decay_steps`` counts the
    warmup too), so we use it rather than re-deriving the join.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=min_lr,
    )


def learning_rate_at(cfg: OptimConfig, step: int) -> float:
    """The LR used by optimizer update number ``step`` (0-based), for logging."""
    schedule = make_schedule(cfg.peak_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
    return float(schedule(step))


def _path_names(path) -> list[str]:
    """String names of the keys on a pytree path (dict keys, attribute names, indices)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return names


def default_weight_decay_mask(params: Any) -> Any:
    """True for weight matrices, False for norm scales and biases.

    A plain "ndim ≥ 2" rule is wrong for this codebase: per-layer params are stacked along a
    leading ``layer`` axis (under the ``layers`` key, or a heterogeneous model's ``segments``), so a stacked
    RMSNorm scale is ``[L, D]``.
    So the rule is: a leaf is decayed iff its name mentions neither "norm" nor "bias" and it has
    ≥ 2 dims *besides* the stacked layer axis. Embeddings and lm_head are matrices and are decayed.
    """

    def decide(path, leaf) -> bool:
        names = _path_names(path)
        leaf_name = names[-1].lower() if names else ""
        if "norm" in leaf_name or "bias" in leaf_name:
            return False
        per_layer_ndim = leaf.ndim - (1 if ("layers" in names or "segments" in names) else 0)
        return per_layer_ndim >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(
    cfg: OptimConfig, weight_decay_mask: Any | Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm → AdamW(schedule, masked decay), wrapped in MultiSteps if accumulating.

    Args:
      cfg: the validated `OptimConfig`.
      weight_decay_mask: pytree of bools or a callable params → bools; default
        `default_weight_decay_mask` (decay matrices only).

    Returns:
      An optax ``GradientTransformation``. With ``accumulate_steps > 1`` it averages the gradients
      of k consecutive ``update`` calls and emits zero updates on the first k−1 of them; clipping
      then applies to the *averaged* gradient, as it would for one large batch.
    """
    schedule = make_schedule(cfg.peak_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=default_weight_decay_mask if weight_decay_mask is None else weight_decay_mask,
    )
    chain = adamw if cfg.grad_clip is None else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    if cfg.accumulate_steps > 1:
        return optax.MultiSteps(chain, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
    return chain
