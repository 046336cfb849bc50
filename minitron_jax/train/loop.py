"""The training loop: set up a run, resume it if it has checkpoints, step, validate, checkpoint, export.

The loop is made of pieces that other searches reuse (NAS trains its candidates with them):

- :func:`start` → a :class:`Run`: the compiled train/eval steps, the placed teacher, the state (fresh from given
  params, or restored from a checkpoint), the batch iterator and the validation batches;
- :func:`setup`: :func:`start` for a whole run config (models, data, checkpoints, run files);
- :func:`train_steps`: ``n`` checked updates; :func:`validate`: the validation losses;
- :func:`run`: ``setup`` + ``train_steps`` with logging, validation and checkpoints after each step + export.

Invariants the loop keeps:

- **Exact resume.** A checkpoint at step k holds the state after k updates and the iterator position after the
  k-th batch; restarting from it replays the same batches through the same compiled step, so N steps straight and
  N/2 + resume + N/2 give bitwise-identical params and losses.
- **Never save a bad state.** Every step's loss and gradient norm, and the updated state itself (params and
  optimizer state: the loss is computed before the update, so it cannot vouch for it), are checked before the state
  can be checkpointed, logged or exported; a non-finite value ends the run with :class:`NonFiniteLossError` (exit
  3) and the previous checkpoints are left as they were. A restored checkpoint is checked the same way.
- **A refused run changes nothing.** config.yaml and the model descriptions are written only once everything that
  can refuse the run (models, data, checkpoint) has passed.
- **One process writes files.** Checkpoints are written by all processes (Orbax coordinates them); metrics,
  TensorBoard and the HF export by process 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from minitron_jax import hostmem
from minitron_jax.arch import AnyConfig
from minitron_jax.attention import cudnn_fused_attention
from minitron_jax.exitcodes import NonFiniteError
from minitron_jax.sharding import make_mesh
from minitron_jax.train import inputs, teacher_cache
from minitron_jax.train.checkpoints import CHECKPOINT_DIR, CONFIG_FILE, STUDENT_DIR, TEACHER_DIR, Checkpointer
from minitron_jax.train.config import RunConfig, RunConfigError, resolve_path
from minitron_jax.train.models import RunModels, StudentPruner, load_run_models
from minitron_jax.train.observe import Reporter, step_flops_per_token
from minitron_jax.train.state import TrainState, abstract_train_state, init_train_state, place_teacher
from minitron_jax.train.step import TrainStep, build_eval_step, build_train_step


class NonFiniteLossError(NonFiniteError, RuntimeError):
    """The loss, the gradients or the updated state became NaN/inf; the run stopped without checkpointing that
    state (exit code 3). Still a RuntimeError for callers that caught it as one."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int  # updates done when the run returned
    resumed_from: int | None
    history: list[dict[str, float]]  # per-step metrics of this invocation
    validation: list[dict[str, float]]
    export_path: Path | None
    state: TrainState | None = None


def _setup_jax(rc: RunConfig) -> None:
    if rc.train.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(rc.train.compile_cache).expanduser()))
    d = rc.distributed
    if d.initialize and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)


def _write_run_files(rc: RunConfig, run_dir: Path, models: RunModels, resuming: bool) -> None:
    """config.yaml always (the config this invocation ran with); model descriptions on a fresh start.

    config.yaml goes to a temporary name and is renamed, so a crash leaves the old or the new file, never half."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(rc.to_yaml())
    os.replace(tmp, run_dir / CONFIG_FILE)
    if resuming:
        return
    student_dir = run_dir / STUDENT_DIR
    student_dir.mkdir(exist_ok=True)
    models.student_config.to_json_file(student_dir / "config.json")
    if models.tokenizer is not None:
        models.tokenizer.save_pretrained(str(student_dir))
    if models.teacher_config is not None:
        (run_dir / TEACHER_DIR).mkdir(exist_ok=True)
        models.teacher_config.to_json_file(run_dir / TEACHER_DIR / "config.json")


@functools.lru_cache(maxsize=8)
def _finite_checker(mesh) -> Any:
    """``tree -> first non-finite leaf path or None``: one jitted all-finite reduction per floating leaf, so the
    state is read once on device and only a vector of booleans comes to the host. It checks a state before any step
    trains from it (fresh or restored) and names the bad leaf of a state a step refused; the train step checks its
    own result inside its jit (``metrics["finite"]``), so a good step costs no second pass.

    Checking the loss is not enough: it is computed *before* the update, so an update that overflows (a huge LR,
    an inf second moment) leaves NaN/inf params or optimizer state behind a finite loss, and that state would be
    the one checkpointed. The reduction reads the state once, which is small next to a step that reads it several
    times over. Its result is replicated so every process can read it, multi-host included. One checker per mesh,
    so runs on one mesh (a search's candidates) share its compiled reductions."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    def floating(x) -> bool:
        return jnp.issubdtype(x.dtype, jnp.inexact)

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def finite_leaves(leaves):
        return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)

    def first_nonfinite(tree) -> str | None:
        named = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
                 if floating(x)]
        ok = np.asarray(finite_leaves([x for _, x in named]).addressable_data(0))
        bad = np.flatnonzero(~ok)
        return named[bad[0]][0] if len(bad) else None

    return first_nonfinite


