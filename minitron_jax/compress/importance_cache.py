"""The importance of one model's units as one object, :class:`Importance`, and its ``importance.npz``.

:class:`Importance` is what prune, NAS and the pipeline use: one model, one set of calibration windows, ONE
calibration pass (run on first need), and every width and depth score derived from it, the layer-drop scans computed
on first request and cached; ``save``/``load`` as ``importance.npz``.

The statistics themselves (the calibration pass, aggregations, Block Importance, layer-drop scans, baselines) are the
functions of :mod:`minitron_jax.compress.importance`; the object calls them as attributes of that module, so what is
bound there at call time is what runs (as when they lived in one module).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from minitron_jax.arch import AnyConfig
from minitron_jax.compress import importance as imp
from minitron_jax.compress.importance import DEPTH_METRICS, ActivationStats, Progress, check_choice
from minitron_jax.evaluate.perplexity import DTYPES
from minitron_jax.model import Params


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
_OFFSETS = "_offsets"
_LAYERS_KEY = re.compile(r"layers_(\w+)_(\d+)")


def npz_arrays(scores: dict[str, np.ndarray | list]) -> dict[str, np.ndarray]:
    """Scores as ``importance.npz`` holds them: float32 arrays; a ragged per-layer list (a heterogeneous model's
    ``heads`` / ``neurons``) as its rows concatenated plus ``<name>_offsets`` [L + 1] (int64), which
    :meth:`Importance.load` turns back into the list."""
    out: dict[str, np.ndarray] = {}
    for k, v in scores.items():
        if isinstance(v, list):
            flat, offsets = imp.ragged_flat(v)
            out[k], out[k + _OFFSETS] = np.asarray(flat, np.float32), offsets
        else:
            out[k] = np.asarray(v, np.float32)
    return out


class Importance:
    """The importance of one model's units: one calibration pass, every score derived from it.

    - :meth:`activation_stats`: the calibration pass
      (:func:`~minitron_jax.compress.importance.collect_activation_stats`), run on first need, once;
    - :meth:`width`: ``{"heads", "neurons", "channels"}`` for any method and aggregation (activation: free after
      the pass; ``magnitude``/``random``: from the weights);
    - :meth:`layers`: ``[L]`` depth scores of a metric for dropping ``k`` layers, computed on first request and
      cached (``bi`` comes free with the pass; the ``ppl``/``contiguous`` layer-drop scans are the expensive part;
      ``bi`` and ``ppl`` do not depend on ``k``, so one scan serves every ``k``);
    - :meth:`save` / :meth:`load`: ``importance.npz`` with ``heads``, ``neurons``, ``channels`` (the settings'
      aggregation), ``bi`` and ``layers_<metric>_<k>`` for every layer score asked for. A loaded object serves
      those arrays only (it holds no model).

    A heterogeneous model (:class:`~minitron_jax.hetero.HeteroConfig`) gives ``heads`` and ``neurons`` as ragged
    per-layer lists (an array per layer that has GQA attention / an MLP, None otherwise); the npz stores each as its
    rows concatenated (``heads``) plus ``heads_offsets`` [L + 1] (int64; :func:`~minitron_jax.compress.importance.
    ragged_flat`), and :meth:`load` gives the list back. A uniform model's file is what it always was.

    ``timings`` holds the seconds of each computation: ``calibration_pass_s`` and ``layers_<metric>_<k>_s`` (0 for a
    request served by the scan of another ``k``).
    """

    def __init__(self, config: AnyConfig | None, params: Params | None, windows: np.ndarray | None,
                 settings: CalibrationSettings = CalibrationSettings()):
        self.config, self.params, self.windows, self.settings = config, params, windows, settings
        self.timings: dict[str, float] = {}
        self._stats: ActivationStats | None = None
        self._width: dict[str, np.ndarray] | None = None  # a loaded file's width scores
        self._layers: dict[tuple[str, int], np.ndarray] = {}  # (metric, k or 1 where k does not matter) → [L]
        self._asked: list[tuple[str, int]] = []  # (metric, k) in the order asked for: what save() writes

    @classmethod
    def from_text(cls, config: AnyConfig, params: Params, tokenizer, text: str,
                  settings: CalibrationSettings = CalibrationSettings()) -> Importance:
        """Calibration windows from ``text``; nothing is computed until a score is asked for."""
        return cls(config, params, calibration_windows(tokenizer, text, settings), settings)

    @classmethod
    def calibrate(cls, config: AnyConfig, params: Params, tokenizer, text: str,
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
            self._stats = imp.collect_activation_stats(self.config, self.params, self.windows,
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
        return imp.width_importance(self.config, self.params, method, stats=stats, seq_agg=seq_agg,
                                    batch_agg=batch_agg, preact=preact, seed=seed)

    def block_importance(self, progress: Progress | None = None) -> np.ndarray:
        """[L] Block Importance (from the calibration pass)."""
        if ("bi", 1) in self._layers:
            return self._layers[("bi", 1)].copy()
        return self.activation_stats(progress).block_importance()

    def layers(self, metric: str, k: int = 1, *, progress: Progress | None = None) -> np.ndarray:
        """[L] scores of depth ``metric`` for dropping ``k`` layers (higher = more important; see
        :func:`~minitron_jax.compress.importance.layer_importance`), computed on the first request and cached."""
        check_choice("depth metric", metric, DEPTH_METRICS)
        key = (metric, k if metric == "contiguous" else 1)
        if (metric, k) not in self._asked:
            self._asked.append((metric, k))
        if key not in self._layers:
            if self.params is None:
                raise ValueError(f"these saved scores hold no {metric} layer scores for dropping {k} layers")
            t0 = time.perf_counter()
            stats = self.activation_stats(progress) if metric == "bi" else None
            self._layers[key] = imp.layer_importance(self.config, self.params, metric, windows=self.depth_windows,
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
        """Write :meth:`arrays` to ``path`` (an ``.npz``, by :func:`npz_arrays`)."""
        np.savez(path, **npz_arrays(self.arrays()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, settings: CalibrationSettings = CalibrationSettings()) -> Importance:
        """Scores saved by :meth:`save` (``settings``: the aggregation they were saved with)."""
        out = cls(None, None, None, settings)
        with np.load(path) as z:
            if all(k in z for k in _WIDTH_KEYS):
                out._width = {k: imp.ragged_rows(z[k], z[k + _OFFSETS]) if k + _OFFSETS in z else z[k]
                              for k in _WIDTH_KEYS}
            if "bi" in z:
                out._layers[("bi", 1)] = z["bi"]
            for name in z.files:
                m = _LAYERS_KEY.fullmatch(name)
                if m and m.group(1) in DEPTH_METRICS:
                    metric, k = m.group(1), int(m.group(2))
                    out._layers[(metric, k if metric == "contiguous" else 1)] = z[name]
                    out._asked.append((metric, k))
        return out
