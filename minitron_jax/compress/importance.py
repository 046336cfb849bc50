"""Importance of every prunable unit, from forward passes only (no gradients).

Width (one calibration pass, :func:`collect_activation_stats`):

- **heads** ``[layers, heads]`` (HF order ``h = k * G + g``): the L2 norm over ``head_dim`` of each head's attention
  output before ``o_proj``, per token;
- **neurons** ``[layers, ffn]``: ``|silu(gate) * up|`` per token (the input of ``down_proj``); ``preact=True`` uses the
  paper's variant, ``|gate pre-activation|``;
- **channels** ``[hidden]``: ``|RMSNorm output|`` per token of the two norms feeding attention and MLP in every
  layer (the final norm excluded), summed over those ``2 * layers`` norms.

Aggregation, precisely. For one sample (a calibration window of T tokens) and one unit, let ``x_1..x_T >= 0`` be
the per-token magnitudes above. The *sequence* aggregate is

- ``mean``: ``(1/T) Σ_t x_t``;  ``l2``: ``sqrt(Σ_t x_t²)``;  ``var``: ``(1/T) Σ_t (x_t − mean)²``.

Channels sum the sequence aggregates of their ``2 * layers`` norms into one value per sample. The *batch*
aggregate of those per-sample values ``s_1..s_N`` over the N calibration samples is

- ``mean``: ``(1/N) Σ_n s_n``;  ``l2``: ``sqrt(Σ_n s_n²)``;  ``var``: ``(1/N) Σ_n (s_n − mean)²``.

The paper's default is sequence ``mean``, batch ``l2``. The sequence aggregates are taken inside the layer scan (via
``hidden_states(collect=...)``), so memory never holds more than one layer's ``[B, T, ffn]``; the batch aggregates
come from running moments (count, mean, centred sum of squares) merged batch after batch, which are exact for
any number of batches. One pass collects every (sequence, batch) pair, both neuron variants and Block Importance,
so the aggregation choice is free after the fact.

Depth:

- **bi** (Block Importance, ShortGPT): ``1 − cos(layer input, layer output)`` averaged over every calibration token;
- **ppl**: calibration perplexity with one layer dropped (``layer_keep`` masks, one compile for every layer);
- **contiguous**: perplexity with each window of ``k`` consecutive layers dropped (``ppl`` is the ``k = 1`` case).

Baselines for ablation: :func:`weight_magnitude` (L2 of every weight a unit owns, read off the named-axis table)
and :func:`random_scores` (seeded).

:class:`Importance` is what prune, NAS and the pipeline use: one model, one set of calibration windows, ONE
calibration pass (run on first need), and every width and depth score derived from it, the layer-drop scans computed
on first request and cached; ``save``/``load`` as ``importance.npz``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.config import LlamaConfig
from minitron_jax.evaluate.perplexity import DTYPES, nll_sum, padded_batches
from minitron_jax.model import Params, axis_sizes, hidden_states, param_axes

SEQ_AGGS = ("mean", "l2", "var")
BATCH_AGGS = ("mean", "l2", "var")
WIDTH_METRICS = ("heads", "neurons", "neurons_preact", "channels")
WIDTH_METHODS = ("activation", "magnitude", "random")
DEPTH_METRICS = ("contiguous", "ppl", "bi")

# The logical axes that index one prunable unit (see model.PARAM_AXES); heads are (kv group, position in group).
UNIT_AXES = {
    "heads": ("layer", "kv_heads", "q_per_kv"),
    "neurons": ("layer", "mlp"),
    "channels": ("embed",),
}

# Progress callbacks receive (phase, done, total).
Progress = Callable[[str, int, int], None]

# Incremented each time the calibration pass is traced: tests assert it compiles once per model shape.
TRACE_COUNT = 0


# ------------------------------------------------------------------------------------------------------------------
# Running moments over samples
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Moments:
    """Count, mean and centred sum of squares of per-sample values, per unit (float64).

    Batches are merged with Chan et al.'s parallel update rather than raw Σx, Σx²: the same exactness over any
    number of batches, without the cancellation of ``Σx²/N − mean²`` when the variance is small."""

    n: float
    mean: np.ndarray
    m2: np.ndarray

    def merge(self, n_b: float, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n

    def aggregate(self, how: str) -> np.ndarray:
        """The batch aggregate ``how`` (mean / l2 / var, see the module docstring)."""
        var = self.m2 / self.n
        if how == "mean":
            return self.mean.copy()
        if how == "var":
            return var
        if how == "l2":
            return np.sqrt(self.n * (var + self.mean * self.mean))
        raise ValueError(f"unknown batch aggregation {how!r}; choose from {', '.join(BATCH_AGGS)}")


@dataclasses.dataclass
class ActivationStats:
    """What one calibration pass collects; :meth:`scores` turns it into importance for any aggregation pair."""

    config: LlamaConfig
    moments: dict[tuple[str, str], Moments]  # (metric, seq_agg) → moments over samples
    bi_sum: np.ndarray  # [L] Σ over samples and tokens of 1 − cos(layer in, layer out)
    samples: int
    seq_len: int

    def scores(self, metric: str, seq_agg: str = "mean", batch_agg: str = "l2") -> np.ndarray:
        """Importance of ``metric`` (heads [L, H], neurons / neurons_preact [L, F], channels [D])."""
        _check_choice("metric", metric, WIDTH_METRICS)
        _check_choice("sequence aggregation", seq_agg, SEQ_AGGS)
        _check_choice("batch aggregation", batch_agg, BATCH_AGGS)
        out = self.moments[(metric, seq_agg)].aggregate(batch_agg)
        return out.reshape(self.config.num_layers, -1) if metric == "heads" else out

    def width_scores(self, seq_agg: str = "mean", batch_agg: str = "l2", preact: bool = False) -> dict[str, np.ndarray]:
        """``{"heads", "neurons", "channels"}`` for one aggregation pair (``preact`` picks the neuron variant)."""
        return {"heads": self.scores("heads", seq_agg, batch_agg),
                "neurons": self.scores("neurons_preact" if preact else "neurons", seq_agg, batch_agg),
                "channels": self.scores("channels", seq_agg, batch_agg)}

    def block_importance(self) -> np.ndarray:
        """[L] mean over every calibration token of ``1 − cos(layer input, layer output)``."""
        return self.bi_sum / (self.samples * self.seq_len)


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


# ------------------------------------------------------------------------------------------------------------------
# The calibration pass
# ------------------------------------------------------------------------------------------------------------------
def _seq_aggregates(x: jax.Array) -> dict[str, jax.Array]:
    """Magnitudes [B, T, U] → every sequence aggregate, each [B, U] (float32)."""
    mean = jnp.mean(x, axis=1)
    return {"mean": mean,
            "l2": jnp.sqrt(jnp.sum(x * x, axis=1)),
            # Two-pass variance: the whole sequence is at hand, so no cancellation.
            "var": jnp.mean(jnp.square(x - mean[:, None]), axis=1)}


def _one_minus_cos(x: jax.Array, y: jax.Array) -> jax.Array:
    """[B, T, D] pair → Σ over tokens of 1 − cos(x_t, y_t), [B]."""
    dot = jnp.sum(x * y, axis=-1)
    norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    return jnp.sum(1.0 - dot / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny), axis=1)


def _reduce_layer(inter: dict) -> dict:
    """One layer's intermediates → per-sample sequence aggregates (called inside the layer scan)."""
    f32 = {k: v.astype(jnp.float32) for k, v in inter.items()}
    heads = jnp.linalg.norm(f32["attn_heads"], axis=-1)  # [B, T, K, G]: per-token norm over head_dim
    heads = heads.reshape(heads.shape[:2] + (-1,))  # K, G → h = k * G + g (HF's order)
    attn_norm = _seq_aggregates(jnp.abs(f32["attn_norm_out"]))
    mlp_norm = _seq_aggregates(jnp.abs(f32["mlp_norm_out"]))
    return {
        "heads": _seq_aggregates(heads),
        "neurons": _seq_aggregates(jnp.abs(f32["mlp_act"])),
        "neurons_preact": _seq_aggregates(jnp.abs(f32["mlp_preact"])),
        "channels": {a: attn_norm[a] + mlp_norm[a] for a in SEQ_AGGS},
        "bi": _one_minus_cos(f32["layer_in"], f32["layer_out"]),
    }


