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

Heterogeneous models (:class:`~minitron_jax.hetero.HeteroConfig`) take the same pass, layer by layer as far as each
layer goes (``hetero.hidden_states``' per-segment collections):

- **channels** ``[D]`` sum the norms that exist: a layer's attention norm when it has attention (GQA *or* linear:
  both normalise their input), its MLP norm when it has an FFN (MLP *or* linear); a removed (``none``) sub-block has
  no norm and adds nothing, so a ``none/none`` layer adds nothing at all. The final norm is excluded, as above.
- **heads** and **neurons** are *ragged*: a list of ``L`` entries, ``[H]`` for a GQA layer (query heads, HF
  order) / ``[F_l]`` for an MLP layer, ``None`` for a layer without one (:func:`unit_sizes`); :func:`ragged_flat`
  / :func:`ragged_rows` turn such a list into ``(values, offsets)`` and back (how ``importance.npz`` stores it).
- **bi** ``[L]`` over every layer (a ``none/none`` layer is the identity: 0); ``ppl``/``contiguous`` drop layers
  with ``layer_keep`` exactly as for a uniform model.

A uniform model takes the code path it always did (same numbers, bit for bit).

The object prune, NAS and the pipeline use (one calibration pass, cached scores, ``importance.npz``) is
:class:`~minitron_jax.compress.importance_cache.Importance`, built on these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import hetero
from minitron_jax.arch import AnyConfig, is_hetero
from minitron_jax.config import LlamaConfig
from minitron_jax.evaluate.perplexity import nll_sum, padded_batches
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


# ------------------------------------------------------------------------------------------------------------------
# Per-layer (ragged) scores of a heterogeneous model
# ------------------------------------------------------------------------------------------------------------------
Ragged = list  # L entries, each a 1-D array or None (the layer has no such unit)


def unit_sizes(config: AnyConfig, unit: str) -> list[int | None]:
    """How many ``unit`` (``heads``: query heads; ``neurons``: FFN channels) each layer has, None where it has no
    GQA attention / no MLP. A uniform model's list is constant."""
    if unit not in ("heads", "neurons"):
        raise ValueError(f"per-layer units are heads or neurons, not {unit!r}")
    if not is_hetero(config):
        return [config.num_heads if unit == "heads" else config.intermediate_size] * config.num_layers
    if unit == "heads":  # GQA keeps every query head whatever its KV heads: H per attending layer
        return [config.num_heads if b.attention.kind == "gqa" else None for b in config.blocks]
    return [b.ffn.width if b.ffn.kind == "mlp" else None for b in config.blocks]


def ragged_rows(flat: np.ndarray, offsets: np.ndarray) -> Ragged:
    """``(values, offsets [L + 1])`` → L rows; an empty row is None (no unit has size 0, so empty means absent)."""
    offsets = np.asarray(offsets, np.int64)
    return [flat[a:b] if b > a else None for a, b in zip(offsets[:-1], offsets[1:])]


