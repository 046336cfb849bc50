"""Structured pruning as pure functions ``(config, params, kept indices) → (config', params')``.

Everything rests on one generic operation, :func:`keep_along_axis`: keep some indices along one *logical* axis
(``model.param_axes``) in every parameter that has that axis. Width and depth are that operation on one axis each:

=================  ===========  ======================================================================================
dimension          axis         indices
=================  ===========  ======================================================================================
hidden size        ``embed``    [D'] shared by every layer (the residual stream: norms, embedding, lm_head, …)
FFN size           ``mlp``      [L, F'] each layer its own neurons
attention heads    ``q_per_kv`` [L, K, G'] per layer and KV group, so every group keeps the same count (GQA);
                                KV heads and head_dim are kept, as the paper does for Llama-3.1
depth              ``layer``    [L'] the layers kept
=================  ===========  ======================================================================================

A heterogeneous model (:class:`~minitron_jax.hetero.HeteroConfig`) is pruned by hidden size and depth only
(:data:`~minitron_jax.compress.spec.HETERO_OPTIONS`): :func:`prune_hidden` keeps the same channels on the ``embed``
axis of every segment (both sides of a linear sub-block's ``[D, D]``), :func:`drop_layers` removes layers and
rebuilds the segments from the blocks that remain. Its FFN widths and heads are per layer: the layer-by-layer
search (``python -m minitron_jax.puzzle``) chooses those. The pruned model is heterogeneous and saves as one (an HF
DeciLM directory, ``convert.save_hf``).

Ranks come from :mod:`minitron_jax.compress.importance` (one
:class:`~minitron_jax.compress.importance_cache.Importance` object); a :class:`~minitron_jax.compress.spec.PruneSpec`
+ :func:`prune_from_spec` run the whole recipe (calibrate, rank, slice);
:func:`prune_student` is what the distill command hands the trainer to build a student given as ``student.prune``.

The command is ``python -m minitron_jax.prune`` (:mod:`minitron_jax.cli.prune`, docs/pruning.md); its output is
what :func:`save_pruned` writes: a directory with an HF model (with the tokenizer), ``importance.npz`` (``heads``
[L, H], ``neurons`` [L, F], ``channels`` [D] when width is pruned; ``layers`` [L] when layers are chosen by a metric;
all on the unpruned model) and ``prune_report.json``, written to a temporary sibling and renamed into place. A
heterogeneous model is written as an HF DeciLM directory (``convert.save_hf``), its ``heads`` / ``neurons`` ragged
(values + ``<name>_offsets``, ``importance_cache.npz_arrays``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import arch, hetero
from minitron_jax.compress.importance import Progress
from minitron_jax.compress.importance_cache import Importance, calibration_windows, npz_arrays
from minitron_jax.compress.spec import PruneSpec, check_drop_list, check_spec, resolve_heads_per_group
from minitron_jax.config import ConfigError, LlamaConfig
from minitron_jax.model import Params, axis_sizes, param_axes

REPORT_NAME = "prune_report.json"
IMPORTANCE_NAME = "importance.npz"


# ------------------------------------------------------------------------------------------------------------------
# The one slicing operation
# ------------------------------------------------------------------------------------------------------------------
def resized_config(config: LlamaConfig, axis: str, n: int) -> LlamaConfig:
    """``config`` with logical ``axis`` resized to ``n``."""
    if axis == "layer":
        return config.replace(num_layers=n)
    if axis == "embed":
        return config.replace(hidden_size=n)
    if axis == "mlp":
        return config.replace(intermediate_size=n)
    if axis == "q_per_kv":
        return config.replace(num_heads=config.num_kv_heads * n)
    if axis == "kv_heads":  # whole groups go with their query heads
        return config.replace(num_kv_heads=n, num_heads=n * config.q_per_kv)
    # head_dim: RoPE rotates dims i and i + Hd/2 together; vocab: the tokenizer would no longer match.
    raise ConfigError(f"pruning the {axis!r} axis is not supported")


def _check_indices(indices, axis: str, size: int, batch_shape: tuple[int, ...]) -> np.ndarray:
    """Indices [*batch_shape, n] as int64, or a ValueError saying what is wrong with them."""
    idx = np.asarray(indices)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{axis} indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.ndim != len(batch_shape) + 1 or idx.shape[:-1] != batch_shape:
        raise ValueError(f"{axis} indices must have shape {batch_shape + ('n',)}, got {idx.shape}")
    if idx.shape[-1] == 0:
        raise ConfigError(f"cannot keep zero entries along {axis!r}")
    if idx.min() < 0 or idx.max() >= size:
        raise ValueError(f"{axis} indices out of range [0, {size}): min {idx.min()}, max {idx.max()}")
    if (np.diff(np.sort(idx, axis=-1), axis=-1) == 0).any():
        raise ValueError(f"{axis} indices contain duplicates")
    return idx


def _gather(arr, axes: tuple[str, ...], axis: str, idx: np.ndarray, batch_axes: tuple[str, ...]):
    """``take_along_axis`` of ``arr`` along ``axis`` with ``idx`` [*batch_axes, n] broadcast over its other axes."""
    dims = [axes.index(b) for b in batch_axes] + [axes.index(axis)]
    order = np.argsort(dims)  # idx's own axes, rearranged into arr's axis order
    shape = [1] * len(axes)
    for i, d in enumerate(sorted(dims)):
        shape[d] = idx.shape[order[i]]
    ix = np.transpose(idx, order).reshape(shape)
    if isinstance(arr, jax.Array):  # stay on device
        return jnp.take_along_axis(arr, jnp.asarray(ix), axis=axes.index(axis))
    return np.take_along_axis(np.asarray(arr), ix, axis=axes.index(axis))


def keep_along_axis(config: LlamaConfig, params: Params, axis: str, indices,
                    batch_axes: Sequence[str] = ()) -> tuple[LlamaConfig, Params]:
    """Keep ``indices`` along logical ``axis`` in every parameter that has it.

    ``indices`` has shape ``[*sizes of batch_axes, n]``: with ``batch_axes=("layer",)`` each layer keeps its own
    n entries. Every parameter with ``axis`` must also have the batch axes. Order is preserved as given (the
    ranking helpers return sorted indices, so the original order survives). Uniform models only: a heterogeneous
    model's axes differ by segment (:func:`prune_hidden` and :func:`drop_layers` take one)."""
    if arch.is_hetero(config):
        raise ConfigError(f"keep_along_axis({axis!r}) slices a uniform model; a heterogeneous one is pruned by "
                          "prune_hidden and drop_layers")
    sizes = axis_sizes(config)
    batch_axes = tuple(batch_axes)
    idx = _check_indices(indices, axis, sizes[axis], tuple(sizes[b] for b in batch_axes))
    new_config = resized_config(config, axis, idx.shape[-1])

    def one(axes, arr):
        if axis not in axes:
            return arr
        if not all(b in axes for b in batch_axes):
            raise ValueError(f"a parameter with axes {axes} has {axis!r} but not all of {batch_axes}")
        return _gather(arr, axes, axis, idx, batch_axes)

    return new_config, jax.tree.map(one, param_axes(config), params, is_leaf=lambda x: isinstance(x, tuple))