def _batch_moments(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample values [B, ...] → (weighted mean, weighted centred Σ squares) over the batch axis."""
    w = weights.reshape((-1,) + (1,) * (values.ndim - 1))
    mean = jnp.sum(w * values, axis=0) / jnp.sum(weights)
    return mean, jnp.sum(w * jnp.square(values - mean), axis=0)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def calibration_batch(config: LlamaConfig, params: Params, tokens: jax.Array, weights: jax.Array,
                      dtype=jnp.float32):
    """One fixed-shape batch → batch moments of every (metric, seq_agg), and Σ of 1 − cos per layer."""
    global TRACE_COUNT
    TRACE_COUNT += 1  # runs at trace time only
    _, per_layer, _ = hidden_states(config, params, tokens, dtype=dtype, collect=_reduce_layer)
    out = {}
    for metric in WIDTH_METRICS:
        for agg, v in per_layer[metric].items():  # [L, B, U]
            per_sample = jnp.sum(v, axis=0) if metric == "channels" else jnp.moveaxis(v, 1, 0)
            out[(metric, agg)] = _batch_moments(per_sample, weights)
    bi_sum = jnp.sum(per_layer["bi"] * weights[None, :], axis=1)
    return out, bi_sum


def collect_activation_stats(config: LlamaConfig, params: Params, windows: np.ndarray, *, batch_size: int = 8,
                             dtype=jnp.float32, progress: Progress | None = None) -> ActivationStats:
    """Run the calibration windows [N, T] through the model once and return :class:`ActivationStats`.

    One compiled function for every batch (fixed shape; the last batch is padded with zero-weight rows)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"calibration windows must be a non-empty [N, T] array, got shape {windows.shape}")
    params = jax.device_put(params)
    batch_size = min(batch_size, len(windows))  # fewer windows than a batch: no compute spent on padding rows
    moments: dict[tuple[str, str], Moments] = {}
    bi_sum = np.zeros(config.num_layers)
    for tokens, weights, done in padded_batches(windows, batch_size):
        batch, bi = calibration_batch(config, params, tokens, weights, dtype=dtype)
        n_b = float(weights.sum())
        for key, (mean_b, m2_b) in jax.device_get(batch).items():
            mean_b, m2_b = np.asarray(mean_b, np.float64), np.asarray(m2_b, np.float64)
            if key in moments:
                moments[key].merge(n_b, mean_b, m2_b)
            else:
                moments[key] = Moments(n_b, mean_b, m2_b)
        bi_sum += np.asarray(bi, np.float64)
        if progress:
            progress("calibration", done, len(windows))
    return ActivationStats(config, moments, bi_sum, samples=len(windows), seq_len=windows.shape[1])