def ragged_flat(rows: Ragged) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`ragged_rows`: the rows concatenated, and ``offsets`` [L + 1] (int64) where each row
    starts (row ``l`` is ``values[offsets[l]:offsets[l + 1]]``)."""
    sizes = [0 if r is None else len(r) for r in rows]
    parts = [np.asarray(r, np.float64) for r in rows if r is not None]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    return flat, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _split_layers(config: AnyConfig, unit: str, flat: np.ndarray) -> Ragged:
    """Per-unit values of every layer that has the unit, layer after layer → the ragged per-layer list."""
    sizes = [s or 0 for s in unit_sizes(config, unit)]
    return ragged_rows(flat, np.concatenate([[0], np.cumsum(sizes)]))


@dataclasses.dataclass
class ActivationStats:
    """What one calibration pass collects; :meth:`scores` turns it into importance for any aggregation pair."""

    config: AnyConfig
    moments: dict[tuple[str, str], Moments]  # (metric, seq_agg) → moments over samples
    bi_sum: np.ndarray  # [L] Σ over samples and tokens of 1 − cos(layer in, layer out)
    samples: int
    seq_len: int

    def scores(self, metric: str, seq_agg: str = "mean", batch_agg: str = "l2") -> np.ndarray:
        """Importance of ``metric`` (heads [L, H], neurons / neurons_preact [L, F], channels [D]); for a
        heterogeneous model heads and neurons are ragged lists (see the module docstring)."""
        check_choice("metric", metric, WIDTH_METRICS)
        check_choice("sequence aggregation", seq_agg, SEQ_AGGS)
        check_choice("batch aggregation", batch_agg, BATCH_AGGS)
        out = self.moments[(metric, seq_agg)].aggregate(batch_agg)
        if is_hetero(self.config) and metric != "channels":
            return _split_layers(self.config, "heads" if metric == "heads" else "neurons", out)
        return out.reshape(self.config.num_layers, -1) if metric == "heads" else out

    def width_scores(self, seq_agg: str = "mean", batch_agg: str = "l2", preact: bool = False) -> dict[str, np.ndarray]:
        """``{"heads", "neurons", "channels"}`` for one aggregation pair (``preact`` picks the neuron variant)."""
        return {"heads": self.scores("heads", seq_agg, batch_agg),
                "neurons": self.scores("neurons_preact" if preact else "neurons", seq_agg, batch_agg),
                "channels": self.scores("channels", seq_agg, batch_agg)}

    def block_importance(self) -> np.ndarray:
        """[L] mean over every calibration token of ``1 − cos(layer input, layer output)``."""
        return self.bi_sum / (self.samples * self.seq_len)


def check_choice(what: str, value: str, choices) -> None:
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
    """One layer's intermediates → per-sample sequence aggregates (called inside the layer scan).

    A heterogeneous layer hands over only the keys of the sub-blocks it has (``hetero.layer``), so each metric is
    taken where its input exists: heads from GQA attention, neurons from an MLP, channels from whichever norms the
    layer has (none for a ``none/none`` layer: no ``channels`` key). A Llama layer has them all, and its channels are
    ``attn + mlp`` exactly as they always were."""
    f32 = {k: v.astype(jnp.float32) for k, v in inter.items()}
    out = {}
    if "attn_heads" in f32:
        heads = jnp.linalg.norm(f32["attn_heads"], axis=-1)  # [B, T, K, G]: per-token norm over head_dim
        heads = heads.reshape(heads.shape[:2] + (-1,))  # K, G → h = k * G + g (HF's order)
        out["heads"] = _seq_aggregates(heads)
    if "mlp_act" in f32:
        out["neurons"] = _seq_aggregates(jnp.abs(f32["mlp_act"]))
        out["neurons_preact"] = _seq_aggregates(jnp.abs(f32["mlp_preact"]))
    norms = [_seq_aggregates(jnp.abs(f32[k])) for k in ("attn_norm_out", "mlp_norm_out") if k in f32]
    if norms:
        out["channels"] = {a: functools.reduce(operator.add, [n[a] for n in norms]) for a in SEQ_AGGS}
    out["bi"] = _one_minus_cos(f32["layer_in"], f32["layer_out"])
    return out


def _batch_moments(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample values [B, ...] → (weighted mean, weighted centred Σ squares) over the batch axis."""
    w = weights.reshape((-1,) + (1,) * (values.ndim - 1))
    mean = jnp.sum(w * values, axis=0) / jnp.sum(weights)
    return mean, jnp.sum(w * jnp.square(values - mean), axis=0)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def calibration_batch(config: AnyConfig, params: Params, tokens: jax.Array, weights: jax.Array,
                      dtype=jnp.float32):
    """One fixed-shape batch → batch moments of every (metric, seq_agg), and Σ of 1 − cos per layer."""
    global TRACE_COUNT
    TRACE_COUNT += 1  # runs at trace time only
    if is_hetero(config):
        return _hetero_calibration_batch(config, params, tokens, weights, dtype)
    _, per_layer, _ = hidden_states(config, params, tokens, dtype=dtype, collect=_reduce_layer)
    out = {}
    for metric in WIDTH_METRICS:
        for agg, v in per_layer[metric].items():  # [L, B, U]
            per_sample = jnp.sum(v, axis=0) if metric == "channels" else jnp.moveaxis(v, 1, 0)
            out[(metric, agg)] = _batch_moments(per_sample, weights)
    bi_sum = jnp.sum(per_layer["bi"] * weights[None, :], axis=1)
    return out, bi_sum


