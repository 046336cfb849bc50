"""A small architecture search the Minitron way: ``python -m minitron_jax.nas --model PATH --target-params P``.

1. **Enumerate** width/depth candidates on grids (hidden size, FFN size, query heads per KV group, layers) and keep
   those whose :func:`minitron_jax.model.count_params` is within ``±tolerance`` of the target (the paper: ±5%).
   Default grids: hidden ``D − k·64`` and FFN ``F − k·F/12`` down to half, every head count per group, layers
   ``L − k·step`` down to half (step ``max(1, L // 15)``). With more candidates than ``--max-candidates`` an evenly
   spaced subset of the list ordered from deepest-and-narrowest to shallowest-and-widest is kept, so both extremes and
   the middle are searched.
2. **Prune** every candidate from ONE shared importance pass on the unpruned model (width scores and Block Importance
   come from the same calibration pass; the ``ppl``/``contiguous`` depth metrics add layer-drop scans, one per
   distinct number of dropped layers, through a single compiled function).
3. **Distill** each candidate briefly from the unpruned teacher (forward KL, the trainer's own jitted step) on the
   same batches in the same order, evaluating the validation loss right after pruning (step 0) and at
   ``--eval-steps``. Validation rows hold documents that no training row touches (at least ``--val-rows`` rows'
   worth, held out before packing: ``minitron_jax.data``), so the ranking rewards generalizing, not fitting the
   training passages. Candidates run one after another; a jitted step is built once per distinct shape and reused.
4. **Rank** by validation loss (LM cross-entropy by default, or the KL to the teacher) at every evaluation step and
   report how stable the ranking is: Kendall's tau against the final ranking and against the previous evaluation,
   whether the top-1 candidate agrees with the final one, and the step after which the ranking (and the top-1) no
   longer changed. (The paper saw rankings settle after ~300 steps of a 400-step search.)
5. **Export** the winner (its distilled weights) as an HF directory.

Outputs in ``--out``: ``candidates/<name>.json`` (one per finished candidate; a rerun skips them), ``winner/`` (HF),
``nas_report.json``, ``nas_report.md`` and ``nas_curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from minitron_jax.config import ConfigError, LlamaConfig
from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.model import count_params

EXIT_ERROR = ExitCode.BAD_INPUT
RANK_BY = ("ce", "kl")


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


# ======================================================================================================================
# The search
# ======================================================================================================================
@dataclasses.dataclass
class SearchSettings:
    steps: int = 400
    eval_steps: tuple[int, ...] = (100, 200, 300, 400)
    seq_len: int = 128
    batch_size: int = 4
    peak_lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    val_rows: int = 16
    val_batches: int = 2
    rank_by: str = "ce"
    compute_dtype: str = "float32"
    teacher_dtype: str = "float32"
    calib_samples: int = 16
    calib_seq_len: int = 256
    depth_samples: int = 2
    depth_metric: str = "bi"
    seed: int = 0

    def check(self) -> None:
        from minitron_jax.compress.importance import DEPTH_METRICS

        if self.steps < 1:
            raise NASError(f"--steps must be >= 1, got {self.steps}")
        if not self.eval_steps or list(self.eval_steps) != sorted(set(self.eval_steps)):
            raise NASError(f"--eval-steps must be ascending distinct steps, got {list(self.eval_steps)}")
        if self.eval_steps[0] < 1 or self.eval_steps[-1] > self.steps:
            raise NASError(f"--eval-steps must lie in [1, --steps={self.steps}], got {list(self.eval_steps)}")
        if self.eval_steps[-1] != self.steps:  # the ranking (and the exported winner) is at the last step
            self.eval_steps = tuple(self.eval_steps) + (self.steps,)
        if self.rank_by not in RANK_BY:
            raise NASError(f"--rank-by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.depth_metric not in DEPTH_METRICS:
            raise NASError(f"--depth-metric must be one of {DEPTH_METRICS}, got {self.depth_metric!r}")
        for name in ("seq_len", "batch_size", "val_rows", "val_batches", "calib_samples", "calib_seq_len",
                     "depth_samples"):
            if getattr(self, name) < 1:
                raise NASError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def _run_config(settings: SearchSettings, out: Path, model_path: str, train_text: str, mesh: dict[str, int]):
    from minitron_jax.train.config import RunConfigError, from_dict

    s = settings
    data = {
        "mode": "distill", "run_dir": str(out / "train"),
        "teacher": {"path": str(model_path), "dtype": s.teacher_dtype},
        "student": {"path": str(model_path)},  # a placeholder: students are built here, never loaded
        "data": {"sources": [str(train_text)], "seq_len": s.seq_len, "batch_size": s.batch_size,
                 "val_rows": s.val_rows, "val_batches": s.val_batches, "seed": s.seed,
                 "cache_dir": str(out / "tokens")},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0},
        "optim": {"peak_lr": s.peak_lr, "min_lr": s.min_lr, "warmup_steps": min(s.warmup_steps, s.steps - 1)},
        "train": {"steps": s.steps, "compute_dtype": s.compute_dtype, "param_dtype": "float32", "seed": s.seed},
        "mesh": dict(mesh),
    }
    try:
        return from_dict(data)
    except RunConfigError as e:
        raise NASError(str(e)) from None


class StepCache:
    """Jitted train and eval steps per student shape: a shape seen before reuses its compiled functions."""

    def __init__(self, rc, mesh, teacher_config: LlamaConfig):
        self.rc, self.mesh, self.teacher_config = rc, mesh, teacher_config
        self._steps: dict[LlamaConfig, tuple[Any, Any]] = {}
        self.builds = 0

    def get(self, config: LlamaConfig):
        from minitron_jax.train.step import build_eval_step, build_train_step

        if config not in self._steps:
            self.builds += 1
            self._steps[config] = (build_train_step(self.rc, self.mesh, config, self.teacher_config),
                                   build_eval_step(self.rc, self.mesh, config, self.teacher_config))
        return self._steps[config]


def _validate(eval_step, params, teacher_params, batches, shardings, batch_size) -> dict[str, float]:
    import jax

    from minitron_jax.train import inputs

    totals: dict[str, float] = {}
    for local in batches:
        sums = jax.device_get(eval_step(params, teacher_params, inputs.to_global(local, shardings, batch_size)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    w = max(totals.get("weight", 0.0), 1.0)
    return {"ce": totals["ce"] / w, "kl": totals.get("kd", float("nan")) / w}


@dataclasses.dataclass
class SharedImportance:
    """What one calibration pass gives every candidate: width scores and per-k layer scores (computed lazily)."""

    width: dict[str, np.ndarray]
    stats: Any
    windows: np.ndarray
    depth_metric: str
    depth_samples: int
    layer_scores: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def layers(self, config: LlamaConfig, params, k: int, progress=None) -> np.ndarray:
        from minitron_jax.compress import importance as imp

        key = 1 if self.depth_metric in ("ppl", "bi") else k  # ppl/bi: one score vector for every k
        if key not in self.layer_scores:
            windows = self.windows[: self.depth_samples]
            self.layer_scores[key] = imp.layer_importance(config, params, self.depth_metric, windows=windows,
                                                          stats=self.stats, block_size=k,
                                                          batch_size=min(8, len(windows)), progress=progress)
        return self.layer_scores[key]


def prune_candidate(config: LlamaConfig, params, cand: Candidate, shared: SharedImportance, progress=None):
    """The candidate's (config, params): width by the shared scores, then depth by the shared layer scores."""
    from minitron_jax.compress import prune

    spec = prune.PruneSpec(hidden=cand.hidden, ffn=cand.ffn, heads_per_group=cand.heads_per_group,
                           drop_layers=config.num_layers - cand.layers, depth_metric=shared.depth_metric)
    scores = dict(shared.width)
    if cand.layers < config.num_layers:
        scores["layers"] = shared.layers(config, params, config.num_layers - cand.layers, progress)
    keep = prune.plan(config, spec, scores)
    new_config, new_params = prune.apply_plan(config, params, keep)
    assert new_config == cand.config(config), (new_config, cand)
    return new_config, new_params, [int(i) for i in keep["drop_layers"]]