# ------------------------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------------------------
def _unit_shape(config: LlamaConfig, unit: str) -> tuple[int, ...]:
    sizes = axis_sizes(config)
    return tuple(sizes[a] for a in UNIT_AXES[unit])


def _as_scores(config: LlamaConfig, unit: str, values: np.ndarray) -> np.ndarray:
    """Unit-axes-shaped values → the shape importance uses (heads: [L, K, G] → [L, H])."""
    return values.reshape(config.num_layers, -1) if unit == "heads" else values


def weight_magnitude(config: LlamaConfig, params: Params, unit: str) -> np.ndarray:
    """L2 norm of all the weights a unit owns: every parameter that carries all of the unit's axes contributes
    its squares summed over its other axes (e.g. a neuron: its gate and up columns and its down row; a channel:
    its entries in every matrix, norm and embedding that touches the residual stream)."""
    _check_choice("unit", unit, tuple(UNIT_AXES))
    want = UNIT_AXES[unit]
    total = np.zeros(_unit_shape(config, unit))
    flat_axes = jax.tree.leaves(param_axes(config), is_leaf=lambda x: isinstance(x, tuple))
    for axes, arr in zip(flat_axes, jax.tree.leaves(params)):
        if not all(a in axes for a in want):
            continue
        sq = np.square(np.asarray(arr, np.float64))
        other = tuple(i for i, a in enumerate(axes) if a not in want)
        kept = [a for a in axes if a in want]  # order of the remaining axes after summing
        total += np.transpose(sq.sum(axis=other), [kept.index(a) for a in want])
    return _as_scores(config, unit, np.sqrt(total))