def _hetero_calibration_batch(hcfg, params: Params, tokens: jax.Array, weights: jax.Array, dtype):
    """:func:`calibration_batch` of a heterogeneous model (traced inside it). Per-layer units of the layers that
    have them are laid side by side, layer after layer (segment by segment), into one flat unit axis per metric —
    the order :func:`_split_layers` undoes; channels sum over every segment's norms."""
    _, per_seg, _ = hetero.hidden_states(hcfg, params, tokens, dtype=dtype, collect=_reduce_layer)
    B, D = tokens.shape[0], hcfg.hidden_size
    out = {}
    for metric in WIDTH_METRICS:
        for agg in SEQ_AGGS:
            have = [seg[metric][agg] for seg in per_seg if metric in seg]  # [n, B, U] or [n, B, D]
            if metric == "channels":
                per_sample = (functools.reduce(operator.add, [jnp.sum(v, axis=0) for v in have]) if have
                              else jnp.zeros((B, D), jnp.float32))
            else:
                per_sample = (jnp.concatenate([jnp.moveaxis(v, 1, 0).reshape(B, -1) for v in have], axis=1)
                              if have else jnp.zeros((B, 0), jnp.float32))
            out[(metric, agg)] = _batch_moments(per_sample, weights)
    bi = jnp.concatenate([seg["bi"] for seg in per_seg], axis=0)  # [L, B]
    return out, jnp.sum(bi * weights[None, :], axis=1)


