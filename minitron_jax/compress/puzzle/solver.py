"""Choose one variant per layer: the exact MIP of Puzzle's search, solved by HiGHS through ``scipy.optimize.milp``.

    maximise   Σ_l Σ_v score[l, v] · x[l, v]
    subject to Σ_v x[l, v] = 1                                    for every layer l
               overhead_k + Σ_l Σ_v cost_k[l, v] · x[l, v] ≤ budget_k   for every constraint k
               x[l, v] ∈ {0, 1};  x[l, v] absent where the variant is not allowed (score NaN/None)

Runner-ups come from re-solving with a no-good cut per solution already found (``Σ_{(l,v) ∈ sol} x[l, v] ≤ L − 1``
excludes exactly that assignment, since every layer picks one variant), so the k-th solve returns the k-th best
distinct architecture.

Numerics: the model is solved in shifted, scaled units and every reported number is recomputed from the caller's
own matrices. Each cost row has its per-layer minimum moved into the constant (so coefficients are the *extra* cost
of a variant over the layer's cheapest, not parameter counts in the billions next to differences in the millions)
and is divided by its largest entry; scores are shifted by each layer's best and divided by the largest gap. The
MIP gap is set to zero so "optimal" means optimal, not within HiGHS's default 0.01%. HiGHS accepts a solution
that breaks a scaled row by its feasibility tolerance (1e-7); every solution is checked against the unscaled
budgets and one that breaks any is cut off and the solve repeated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

_MILP_STATUS = {0: "optimal", 1: "time or iteration limit reached", 2: "infeasible", 3: "unbounded",
                4: "solver error"}
_REL_TOL = 1e-9  # a reported cost may exceed its budget by this fraction (float sums), never more


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``overhead + Σ_l costs[l, choice_l] ≤ budget``, named and shown the way the user wrote the target.

    ``unit``/``unit_scale`` are for messages only (a memory constraint in bytes shows as GB with ``unit_scale``
    1e9). ``inverse`` makes a constraint whose target is a rate read naturally: with ``inverse = tokens``, a
    latency budget of ``tokens / rate`` seconds is shown as the rate ``inverse / value`` (tokens per second)."""

    name: str
    costs: np.ndarray  # [layers, variants]; entries at not-allowed variants are ignored
    budget: float
    overhead: float = 0.0
    unit: str = ""
    unit_scale: float = 1.0
    inverse: float | None = None

    def show(self, value: float) -> str:
        if self.inverse is not None:
            shown = self.inverse / value if value > 0 else float("inf")
        else:
            shown = value / self.unit_scale
        return f"{shown:.4g}{' ' + self.unit if self.unit else ''}"


@dataclasses.dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # variant index per layer
    score: float  # Σ score[l, choice_l]
    costs: dict[str, float]  # achieved value of every constraint, overhead included (the caller's units)
    slack: dict[str, float]  # budget − achieved
    optimal: bool  # HiGHS proved it the best of what was left when it was found
    status: str

    def labels(self, variant_names: Sequence[str]) -> list[str]:
        return [variant_names[v] for v in self.choices]


@dataclasses.dataclass(frozen=True)
class SolveResult:
    solutions: list[Solution]  # best first; runner-ups after it, in order
    constraints: list[Constraint]
    variant_names: tuple[str, ...]
    seconds: float
    exhausted: bool  # fewer than the requested solutions exist (every feasible architecture was listed)

    @property
    def best(self) -> Solution:
        return self.solutions[0]

    def report(self, runner_ups: int | None = None) -> str:
        return format_report(self, runner_ups)


def _as_matrix(a, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    m = np.array(a, dtype=float)  # None becomes NaN
    if m.ndim != 2:
        raise ValueError(f"{name} must be a [layers, variants] matrix, got shape {m.shape}")
    if shape is not None and m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape}, the scores have {shape}")
    return m


def _min_achievable(costs: np.ndarray, allowed: np.ndarray, overhead: float) -> float:
    return overhead + float(np.where(allowed, costs, np.inf).min(axis=1).sum())


def _infeasible_message(constraints: Sequence[Constraint], allowed: np.ndarray) -> str | None:
    """The message for targets that no single architecture can meet one at a time, tightest first; None if each
    target alone can be met."""
    over = []
    for c in constraints:
        lo = _min_achievable(c.costs, allowed, c.overhead)
        if lo > c.budget + _REL_TOL * max(abs(c.budget), 1.0):
            ratio = lo / c.budget if c.budget > 0 else float("inf")
            over.append((ratio, c, lo))
    if not over:
        return None
    over.sort(key=lambda t: -t[0])
    parts = []
    for _, c, lo in over:
        if c.inverse is not None:
            parts.append(f"{c.name} {c.show(c.budget)} is above the largest possible {c.show(lo)}")
        else:
            parts.append(f"{c.name} {c.show(c.budget)} is below the smallest possible {c.show(lo)}")
    return "; ".join(parts) + f" (tightest: {over[0][1].name})"