def run_search(model_path: str, target_params: int, *, out: str | Path, **kwargs) -> dict[str, Any]:
    """The whole search (see the module docstring; keyword arguments: :func:`_search`'s); returns the report dict
    (also written to ``out``).

    Holds ``out``'s lock throughout: a second search into one directory would mix its candidates' results with
    ours; it gets BusyError (exit 5) before anything is written."""
    from minitron_jax.fsutil import lock_directory

    with lock_directory(out):
        return _search(model_path, target_params, out=out, **kwargs)


def _search(model_path: str, target_params: int, *, out: str | Path, train_text: str, calib_text: str,
            tolerance: float = 0.05, settings: SearchSettings | None = None,
            grids: dict[str, Sequence[int]] | None = None, max_candidates: int = 8,
            candidates: Sequence[Candidate] | None = None, mesh: dict[str, int] | None = None,
            console=None) -> dict[str, Any]:
    import jax

    from minitron_jax.compress import importance as imp
    from minitron_jax.convert import load_model
    from minitron_jax.convert.hf import save_hf
    from minitron_jax.data import CACHE_FORMAT_VERSION, read_text, token_windows
    from minitron_jax.pipeline import write_json_atomic
    from minitron_jax.progress import PhaseProgress
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train import inputs
    from minitron_jax.train.state import init_train_state, place_teacher

    if console is None:
        from rich.console import Console

        console = Console() if sys.stdout.isatty() else Console(width=150)
    settings = settings or SearchSettings()
    settings.check()
    out = Path(out).absolute()
    mesh_sizes = mesh or {"data": 1, "fsdp": -1, "tensor": 1}
    rc = _run_config(settings, out, model_path, train_text, mesh_sizes)
    t_start = time.perf_counter()

    with console.status(f"loading {model_path} ..."):
        m = load_model(model_path)
    if m.tokenizer is None:
        raise NASError(f"{model_path} carries no tokenizer; the search tokenizes text with it")
    if candidates is None:
        all_cands = enumerate_candidates(m.config, target_params, tolerance, grids)
        candidates = select_spread(all_cands, max_candidates)
        console.print(f"{len(all_cands)} candidates within ±{tolerance:.0%} of {target_params:,} params; "
                      f"searching {len(candidates)}")
    else:
        all_cands = list(candidates)
    console.print(_candidates_table(candidates, m.config))

    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates").mkdir(exist_ok=True)
    sizes = [mesh_sizes.get("data", 1), mesh_sizes.get("fsdp", -1), mesh_sizes.get("tensor", 1)]
    mesh_obj = make_mesh(*sizes, devices=None if -1 in sizes else jax.devices()[: math.prod(sizes)])
    train_ds, val_ds = inputs.build_datasets(rc, m.tokenizer)
    val_batches = inputs.validation_batches(rc, val_ds)
    if not val_batches:
        raise NASError("the search needs held-out validation documents (--val-rows)")

    # One calibration pass for every candidate.
    windows = token_windows(m.tokenizer, read_text(calib_text), settings.calib_seq_len,
                            settings.calib_samples * settings.calib_seq_len)
    with PhaseProgress(console) as progress:
        t0 = time.perf_counter()
        stats = imp.collect_activation_stats(m.config, m.params, windows, progress=progress)
        shared = SharedImportance(stats.width_scores("mean", "l2"), stats, windows, settings.depth_metric,
                                  settings.depth_samples)
    importance_s = time.perf_counter() - t0

    teacher_params = place_teacher(rc, mesh_obj, m.config, m.params)
    cache = StepCache(rc, mesh_obj, m.config)
    results: list[dict[str, Any]] = []
    best: tuple[float, str] | None = None
    # Results are comparable only under the same settings and the same validation data: the token-cache format
    # changes with packing or the held-out split (format 2 validates on held-out documents, not packed rows).
    settings_key = json.dumps({**dataclasses.asdict(settings), "data_format": CACHE_FORMAT_VERSION}, sort_keys=True)
    best_file = out / "winner_so_far.json"
    if best_file.is_file():
        b = json.loads(best_file.read_text())
        if b.get("settings") == settings_key:
            best = (b["loss"], b["name"])
    for ci, cand in enumerate(candidates):
        done_file = out / "candidates" / f"{cand.name}.json"
        if done_file.is_file():
            done = json.loads(done_file.read_text())
            if done.get("settings") == settings_key:
                console.print(f"[green]✓[/green] {cand.name} done earlier, skipped")
                results.append(done)
                continue
        console.rule(f"[bold]{ci + 1}/{len(candidates)} {cand.name}[/bold] ({cand.params / 1e6:.2f}M params)")
        t0 = time.perf_counter()
        with PhaseProgress(console) as progress:
            cfg, params, dropped = prune_candidate(m.config, m.params, cand, shared, progress)
        builds_before = cache.builds
        ts, eval_step = cache.get(cfg)
        state = init_train_state(rc, mesh_obj, cfg, m.config, params)
        del params
        it = inputs.train_iterator(rc, train_ds)  # the same batches in the same order for every candidate
        curve, train_loss = [], []
        val = _validate(eval_step, state.params, teacher_params, val_batches, ts.batch_shardings,
                        settings.batch_size)
        curve.append({"step": 0, **val})
        compile_s = None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("distill"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[stats]}"), console=console) as bar:
            task = bar.add_task("distill", total=settings.steps, stats="")
            for step in range(1, settings.steps + 1):
                ts0 = time.perf_counter()
                state, metrics = ts.step(state, teacher_params,
                                         inputs.to_global(next(it), ts.batch_shardings, settings.batch_size))
                loss = float(jax.device_get(metrics["loss"]))
                if compile_s is None:
                    compile_s = time.perf_counter() - ts0
                if not math.isfinite(loss):
                    raise NASError(f"{cand.name}: non-finite loss at step {step}; lower --peak-lr")
                train_loss.append(loss)
                if step in settings.eval_steps:
                    val = _validate(eval_step, state.params, teacher_params, val_batches, ts.batch_shardings,
                                    settings.batch_size)
                    curve.append({"step": step, **val})
                bar.update(task, completed=step, stats=f"loss {loss:.4f}  val {settings.rank_by} "
                                                       f"{curve[-1][settings.rank_by]:.4f} @ {curve[-1]['step']}")
        seconds = time.perf_counter() - t0
        final = curve[-1][settings.rank_by]
        record = {"candidate": cand.to_dict(), "dropped_layers": dropped, "curve": curve, "train_loss": train_loss,
                  "seconds": seconds, "first_step_seconds": compile_s, "new_compile": cache.builds > builds_before,
                  "settings": settings_key}
        console.print(f"{cand.name}: val {settings.rank_by} {curve[0][settings.rank_by]:.4f} after pruning → "
                      f"{final:.4f} after {settings.steps} steps ({seconds:.0f}s)")
        if best is None or final < best[0]:
            from minitron_jax.train.state import student_params_to_host

            save_hf(out / "winner", cfg, student_params_to_host(state), tokenizer=m.tokenizer, overwrite=True,
                    sources=[model_path])
            best = (final, cand.name)
            write_json_atomic(best_file, {"loss": final, "name": cand.name, "settings": settings_key})
        write_json_atomic(done_file, record)
        results.append(record)
        del state

    report = _report(results, settings, target_params, tolerance, len(all_cands), m.config, out, importance_s,
                     cache.builds, time.perf_counter() - t_start)
    if best is not None and best[1] != report["winner"]["name"]:
        raise RuntimeError(f"exported winner {best[1]} differs from the ranked winner {report['winner']['name']}")
    console.print(_ranking_table(report))
    st = report["stability"]
    console.print(f"winner {report['winner']['name']} ({report['winner']['params'] / 1e6:.2f}M params) exported to "
                  f"{out / 'winner'}; ranking settled at step {st['settled_at']}, top-1 at step "
                  f"{st['top1_settled_at']} (Kendall tau vs final: "
                  + ", ".join(f"{p['step']}: {p['tau_vs_final']:.2f}" for p in st["per_step"]) + ")")
    return report