def _host_params(tree) -> Any:
    """Gather a (possibly multi-host sharded) tree to host numpy arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _validate(eval_step, state: TrainState, teacher_params, batches, shardings, rc: RunConfig) -> dict[str, float]:
    totals: dict[str, float] = {}
    for local in batches:
        sums = jax.device_get(eval_step(state.params, teacher_params,
                                        inputs.to_global(local, shardings, rc.data.batch_size)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    w = max(totals.get("weight", 0.0), 1.0)
    out = {"ce": totals["ce"] / w, "ppl": math.exp(min(totals["ce"] / w, 50.0)), "tokens": totals["tokens"]}
    if "kd" in totals:
        out["kl"] = totals["kd"] / w
    return out


# ----------------------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """A run being trained: what :func:`train_steps` and :func:`validate` work on. Close it when done."""

    rc: RunConfig
    mesh: Any
    student_config: AnyConfig
    teacher_config: AnyConfig | None
    train_step: TrainStep
    eval_step: Any  # jitted (trainable, teacher_params, batch) -> sums; None without validation batches
    teacher_params: Any  # placed on the mesh ({} without a teacher)
    train_rows: int
    val_batches: list[dict[str, np.ndarray]]
    state: TrainState
    step: int  # updates done
    batches: inputs.Prefetcher  # yields (local batch, iterator position after it)
    data_state: dict | None = None  # iterator position after the last batch trained on: what a checkpoint saves
    checkpointer: Checkpointer | None = None
    resumed_from: int | None = None
    models: RunModels | None = None  # setup()'s models (params dropped once placed)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per-step metrics, this invocation

    def close(self) -> None:
        """Stop the batch reader and close the checkpointer (waiting for saves in flight)."""
        self.batches.close()
        if self.checkpointer is not None:
            self.checkpointer.close()


def start(rc: RunConfig, mesh, student_config: AnyConfig, teacher_config: AnyConfig | None, teacher_params,
          train_ds, val_batches: list, *, student_params=None, resume_step: int | None = None,
          checkpointer: Checkpointer | None = None, steps: tuple[TrainStep, Any] | None = None,
          log: Callable[[str], None] = print) -> Run:
    """A :class:`Run` of ``rc``'s training for ``student_config``: a fresh state around ``student_params``, or the
    state and data position of checkpoint ``resume_step`` of ``checkpointer``.

    ``teacher_params`` are already placed (``state.place_teacher``); ``train_ds`` and ``val_batches`` come from
    ``inputs.build_datasets`` / ``inputs.validation_batches``. ``steps`` = ``(train step, eval step)`` built earlier
    for this shape (a search reuses them across candidates); otherwise they are built here. The state is checked
    for NaN/inf before anything trains from it (:class:`NonFiniteLossError`). ``checkpointer`` is kept on the Run
    (closed with it) and named in non-finite errors."""
    if steps is None:
        steps = (build_train_step(rc, mesh, student_config, teacher_config),
                 build_eval_step(rc, mesh, student_config, teacher_config) if val_batches else None)
    ts, eval_step = steps
    first_nonfinite = _finite_checker(mesh)
    if resume_step is not None:
        state, data_state = _restore(checkpointer, resume_step,
                                     abstract_train_state(rc, mesh, student_config, teacher_config))
        log(f"resumed {Path(rc.run_dir).absolute()} at step {resume_step}")
    else:
        state, data_state = init_train_state(rc, mesh, student_config, teacher_config, student_params), None
    bad = first_nonfinite(state)
    if bad is not None:  # a checkpoint from before this check, or a model that is NaN already
        where = (f"checkpoint step {resume_step} in {checkpointer.directory}" if resume_step is not None
                 else "the initial state")
        raise NonFiniteLossError(f"{where} holds non-finite values (first: {bad}); refusing to train from it")
    step = int(jax.device_get(state.step))
    batches = inputs.Prefetcher(inputs.train_iterator(rc, train_ds, data_state))
    return Run(rc, mesh, student_config, teacher_config, ts, eval_step, teacher_params, len(train_ds), val_batches,
               state, step, batches, data_state, checkpointer, resume_step)


def setup(rc: RunConfig, *, prune_student: StudentPruner | None = None,
          log: Callable[[str], None] = print) -> Run:
    """The :class:`Run` that ``rc`` describes: models loaded (a student given as ``student.prune`` is built by
    ``prune_student``, see ``train.models``), data built, resumed from the run dir's latest checkpoint if it has
    one; config.yaml and the model descriptions written only once all of that has passed (process 0).

    Does not take the run dir's lock; :func:`run` does."""
    _setup_jax(rc)
    run_dir = Path(rc.run_dir).absolute()
    mesh = make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, rc.checkpoint)
    r = None
    try:
        latest = ckpt.latest_step()
        if latest is not None and not rc.train.resume:
            raise RunConfigError(f"{run_dir} already has checkpoints (latest step {latest}) and train.resume is "
                                 "false: pick a new run_dir or resume")
        models = load_run_models(rc, run_dir if latest is not None else None, log=log, prune_student=prune_student)
        student_cfg, teacher_cfg = models.student_config, models.teacher_config
        train_ds, val_ds = inputs.build_datasets(rc, models.tokenizer)
        if rc.teacher.logits_cache is not None:  # the teacher's cached top-k stand in for it (train/teacher_cache)
            train_ds, val_ds = teacher_cache.attach(rc, teacher_cfg, models.tokenizer, train_ds, val_ds, log=log)
            teacher_cfg = None  # no teacher forward in the step and no teacher params on the devices
        val_batches = inputs.validation_batches(rc, val_ds)
        teacher_params = place_teacher(rc, mesh, teacher_cfg, models.teacher_params) if teacher_cfg else {}
        models.teacher_params = None  # the host copy is no longer needed
        r = start(rc, mesh, student_cfg, teacher_cfg, teacher_params, train_ds, val_batches,
                  student_params=models.student_params, resume_step=latest, checkpointer=ckpt, log=log)
        models.student_params = None
        # Loading, placing and initializing left ~0.5 GB of freed host copies in glibc's heaps (XLA:CPU buffers
        # are malloc memory): give them back before the first step's temporaries come on top (docs/pipeline.md).
        hostmem.release()
        r.models = models
        # Only now, with the models loaded and compatible, the data built and the checkpoint restored, has
        # everything that can refuse this run passed: a refused run leaves the run dir's files as they were.
        if jax.process_index() == 0:
            _write_run_files(rc, run_dir, models, resuming=latest is not None)
        return r
    except BaseException:
        if r is not None:
            r.close()
        else:
            ckpt.close()
        raise


