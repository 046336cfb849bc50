"""The candidates of an architecture search and the statistics that rank them (:mod:`minitron_jax.compress.nas`).

- **Enumerate** width/depth candidates on grids (hidden size, FFN size, query heads per KV group, layers) and keep
  those whose :func:`minitron_jax.model.count_params` is within ``±tolerance`` of the target (the paper: ±5%).
  Default grids: hidden ``D − k·64`` and FFN ``F − k·F/12`` down to half, every head count per group, layers
  ``L − k·step`` down to half (step ``max(1, L // 15)``). :func:`select_spread` keeps an evenly spaced subset of the
  list ordered from deepest-and-narrowest to shallowest-and-widest, so both extremes and the middle are searched.
- **Rank** by a loss and measure how stable the ranking is over evaluation steps: Kendall's tau against the final
  ranking and against the previous evaluation, whether the top-1 agrees with the final one, and the step after
  which the ranking (and the top-1) no longer changed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

from minitron_jax.config import LlamaConfig
from minitron_jax.model import count_params


class NASError(ValueError):
    """A search that cannot be run (impossible target, bad grid, bad option)."""


# ======================================================================================================================
# Candidates
# ======================================================================================================================
@dataclasses.dataclass(frozen=True)
class Candidate:
    layers: int
    hidden: int
    ffn: int
    heads_per_group: int
    params: int

    @property
    def name(self) -> str:
        return f"L{self.layers}-D{self.hidden}-F{self.ffn}-G{self.heads_per_group}"

    def config(self, base: LlamaConfig) -> LlamaConfig:
        return base.replace(num_layers=self.layers, hidden_size=self.hidden, intermediate_size=self.ffn,
                            num_heads=base.num_kv_heads * self.heads_per_group)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "name": self.name}


def _down_grid(full: int, step: int, min_fraction: float) -> list[int]:
    step = max(1, int(step))
    lo = max(1, math.ceil(full * min_fraction))
    return [full - k * step for k in range((full - lo) // step + 1)]


def default_grids(config: LlamaConfig, min_fraction: float = 0.5) -> dict[str, list[int]]:
    """Sensible search grids: each axis from the full size down to ``min_fraction`` of it."""
    return {
        "hidden": _down_grid(config.hidden_size, 64 if config.hidden_size >= 256 else max(1, config.hidden_size // 8),
                             min_fraction),
        "ffn": _down_grid(config.intermediate_size, max(1, config.intermediate_size // 12), min_fraction),
        "heads_per_group": list(range(config.q_per_kv, 0, -1)),
        "layers": _down_grid(config.num_layers, max(1, config.num_layers // 15), min_fraction),
    }


def parse_params(text: str | int | float) -> int:
    """``"90M"``, ``"0.09B"``, ``"90e6"``, ``90000000`` → an integer parameter count."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(s[-1:].lower())
    try:
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise NASError(f"cannot read a parameter count from {text!r} (e.g. 90M, 0.09B, 90000000)") from None
    if value <= 0:
        raise NASError(f"the target parameter count must be positive, got {text!r}")
    return int(round(value))