# ------------------------------------------------------------------------------------------------------------------
# Width and depth
# ------------------------------------------------------------------------------------------------------------------
def _take(arr, idx: np.ndarray, axis: int):
    if isinstance(arr, jax.Array):  # stay on device
        return jnp.take(arr, jnp.asarray(idx), axis=axis)
    return np.take(np.asarray(arr), idx, axis=axis)


def _refuse_hetero(config, what: str) -> None:
    if arch.is_hetero(config):
        raise ConfigError(f"{what} of a heterogeneous model is per layer: choose per-layer widths with "
                          "python -m minitron_jax.puzzle")


def prune_hidden(config: arch.AnyConfig, params: Params, keep) -> tuple[arch.AnyConfig, Params]:
    """Keep hidden channels ``keep`` [D'] in every array touching the residual stream (a heterogeneous model: in
    every segment, each ``embed`` axis of an array sliced, so a ``[D, D]`` linear sub-block loses rows and
    columns)."""
    if not arch.is_hetero(config):
        return keep_along_axis(config, params, "embed", keep)
    idx = _check_indices(keep, "embed", config.hidden_size, ())

    def one(axes, arr):
        for i, a in enumerate(axes):
            if a == "embed":
                arr = _take(arr, idx, i)
        return arr

    new_config = hetero.HeteroConfig(resized_config(config.base, "embed", len(idx)), config.blocks)
    return new_config, jax.tree.map(one, hetero.param_axes(config), params, is_leaf=lambda x: isinstance(x, tuple))