def train_steps(run: Run, n: int, on_step: Callable[[Run, dict[str, float], float], None] | None = None,
                ) -> list[dict[str, float]]:
    """``n`` updates of ``run.state``, each on the next batch; returns their metrics (``{"step", **metrics}``, also
    appended to ``run.history``).

    Every step's loss and gradient norm, and the updated state itself, are checked before anything sees them: a
    non-finite value raises :class:`NonFiniteLossError`. ``on_step(run, metrics, seconds)`` runs after each
    checked step (log, validate, checkpoint)."""
    rc, ts, done = run.rc, run.train_step, []
    first_nonfinite = _finite_checker(run.mesh)
    for _ in range(n):
        local, run.data_state = next(run.batches)
        start_time = time.perf_counter()
        run.state, metrics = ts.step(run.state, run.teacher_params,
                                     inputs.to_global(local, ts.batch_shardings, rc.data.batch_size))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        seconds = time.perf_counter() - start_time
        run.step += 1
        step = run.step
        finite = bool(metrics.pop("finite"))  # the step's own check of its loss, grads and new state
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss {metrics['loss']}, grad norm {metrics['grad_norm']}); "
                f"stopped without saving it. {_latest_good(run.checkpointer)}. Lower optim.peak_lr, check the "
                "data, or set optim.grad_clip.")
        # Every state is checked, not only the ones saved: so every checkpoint (and the export) is finite, and
        # metrics.jsonl never holds a line for a step whose result was refused. The step computed the check; only
        # a refused state is read again, leaf by leaf, to name its first bad leaf in the error.
        if not finite:
            bad = first_nonfinite(run.state) or "a leaf the step found non-finite"
            raise NonFiniteLossError(
                f"non-finite state after step {step} (first: {bad}; loss {metrics['loss']}, grad norm "
                f"{metrics['grad_norm']}); stopped without saving it. {_latest_good(run.checkpointer)}. Lower "
                "optim.peak_lr or set optim.grad_clip.")
        record = {"step": step, **metrics}
        run.history.append(record)
        done.append(record)
        if on_step is not None:
            on_step(run, metrics, seconds)
    return done


