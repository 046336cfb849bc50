"""A small architecture search the Minitron way: ``python -m minitron_jax.nas --model PATH --target-params P``
(the command: :mod:`minitron_jax.cli.nas`).

1. **Enumerate** width/depth candidates within ``±tolerance`` of the target parameter count and keep an evenly
   spread subset of at most ``--max-candidates`` (:mod:`minitron_jax.compress.candidates`).
2. **Prune** every candidate from ONE :class:`~minitron_jax.compress.importance.Importance` of the unpruned model
   (width scores and Block Importance come from the same calibration pass; the ``ppl``/``contiguous`` depth metrics
   add layer-drop scans, one per distinct number of dropped layers, cached by the importance object).
3. **Distill** each candidate briefly from the unpruned teacher (forward KL) with the trainer's own loop pieces
   (:func:`minitron_jax.train.loop.start`, ``train_steps``, ``validate``) on the same batches in the same order,
   evaluating the validation loss right after pruning (step 0) and at ``--eval-steps``. Validation rows hold
   documents that no training row touches (at least ``--val-rows`` rows' worth, held out before packing:
   ``minitron_jax.data``), so the ranking rewards generalizing, not fitting the training passages. Candidates run one
   after another; the jitted steps are built once per distinct shape and reused (:class:`StepCache`).
4. **Rank** by validation loss (LM cross-entropy by default, or the KL to the teacher) at every evaluation step and
   report how stable the ranking is (Kendall's tau against the final ranking and the previous evaluation, top-1
   agreement, the step after which the ranking and the top-1 no longer changed). (The paper saw rankings settle
   after ~300 steps of a 400-step search.)
5. **Export** the winner (its distilled weights) as an HF directory.

Outputs in ``--out``: ``candidates/<name>.json`` (one per finished candidate; a rerun skips them), ``winner/`` (HF),
``nas_report.json``, ``nas_report.md`` and ``nas_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from minitron_jax.compress.candidates import Candidate, NASError, enumerate_candidates, ranking_stability, select_spread
from minitron_jax.config import LlamaConfig
from minitron_jax.fsutil import write_json_atomic
from minitron_jax.model import count_params

RANK_BY = ("ce", "kl")


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
    # The teacher's top-k log-probs written once (train/teacher_cache) and read by every candidate instead of a
    # teacher forward per candidate per step; None: the online teacher. Candidates then train on the sparse KL.
    teacher_top_k: int | None = None
    teacher_logits_dtype: str = "float16"

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
        if self.teacher_top_k is not None and (isinstance(self.teacher_top_k, bool) or self.teacher_top_k < 1):
            raise NASError(f"--teacher-top-k must be >= 1, got {self.teacher_top_k}")
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


def prune_candidate(importance, cand: Candidate, depth_metric: str, progress=None):
    """The candidate's (config, params, dropped layers): the unpruned model of ``importance`` (an
    :class:`~minitron_jax.compress.importance_cache.Importance`) sliced by its width scores, then by its
    ``depth_metric`` layer scores."""
    from minitron_jax.compress import prune
    from minitron_jax.compress.spec import PruneSpec

    config = importance.config
    spec = PruneSpec(hidden=cand.hidden, ffn=cand.ffn, heads_per_group=cand.heads_per_group,
                     drop_layers=config.num_layers - cand.layers, depth_metric=depth_metric)
    scores, _ = prune.rank(importance, spec, progress)
    keep = prune.plan(config, spec, scores)
    new_config, new_params = prune.apply_plan(config, importance.params, keep)
    assert new_config == cand.config(config), (new_config, cand)
    return new_config, new_params, [int(i) for i in keep["drop_layers"]]


def _losses(val: dict[str, float]) -> dict[str, float]:
    """The validation losses a candidate is ranked by (``kl``: NaN without a teacher)."""
    return {"ce": val["ce"], "kl": val.get("kl", float("nan"))}


def _distill(run, cand: Candidate, settings: SearchSettings, console) -> tuple[list, list, float | None]:
    """``settings.steps`` checked trainer steps on ``run`` (a ``train.loop.Run``), validated at step 0 and at every
    evaluation step: (curve, train losses, seconds of the first step, its compile included)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from minitron_jax.train import loop

    curve = [{"step": 0, **_losses(loop.validate(run))}]
    train_loss: list[float] = []
    first_step_s: list[float] = []
    with Progress(TextColumn("distill"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[stats]}"), console=console) as bar:
        task = bar.add_task("distill", total=settings.steps, stats="")

        def after_step(r, metrics: dict[str, float], seconds: float) -> None:
            first_step_s.append(seconds)
            train_loss.append(metrics["loss"])
            if r.step in settings.eval_steps:
                curve.append({"step": r.step, **_losses(loop.validate(r))})
            bar.update(task, completed=r.step, stats=f"loss {metrics['loss']:.4f}  val {settings.rank_by} "
                                                     f"{curve[-1][settings.rank_by]:.4f} @ {curve[-1]['step']}")

        try:
            loop.train_steps(run, settings.steps, on_step=after_step)
        except loop.NonFiniteLossError:
            raise NASError(f"{cand.name}: non-finite loss at step {run.step}; lower --peak-lr") from None
    return curve, train_loss, first_step_s[0] if first_step_s else None


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

    from minitron_jax.compress.importance_cache import CalibrationSettings, Importance
    from minitron_jax.convert import load_model, save_hf
    from minitron_jax.data import CACHE_FORMAT_VERSION, read_text
    from minitron_jax.progress import PhaseProgress
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train import inputs, loop
    from minitron_jax.train.state import place_teacher, student_params_to_host

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
    console.print(candidates_table(candidates, m.config))

    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates").mkdir(exist_ok=True)
    sizes = [mesh_sizes.get("data", 1), mesh_sizes.get("fsdp", -1), mesh_sizes.get("tensor", 1)]
    mesh_obj = make_mesh(*sizes, devices=None if -1 in sizes else jax.devices()[: math.prod(sizes)])
    train_ds, val_ds = inputs.build_datasets(rc, m.tokenizer)
    teacher_config = m.config
    if settings.teacher_top_k is not None:
        # The teacher runs once, over the rows every candidate trains and validates on, instead of once per
        # candidate per step; the cache is resumable and refuses to be reused with other data or another teacher.
        rc, train_ds, val_ds = _cached_teacher(rc, settings, out, m, train_ds, val_ds, console)
        teacher_config = None  # no teacher in the candidates' steps, no teacher params on the devices
    val_batches = inputs.validation_batches(rc, val_ds)
    if not val_batches:
        raise NASError("the search needs held-out validation documents (--val-rows)")

    # One importance object (one calibration pass) for every candidate.
    calib = CalibrationSettings(calib_samples=settings.calib_samples, seq_len=settings.calib_seq_len,
                                depth_samples=settings.depth_samples)
    text = read_text(calib_text)
    with PhaseProgress(console) as progress:
        importance = Importance.calibrate(m.config, m.params, m.tokenizer, text, calib, progress=progress)
    importance_s = importance.timings["calibration_pass_s"]

    teacher_params = place_teacher(rc, mesh_obj, m.config, m.params) if teacher_config else {}
    cache = StepCache(rc, mesh_obj, teacher_config)
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
            cfg, params, dropped = prune_candidate(importance, cand, settings.depth_metric, progress)
        builds_before = cache.builds
        steps = cache.get(cfg)
        # The same batches in the same order for every candidate: each run starts a fresh iterator.
        try:
            run = loop.start(rc, mesh_obj, cfg, teacher_config, teacher_params, train_ds, val_batches,
                             student_params=params, steps=steps)
        except loop.NonFiniteLossError as e:
            raise NASError(f"{cand.name}: {e}") from None
        del params
        try:
            curve, train_loss, compile_s = _distill(run, cand, settings, console)
            seconds = time.perf_counter() - t0
            final = curve[-1][settings.rank_by]
            record = {"candidate": cand.to_dict(), "dropped_layers": dropped, "curve": curve,
                      "train_loss": train_loss, "seconds": seconds, "first_step_seconds": compile_s,
                      "new_compile": cache.builds > builds_before, "settings": settings_key}
            console.print(f"{cand.name}: val {settings.rank_by} {curve[0][settings.rank_by]:.4f} after pruning → "
                          f"{final:.4f} after {settings.steps} steps ({seconds:.0f}s)")
            if best is None or final < best[0]:
                save_hf(out / "winner", cfg, student_params_to_host(run.state), tokenizer=m.tokenizer,
                        overwrite=True, sources=[model_path])
                best = (final, cand.name)
                write_json_atomic(best_file, {"loss": final, "name": cand.name, "settings": settings_key})
        finally:
            run.close()
        write_json_atomic(done_file, record)
        results.append(record)
        del run

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


def _cached_teacher(rc, settings: SearchSettings, out: Path, m, train_ds, val_ds, console):
    """(run config reading the teacher cache, train and validation datasets carrying it), the cache written to
    ``out/teacher_logits`` first if it is not complete there."""
    from minitron_jax.train import teacher_cache

    cache_dir = out / "teacher_logits"
    with console.status(f"teacher top-{settings.teacher_top_k} log-probs → {cache_dir} ..."):
        teacher_cache.write_teacher_cache(rc, cache_dir, top_k=settings.teacher_top_k,
                                          dtype=settings.teacher_logits_dtype, log=console.print)
    rc = rc.replace(teacher=dataclasses.replace(rc.teacher, logits_cache=str(cache_dir)))
    train_ds, val_ds = teacher_cache.attach(rc, m.config, m.tokenizer, train_ds, val_ds, log=console.print)
    return rc, train_ds, val_ds


def _report(results, settings: SearchSettings, target, tolerance, n_enumerated, base: LlamaConfig, out: Path,
            importance_s: float, builds: int, wall: float) -> dict[str, Any]:
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


def candidates_table(cands: Sequence[Candidate], base: LlamaConfig):
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
