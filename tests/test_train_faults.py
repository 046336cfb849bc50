"""Faults of a training run and of the tools around it: what is refused, with which exit code, and what is left.

- Non-finite numbers: an LR that overflows the param dtype is refused with the config; a step that leaves NaN/inf
  in the state is never checkpointed or logged; a NaN checkpoint is neither exported nor resumed; ``save_hf`` and
  the perplexity CLI refuse NaN (exit 3) instead of writing it.
- Unusable data (no token to predict, an empty validation split) is bad input (exit 2) before any step.
- A resume after a crash logs every step once; a refused resume leaves config.yaml as it was.

Tiny models and few steps, sharing test_distill's fixtures and compile cache.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill import compile_cache, make_rc, random_batch, tiny  # noqa: F401  (fixtures)
from utils import poison_hf

from minitron_jax.cli import distill
from minitron_jax.exitcodes import NonFiniteError
from minitron_jax.train import loop
from minitron_jax.train.checkpoints import Checkpointer
from minitron_jax.train.config import RunConfigError
from minitron_jax.train.loop import NonFiniteLossError, run
from minitron_jax.train.observe import read_metrics, truncate_metrics
from minitron_jax.train.step import all_finite


def _steps(run_dir, kind="train"):
    return [r["step"] for r in read_metrics(run_dir, kind)]


def _latest(run_dir, rc):
    ckpt = Checkpointer(run_dir / "checkpoints", rc.checkpoint)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------------------------------------------
# Non-finite numbers
# ----------------------------------------------------------------------------------------------------------------
def test_learning_rate_that_overflows_is_refused_with_the_config(tiny, tmp_path, capsys):  # noqa: F811
    with pytest.raises(RunConfigError, match=r"optim\.peak_lr=1e\+39 overflows float32"):
        make_rc(tiny, tmp_path, "optim.peak_lr=1e39")
    with pytest.raises(RunConfigError, match=r"optim\.peak_lr=1e\+39 overflows bfloat16"):
        make_rc(tiny, tmp_path, "optim.peak_lr=1e39", "train.param_dtype=bfloat16")
    with pytest.raises(RunConfigError, match=r"optim\.peak_lr=70000 overflows float16"):
        make_rc(tiny, tmp_path, "optim.peak_lr=7e4", "train.param_dtype=float16")
    # NaN passes every "< 0" check by comparing false: every float of the config must be finite.
    for override in ("optim.peak_lr=.nan", "optim.min_lr=.inf", "loss.temperature=.nan", "optim.eps=1e999"):
        with pytest.raises(RunConfigError, match="is not a finite number"):
            make_rc(tiny, tmp_path, override)
    rc = make_rc(tiny, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(rc.to_yaml())
    assert distill.main(["--config", str(tmp_path / "c.yaml"), "optim.peak_lr=1e39"]) == 2  # bad input
    assert "optim.peak_lr=1e+39 overflows float32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _poison_step_at(monkeypatch, bad_step: int):
    """Make the train step leave a NaN in the params after update ``bad_step`` while its loss (computed before the
    update) stays finite: the case a loss check alone lets through. The NaN goes in after the jitted step, so its
    ``finite`` metric is recomputed on the poisoned state with the step's own check (``step.all_finite``), as the
    step would have reported had its update made the NaN."""
    real = loop.build_train_step

    def build(*args, **kwargs):
        ts = real(*args, **kwargs)

        def step(state, teacher, batch):
            state, metrics = ts.step(state, teacher, batch)
            if int(jax.device_get(state.step)) == bad_step:
                model = dict(state.params["model"], final_norm=state.params["model"]["final_norm"] * jnp.nan)
                state = state._replace(params=dict(state.params, model=model))
                # Jitted, as inside the step: dozens of eager ops over the 8-fake-device state aborted the worker
                # twice under a loaded machine (SIGABRT inside an eager multiply; not reproduced alone).
                metrics = dict(metrics, finite=metrics["finite"]
                               & jax.jit(all_finite)((state.params, state.opt_state)))
            return state, metrics

        return ts._replace(step=step)

    monkeypatch.setattr(loop, "build_train_step", build)


def test_nonfinite_state_is_never_checkpointed_or_logged(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    _poison_step_at(monkeypatch, 3)
    rc = make_rc(tiny, tmp_path / "run", "train.stop_at=4", "checkpoint.every=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite state after step 3 \(first: .*final_norm.*"
                                                 r"Latest good checkpoint: step 2 in"):
        run(rc)
    assert _latest(tmp_path / "run", rc) == 2  # the NaN state was not saved...
    assert _steps(tmp_path / "run") == [1, 2]  # ...nor logged
    # The CLI: exit 3, resuming from step 2 and refusing step 3 again.
    (tmp_path / "c.yaml").write_text(rc.to_yaml())
    assert distill.main(["--config", str(tmp_path / "c.yaml")]) == 3
    assert "non-finite state after step 3" in capsys.readouterr().err
    assert _latest(tmp_path / "run", rc) == 2 and _steps(tmp_path / "run") == [1, 2]


def test_the_step_reports_whether_its_result_is_finite(tiny):  # noqa: F811
    """metrics["finite"], computed inside the jitted step, is False when the new state holds NaN/inf even though the
    loss and the params are finite (an inf second moment: Adam's update is then 0), and when the loss is NaN."""
    from minitron_jax.model import init_params
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train.state import init_train_state, place_teacher
    from minitron_jax.train.step import build_train_step

    rc = make_rc(tiny, "/tmp/unused_run_dir")
    s_cfg, t_cfg = tiny["student_cfg"], tiny["teacher_cfg"]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = build_train_step(rc, mesh, s_cfg, t_cfg)
    t_params = jax.tree.map(np.asarray, init_params(t_cfg, jax.random.key(0)))
    s_params = jax.tree.map(np.asarray, init_params(s_cfg, jax.random.key(1)))
    batch = jax.device_put({k: np.asarray(v, np.int32) for k, v in random_batch(s_cfg.vocab_size).items()},
                           ts.batch_shardings)

    def one_step(state, teacher):
        state, metrics = ts.step(state, place_teacher(rc, mesh, t_cfg, teacher), batch)
        return state, jax.device_get(metrics)

    state, metrics = one_step(init_train_state(rc, mesh, s_cfg, t_cfg, s_params), t_params)
    assert bool(metrics["finite"]) and bool(jax.jit(all_finite)(state))

    def inf_second_moment(x):  # Adam's nu of one leaf: its update becomes mu / inf = 0
        return x.at[0].set(jnp.inf) if x.ndim == 1 and x.shape == s_params["final_norm"].shape else x

    state = init_train_state(rc, mesh, s_cfg, t_cfg, s_params)
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, x: inf_second_moment(x) if "nu" in jax.tree_util.keystr(path) else x, state.opt_state)
    state, metrics = one_step(state._replace(opt_state=opt_state), t_params)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert bool(jax.jit(all_finite)(state.params))
    assert not bool(metrics["finite"]) and not bool(jax.jit(all_finite)(state.opt_state))

    nan_teacher = dict(t_params, final_norm=t_params["final_norm"] * np.nan)
    _, metrics = one_step(init_train_state(rc, mesh, s_cfg, t_cfg, s_params), nan_teacher)
    assert not np.isfinite(metrics["loss"]) and not bool(metrics["finite"])