def validate(run: Run) -> dict[str, float]:
    """Validation CE (``ce``, ``ppl``), token count and KL to the teacher (``kl``, with one) of ``run.state`` on
    ``run.val_batches``."""
    return _validate(run.eval_step, run.state, run.teacher_params, run.val_batches, run.train_step.batch_shardings,
                     run.rc)


def _holding_run_dir_lock(fn):
    """Run ``fn(rc, ...)`` holding ``rc.run_dir``'s lock, taken before anything is written (fsutil.lock_directory).

    Two runs on one run_dir would interleave metrics.jsonl and race in Orbax: the second gets BusyError (exit 5)
    at once; a run_dir that is a file is bad input (exit 2). Only process 0 locks: every host of one run shares
    the run_dir. A destination the export at the end would refuse is refused now, not after hours of training."""

    @functools.wraps(fn)
    def locked(rc: RunConfig, **kwargs):
        from minitron_jax.fsutil import check_destination, first_missing, lock_directory, remove_empty_tree

        _setup_jax(rc)
        if jax.process_index() != 0:
            return fn(rc, **kwargs)
        run_dir = Path(rc.run_dir).absolute()
        created = first_missing(run_dir)
        try:
            with lock_directory(run_dir):
                if rc.export.at_end and not str(rc.export.path or "").startswith("asset:"):
                    inputs_read = [p for p in (rc.teacher.path, rc.student.path) if p and not p.startswith("asset:")]
                    check_destination(Path(rc.export.path) if rc.export.path else run_dir / "hf", overwrite=True,
                                      sources=[*inputs_read, run_dir / CHECKPOINT_DIR, run_dir / STUDENT_DIR])
                return fn(rc, **kwargs)
        except BaseException:
            # A new run refused before it wrote anything (a bad cache, a model that does not load) leaves no empty
            # run_dir/checkpoints behind; anything it did write is kept. After the lock: its file lives beside.
            remove_empty_tree(created)
            raise

    return locked