def collect_activation_stats(config: AnyConfig, params: Params, windows: np.ndarray, *, batch_size: int = 8,
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
def _owned_squares(axes: tuple[str, ...], arr, want: tuple[str, ...]) -> np.ndarray:
    """Squares of ``arr`` summed over every axis not in ``want``, laid out in ``want``'s order. An axis that occurs
    twice (a heterogeneous ``[D, D]`` linear sub-block: ``embed`` on both sides) gives the unit both its row and its
    column: the sum over each occurrence."""
    sq = np.square(np.asarray(arr, np.float64))
    if len(want) == 1 and axes.count(want[0]) > 1:
        return sum(sq.sum(axis=tuple(j for j in range(len(axes)) if j != i))
                   for i, a in enumerate(axes) if a == want[0])
    other = tuple(i for i, a in enumerate(axes) if a not in want)
    kept = [a for a in axes if a in want]  # order of the remaining axes after summing
    return np.transpose(sq.sum(axis=other), [kept.index(a) for a in want])


def _hetero_weight_magnitude(hcfg, params: Params, unit: str):
    """:func:`weight_magnitude` of a heterogeneous model: channels over every array touching the residual stream;
    heads / neurons per layer, segment by segment (ragged, None where a layer has none)."""
    want = UNIT_AXES[unit]
    axes_tree = hetero.param_axes(hcfg)
    if unit == "channels":
        total = np.zeros(hcfg.hidden_size)
        flat_axes = jax.tree.leaves(axes_tree, is_leaf=lambda x: isinstance(x, tuple))
        for axes, arr in zip(flat_axes, jax.tree.leaves(params)):
            if "embed" in axes:
                total += _owned_squares(axes, arr, want)
        return np.sqrt(total)
    rows: Ragged = []
    for (start, stop, spec), seg_axes, seg in zip(hcfg.segments(), axes_tree["segments"], params["segments"]):
        n = stop - start
        sizes = hetero.segment_axis_sizes(hcfg.base, spec, n)
        if not all(a in sizes for a in want):
            rows.extend([None] * n)
            continue
        total = np.zeros(tuple(sizes[a] for a in want))
        for name, axes in seg_axes.items():
            if all(a in axes for a in want):
                total += _owned_squares(axes, seg[name], want)
        rows.extend(np.sqrt(total).reshape(n, -1))
    return rows


def _unit_shape(config: LlamaConfig, unit: str) -> tuple[int, ...]:
    sizes = axis_sizes(config)
    return tuple(sizes[a] for a in UNIT_AXES[unit])


def _as_scores(config: LlamaConfig, unit: str, values: np.ndarray) -> np.ndarray:
    """Unit-axes-shaped values → the shape importance uses (heads: [L, K, G] → [L, H])."""
    return values.reshape(config.num_layers, -1) if unit == "heads" else values


def weight_magnitude(config: AnyConfig, params: Params, unit: str) -> np.ndarray:
    """L2 norm of all the weights a unit owns: every parameter that carries all of the unit's axes contributes
    its squares summed over its other axes (e.g. a neuron: its gate and up columns and its down row; a channel:
    its entries in every matrix, norm and embedding that touches the residual stream). A heterogeneous model's
    heads and neurons come back ragged (None for a layer without them)."""
    check_choice("unit", unit, tuple(UNIT_AXES))
    if is_hetero(config):
        return _hetero_weight_magnitude(config, params, unit)
    want = UNIT_AXES[unit]
    total = np.zeros(_unit_shape(config, unit))
    flat_axes = jax.tree.leaves(param_axes(config), is_leaf=lambda x: isinstance(x, tuple))
    for axes, arr in zip(flat_axes, jax.tree.leaves(params)):
        if all(a in axes for a in want):
            total += _owned_squares(axes, arr, want)
    return _as_scores(config, unit, np.sqrt(total))


def random_scores(config: AnyConfig, unit: str, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores (a pruning baseline); each unit kind draws from its own stream."""
    check_choice("unit", unit, tuple(UNIT_AXES))
    rng = np.random.default_rng([seed, tuple(UNIT_AXES).index(unit)])
    if is_hetero(config):  # one draw for every unit of the layers that have one, then split per layer
        if unit == "channels":
            return rng.random(config.hidden_size)
        return _split_layers(config, unit, rng.random(sum(s or 0 for s in unit_sizes(config, unit))))
    return _as_scores(config, unit, rng.random(_unit_shape(config, unit)))


def width_importance(config: AnyConfig, params: Params, method: str, *, stats: ActivationStats | None = None,
                     seq_agg: str = "mean", batch_agg: str = "l2", preact: bool = False,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """``{"heads" [L, H], "neurons" [L, F], "channels" [D]}`` by ``method`` (activation needs ``stats``); for a
    heterogeneous model ``heads`` and ``neurons`` are ragged per-layer lists (:func:`unit_sizes`)."""
    check_choice("importance method", method, WIDTH_METHODS)
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
def block_drop_perplexities(config: AnyConfig, params: Params, windows: np.ndarray, block_size: int = 1, *,
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


def layer_importance(config: AnyConfig, params: Params, metric: str, *, windows: np.ndarray | None = None,
                     stats: ActivationStats | None = None, block_size: int = 1, batch_size: int = 8,
                     dtype=jnp.float32, progress: Progress | None = None) -> np.ndarray:
    """[L] per-layer scores of a depth metric (higher = more important):

    - ``bi``: Block Importance (needs ``stats``);
    - ``ppl``: perplexity with that single layer dropped (needs ``windows``);
    - ``contiguous``: perplexity with the ``block_size`` layers starting at that layer dropped, NaN where no such
      window fits (needs ``windows``); with ``block_size=1`` it equals ``ppl``.
    """
    check_choice("depth metric", metric, DEPTH_METRICS)
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