def test_the_finite_check_adds_no_step_memory(tiny, monkeypatch):  # noqa: F811
    """The step's NaN/inf check reads the new state inside reductions and holds no buffer of its own: the compiled
    step's temporaries are those of the same step without the check. (Written as Σ x·0, XLA merged the 0 with the
    backward pass's zero-initialized gradient buffers and kept them alive to the end: +0.3 GB on the demo.)"""
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train import step as step_module
    from minitron_jax.train.state import abstract_teacher, abstract_train_state

    rc = make_rc(tiny, "/tmp/unused_run_dir")
    s_cfg, t_cfg = tiny["student_cfg"], tiny["teacher_cfg"]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])

    def temp_bytes():
        ts = step_module.build_train_step(rc, mesh, s_cfg, t_cfg)
        args = (abstract_train_state(rc, mesh, s_cfg, t_cfg), abstract_teacher(rc, mesh, t_cfg),
                step_module.abstract_batch(rc, mesh))
        return ts.step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    with_check = temp_bytes()
    monkeypatch.setattr(step_module, "all_finite", lambda tree: jnp.asarray(True))
    without = temp_bytes()
    assert with_check <= without * 1.01 + 4096, (with_check, without)


def test_nan_checkpoint_is_neither_exported_nor_resumed(tiny, tmp_path, capsys):  # noqa: F811
    """A checkpoint holding NaN (written before the loop checked states) is refused by --export-from (exit 3,
    nothing written) and by a resume; its good predecessor still exports."""
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train.state import abstract_train_state

    rc = make_rc(tiny, tmp_path / "run", "train.stop_at=2")
    run(rc)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", rc.checkpoint)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, data_state, meta = ckpt.restore(2, abstract_train_state(rc, mesh, tiny["student_cfg"], tiny["teacher_cfg"]))
    layers = dict(state.params["model"]["layers"], up=state.params["model"]["layers"]["up"].at[1, 0, 0].set(jnp.inf))
    state = state._replace(step=state.step + 2, params=dict(state.params, model=dict(state.params["model"],
                                                                                       layers=layers)))
    ckpt.save(4, state, data_state, {**meta, "step": 4})
    ckpt.close()

    out = tmp_path / "hf"
    assert distill.main(["--export-from", str(tmp_path / "run"), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "layers.up[1]" in err and "Other checkpoints: 2" in err
    assert not out.exists() and not list(tmp_path.glob(".hf*"))  # nothing half-written either
    assert distill.main(["--export-from", str(tmp_path / "run" / "checkpoints" / "2"), "--out", str(out)]) == 0
    with pytest.raises(NonFiniteLossError, match=r"checkpoint step 4 .* holds non-finite values .*layers.*up"):
        run(make_rc(tiny, tmp_path / "run", "train.stop_at=6"))


def test_save_hf_refuses_nonfinite_params(tiny, tmp_path):  # noqa: F811
    from minitron_jax.convert.hf import save_hf
    from minitron_jax.model import init_params

    params = jax.tree.map(np.array, init_params(tiny["student_cfg"], jax.random.key(1)))
    params["layers"]["q"][1, 0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"tensor layers\.q\[1\] holds NaN/inf"):
        save_hf(tmp_path / "m", tiny["student_cfg"], params)
    assert not (tmp_path / "m").exists()


def test_eval_of_a_nan_model_exits_3_without_printing_nan(tiny, tmp_path, capsys):  # noqa: F811
    from minitron_jax.cli import eval as eval_cli

    model = poison_hf(shutil.copytree(tiny["root"] / "student", tmp_path / "nan_student"))
    args = ["--model", str(model), "--text", str(tiny["root"] / "corpus.jsonl"), "--seq-len", "16",
            "--max-tokens", "64", "--json"]
    assert eval_cli.main(args) == 3
    out, err = capsys.readouterr()
    assert out == ""  # no {"perplexity": NaN}, which is not JSON
    assert err.count("\n") == 1 and err.startswith("error: perplexity of") and "not finite" in err
    # The good model's line is strict JSON.
    args[1] = str(tiny["root"] / "student")
    assert eval_cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_reports_write_nonfinite_values_as_null(tmp_path):
    from minitron_jax.pipeline import write_json_atomic
    from minitron_jax.train.observe import Reporter

    write_json_atomic(tmp_path / "r.json", {"ppl": float("nan"), "curve": [1.0, np.float32("inf")], "n": 3})
    assert json.loads((tmp_path / "r.json").read_text()) == {"ppl": None, "curve": [1.0, None], "n": 3}
    reporter = Reporter(tmp_path, total_steps=2, start_step=0, flops_per_token=1.0, progress=False,
                        tensorboard=False)
    reporter.validation(1, {"ce": float("inf"), "ppl": 3.0})
    reporter.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "Infinity" not in line and json.loads(line)["ce"] is None


# ----------------------------------------------------------------------------------------------------------------
# Unusable data
# ----------------------------------------------------------------------------------------------------------------
def test_data_with_nothing_to_learn_is_refused_before_any_step(tiny, tmp_path, capsys):  # noqa: F811
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n' * 20)
    for name in ("empty.txt", "empty.jsonl"):
        run_dir = tmp_path / f"run_{name}"
        with pytest.raises(RunConfigError, match=rf"data\.sources \(.*{name}\).*hold no token to predict"):
            run(make_rc(tiny, run_dir, f"data.sources={tmp_path / name}"))
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
    rc = make_rc(tiny, tmp_path / "run_cli", f"data.sources={tmp_path / 'empty.txt'}")
    (tmp_path / "c.yaml").write_text(rc.to_yaml())
    assert distill.main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert "empty.txt" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_logs_every_step_once(tiny, tmp_path, monkeypatch):  # noqa: F811
    """A crash after steps 3 and 4 were logged but before checkpoint 4 was written: the resume from 2 re-runs 3 and
    4, and metrics.jsonl holds each step (and the validation at 3) exactly once."""
    real_save = Checkpointer.save

    def crash_at_4(self, step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_save(self, step, *args, **kwargs)

    extra = ("train.stop_at=4", "data.val_rows=8", "train.eval_every=3")
    monkeypatch.setattr(Checkpointer, "save", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run(make_rc(tiny, tmp_path / "run", *extra))
    assert _steps(tmp_path / "run") == [1, 2, 3, 4] and _steps(tmp_path / "run", "val") == [3]
    monkeypatch.setattr(Checkpointer, "save", real_save)
    result = run(make_rc(tiny, tmp_path / "run", *extra))
    assert result.resumed_from == 2 and result.step == 4
    assert _steps(tmp_path / "run") == [1, 2, 3, 4] and _steps(tmp_path / "run", "val") == [3]


def test_truncate_metrics_drops_later_steps_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (1, 2, 3)] + [json.dumps({"kind": "val", "step": 2})]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')
    truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_refused_resume_leaves_config_yaml_unchanged(tiny, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    run(make_rc(tiny, run_dir, "train.stop_at=2"))
    before = (run_dir / "config.yaml").read_bytes()
    refusals = {
        "data.sources": ("data.sources=" + str(tmp_path / "missing.txt"),),
        "cannot resume from checkpoint step 2": ("loss.hidden.pairs=[[0,0]]", "loss.hidden.weight=0.1"),
        "train.resume is false": ("train.resume=false",),
    }
    for message, overrides in refusals.items():
        with pytest.raises(RunConfigError, match=message):
            run(make_rc(tiny, run_dir, "train.stop_at=4", *overrides))
        assert (run_dir / "config.yaml").read_bytes() == before, overrides
    assert not list(run_dir.glob(".config.yaml.tmp*"))  # no temporary file left
    assert _latest(run_dir, make_rc(tiny, run_dir)) == 2


def test_a_full_disk_mid_save_is_one_line_and_keeps_the_finished_checkpoints(tiny, tmp_path,  # noqa: F811
                                                                             compile_cache):  # noqa: F811
    """A checkpoint save the system refuses (here: the process's file-size limit, EFBIG, as a full disk refuses
    with ENOSPC) is one line naming the checkpoint directory, exit 6. Before, each tensorstore write still in flight
    when Orbax's save failed printed an "Event loop is closed" traceback after that line (37 of them for a 2-layer
    model; seen in CI on a full /tmp). The refused save's temporary directory is removed; step 2 stays."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run(make_rc(tiny, run_dir, "train.stop_at=2"))
    (tmp_path / "c.yaml").write_text(make_rc(tiny, run_dir, "train.stop_at=4", "checkpoint.async_save=true").to_yaml())
    # A fixed limit: how tensorstore splits the data into files depends on timing (the biggest file of step 2's
    # checkpoint was 119 kB in one CI run and 217-362 kB here), but every save so far had at least three data files
    # over 32 kB, while the metadata files, the config, the metrics and the logs stay well under it.
    limit = 32 * 1024
    files = [p for p in (run_dir / "checkpoints" / "2").rglob("*") if p.is_file()]
    data = sorted(p.stat().st_size for p in files if p.parent.name == "d")
    assert data[-2] > limit, data  # a save of this size does not fit under the limit
    assert max(p.stat().st_size for p in files if p.parent.name != "d") < limit * 0.6, files  # its metadata fits

    # The limit is set by the child itself (no preexec_fn: forking this multithreaded process warns).
    child = ("import resource, runpy, sys; "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
             f"sys.argv = ['distill', '--config', {str(tmp_path / 'c.yaml')!r}]; "
             "runpy.run_module('minitron_jax.distill', run_name='__main__')")
    # The child reads this module's XLA cache (same devices, same step: no compile) and writes none to it: an
    # entry over the file-size limit would be one more refused write.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: file size limit exceeded writing {run_dir / 'checkpoints'} (File too large)"], proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]  # no partial save left
    assert _latest(run_dir, make_rc(tiny, run_dir)) == 2