@_holding_run_dir_lock
def run(rc: RunConfig, *, keep_state: bool = False, prune_student: StudentPruner | None = None) -> RunResult:
    """Run (or resume) the training described by ``rc``. Raises NonFiniteLossError on a NaN/inf loss or state.

    ``prune_student`` builds a student given as ``student.prune`` (the distill command passes
    ``minitron_jax.compress.prune.prune_student``; ``train`` never imports ``compress``)."""
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *_: None)
    r = None
    reporter = None
    try:
        r = setup(rc, prune_student=prune_student, log=log)
        ckpt, student_cfg, teacher_cfg, mesh = r.checkpointer, r.student_config, r.teacher_config, r.mesh
        run_dir = Path(rc.run_dir).absolute()
        stop = rc.train.stop_at or rc.train.steps
        tokens_per_step = rc.data.batch_size * rc.data.seq_len
        reporter = Reporter(run_dir, total_steps=rc.train.steps, start_step=r.step,
                            flops_per_token=step_flops_per_token(student_cfg, teacher_cfg, rc.data.seq_len),
                            devices=list(mesh.devices.flat),
                            progress=rc.log.progress, tensorboard=rc.log.tensorboard, log_every=rc.train.log_every,
                            enabled=is_main)
        log(f"{rc.mode}: {'student' if teacher_cfg else 'trained model'} {student_cfg.describe()}"
            + (f" | teacher {teacher_cfg.describe()}" if teacher_cfg else "")
            + f" | mesh {dict(mesh.shape)} | {r.train_rows} train rows, {len(r.val_batches)} val batches")
        if rc.train.attention == "einsum" and cudnn_fused_attention(rc.train.compute_dtype):
            # The default stays einsum until more GPU shapes are checked (docs/gpu.md); say what it costs here.
            log("note: this is an NVIDIA GPU in half precision: train.attention: fused (cuDNN) ran the distillation "
                "step 2.2x faster than the default einsum at 4096 tokens on an H200 (docs/gpu.md)")
        validations = []
        first = True

        def after_step(r: Run, metrics: dict[str, float], seconds: float) -> None:
            nonlocal first
            reporter.step(r.step, metrics, seconds=seconds, tokens=tokens_per_step, compiled=first)
            first = False
            if r.eval_step is not None and ((rc.train.eval_every and r.step % rc.train.eval_every == 0)
                                            or r.step == rc.train.steps):
                val = validate(r)
                validations.append({"step": r.step, **val})
                reporter.validation(r.step, val)
            if r.step % rc.checkpoint.every == 0 or r.step == stop:
                ckpt.save(r.step, r.state, r.data_state, {"step": r.step, "mode": rc.mode, "time": time.time()})

        train_steps(r, max(stop - r.step, 0), on_step=after_step)
        ckpt.wait()

        export_path = None
        if r.step == rc.train.steps and rc.export.at_end:
            params = _host_params(r.state.params["model"])
            if is_main:
                export_path = _export(rc, run_dir, student_cfg, params)
                log(f"exported the student to {export_path}")
        return RunResult(run_dir, r.step, r.resumed_from, r.history, validations, export_path,
                         r.state if keep_state else None)
    finally:
        if r is not None:
            r.close()
        if reporter is not None:
            reporter.close()


def _latest_good(ckpt: Checkpointer | None) -> str:
    if ckpt is None:
        return "This run keeps no checkpoints"
    latest = ckpt.latest_step()
    return (f"Latest good checkpoint: step {latest} in {ckpt.directory}" if latest is not None
            else f"No checkpoint was written yet in {ckpt.directory}")


def _restore(ckpt: Checkpointer, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """The state and data iterator position of checkpoint ``step``; a checkpoint that does not fit this run's
    config (a changed model, hidden loss or dtype) is bad input, named, not an Orbax traceback."""
    try:
        state, data_state, _ = ckpt.restore(step, abstract_state)
    except (ValueError, KeyError, TypeError) as e:
        raise RunConfigError(f"cannot resume from checkpoint step {step} in {ckpt.directory}: it does not match "
                             f"this run's config ({type(e).__name__}: {str(e)[:300]}); resume with the config it "
                             "was written with (config.yaml) or pick a new run_dir") from None
    return state, data_state


def _export(rc: RunConfig, run_dir: Path, student_cfg, params) -> Path:
    import jax.numpy as jnp

    from minitron_jax.convert import save_hf
    from minitron_jax.convert.model_card import derived_card

    out = Path(resolve_path(rc.export.path) if rc.export.path else run_dir / "hf")
    # The card says what this run did to which model; the source is the teacher it learned from (the model it
    # fine-tuned, for sft without a teacher).
    source = rc.teacher.path if rc.mode != "sft" or rc.student.path is None else rc.student.path
    step = {"distill": "distillation", "teacher_correction": "teacher correction", "sft": "sft"}[rc.mode]
    loss = (f"{rc.loss.kind} on logits (T={rc.loss.temperature:g}, alpha={rc.loss.alpha:g})" if rc.uses_teacher
            else "next-token cross-entropy")
    if rc.mode == "sft":
        loss += ", assistant tokens only"
    facts = {"steps": rc.train.steps, "tokens": rc.train.steps * rc.data.batch_size * rc.data.seq_len, "loss": loss}
    card = derived_card(out.name if out.name != "hf" else run_dir.name, student_cfg,
                        resolve_path(source) if source else None, {step: facts})
    return save_hf(out, student_cfg, params, tokenizer_dir=run_dir / STUDENT_DIR, dtype=jnp.dtype(rc.export.dtype),
                   overwrite=True, card=card)
