"""What a pruning asks for: :class:`PruneSpec` (target sizes and how to rank), and whether it can be built.

:func:`check_spec` refuses, before any work, a size that cannot be built from a model's config;
:func:`target_config` gives the pruned config from the sizes alone (no calibration needed);
:func:`check_drop_list` validates an explicit list of layers to drop.

A heterogeneous model (:class:`~minitron_jax.hetero.HeteroConfig`) can be pruned by hidden size (``hidden``: one
residual stream, shared by every layer) and by depth (``drop_layers`` / ``layers``) only: it has no single FFN
width, KV-head count or query-head count to slice to (:data:`HETERO_OPTIONS`); per-layer widths are what the
layer-by-layer search (``python -m minitron_jax.puzzle``) chooses. The recipe that runs a spec (calibrate, rank,
slice) is :func:`minitron_jax.compress.prune.prune_from_spec`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from minitron_jax.arch import AnyConfig, is_hetero
from minitron_jax.compress import importance as imp
from minitron_jax.compress.importance_cache import CalibrationSettings
from minitron_jax.config import ConfigError, LlamaConfig
from minitron_jax.evaluate.perplexity import DTYPES


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """Target sizes (None keeps a dimension) and how to rank.

    Attributes:
      hidden, ffn: target hidden and FFN sizes.
      heads_per_group: query heads to keep in each KV group (``heads``: the same as a total, a multiple of K).
      drop_layers: number of layers to remove, chosen by ``depth_metric``; ``layers``: exactly which to remove.
      depth_metric: ``contiguous`` (best window of consecutive layers by calibration perplexity), ``ppl`` (the
        layers whose single removal hurts perplexity least) or ``bi`` (lowest Block Importance).
      importance: width ranking by ``activation`` (calibration pass), weight ``magnitude`` or seeded ``random``.
      seq_agg, batch_agg: activation aggregation over tokens, then samples (see ``minitron_jax.compress.importance``).
      preact: rank neurons by the gate pre-activation (the paper's variant) instead of ``silu(gate) * up``.
      calib_samples, seq_len: calibration windows (at most ``calib_samples`` windows of ``seq_len`` tokens).
      batch_size: calibration batch size; seed: for ``random``; dtype: compute dtype of calibration.
    """

    hidden: int | None = None
    ffn: int | None = None
    heads_per_group: int | None = None
    heads: int | None = None
    drop_layers: int | None = None
    layers: tuple[int, ...] | None = None
    depth_metric: str = "contiguous"
    importance: str = "activation"
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    preact: bool = False
    calib_samples: int = 1024
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        for name, choices in (("depth_metric", imp.DEPTH_METRICS), ("importance", imp.WIDTH_METHODS),
                              ("seq_agg", imp.SEQ_AGGS), ("batch_agg", imp.BATCH_AGGS), ("dtype", tuple(DTYPES))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("hidden", "ffn", "heads_per_group", "heads"):
            _check_int(name, getattr(self, name), minimum=1, optional=True)
        _check_int("drop_layers", self.drop_layers, minimum=0, optional=True)
        for name in ("calib_samples", "seq_len", "batch_size"):
            _check_int(name, getattr(self, name), minimum=2 if name == "seq_len" else 1)
        _check_int("seed", self.seed, minimum=0)
        if self.drop_layers is not None and self.layers is not None:
            raise ValueError("give either drop_layers (how many, chosen by a metric) or layers (which), not both")
        if self.heads is not None and self.heads_per_group is not None:
            raise ValueError("give either heads or heads_per_group, not both")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneSpec:
        """From a dict of field names (``-`` or ``_``), refusing unknown keys by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - fields)
        if unknown:
            raise ValueError(f"unknown prune option(s): {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        return cls(**norm)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @property
    def prunes_width(self) -> bool:
        return any(x is not None for x in (self.hidden, self.ffn, self.heads_per_group, self.heads))

    @property
    def ranks_layers(self) -> bool:
        return bool(self.drop_layers)

    @property
    def needs_calibration(self) -> bool:
        return (self.prunes_width and self.importance == "activation") or self.ranks_layers

    @property
    def calibration(self) -> CalibrationSettings:
        """How importance is measured for this spec (the layer scans use every calibration window)."""
        return CalibrationSettings(calib_samples=self.calib_samples, seq_len=self.seq_len,
                                   batch_size=self.batch_size, seq_agg=self.seq_agg, batch_agg=self.batch_agg,
                                   preact=self.preact, dtype=self.dtype)


def _check_int(name: str, value, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def resolve_heads_per_group(config: LlamaConfig, spec: PruneSpec) -> int | None:
    """Target query heads per KV group (from ``heads_per_group`` or a total ``heads``), or None to keep them."""
    if spec.heads is None:
        return spec.heads_per_group
    if spec.heads % config.num_kv_heads:
        raise ConfigError(f"heads={spec.heads} is not divisible across the {config.num_kv_heads} KV groups: every "
                          f"group must keep the same number of query heads (try a multiple of {config.num_kv_heads})")
    return spec.heads // config.num_kv_heads


# What a heterogeneous model can be pruned by: the residual stream and the layer list are shared by every kind of
# layer; FFN widths and head counts are per layer (and a layer may have none), so there is no one target to slice to.
HETERO_OPTIONS = ("hidden", "drop_layers", "layers")


def check_spec(config: AnyConfig, spec: PruneSpec) -> None:
    """Refuse, with a ConfigError naming the size, anything that cannot be built from ``config`` (for a
    heterogeneous model also any option other than :data:`HETERO_OPTIONS`)."""
    hetero = is_hetero(config)
    if hetero:
        asked = [f"{name}={getattr(spec, name)}" for name in ("ffn", "heads", "heads_per_group")
                 if getattr(spec, name) is not None]
        if asked:
            raise ConfigError(f"{', '.join(asked)}: a heterogeneous model ({config.describe()}) can be pruned by "
                              f"{', '.join(HETERO_OPTIONS)} only (its FFN widths and heads are per layer); choose "
                              "per-layer widths with python -m minitron_jax.puzzle")

    def at_most(name, value, limit, what):
        if value is not None and value > limit:
            raise ConfigError(f"{name}={value} exceeds the model's {what} ({limit}): pruning cannot grow a model")

    at_most("hidden", spec.hidden, config.hidden_size, "hidden size")
    if not hetero:
        at_most("ffn", spec.ffn, config.intermediate_size, "FFN size")
        at_most("heads", spec.heads, config.num_heads, "number of attention heads")
        g = resolve_heads_per_group(config, spec)
        at_most("heads_per_group", g, config.q_per_kv, "query heads per KV group")
    if spec.drop_layers is not None and spec.drop_layers >= config.num_layers:
        raise ConfigError(f"drop_layers={spec.drop_layers} leaves no layer of a {config.num_layers}-layer model")
    if spec.layers is not None:
        check_drop_list(config, spec.layers)
    if not hetero:
        _ = target_config(config, spec).hf_architecture  # refuses now what could not be exported to HF at the end
    # (A heterogeneous model needs no export check: its blocks are its own, which its DeciLM config.json already
    # expresses, and the hidden size does not enter what that layout needs.)


def target_config(config: AnyConfig, spec: PruneSpec) -> AnyConfig:
    """The pruned model's config: fixed by the target sizes alone, before any importance is computed.

    For a heterogeneous model the blocks that remain depend on *which* layers go, so a ``drop_layers`` chosen by a
    metric has no config before ranking (ConfigError); ``hidden`` and an explicit ``layers`` list have one."""
    if is_hetero(config):
        from minitron_jax.hetero import HeteroConfig

        if spec.drop_layers:
            raise ConfigError(f"which {spec.drop_layers} layers of a heterogeneous model go (and so its blocks) is "
                              f"known only after ranking by {spec.depth_metric}; give layers= to fix them")
        drop = set(check_drop_list(config, spec.layers or ()))
        return HeteroConfig(config.base.replace(hidden_size=spec.hidden or config.hidden_size),
                            tuple(b for i, b in enumerate(config.blocks) if i not in drop))
    g = resolve_heads_per_group(config, spec)
    n_drop = len(spec.layers) if spec.layers is not None else (spec.drop_layers or 0)
    return config.replace(
        hidden_size=spec.hidden or config.hidden_size,
        intermediate_size=spec.ffn or config.intermediate_size,
        num_heads=config.num_kv_heads * (g or config.q_per_kv),
        num_layers=config.num_layers - n_drop,
    )


def check_drop_list(config: AnyConfig, drop: Sequence[int]) -> list[int]:
    """Validated, sorted layer indices to drop (in range, no duplicates, at least one layer left)."""
    drop = [int(i) for i in drop]
    L = config.num_layers
    bad = [i for i in drop if not 0 <= i < L]
    if bad:
        raise ConfigError(f"layer indices {bad} out of range for a {L}-layer model (0..{L - 1})")
    if len(set(drop)) != len(drop):
        raise ConfigError(f"layer indices to drop contain duplicates: {drop}")
    if len(drop) >= L:
        raise ConfigError(f"cannot drop {len(drop)} layers of a {L}-layer model: at least one must remain")
    return sorted(drop)