def prune_ffn(config: LlamaConfig, params: Params, keep) -> tuple[LlamaConfig, Params]:
    """Keep FFN neurons: ``keep`` [L, F'] per layer, or [F'] for the same neurons in every layer."""
    _refuse_hetero(config, "the FFN width")
    keep = np.asarray(keep)
    if keep.ndim == 1:
        keep = np.broadcast_to(keep, (config.num_layers, keep.shape[0]))
    return keep_along_axis(config, params, "mlp", keep, ("layer",))


def prune_heads(config: LlamaConfig, params: Params, keep) -> tuple[LlamaConfig, Params]:
    """Keep query heads within their KV groups: ``keep`` [L, K, G'] (or [K, G'] for every layer) holds positions
    0..G−1 inside each group, so every group keeps G' heads and GQA stays intact."""
    _refuse_hetero(config, "the number of heads")
    keep = np.asarray(keep)
    if keep.ndim == 2:
        keep = np.broadcast_to(keep, (config.num_layers,) + keep.shape)
    return keep_along_axis(config, params, "q_per_kv", keep, ("layer", "kv_heads"))


def drop_layers(config: arch.AnyConfig, params: Params, drop: Sequence[int]) -> tuple[arch.AnyConfig, Params]:
    """Remove the layers ``drop`` (0-based); the others keep their order. A heterogeneous model's remaining blocks
    are regrouped into segments (two runs that the dropped layers separated become one)."""
    drop = check_drop_list(config, drop)
    kept = [i for i in range(config.num_layers) if i not in drop]
    if not arch.is_hetero(config):
        return keep_along_axis(config, params, "layer", kept)
    return hetero.keep_layers(config, params, kept)