def _minimums(constraints: Sequence[Constraint], allowed: np.ndarray) -> str:
    return ", ".join(f"{c.name} ≥ {c.show(_min_achievable(c.costs, allowed, c.overhead))}" if c.inverse is None
                     else f"{c.name} ≤ {c.show(_min_achievable(c.costs, allowed, c.overhead))}"
                     for c in constraints)


class _Model:
    """The scaled MILP over the allowed (layer, variant) pairs, with no-good cuts added as solutions are found."""

    def __init__(self, scores: np.ndarray, allowed: np.ndarray, constraints: Sequence[Constraint]):
        self.L, self.V = scores.shape
        self.pairs = np.argwhere(allowed)  # [n, 2] (layer, variant), one binary variable each
        n = len(self.pairs)
        layer_of = self.pairs[:, 0]
        s = np.where(allowed, scores, -np.inf)
        gap = (s.max(axis=1)[:, None] - scores)[allowed]  # ≥ 0: how much worse than the layer's best
        scale = gap.max() if gap.size and gap.max() > 0 else 1.0
        self.c = gap / scale  # minimise the scaled loss against the per-layer best

        one_hot = np.zeros((self.L, n))
        one_hot[layer_of, np.arange(n)] = 1.0
        self.rows = [LinearConstraint(one_hot, 1.0, 1.0)]
        for k in constraints:
            cost = np.where(allowed, k.costs, np.inf)
            floor = cost.min(axis=1)
            extra = (k.costs - floor[:, None])[allowed]
            room = k.budget - k.overhead - floor.sum()
            if extra.max(initial=0.0) <= 0:
                continue  # every architecture costs the same here: checked once up front, nothing to choose
            row_scale = extra.max()
            self.rows.append(LinearConstraint((extra / row_scale)[None], -np.inf, room / row_scale))
        self.cuts: list[np.ndarray] = []

    def solve(self, time_limit: float):
        # Fixed choices need no bounds: they were applied to `allowed`, so only their variable exists.
        cuts = [LinearConstraint(np.array(self.cuts), -np.inf, self.L - 1.0)] if self.cuts else []
        res = milp(self.c, integrality=np.ones(len(self.pairs)), bounds=Bounds(0.0, 1.0),
                   constraints=self.rows + cuts,
                   options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            return None, res.status
        chosen = self.pairs[np.round(res.x) > 0.5]
        choices = np.full(self.L, -1)
        choices[chosen[:, 0]] = chosen[:, 1]
        return tuple(int(v) for v in choices), res.status

    def cut(self, choices: Sequence[int]) -> None:
        row = np.zeros(len(self.pairs))
        for l, v in enumerate(choices):
            row[(self.pairs[:, 0] == l) & (self.pairs[:, 1] == v)] = 1.0
        self.cuts.append(row)


def solve(scores, constraints: Sequence[Constraint], *, top_n: int = 1, fixed: Mapping[int, int] | None = None,
          variant_names: Sequence[str] | None = None, time_limit: float = 60.0) -> SolveResult:
    """The best ``top_n`` distinct assignments of one variant per layer, best first.

    Args:
      scores: [layers, variants], higher is better (e.g. minus a block's distillation loss, in nats); NaN or None
        marks a variant not allowed at that layer.
      constraints: each a :class:`Constraint` over a cost matrix of the same shape.
      top_n: how many solutions: the best and ``top_n − 1`` runner-ups.
      fixed: ``{layer: variant}`` choices imposed on the search.
      variant_names: labels for the report (default ``v0, v1, …``).
      time_limit: seconds HiGHS may spend on *each* solve; a solve stopped by it returns its incumbent marked
        ``optimal=False``.

    Raises:
      ValueError: malformed inputs, or no architecture meets the targets (the message names the tightest target
        and the smallest value each cost can reach).
      RuntimeError: HiGHS stopped (time limit, error) before finding any feasible architecture.
    """
    t0 = time.perf_counter()
    scores = _as_matrix(scores, "scores")
    L, V = scores.shape
    if L == 0 or V == 0:
        raise ValueError(f"scores must have at least one layer and one variant, got shape {scores.shape}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    names = tuple(variant_names) if variant_names is not None else tuple(f"v{i}" for i in range(V))
    if len(names) != V:
        raise ValueError(f"{len(names)} variant names for {V} variants")
    allowed = np.isfinite(scores)
    if np.isposinf(scores).any() or np.isneginf(scores).any():
        raise ValueError("scores must be finite (NaN/None marks a variant not allowed)")
    fixed = dict(fixed or {})
    for l, v in fixed.items():
        if not (0 <= l < L and 0 <= v < V):
            raise ValueError(f"fixed choice layer {l} → variant {v} is outside the {L}×{V} scores")
        if not allowed[l, v]:
            raise ValueError(f"fixed choice layer {l} → {names[v]} is not allowed at that layer (score NaN)")
        allowed[l] &= np.arange(V) == v
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise ValueError(f"no variant is allowed at layer(s) {empty.tolist()}")
    constraints = list(constraints)
    seen = set()
    for c in constraints:
        if c.name in seen:
            raise ValueError(f"constraint {c.name!r} is given twice")
        seen.add(c.name)
        m = _as_matrix(c.costs, f"costs of {c.name}", (L, V))
        if not np.isfinite(m[allowed]).all():
            raise ValueError(f"costs of {c.name} are not finite at an allowed variant")
        if not np.isfinite(c.budget):
            raise ValueError(f"budget of {c.name} must be finite, got {c.budget}")
    constraints = [dataclasses.replace(c, costs=_as_matrix(c.costs, c.name)) for c in constraints]

    msg = _infeasible_message(constraints, allowed)
    if msg:
        raise ValueError(f"infeasible targets: {msg}")

    model = _Model(scores, allowed, constraints)
    solutions: list[Solution] = []
    exhausted = False
    while len(solutions) < top_n:
        choices, status = model.solve(time_limit)
        if choices is None:
            if status == 2 and not solutions:
                raise ValueError(
                    "infeasible targets: each target can be met alone but not all together "
                    f"({_tightest_together(scores, allowed, constraints, time_limit)}); the smallest "
                    f"values reachable one at a time: {_minimums(constraints, allowed)}")
            if status == 2:
                exhausted = True
                break
            if not solutions:
                raise RuntimeError(f"HiGHS found no architecture: {_MILP_STATUS.get(status, status)}")
            break  # a later solve ran out of time: report what was found
        model.cut(choices)
        sol = _evaluate(choices, scores, constraints, status)
        if sol is None:
            continue  # broke an unscaled budget within HiGHS's tolerance: cut off, solve again
        solutions.append(sol)
    return SolveResult(solutions, constraints, names, time.perf_counter() - t0, exhausted)


def _tightest_together(scores, allowed, constraints, time_limit) -> str:
    """Which single target, dropped, makes the rest feasible: the tightest ones in the combination."""
    culprits = []
    for i, c in enumerate(constraints):
        rest = constraints[:i] + constraints[i + 1:]
        choices, _ = _Model(scores, allowed, rest).solve(time_limit)
        if choices is not None:
            culprits.append(c.name)
    if culprits:
        return "dropping any one of " + ", ".join(culprits) + " makes the rest feasible"
    return "no single target can be dropped to make the rest feasible"


def _evaluate(choices, scores, constraints, status) -> Solution | None:
    rows = np.arange(len(choices))
    idx = np.array(choices)
    costs, slack = {}, {}
    for c in constraints:
        value = c.overhead + float(c.costs[rows, idx].sum())
        if value > c.budget + _REL_TOL * max(abs(c.budget), 1.0):
            return None
        costs[c.name], slack[c.name] = value, c.budget - value
    return Solution(tuple(choices), float(scores[rows, idx].sum()), costs, slack, status == 0,
                    _MILP_STATUS.get(status, str(status)))


def _runs(labels: Sequence[str]) -> str:
    """``0-3 gqa3/mlp1536, 4 none/mlp1536, …``: consecutive equal choices folded."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            out.append(f"{span} {labels[start]}")
            start = i
    return ", ".join(out)


def format_report(result: SolveResult, runner_ups: int | None = None) -> str:
    """The chosen architecture, its score and every target's achieved value, then the runner-ups (each as its
    score and the layers where it differs from the best)."""
    best = result.best
    L, V = len(best.choices), len(result.variant_names)
    lines = [f"Puzzle MIP: {L} layers × {V} variants, {len(result.constraints)} target(s); "
             f"{len(result.solutions)} solution(s) in {result.seconds:.2f} s"
             f"{' (every feasible architecture listed)' if result.exhausted else ''}"]
    for i, sol in enumerate(result.solutions[: None if runner_ups is None else runner_ups + 1]):
        head = "best" if i == 0 else f"#{i + 1}"
        lines.append(f"{head}: score {sol.score:.6g}"
                     f"{'' if i == 0 else f' ({sol.score - best.score:+.4g})'}"
                     f"{'' if sol.optimal else f' [not proved optimal: {sol.status}]'}")
        for c in result.constraints:
            lines.append(f"    {c.name}: {c.show(sol.costs[c.name])} (limit {c.show(c.budget)}, "
                         f"{100 * sol.costs[c.name] / c.budget if c.budget else float('nan'):.1f}% used)"
                         if c.inverse is None else
                         f"    {c.name}: {c.show(sol.costs[c.name])} (target {c.show(c.budget)})")
        labels = sol.labels(result.variant_names)
        if i == 0:
            lines.append(f"    layers: {_runs(labels)}")
        else:
            ref = best.labels(result.variant_names)
            diff = [f"{l}: {ref[l]} → {labels[l]}" for l in range(L) if labels[l] != ref[l]]
            lines.append(f"    differs at {', '.join(diff)}")
    return "\n".join(lines)