def enumerate_candidates(config: LlamaConfig, target_params: int, tolerance: float = 0.05,
                         grids: dict[str, Sequence[int]] | None = None) -> list[Candidate]:
    """Every grid point whose parameter count is within ``±tolerance`` of ``target_params``, ordered from the deepest
    and narrowest to the shallowest and widest (layers descending, then hidden, heads, FFN ascending).

    Raises NASError, naming the nearest counts the grids can reach, when no candidate fits; and for a target the
    model cannot be pruned to (at or above its own size)."""
    if not 0 < tolerance < 1:
        raise NASError(f"tolerance must be in (0, 1), got {tolerance}")
    full = count_params(config)
    if target_params >= full:
        raise NASError(f"target {target_params:,} params is not below the model's own {full:,}: nothing to prune")
    g = {**default_grids(config), **{k: list(v) for k, v in (grids or {}).items() if v}}
    limits = {"hidden": config.hidden_size, "ffn": config.intermediate_size, "heads_per_group": config.q_per_kv,
              "layers": config.num_layers}
    for axis, values in g.items():
        if axis not in limits:
            raise NASError(f"unknown grid axis {axis!r} (axes: {', '.join(limits)})")
        bad = [v for v in values if not isinstance(v, (int, np.integer)) or not 1 <= v <= limits[axis]]
        if bad:
            raise NASError(f"{axis} grid values {bad} are outside [1, {limits[axis]}] (pruning cannot grow a model)")
    lo, hi = target_params * (1 - tolerance), target_params * (1 + tolerance)
    out, below, above = [], 0, None
    for layers, hidden, hpg, ffn in itertools.product(sorted(set(g["layers"]), reverse=True), sorted(set(g["hidden"])),
                                                      sorted(set(g["heads_per_group"])), sorted(set(g["ffn"]))):
        cfg = config.replace(num_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                             num_heads=config.num_kv_heads * hpg)
        n = count_params(cfg)
        if lo <= n <= hi:
            out.append(Candidate(layers, hidden, ffn, hpg, n))
        elif n < lo:
            below = max(below, n)
        else:
            above = n if above is None else min(above, n)
    if not out:
        near = ", ".join(x for x in (f"{below:,} below" if below else "", f"{above:,} above" if above else "") if x)
        raise NASError(f"no candidate within ±{tolerance * 100:g}% of {target_params:,} params on these grids "
                       f"(nearest: {near or 'none'}); widen the grids (--hidden-grid/--ffn-grid/--layers-grid/"
                       f"--heads-grid) or the --tolerance")
    return out


def select_spread(candidates: Sequence[Candidate], n: int) -> list[Candidate]:
    """``n`` candidates evenly spaced over the list (first and last included); all of them when ``n`` is 0 or
    at least the list's length."""
    if n <= 0 or n >= len(candidates):
        return list(candidates)
    if n == 1:
        return [candidates[len(candidates) // 2]]
    idx = sorted({round(i * (len(candidates) - 1) / (n - 1)) for i in range(n)})
    return [candidates[i] for i in idx]


# ======================================================================================================================
# Ranking stability
# ======================================================================================================================
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists over the same items (ties handled; 1.0 for fewer than 2 items or
    when both lists are constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"score lists differ in length: {x.shape} vs {y.shape}")
    n = len(x)
    if n < 2:
        return 1.0
    i, j = np.triu_indices(n, 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordant_minus_discordant = float(np.sum(dx * dy))
    nx, ny = float(np.sum(dx != 0)), float(np.sum(dy != 0))
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return concordant_minus_discordant / math.sqrt(nx * ny)


def ranking(losses: Sequence[float]) -> list[int]:
    """Candidate indices from best (lowest loss) to worst; ties keep index order."""
    return [int(i) for i in np.argsort(np.asarray(losses, np.float64), kind="stable")]


def ranking_stability(steps: Sequence[int], losses: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How the ranking of candidates by loss changes over evaluation steps.

    ``losses[s][c]`` is candidate c's loss at ``steps[s]`` (steps ascending). Returns per step: the ranking
    (best first), Kendall's tau against the final step and against the previous step, the top-1 and whether it is
    the final top-1; and ``settled_at`` / ``top1_settled_at``: the first step from which the full ranking / the top-1
    no longer changed until the end."""
    steps = [int(s) for s in steps]
    L = np.asarray(losses, np.float64)
    if L.ndim != 2 or L.shape[0] != len(steps) or L.shape[0] == 0:
        raise ValueError(f"losses must be [len(steps)={len(steps)}, candidates], got shape {L.shape}")
    if steps != sorted(steps):
        raise ValueError(f"steps must be ascending, got {steps}")
    final = L[-1]
    ranks = [ranking(row) for row in L]
    per_step = []
    for k, s in enumerate(steps):
        per_step.append({"step": s, "ranking": ranks[k], "top1": ranks[k][0],
                         "tau_vs_final": kendall_tau(L[k], final),
                         "tau_vs_previous": None if k == 0 else kendall_tau(L[k], L[k - 1]),
                         "top1_agrees_with_final": ranks[k][0] == ranks[-1][0]})

    def settled(same: Callable[[int], bool]) -> int:
        k = len(steps) - 1
        while k > 0 and same(k - 1):
            k -= 1
        return steps[k]

    return {"steps": steps, "per_step": per_step,
            "settled_at": settled(lambda k: ranks[k] == ranks[-1]),
            "top1_settled_at": settled(lambda k: ranks[k][0] == ranks[-1][0]),
            "final_ranking": ranks[-1]}