def random_scores(config: LlamaConfig, unit: str, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores (a pruning baseline); each unit kind draws from its own stream."""
    _check_choice("unit", unit, tuple(UNIT_AXES))
    rng = np.random.default_rng([seed, tuple(UNIT_AXES).index(unit)])
    return _as_scores(config, unit, rng.random(_unit_shape(config, unit)))


def width_importance(config: LlamaConfig, params: Params, method: str, *, stats: ActivationStats | None = None,
                     seq_agg: str = "mean", batch_agg: str = "l2", preact: bool = False,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """``{"heads" [L, H], "neurons" [L, F], "channels" [D]}`` by ``method`` (activation needs ``stats``)."""
    _check_choice("importance method", method, WIDTH_METHODS)
    if method == "activation":
        if stats is None:
            raise ValueError("activation importance needs the ActivationStats of a calibration pass")
        return stats.width_scores(seq_agg, batch_agg, preact)
    if method == "magnitude":
        return {u: weight_magnitude(config, params, u) for u in UNIT_AXES}
    return {u: random_scores(config, u, seed) for u in UNIT_AXES}


# ------------------------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------------------------
def block_drop_perplexities(config: LlamaConfig, params: Params, windows: np.ndarray, block_size: int = 1, *,
                            batch_size: int = 8, dtype=jnp.float32,
                            progress: Progress | None = None) -> np.ndarray:
    """[L − k + 1]: perplexity on ``windows`` with layers ``s .. s + k − 1`` dropped, for every start ``s``.

    Dropping is a ``layer_keep`` mask (the block's residual updates multiplied by 0, an exact identity), so every
    window runs through the same compiled function as the full model."""
    L = config.num_layers
    if not 1 <= block_size < L:
        raise ValueError(f"block size must be in [1, {L - 1}] for a {L}-layer model, got {block_size}")
    params = jax.device_put(params)
    batch_size = min(batch_size, len(windows))  # fewer windows than a batch: no compute spent on padding rows
    starts = range(L - block_size + 1)
    out = np.empty(len(starts))
    for s in starts:
        keep = np.ones(L, np.float32)
        keep[s:s + block_size] = 0.0
        total, count = nll_sum(config, params, windows, batch_size=batch_size, dtype=dtype, layer_keep=keep)
        out[s] = math.exp(total / count)
        if progress:
            progress(f"drop {block_size} layer{'s' if block_size > 1 else ''}", s + 1, len(starts))
    return out


def layer_importance(config: LlamaConfig, params: Params, metric: str, *, windows: np.ndarray | None = None,
                     stats: ActivationStats | None = None, block_size: int = 1, batch_size: int = 8,
                     dtype=jnp.float32, progress: Progress | None = None) -> np.ndarray:
    """[L] per-layer scores of a depth metric (higher = more important):

    - ``bi``: Block Importance (needs ``stats``);
    - ``ppl``: perplexity with that single layer dropped (needs ``windows``);
    - ``contiguous``: perplexity with the ``block_size`` layers starting at that layer dropped, NaN where no such
      window fits (needs ``windows``); with ``block_size=1`` it equals ``ppl``.
    """
    _check_choice("depth metric", metric, DEPTH_METRICS)
    if metric == "bi":
        if stats is None:
            raise ValueError("Block Importance needs the ActivationStats of a calibration pass")
        return stats.block_importance()
    if windows is None:
        raise ValueError(f"depth metric {metric!r} needs calibration windows")
    k = 1 if metric == "ppl" else block_size
    scores = np.full(config.num_layers, np.nan)
    ppl = block_drop_perplexities(config, params, windows, k, batch_size=batch_size, dtype=dtype, progress=progress)
    scores[: len(ppl)] = ppl
    return scores


# ------------------------------------------------------------------------------------------------------------------
# One object: one calibration pass, every score derived from it
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How importance is measured (the fields prune's ``PruneSpec`` and the pipeline's ``importance`` section share).

    At most ``calib_samples`` windows of ``seq_len`` tokens of the calibration text (``data.token_windows``), run
    ``batch_size`` at a time in ``dtype``. Width scores aggregate over tokens by ``seq_agg``, then over windows by
    ``batch_agg``; ``preact`` ranks neurons by the gate pre-activation. The layer-drop scans (``ppl``,
    ``contiguous``) run on the first ``depth_samples`` windows (None: all of them)."""

    calib_samples: int = 16
    seq_len: int = 256
    batch_size: int = 8
    depth_samples: int | None = None
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    preact: bool = False
    dtype: str = "float32"


def calibration_windows(tokenizer, text: str, settings: CalibrationSettings) -> np.ndarray:
    """At most ``calib_samples`` windows of ``seq_len`` tokens, by the shared text rules of ``minitron_jax.data``."""
    from minitron_jax.data import token_windows

    return token_windows(tokenizer, text, settings.seq_len, settings.calib_samples * settings.seq_len)


_WIDTH_KEYS = ("heads", "neurons", "channels")
_LAYERS_KEY = re.compile(r"layers_(\w+)_(\d+)")


class Importance:
    """The importance of one model's units: one calibration pass, every score derived from it.

    - :meth:`activation_stats`: the calibration pass (:func:`collect_activation_stats`), run on first need, once;
    - :meth:`width`: ``{"heads", "neurons", "channels"}`` for any method and aggregation (activation: free after
      the pass; ``magnitude``/``random``: from the weights);
    - :meth:`layers`: ``[L]`` depth scores of a metric for dropping ``k`` layers, computed on first request and
      cached (``bi`` comes free with the pass; the ``ppl``/``contiguous`` layer-drop scans are the expensive part;
      ``bi`` and ``ppl`` do not depend on ``k``, so one scan serves every ``k``);
    - :meth:`save` / :meth:`load`: ``importance.npz`` with ``heads``, ``neurons``, ``channels`` (the settings'
      aggregation), ``bi`` and ``layers_<metric>_<k>`` for every layer score asked for. A loaded object serves
      those arrays only (it holds no model).

    ``timings`` holds the seconds of each computation: ``calibration_pass_s`` and ``layers_<metric>_<k>_s`` (0 for a
    request served by the scan of another ``k``).
    """

    def __init__(self, config: LlamaConfig | None, params: Params | None, windows: np.ndarray | None,
                 settings: CalibrationSettings = CalibrationSettings()):
        self.config, self.params, self.windows, self.settings = config, params, windows, settings
        self.timings: dict[str, float] = {}
        self._stats: ActivationStats | None = None
        self._width: dict[str, np.ndarray] | None = None  # a loaded file's width scores
        self._layers: dict[tuple[str, int], np.ndarray] = {}  # (metric, k or 1 where k does not matter) → [L]
        self._asked: list[tuple[str, int]] = []  # (metric, k) in the order asked for: what save() writes

    @classmethod
    def from_text(cls, config: LlamaConfig, params: Params, tokenizer, text: str,
                  settings: CalibrationSettings = CalibrationSettings()) -> Importance:
        """Calibration windows from ``text``; nothing is computed until a score is asked for."""
        return cls(config, params, calibration_windows(tokenizer, text, settings), settings)

    @classmethod
    def calibrate(cls, config: LlamaConfig, params: Params, tokenizer, text: str,
                  settings: CalibrationSettings = CalibrationSettings(), *,
                  progress: Progress | None = None) -> Importance:
        """Calibration windows from ``text`` and the calibration pass over them."""
        out = cls.from_text(config, params, tokenizer, text, settings)
        out.activation_stats(progress)
        return out

    @property
    def _dtype(self):
        return DTYPES[self.settings.dtype]

    @property
    def depth_windows(self) -> np.ndarray | None:
        """The windows of the layer-drop scans: the first ``depth_samples`` calibration windows."""
        n = self.settings.depth_samples
        return self.windows if self.windows is None or n is None else self.windows[:n]

    def activation_stats(self, progress: Progress | None = None) -> ActivationStats:
        """The calibration pass over every window (run on the first call only)."""
        if self._stats is None:
            if self.windows is None or self.params is None:
                raise ValueError("activation importance needs the ActivationStats of a calibration pass "
                                 "(calibration windows and the model)")
            t0 = time.perf_counter()
            self._stats = collect_activation_stats(self.config, self.params, self.windows,
                                                   batch_size=self.settings.batch_size, dtype=self._dtype,
                                                   progress=progress)
            self.timings["calibration_pass_s"] = time.perf_counter() - t0
        return self._stats

    def width(self, method: str = "activation", *, seq_agg: str | None = None, batch_agg: str | None = None,
              preact: bool | None = None, seed: int = 0, progress: Progress | None = None) -> dict[str, np.ndarray]:
        """``{"heads" [L, H], "neurons" [L, F], "channels" [D]}`` by ``method``; the aggregation defaults to the
        settings'."""
        s = self.settings
        seq_agg, batch_agg = seq_agg or s.seq_agg, batch_agg or s.batch_agg
        preact = s.preact if preact is None else preact
        if self._width is not None and method == "activation":
            if (seq_agg, batch_agg, preact) != (s.seq_agg, s.batch_agg, s.preact):
                raise ValueError(f"these saved scores hold the {s.seq_agg}/{s.batch_agg} aggregation only")
            return dict(self._width)
        stats = self.activation_stats(progress) if method == "activation" else None
        return width_importance(self.config, self.params, method, stats=stats, seq_agg=seq_agg, batch_agg=batch_agg,
                                preact=preact, seed=seed)

    def block_importance(self, progress: Progress | None = None) -> np.ndarray:
        """[L] Block Importance (from the calibration pass)."""
        if ("bi", 1) in self._layers:
            return self._layers[("bi", 1)].copy()
        return self.activation_stats(progress).block_importance()

    def layers(self, metric: str, k: int = 1, *, progress: Progress | None = None) -> np.ndarray:
        """[L] scores of depth ``metric`` for dropping ``k`` layers (higher = more important; see
        :func:`layer_importance`), computed on the first request and cached."""
        _check_choice("depth metric", metric, DEPTH_METRICS)
        key = (metric, k if metric == "contiguous" else 1)
        if (metric, k) not in self._asked:
            self._asked.append((metric, k))
        if key not in self._layers:
            if self.params is None:
                raise ValueError(f"these saved scores hold no {metric} layer scores for dropping {k} layers")
            t0 = time.perf_counter()
            stats = self.activation_stats(progress) if metric == "bi" else None
            self._layers[key] = layer_importance(self.config, self.params, metric, windows=self.depth_windows,
                                                 stats=stats, block_size=k, batch_size=self.settings.batch_size,
                                                 dtype=self._dtype, progress=progress)
            self.timings[f"layers_{metric}_{k}_s"] = time.perf_counter() - t0
        self.timings.setdefault(f"layers_{metric}_{k}_s", 0.0)  # served by a scan done for another k
        return self._layers[key].copy()

    def arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`save` writes: width scores, ``bi``, and ``layers_<metric>_<k>`` for every layer score asked
        for (in the order asked)."""
        out = dict(self.width())
        out["bi"] = self.block_importance()
        for metric, k in self._asked:
            out[f"layers_{metric}_{k}"] = self.layers(metric, k)
        return out

    def save(self, path: str | Path) -> Path:
        """Write :meth:`arrays` to ``path`` (an ``.npz``; float32)."""
        np.savez(path, **{k: np.asarray(v, np.float32) for k, v in self.arrays().items()})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, settings: CalibrationSettings = CalibrationSettings()) -> Importance:
        """Scores saved by :meth:`save` (``settings``: the aggregation they were saved with)."""
        out = cls(None, None, None, settings)
        with np.load(path) as z:
            if all(k in z for k in _WIDTH_KEYS):
                out._width = {k: z[k] for k in _WIDTH_KEYS}
            if "bi" in z:
                out._layers[("bi", 1)] = z["bi"]
            for name in z.files:
                m = _LAYERS_KEY.fullmatch(name)
                if m and m.group(1) in DEPTH_METRICS:
                    metric, k = m.group(1), int(m.group(2))
                    out._layers[(metric, k if metric == "contiguous" else 1)] = z[name]
                    out._asked.append((metric, k))
        return out