# ------------------------------------------------------------------------------------------------------------------
# Ranking
# ------------------------------------------------------------------------------------------------------------------
def top_k_indices(scores, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores along the last axis, sorted ascending (original order kept).

    Ties go to the lower index; NaN ranks lowest."""
    scores = np.asarray(scores, np.float64)
    if not 1 <= k <= scores.shape[-1]:
        raise ConfigError(f"cannot keep {k} of {scores.shape[-1]}")
    ranked = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=-1, kind="stable")
    return np.sort(ranked[..., :k], axis=-1)


def heads_to_keep(config: LlamaConfig, head_scores, heads_per_group: int) -> np.ndarray:
    """[L, H] head scores (HF order) → [L, K, G'] positions of the best ``heads_per_group`` heads in each group."""
    scores = np.asarray(head_scores).reshape(config.num_layers, config.num_kv_heads, config.q_per_kv)
    return top_k_indices(scores, heads_per_group)


def layers_to_drop(layer_scores, k: int, metric: str) -> list[int]:
    """The ``k`` layers a depth metric marks least important (higher score = more important).

    ``contiguous``: the window ``s .. s + k − 1`` whose start has the lowest score (block perplexity);
    ``ppl``/``bi``: the ``k`` lowest per-layer scores, wherever they are."""
    scores = np.asarray(layer_scores, np.float64)
    if k == 0:
        return []
    if metric == "contiguous":
        start = int(np.nanargmin(scores))
        return list(range(start, start + k))
    return sorted(int(i) for i in top_k_indices(-scores, k))


# ------------------------------------------------------------------------------------------------------------------
# A whole recipe
# ------------------------------------------------------------------------------------------------------------------
def rank(importance: Importance, spec: PruneSpec,
         progress: Progress | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Importance arrays on the unpruned model (``importance``'s) for what ``spec`` prunes, and the seconds each
    phase took. The calibration pass and the layer scans run here unless ``importance`` already holds them."""
    timings: dict[str, float] = {}
    if (spec.prunes_width and spec.importance == "activation") or (spec.ranks_layers and spec.depth_metric == "bi"):
        importance.activation_stats(progress)
        timings["calibration_pass_s"] = importance.timings["calibration_pass_s"]
        timings["calibration_tokens_per_s"] = importance.windows.size / timings["calibration_pass_s"]
    scores: dict[str, np.ndarray] = {}
    if spec.prunes_width:
        scores.update(importance.width(spec.importance, seq_agg=spec.seq_agg, batch_agg=spec.batch_agg,
                                       preact=spec.preact, seed=spec.seed))
    if spec.ranks_layers:
        t0 = time.perf_counter()
        scores["layers"] = importance.layers(spec.depth_metric, spec.drop_layers, progress=progress)
        timings["layer_metric_s"] = time.perf_counter() - t0
    return scores, timings


def plan(config: LlamaConfig, spec: PruneSpec, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Indices to keep per dimension (None where a dimension is kept whole) from importance ``scores``."""
    g = resolve_heads_per_group(config, spec)
    if spec.layers is not None:
        drop = check_drop_list(config, spec.layers)
    else:
        drop = layers_to_drop(scores["layers"], spec.drop_layers, spec.depth_metric) if spec.ranks_layers else []
    return {
        "hidden": top_k_indices(scores["channels"], spec.hidden) if spec.hidden is not None else None,
        "ffn": top_k_indices(scores["neurons"], spec.ffn) if spec.ffn is not None else None,
        "heads": heads_to_keep(config, scores["heads"], g) if g is not None else None,
        "drop_layers": drop,
    }


def apply_plan(config: LlamaConfig, params: Params, keep: dict[str, Any]) -> tuple[LlamaConfig, Params]:
    """Slice ``params`` by a :func:`plan` (width first, on all original layers; then depth)."""
    if keep.get("heads") is not None:
        config, params = prune_heads(config, params, keep["heads"])
    if keep.get("ffn") is not None:
        config, params = prune_ffn(config, params, keep["ffn"])
    if keep.get("hidden") is not None:
        config, params = prune_hidden(config, params, keep["hidden"])
    if keep.get("drop_layers"):
        config, params = drop_layers(config, params, keep["drop_layers"])
    return config, params


def prune_from_spec(config: LlamaConfig, params: Params, tokenizer, spec: PruneSpec, calib_text: str | None, *,
                    progress: Progress | None = None) -> tuple[LlamaConfig, Params, dict[str, Any]]:
    """Calibrate, rank and slice: the whole Minitron pruning step. Stable API (:func:`prune_student` calls it).

    Args:
      config, params: the unpruned model (host numpy or device arrays; slices stay where the inputs are).
      tokenizer: a transformers (or bare ``tokenizers``) tokenizer; used only when calibration is needed.
      spec: what to prune and how to rank (:class:`PruneSpec`).
      calib_text: calibration text (the string ``minitron_jax.data.read_text`` gives), tokenized by
        ``data.token_windows``; may be None when nothing needs calibration (magnitude/random width ranking and an
        explicit ``layers`` list).
      progress: optional ``(phase, done, total)`` callback.

    Returns:
      ``(new_config, new_params, report)``. ``report`` is JSON-serialisable except ``report["importance"]``, a dict
      of numpy arrays computed on the unpruned model (``heads`` [L, H], ``neurons`` [L, F], ``channels`` [D] when
      width is pruned; ``layers`` [L] when layers are ranked). Other keys: ``kept`` (``hidden`` [D'], ``ffn``
      [L, F'], ``heads`` [L, H'] in HF head numbering, ``layers`` / ``dropped_layers``), ``config_before`` /
      ``config_after`` (HF dicts), ``params_before`` / ``params_after``, ``options``, ``calibration``, ``timings``.

    Raises:
      ConfigError (a ValueError) before any work for a size that cannot be built; ValueError when calibration
      is needed and ``calib_text`` or ``tokenizer`` is missing or too short.
    """
    t_start = time.perf_counter()
    check_spec(config, spec)
    windows = None
    if spec.needs_calibration:
        if calib_text is None or tokenizer is None:
            raise ValueError(f"{'activation importance' if spec.prunes_width else 'the depth metric'} needs "
                             "calibration text and a tokenizer")
        windows = calibration_windows(tokenizer, calib_text, spec.calibration)
    scores, timings = rank(Importance(config, params, windows, spec.calibration), spec, progress)
    t0 = time.perf_counter()
    keep = plan(config, spec, scores)
    new_config, new_params = apply_plan(config, params, keep)
    timings["slice_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "kept": _kept_for_report(config, keep),
        "config_before": config.to_hf(),
        "config_after": new_config.to_hf(),
        "params_before": arch.count_params(config),
        "params_after": arch.count_params(new_config),
        "options": spec.to_dict(),
        "calibration": None if windows is None else {
            "windows": int(len(windows)), "seq_len": int(windows.shape[1]), "tokens": int(windows.size),
            "requested_windows": spec.calib_samples},
        "timings": timings,
        "importance": scores,
    }
    return new_config, new_params, report


def prune_student(teacher, options: dict[str, Any], calib: str, log=print) -> tuple[LlamaConfig, Params, dict]:
    """A distillation student given as a pruning spec: the teacher (a ``convert.LoadedModel``) pruned by a run
    config's ``student.prune`` options, calibrated on the text at ``calib`` (``student.calib``, resolved).

    The distill command hands this to the trainer (``train.loop.run(rc, prune_student=prune_student)``), which calls
    it on a fresh start only (a resumed run's student comes from its checkpoint): ``train/`` never imports
    ``compress/``. Raises ValueError / FileNotFoundError for a bad spec or calibration text."""
    from minitron_jax.data import read_text

    spec = PruneSpec.from_dict(options)
    text = read_text(calib)
    log(f"pruning the teacher on the fly: {options}")
    return prune_from_spec(teacher.config, teacher.params, teacher.tokenizer, spec, text)


def _kept_for_report(config: LlamaConfig, keep: dict[str, Any]) -> dict[str, Any]:
    """Kept indices as JSON lists; heads in HF numbering (h = k * G + g of the unpruned model)."""
    def tolist(a):
        return None if a is None else np.asarray(a).tolist()

    heads = keep["heads"]
    if heads is not None:
        heads = heads + (np.arange(config.num_kv_heads) * config.q_per_kv)[None, :, None]
        heads = heads.reshape(config.num_layers, -1)
    drop = keep["drop_layers"]
    return {"hidden": tolist(keep["hidden"]), "ffn": tolist(keep["ffn"]), "heads": tolist(heads),
            "layers": [i for i in range(config.num_layers) if i not in drop], "dropped_layers": list(drop)}


# ------------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------------
def save_pruned(out: str | Path, config: LlamaConfig, params: Params, tokenizer, report: dict, *,
                overwrite: bool = False, sources: Sequence[str | Path | None] = ()) -> None:
    """The HF model, importance.npz and prune_report.json of a :func:`prune_from_spec` result, assembled in a
    temporary sibling and renamed into place, so ``out`` is either untouched or complete. ``report["importance"]``
    goes to the npz and is removed from ``report``; the rest is the JSON."""
    from minitron_jax.convert import save_hf
    from minitron_jax.convert.model_card import derived_card
    from minitron_jax.fsutil import atomic_directory

    scores = report.pop("importance")
    calib = report.get("calibration") or {}
    method = {"pruning": {"importance": report.get("options", {}).get("importance"),
                          "calibration samples": calib.get("windows"), "sequence length": calib.get("seq_len"),
                          "dropped layers": report.get("kept", {}).get("dropped_layers") or None}}
    method["pruning"] = {k: v for k, v in method["pruning"].items() if v is not None}
    source = report.get("model")
    card = derived_card(Path(out).name, config, source if isinstance(source, str) else None, method,
                        tokenizer=tokenizer)
    with atomic_directory(Path(out), overwrite=overwrite, sources=sources) as tmp:
        # tmp: atomic_directory's empty staging
        save_hf(tmp, config, params, tokenizer=tokenizer, overwrite=True, card=card)
        np.savez(tmp / IMPORTANCE_NAME, **npz_arrays(scores))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