def _report(results, settings: SearchSettings, target, tolerance, n_enumerated, base: LlamaConfig, out: Path,
            importance_s: float, builds: int, wall: float) -> dict[str, Any]:
    from minitron_jax.pipeline import write_json_atomic

    steps = [p["step"] for p in results[0]["curve"]]
    losses = [[r["curve"][k][settings.rank_by] for r in results] for k in range(len(steps))]
    trained = ranking_stability(steps[1:], losses[1:])
    with_pruned = ranking_stability(steps, losses)
    names = [r["candidate"]["name"] for r in results]
    winner = results[trained["final_ranking"][0]]["candidate"]
    report = {"target_params": target, "tolerance": tolerance, "enumerated": n_enumerated,
              "searched": len(results), "base_params": count_params(base), "settings": dataclasses.asdict(settings),
              "candidates": results, "names": names, "rank_by": settings.rank_by, "stability": trained,
              "tau_pruned_vs_final": with_pruned["per_step"][0]["tau_vs_final"],
              "top1_pruned_agrees_with_final": with_pruned["per_step"][0]["top1_agrees_with_final"],
              "winner": winner, "importance_seconds": importance_s, "compiled_shapes": builds,
              "wall_seconds": wall}
    write_json_atomic(out / "nas_report.json", report)
    (out / "nas_report.md").write_text(_markdown(report))
    _plot(report, out / "nas_curves.png")
    return report


