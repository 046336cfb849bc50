"""Multi-process for real: JAX's distributed runtime on localhost, two processes × 4 fake CPU devices.

Each process is a fresh interpreter running this file as a script (``python tests/test_multiprocess.py worker ...``):
it asks for 4 CPU devices, selects gloo for the CPU backend's cross-process collectives and runs the REAL trainer
(``minitron_jax.train.loop.run``) with ``distributed.initialize=true``, so ``jax.distributed.initialize`` joins the
two processes into one 8-device global mesh (fsdp=8). Each process reads only its half of every global batch (the
trainer's ``BatchIterator(process_index=, process_count=)``), checkpoints go to one shared run directory (Orbax
coordinates the processes), and the gathered final params are written by every process. The reference is one
process with 8 devices and the same config: same losses and same final params.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
TEACHER = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               max_position_embeddings=64)
STUDENT = dict(TEACHER, hidden_size=32, intermediate_size=64)
STEPS = 4


def _overrides(root: Path, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"teacher.path={root / 'teacher'}", f"student.path={root / 'student'}",
            f"data.sources={root / 'corpus.jsonl'}", f"data.cache_dir={root / 'cache'}", "data.seq_len=32",
            "data.batch_size=16", "data.val_rows=0", f"train.steps={STEPS}", "optim.warmup_steps=1",
            "optim.peak_lr=1e-2", "optim.eps=1e-3", "train.compute_dtype=float32", "teacher.dtype=float32",
            "train.grad_accum=2", "loss.chunk_size=64", "checkpoint.every=2", "checkpoint.async_save=false",
            "log.progress=false", "log.tensorboard=false", "export.at_end=false", "mesh.fsdp=-1"]


# ----------------------------------------------------------------------------------------------------------------
# The worker (runs in its own interpreter)
# ----------------------------------------------------------------------------------------------------------------
def worker(root: str, run_dir: str, out: str, num_processes: int, process_id: int, port: int, local_devices: int):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    from jax.experimental import multihost_utils

    from minitron_jax.train.config import load_config
    from minitron_jax.train.loop import run

    extra = []
    if num_processes > 1:
        extra = ["distributed.initialize=true", f"distributed.coordinator_address=127.0.0.1:{port}",
                 f"distributed.num_processes={num_processes}", f"distributed.process_id={process_id}"]
    rc = load_config(None, _overrides(Path(root), Path(run_dir)) + extra)
    result = run(rc, keep_state=True)
    assert jax.process_count() == num_processes and jax.device_count() == 8, (jax.process_count(), jax.devices())
    params = result.state.params["model"]
    if num_processes > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}
    np.savez(out, **flat)
    Path(out).with_suffix(".json").write_text(json.dumps({
        "history": result.history, "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "global_devices": jax.device_count(), "step": result.step,
    }))
    if num_processes > 1:
        jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _np(tree):
    import jax

    return jax.tree.map(np.array, tree)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import jax
    from utils import _CORPUS, tiny_tokenizer

    from minitron_jax.config import LlamaConfig
    from minitron_jax.convert.hf import save_hf
    from minitron_jax.model import init_params

    root = tmp_path_factory.mktemp("multiprocess")
    tok = tiny_tokenizer(300)
    teacher = LlamaConfig(vocab_size=len(tok), **TEACHER)
    student = LlamaConfig(vocab_size=len(tok), **STUDENT)
    save_hf(root / "teacher", teacher, _np(init_params(teacher, jax.random.key(0), std=0.3)), tokenizer=tok)
    save_hf(root / "student", student, _np(init_params(student, jax.random.key(1))), tokenizer=tok)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"text": " ".join(_CORPUS[j % 5] for j in range(i, i + 3))}) + "\n")
    return root


def _spawn(root: Path, run_dir: Path, out: Path, n: int, i: int, port: int, local: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen([sys.executable, __file__, "worker", str(root), str(run_dir), str(out), str(n), str(i),
                             str(port), str(local)], env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, outs, timeout=600):
    for p, out in zip(procs, outs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker timed out; log:\n{out.with_suffix('.log').read_text()[-4000:]}")
        if rc != 0:
            for q in procs:
                q.kill()
            pytest.fail(f"worker exited {rc}; log:\n{out.with_suffix('.log').read_text()[-4000:]}")


def test_two_processes_equal_one(models, tmp_path):
    """2 processes × 4 devices (gloo collectives, one global fsdp=8 mesh, each process feeding its half of every
    batch, one shared checkpoint dir) ≡ 1 process × 8 devices: losses and final params agree to reduction order."""
    import jax

    from minitron_jax.train.config import load_config
    from minitron_jax.train.loop import run

    if len(jax.devices()) < 8:
        pytest.skip("the one-process reference needs 8 fake CPU devices (tests/conftest.py)")
    port = _free_port()
    outs = [tmp_path / "p0.npz", tmp_path / "p1.npz"]
    procs = [_spawn(models, tmp_path / "run2", outs[i], 2, i, port, 4) for i in range(2)]
    try:  # the reference runs here, in this process's 8 devices, while the two workers run
        ref = run(load_config(None, _overrides(models, tmp_path / "run1")), keep_state=True)
    finally:
        _wait(procs, outs)

    meta = [json.loads(o.with_suffix(".json").read_text()) for o in outs]
    assert [m["process_index"] for m in meta] == [0, 1]
    assert all(m["process_count"] == 2 and m["local_devices"] == 4 and m["global_devices"] == 8 for m in meta)
    assert all(m["step"] == STEPS for m in meta) and ref.step == STEPS

    ref_losses = [h["loss"] for h in ref.history]
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    for m in meta:  # every process logs the same global metrics
        np.testing.assert_allclose([h["loss"] for h in m["history"]], ref_losses, rtol=1e-5)
        np.testing.assert_allclose([h["grad_norm"] for h in m["history"]], [h["grad_norm"] for h in ref.history],
                                   rtol=1e-4)
    ref_params = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                  for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(ref.state.params["model"]))[0]}
    for out in outs:
        got = np.load(out)
        assert sorted(got.files) == sorted(ref_params)
        for k, v in ref_params.items():
            np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=0, err_msg=k)
    # The checkpoint of the two-process run is one directory both processes wrote into.
    ckpts = sorted(int(p.name) for p in (tmp_path / "run2" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == STEPS


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    a = sys.argv[2:]
    worker(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]))