def _candidates_table(cands: Sequence[Candidate], base: LlamaConfig):
    from rich.table import Table

    t = Table(title=f"candidates (base {base.describe()}, {count_params(base):,} params)")
    for h in ("name", "layers", "hidden", "ffn", "heads/group", "params"):
        t.add_column(h, justify="right")
    for c in cands:
        t.add_row(c.name, str(c.layers), str(c.hidden), str(c.ffn), str(c.heads_per_group), f"{c.params:,}")
    return t


def _ranking_rows(report) -> tuple[list[str], list[list[str]]]:
    steps = report["stability"]["steps"]
    header = ["rank", "candidate", "params", "after pruning"] + [f"step {s}" for s in steps]
    rows = []
    for rank, i in enumerate(report["stability"]["final_ranking"], 1):
        r = report["candidates"][i]
        vals = [p[report["rank_by"]] for p in r["curve"]]
        rows.append([str(rank), r["candidate"]["name"], f"{r['candidate']['params'] / 1e6:.2f}M"]
                    + [f"{v:.4f}" for v in vals])
    return header, rows


def _ranking_table(report):
    from rich.table import Table

    header, rows = _ranking_rows(report)
    t = Table(title=f"validation {report['rank_by']} by step (ranked at step {report['stability']['steps'][-1]})")
    for h in header:
        t.add_column(h, justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def _markdown(report) -> str:
    header, rows = _ranking_rows(report)
    st = report["stability"]
    lines = [f"# Architecture search: {report['searched']} of {report['enumerated']} candidates within "
             f"±{report['tolerance']:.0%} of {report['target_params']:,} params", "",
             f"Validation {report['rank_by']} (nats/token) after pruning and after each number of distillation steps; "
             f"ranked by the last column.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "| step | Kendall tau vs final | tau vs previous | top-1 | top-1 = final |", "|---|---|---|---|---|"]
    for p in st["per_step"]:
        prev = "–" if p["tau_vs_previous"] is None else f"{p['tau_vs_previous']:.2f}"
        lines.append(f"| {p['step']} | {p['tau_vs_final']:.2f} | {prev} | {report['names'][p['top1']]} | "
                     f"{'yes' if p['top1_agrees_with_final'] else 'no'} |")
    lines += ["", f"Ranking unchanged from step {st['settled_at']} on; top-1 unchanged from step "
                  f"{st['top1_settled_at']} on. Ranking right after pruning vs final: Kendall tau "
                  f"{report['tau_pruned_vs_final']:.2f} "
                  f"(top-1 {'agrees' if report['top1_pruned_agrees_with_final'] else 'differs'}). "
                  f"Winner: {report['winner']['name']}. {report['compiled_shapes']} train steps compiled for "
                  f"{report['searched']} candidates; wall time {report['wall_seconds']:.0f}s."]
    return "\n".join(lines) + "\n"


def _plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["candidates"]:
        steps = [p["step"] for p in r["curve"]]
        ax.plot(steps, [p[report["rank_by"]] for p in r["curve"]], "o-", label=r["candidate"]["name"])
    ax.set_xlabel("distillation step (0 = right after pruning)")
    ax.set_ylabel(f"validation {report['rank_by']} (nats/token)")
    ax.set_yscale("log")
    ax.set_title("architecture search")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ======================================================================================================================
# CLI
# ======================================================================================================================
def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.nas",
                                 description="Enumerate width/depth candidates near a parameter budget, prune each "
                                             "from one importance pass, distill briefly, rank, export the winner.")
    ap.add_argument("--model", required=True, help="HF directory, .gguf or minitron_jax checkpoint (asset:NAME too)")
    ap.add_argument("--target-params", required=True, help="e.g. 90M, 0.09B, 90000000")
    ap.add_argument("--tolerance", type=float, default=0.05, help="candidates within ±this fraction (default 0.05)")
    ap.add_argument("--steps", type=int, default=400, help="distillation steps per candidate (paper: ~400)")
    ap.add_argument("--eval-steps", type=_int_list, default=None,
                    help="steps at which to evaluate and rank (default: 4 evenly spaced, ending at --steps)")
    ap.add_argument("--out", default="runs/nas", help="output directory (default runs/nas)")
    ap.add_argument("--data", default="asset:wikipedia", help="distillation/validation text (default asset:wikipedia)")
    ap.add_argument("--calib", default="asset:owt", help="calibration text (default asset:owt)")
    ap.add_argument("--max-candidates", type=int, default=8, help="search at most N (evenly spread; 0: all)")
    ap.add_argument("--hidden-grid", type=_int_list, help="hidden sizes to try (default: D − k·64 down to D/2)")
    ap.add_argument("--ffn-grid", type=_int_list, help="FFN sizes to try (default: F − k·F/12 down to F/2)")
    ap.add_argument("--heads-grid", type=_int_list, help="query heads per KV group to try (default: all)")
    ap.add_argument("--layers-grid", type=_int_list, help="layer counts to try (default: L − k·step down to L/2)")
    ap.add_argument("--depth-metric", default="bi", help="which layers go: bi (free, from the same pass), ppl or "
                                                         "contiguous (extra layer-drop scans)")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--peak-lr", type=float, default=1e-4)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--val-rows", type=int, default=16,
                    help="validate on at least this many rows' worth of documents held out of --data")
    ap.add_argument("--val-batches", type=int, default=2)
    ap.add_argument("--rank-by", choices=RANK_BY, default="ce", help="validation CE (default) or KL to the teacher")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--depth-samples", type=int, default=2, help="windows for the ppl/contiguous layer scans")
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (NASError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _run(args) -> int:
    from minitron_jax.convert import read_source_config
    from minitron_jax.train.config import resolve_path

    target = parse_params(args.target_params)
    model = resolve_path(args.model)
    config = read_source_config(model)
    grids = {"hidden": args.hidden_grid, "ffn": args.ffn_grid, "heads_per_group": args.heads_grid,
             "layers": args.layers_grid}
    cands = enumerate_candidates(config, target, args.tolerance, grids)
    if args.list:
        from rich.console import Console

        chosen = select_spread(cands, args.max_candidates)
        Console().print(_candidates_table(chosen, config))
        print(f"{len(cands)} candidates within ±{args.tolerance:.0%} of {target:,}; {len(chosen)} would be searched")
        return 0
    eval_steps = args.eval_steps or sorted({max(1, round(args.steps * k / 4)) for k in (1, 2, 3, 4)})
    settings = SearchSettings(steps=args.steps, eval_steps=tuple(eval_steps), seq_len=args.seq_len,
                              batch_size=args.batch_size, peak_lr=args.peak_lr, min_lr=args.min_lr,
                              warmup_steps=args.warmup_steps, val_rows=args.val_rows, val_batches=args.val_batches,
                              rank_by=args.rank_by, compute_dtype=args.compute_dtype, calib_samples=args.calib_samples,
                              calib_seq_len=args.calib_seq_len, depth_samples=args.depth_samples,
                              depth_metric=args.depth_metric, seed=args.seed)
    settings.check()
    run_search(model, target, out=args.out, train_text=resolve_path(args.data), calib_text=resolve_path(args.calib),
               tolerance=args.tolerance, settings=settings, grids=grids, max_candidates=args.max_candidates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
