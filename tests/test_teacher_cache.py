"""The offline teacher (train/teacher_cache.py, train/sparse_loss.py, losses.sparse_forward_kl, the
teacher_logits command): the sparse KL against dense references and jax.grad, the cache round trip, refusals of a
cache made for something else, kill -9 mid-write and resume, exact training resume from the cache, and the K = V
cache giving the online forward-KL loss. Tiny random models on CPU (8 fake devices from conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import _CORPUS, persistent_compile_cache, tiny_distill_files

from minitron_jax.model import forward
from minitron_jax.train import losses, sparse_loss
from minitron_jax.train.config import RunConfigError, load_config
from minitron_jax.train.teacher_cache import TeacherCache, TeacherCacheError, write_teacher_cache

TEACHER = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               max_position_embeddings=64)
STUDENT = dict(TEACHER, hidden_size=32, intermediate_size=64)
REPO = Path(__file__).parent.parent


def _np(tree):
    return jax.tree.map(np.array, tree)


# ----------------------------------------------------------------------------------------------------------------
# The per-token sparse KL
# ----------------------------------------------------------------------------------------------------------------
def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _teacher_top_k(t_logits, k):
    """(ids, log-probs, log rest) of a teacher's logits, float64 numpy."""
    lp = _np_log_softmax(t_logits)
    ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(lp, ids, -1)
    if k == lp.shape[-1]:  # nothing outside the top-k (1 − Σ p would be a rounding error, not 0)
        return ids.astype(np.int32), top, np.full(top.shape[:-1], -np.inf)
    in_top = np.zeros(lp.shape, bool)
    np.put_along_axis(in_top, ids, True, -1)
    return ids.astype(np.int32), top, np.log(np.exp(np.where(in_top, -np.inf, lp)).sum(-1))


def _np_sparse_kl(s_logits, ids, lp_t, rest_t):
    """Straight from the definition, float64: KL over K + 1 outcomes."""
    lp_s = np.take_along_axis(_np_log_softmax(s_logits), ids, -1)
    r_s = 1.0 - np.exp(lp_s).sum(-1)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum(-1)
    r_t = np.exp(rest_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        return kl + np.where(r_t > 0, r_t * (rest_t - np.log(r_s)), 0.0)


def _jax_reference(s_logits, ids, lp_t, rest_t):
    """The same written the obvious way in JAX (probabilities, 1 − Σ), for gradients where it is well conditioned."""
    p_s = jax.nn.softmax(s_logits, axis=-1)
    ps = jnp.take_along_axis(p_s, ids, axis=-1)
    r_s = 1.0 - ps.sum(-1)
    return (jnp.exp(lp_t) * (lp_t - jnp.log(ps))).sum(-1) + jnp.exp(rest_t) * (rest_t - jnp.log(r_s))


@pytest.mark.parametrize("k", [1, 5, 17])
def test_sparse_kl_matches_float64_and_the_gradient_of_a_reference(k):
    rng = np.random.default_rng(k)
    s = rng.normal(0, 2, (3, 5, 40)).astype(np.float32)
    t = rng.normal(0, 2, (3, 5, 40)).astype(np.float32)
    ids, lp_t, rest_t = _teacher_top_k(t, k)
    args = (jnp.asarray(ids), jnp.asarray(lp_t, jnp.float32), jnp.asarray(rest_t, jnp.float32))
    got = losses.sparse_forward_kl(jnp.asarray(s), *args)
    np.testing.assert_allclose(np.asarray(got), _np_sparse_kl(s, ids, lp_t, rest_t), rtol=2e-5, atol=2e-6)
    assert (np.asarray(got) >= -1e-6).all()
    g = jax.grad(lambda z: losses.sparse_forward_kl(z, *args).sum())(jnp.asarray(s))
    g_ref = jax.grad(lambda z: _jax_reference(z, *args).sum())(jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-6)
    # Zero (with a zero gradient) when the student is the teacher.
    same = losses.sparse_forward_kl(jnp.asarray(t), *args)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=2e-5)


def test_sparse_kl_at_full_vocabulary_is_the_dense_forward_kl():
    """K = V: the rest mass is 0 (stored −inf); the loss and its gradient are the dense forward KL's, no NaN."""
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(0, 3, (4, 6, 32)).astype(np.float32))
    t = jnp.asarray(rng.normal(0, 3, (4, 6, 32)).astype(np.float32))
    ids, lp_t, rest_t = _teacher_top_k(np.asarray(t), 32)
    assert np.isneginf(rest_t).all()
    args = (jnp.asarray(ids), jnp.asarray(lp_t, jnp.float32), jnp.asarray(rest_t, jnp.float32))
    sparse = lambda z: losses.sparse_forward_kl(z, *args).sum()  # noqa: E731
    dense = lambda z: losses.forward_kl(z, t).sum()  # noqa: E731
    np.testing.assert_allclose(float(sparse(s)), float(dense(s)), rtol=1e-5)
    g, g_dense = jax.grad(sparse)(s), jax.grad(dense)(s)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_dense), rtol=1e-4, atol=1e-6)


def test_sparse_kl_edge_values_stay_finite():
    """A float16 underflow (log p_t = −inf) contributes 0; a student with all its mass on S gets a finite loss."""
    s = jnp.asarray([[50.0, 49.0, -50.0, -50.0]])
    ids = jnp.asarray([[0, 1]])
    lp = jnp.asarray([[-0.1, -jnp.inf]])
    rest = jnp.log(-jnp.expm1(jnp.asarray([-0.1])))
    value, grad = jax.value_and_grad(lambda z: losses.sparse_forward_kl(z, ids, lp, rest).sum())(s)
    assert np.isfinite(float(value)) and float(value) > 0 and np.isfinite(np.asarray(grad)).all()


def test_temperature_other_than_one_is_refused(tiny, tmp_path):
    z = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="needs temperature 1"):
        losses.sparse_forward_kl(z, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2)), jnp.zeros(2), temperature=2.0)
    with pytest.raises(RunConfigError, match="loss.temperature must be 1"):
        make_rc(tiny, tmp_path, f"teacher.logits_cache={tmp_path}", "loss.temperature=2.0")
    with pytest.raises(RunConfigError, match="is for mode: distill"):
        make_rc(tiny, tmp_path, f"teacher.logits_cache={tmp_path}", "mode=teacher_correction", "student.path=null")
    with pytest.raises(RunConfigError, match="loss.hidden needs the teacher's hidden states"):
        make_rc(tiny, tmp_path, f"teacher.logits_cache={tmp_path}", "loss.hidden.weight=1.0",
                "loss.hidden.pairs=[[0,0]]")


def test_chunked_cached_loss_equals_the_unchunked_one_and_excludes_masked_tokens_exactly():
    rng = np.random.default_rng(2)
    B, T, D, V, K = 3, 7, 16, 48, 6
    hidden = jnp.asarray(rng.normal(0, 1, (B, T, D)).astype(np.float32))
    head = jnp.asarray(rng.normal(0, 0.5, (D, V)).astype(np.float32))
    ids, lp, rest = _teacher_top_k(rng.normal(0, 2, (B, T, V)), K)
    ids, lp, rest = jnp.asarray(ids), jnp.asarray(lp, jnp.float16), jnp.asarray(rest, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    weights = jnp.asarray((rng.random((B, T)) > 0.3).astype(np.float32))
    # Masked tokens carry garbage (NaN log-probs, out-of-range rest): it must not reach the loss or the gradient.
    lp_bad = jnp.where(weights[..., None] == 0, jnp.nan, lp)
    rest_bad = jnp.where(weights == 0, 5.0, rest)

    def chunked(h, w, alpha=0.7, lp=lp_bad, rest=rest_bad):
        return sparse_loss.cached_teacher_loss(h, w, ids, lp, rest, targets, weights, alpha=alpha, chunk_size=4)[0]

    def naive(h, w, alpha=0.7):
        logits = h @ w
        loss, _ = sparse_loss.per_token_loss(logits, ids, lp, rest, targets, alpha=alpha)
        return jnp.sum(jnp.where(weights != 0, weights * loss, 0.0)) / jnp.sum(weights)

    v, g = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, head)
    v_ref, g_ref = jax.value_and_grad(naive, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    for a, b in zip(g, g_ref):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert np.asarray(g[0])[np.asarray(weights) == 0].max(initial=0) == 0  # exactly no gradient from them


# ----------------------------------------------------------------------------------------------------------------
# Tiny models and data
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")) as path:
        yield path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    out = tiny_distill_files(root, TEACHER, STUDENT, teacher_seeds={"teacher2": 5})
    with open(root / "other.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(_CORPUS[j % 5] for j in range(i, i + 4))}) + "\n")
    return out


def make_rc(tiny, run_dir, *extra):
    r = tiny["root"]
    base = [f"run_dir={run_dir}", f"teacher.path={r / 'teacher'}", f"student.path={r / 'student'}",
            f"data.sources={r / 'corpus.jsonl'}", f"data.cache_dir={r / 'cache'}", "data.seq_len=32",
            "data.batch_size=8", "data.val_rows=4", "data.val_batches=1", "train.steps=6", "optim.warmup_steps=1",
            "optim.peak_lr=1e-2", "train.compute_dtype=float32", "teacher.dtype=float32", "loss.chunk_size=64",
            "checkpoint.every=2", "checkpoint.async_save=false", "log.progress=false", "log.tensorboard=false",
            "export.at_end=false"]
    return load_config(None, base + list(extra))


@pytest.fixture(scope="module")
def cache_k8(tiny, tmp_path_factory):
    """A top-8 float32 cache of the tiny teacher over the tiny run's rows (train + validation)."""
    out = tmp_path_factory.mktemp("caches") / "k8"
    rc = make_rc(tiny, out.parent / "unused")
    summary = write_teacher_cache(rc, out, top_k=8, dtype="float32", rows_per_shard=5, batch_rows=4, log=lambda _: 0)
    return out, summary


def _cli(*args) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "minitron_jax.teacher_logits", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc.returncode, proc.stdout, proc.stderr


def _summary_of(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


def _cli_args(tiny, out, *extra):
    r = tiny["root"]
    return ["--teacher", r / "teacher", "--data", r / "corpus.jsonl", "--seq-len", 32, "--val-rows", 4,
            "--cache-dir", r / "cache", "--teacher-dtype", "float32", "--out", out, "--top-k", 8,
            "--dtype", "float32", "--rows-per-shard", 5, "--batch-rows", 4, *extra]


# ----------------------------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------------------------
def _teacher_reference(tiny, rc, split):
    """float64 top-k of the teacher's logits over every row of a split, through the trainer's own data code."""
    from minitron_jax.convert import load_model
    from minitron_jax.train.inputs import build_datasets

    teacher = load_model(tiny["root"] / "teacher")
    train, val = build_datasets(rc, teacher.tokenizer)
    ds = train if split == "train" else val
    rows = ds.rows(np.arange(len(ds)))
    logits = forward(teacher.config, teacher.params, jnp.asarray(rows["tokens"]),
                     positions=jnp.asarray(rows["positions"]), segment_ids=jnp.asarray(rows["segment_ids"]))
    return ds, np.asarray(logits, np.float64)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 1e-2), ("bfloat16", 6e-2)])
def test_cache_round_trip_reproduces_the_teachers_top_k(tiny, cache_k8, tmp_path, dtype, tol):
    out, summary = cache_k8
    if dtype != "float32":
        out = tmp_path / dtype
        rc = make_rc(tiny, tmp_path / "unused")
        summary = write_teacher_cache(rc, out, top_k=8, dtype=dtype, rows_per_shard=5, batch_rows=4,
                                      log=lambda _: 0)
    cache = TeacherCache(out)
    cache.check_complete()
    assert cache.top_k == 8 and cache.ids_dtype == np.uint16 and cache.logprobs_dtype.name == dtype
    itemsize = np.dtype(cache.logprobs_dtype).itemsize
    assert summary["array_bytes_per_token"] == 8 * (2 + itemsize) + 4
    assert summary["complete"] and summary["bytes_per_token"] >= summary["array_bytes_per_token"]
    rc = make_rc(tiny, tmp_path / "unused")
    for split in ("train", "validation"):
        ds, logits = _teacher_reference(tiny, rc, split)
        ids, lp, rest = _teacher_top_k(logits, 8)
        got = cache.split(split).rows(np.arange(len(ds)))
        np.testing.assert_array_equal(got["teacher_ids"].astype(np.int32), ids)
        np.testing.assert_allclose(got["teacher_logprobs"].astype(np.float64), lp, rtol=tol, atol=tol)
        np.testing.assert_allclose(got["teacher_rest"], rest, rtol=1e-4, atol=1e-5)
    # Any row order, with the loader's padding rows (-1).
    order = np.array([7, -1, 0, 3, 12])
    rows = cache.split("train").rows(order)
    whole = cache.split("train").rows(np.arange(13))
    np.testing.assert_array_equal(rows["teacher_ids"][[0, 2, 3, 4]], whole["teacher_ids"][[7, 0, 3, 12]])
    assert np.isneginf(rows["teacher_rest"][1]).all()


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------
def test_rerun_keeps_shards_and_a_mismatched_cache_is_refused_with_exit_2(tiny, tmp_path, capsys):
    out = tmp_path / "cache"
    code, stdout, err = _cli(*_cli_args(tiny, out))
    assert code == 0, err
    summary = _summary_of(stdout)
    assert summary["complete"] and summary["shards_written"] == summary["shards"] > 2
    assert "bytes/token on disk" in stdout
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*/ids.npy")}
    code, stdout, err = _cli(*_cli_args(tiny, out))  # a rerun computes nothing
    assert code == 0 and _summary_of(stdout)["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*/ids.npy")} == before

    r = tiny["root"]
    cases = {"top_k (cache 8 vs now 4)": ["--top-k", 4],
             "teacher.weights_blake2b": ["--teacher", r / "teacher2"],
             "data.seq_len (cache 32 vs now 16)": ["--seq-len", 16],
             "data.train_sha256": ["--data", r / "other.jsonl"],
             "dtype (cache float32 vs now float16)": ["--dtype", "float16"]}
    from minitron_jax.cli.teacher_logits import main

    for what, change in cases.items():  # in this process: the same main as the command's, without a jax import each
        capsys.readouterr()
        code = main([str(a) for a in _cli_args(tiny, out, *change)])
        err = capsys.readouterr().err
        assert code == 2, (what, err)
        line = err.strip().splitlines()
        assert len(line) == 1 and line[0].startswith(f"error: {out / 'index.json'}: ") and what in line[0], line


def test_a_run_refuses_a_cache_of_another_teacher_or_data(tiny, cache_k8, tmp_path, capsys):
    from minitron_jax.cli.distill import main

    out, _ = cache_k8
    r = tiny["root"]
    for change, what in (([f"teacher.path={r / 'teacher2'}"], "teacher.weights_blake2b"),
                         (["teacher.dtype=bfloat16"], "teacher.dtype (cache float32 vs now bfloat16)"),
                         (["data.val_rows=0"], "data.validation_rows (cache ")):
        rc = make_rc(tiny, tmp_path / "run", f"teacher.logits_cache={out}", *change)
        (tmp_path / "c.yaml").write_text(rc.to_yaml())
        capsys.readouterr()
        assert main(["--config", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out / 'index.json'}: " in err[0] and what in err[0], err
    assert not (tmp_path / "run").exists()  # a refused new run leaves no run dir (Orbax made an empty checkpoints/)


def test_a_cache_the_disk_cannot_hold_is_refused_before_the_teacher_pass(tiny, cache_k8, tmp_path, monkeypatch):
    """The writer knows each shard's size exactly: a file system with less room is refused (exit 6) before any
    shard is computed, and a new cache leaves no directory behind; a resumed one is checked for its missing shards
    only. (Before, the teacher ran over every shard that fit and a short write ended in an errno-less OSError
    from numpy, a traceback with exit 1.)"""
    import shutil
    from collections import namedtuple

    from minitron_jax.exitcodes import SystemRefusedError

    src, _ = cache_k8
    shards = sorted(d.name for d in src.iterdir() if d.is_dir())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    rc = make_rc(tiny, tmp_path / "unused")
    out = tmp_path / "new"
    with pytest.raises(SystemRefusedError, match=rf"^{out}: the {len(shards)} shard\(s\) to write need "
                                                 r"\d+\.\d\d kB on disk and 1\.00 kB is free; free some space, "
                                                 r"or lower --top-k") as e:
        write_teacher_cache(rc, out, top_k=8, dtype="float32", rows_per_shard=5, batch_rows=4, log=lambda _: 0)
    assert not out.exists() and not (tmp_path / ".new.lock").exists()
    # The estimate is what cache_k8's shards (the same settings) take: their arrays exactly, plus <= 4 kB each.
    written = sum(f.stat().st_size for d in shards for f in (src / d).iterdir())
    estimate = float(str(e.value).split(" need ")[1].split(" kB")[0]) * 1e3
    assert written <= estimate + 10 <= written + len(shards) * 4096, (written, estimate)
    resumed = tmp_path / "resumed"
    shutil.copytree(src, resumed)
    shutil.rmtree(resumed / shards[1])
    with pytest.raises(SystemRefusedError, match=r"the 1 shard\(s\) to write need"):
        write_teacher_cache(rc, resumed, top_k=8, dtype="float32", rows_per_shard=5, batch_rows=4, log=lambda _: 0)


def test_a_damaged_cache_is_refused_naming_the_shard_and_a_rerun_repairs_it(tiny, cache_k8, tmp_path):
    """Values no teacher writes (an id outside the vocabulary, a NaN log-prob), a shard directory of another cache
    and an index whose shards leave a gap are refused with the file named, not trained on (an out-of-range id
    gathered NaN and stopped the run as a "non-finite loss"; a gap in the index read past a shard's end: exit 1);
    deleting the damaged shard, or not, and rerunning the writer repairs the cache to the original bytes."""
    import shutil

    src, _ = cache_k8
    ref = TeacherCache(src).split("train").rows(np.arange(len(TeacherCache(src).split("train"))))

    def damaged(name, edit):
        out = tmp_path / name
        shutil.copytree(src, out)
        edit(out)
        return out

    def edit_array(shard, file, fn):
        def edit(out):
            a = np.load(out / shard / file)
            fn(a)
            np.save(out / shard / file, a)
        return edit

    bad_id = damaged("bad_id", edit_array("train-00001", "ids.npy", lambda a: a.__setitem__((1, 2, 0), 299 + 7)))
    nan_lp = damaged("nan_lp", edit_array("train-00002", "logprobs.npy", lambda a: a.__setitem__((0, 3, 2), np.nan)))
    pos_rest = damaged("pos_rest", edit_array("train-00003", "rest.npy", lambda a: a.__setitem__((4, 0), 0.5)))
    for out, shard, file, what in ((bad_id, "train-00001", "ids.npy", "token id 306 outside the vocabulary of"),
                                   (nan_lp, "train-00002", "logprobs.npy", "log-probability NaN"),
                                   (pos_rest, "train-00003", "rest.npy", "log-probability 0.5")):
        split = TeacherCache(out).split("train")
        split.rows(np.arange(5))  # an undamaged shard reads as before
        with pytest.raises(TeacherCacheError) as e:
            split.rows(np.arange(len(split)))
        assert str(e.value).startswith(f"{out / shard / file}: {what}") and f"delete {out / shard} and" in str(e.value)

    def foreign_shard(out):
        meta = json.loads((out / "train-00001" / "shard.json").read_text())
        (out / "train-00001" / "shard.json").write_text(json.dumps({**meta, "fingerprint_sha256": "0" * 64}))

    foreign = damaged("foreign", foreign_shard)
    assert TeacherCache(foreign).missing() == ["train-00001"]
    with pytest.raises(TeacherCacheError, match="incomplete \\(1 of"):
        TeacherCache(foreign).check_complete()

    def gap(out):
        index = json.loads((out / "index.json").read_text())
        del index["splits"]["train"]["shards"][1]
        (out / "index.json").write_text(json.dumps(index))

    with pytest.raises(TeacherCacheError, match="shard train-00002 of split 'train' covers rows \\[10, 15\\), "
                                                "expected rows from 5 on"):
        TeacherCache(damaged("gap", gap)).split("train")
    from minitron_jax.train.teacher_cache import read_layout

    with pytest.raises(TeacherCacheError, match="shard train-00002 of split 'train'"):
        read_layout(tmp_path / "gap")  # what a dry run and the step builder read: refused there too

    shutil.rmtree(bad_id / "train-00001")  # as the message says; the foreign shard is replaced without being asked
    for out in (bad_id, foreign):
        summary = write_teacher_cache(make_rc(tiny, tmp_path / "unused"), out, top_k=8, dtype="float32",
                                      rows_per_shard=5, batch_rows=4, log=lambda _: 0)
        assert summary["complete"] and summary["shards_written"] == 1
        split = TeacherCache(out).split("train")
        for key, value in split.rows(np.arange(len(split))).items():
            np.testing.assert_array_equal(value, ref[key])


# ----------------------------------------------------------------------------------------------------------------
# kill -9 mid-write
# ----------------------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    from minitron_jax.cli.teacher_logits import main
    from minitron_jax.train import teacher_cache
    real_save, saved = teacher_cache.save_npy, []
    def slow_save(path, array):  # stop inside the third shard's staging directory, one file written
        real_save(path, array)
        saved.append(path)
        if len(saved) == 7:
            print("ready", flush=True)
            time.sleep(120)
    teacher_cache.save_npy = slow_save
    main(sys.argv[1:])
""")


def test_kill_9_mid_write_leaves_no_readable_half_shard_and_the_rerun_completes(tiny, tmp_path):
    out, ref = tmp_path / "cache", tmp_path / "reference"
    assert _cli(*_cli_args(tiny, ref))[0] == 0
    args = [str(a) for a in _cli_args(tiny, out)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        assert line.strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = TeacherCache(out)
    staging = [p for p in out.iterdir() if p.name.startswith(".train-00002.tmp-")]
    assert len(staging) == 1 and (staging[0] / "ids.npy").is_file()  # the half shard, under its staging name
    assert cache.missing()[0] == "train-00002" and not (out / "train-00002").exists()
    with pytest.raises(TeacherCacheError, match=r"incomplete \(\d+ of \d+ shards missing, first train-00002\)"):
        cache.check_complete()
    with pytest.raises(TeacherCacheError, match="train-00002: shard missing or incomplete"):
        cache.split("train").rows(np.array([10]))  # rows 10-14 live in that shard
    np.testing.assert_array_equal(cache.split("train").rows(np.arange(10))["teacher_ids"],
                                  TeacherCache(ref).split("train").rows(np.arange(10))["teacher_ids"])
    code, stdout, err = _cli(*_cli_args(tiny, out))
    assert code == 0, err
    summary = _summary_of(stdout)
    assert summary["shards_kept"] == 2 and summary["complete"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]
    for split in ("train", "validation"):
        a, b = TeacherCache(out).split(split), TeacherCache(ref).split(split)
        for key, value in a.rows(np.arange(len(a))).items():
            np.testing.assert_array_equal(value, b.rows(np.arange(len(b)))[key])


# ----------------------------------------------------------------------------------------------------------------
# Training from the cache
# ----------------------------------------------------------------------------------------------------------------
def test_training_from_the_cache_resumes_bitwise_and_never_loads_the_teacher(tiny, cache_k8, tmp_path,
                                                                             monkeypatch):
    from minitron_jax.convert import hf
    from minitron_jax.train.loop import run

    out, _ = cache_k8
    loaded = []
    real = hf.load_hf_params
    monkeypatch.setattr(hf, "load_hf_params", lambda path, **k: (loaded.append(Path(path).name), real(path, **k))[1])
    straight = run(make_rc(tiny, tmp_path / "a", f"teacher.logits_cache={out}", "train.stop_at=4"),
                   keep_state=True)
    first = run(make_rc(tiny, tmp_path / "b", f"teacher.logits_cache={out}", "train.stop_at=2"))
    second = run(make_rc(tiny, tmp_path / "b", f"teacher.logits_cache={out}", "train.stop_at=4"), keep_state=True)
    assert "teacher" not in loaded and loaded.count("student") == 2  # the student twice (two fresh starts)
    assert second.resumed_from == 2 and second.step == 4
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in first.history + second.history]
    assert straight.history[-1]["kd"] < straight.history[0]["kd"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (straight.state.params, straight.state.opt_state), (second.state.params, second.state.opt_state))


def test_full_vocabulary_cache_gives_the_online_forward_kl_loss(tiny, tmp_path):
    """K = V, float32: the cached step's loss (sparse KL + rest bucket, here empty) and gradients equal the online
    teacher's forward-KL step's."""
    from minitron_jax.convert import load_model
    from minitron_jax.train.inputs import build_datasets
    from minitron_jax.train.step import make_loss_fn
    from minitron_jax.train.teacher_cache import CachedTeacherDataset

    V = tiny["vocab"]
    out = tmp_path / "full"
    rc = make_rc(tiny, tmp_path / "run", "loss.alpha=0.5")
    write_teacher_cache(rc, out, top_k=V, dtype="float32", rows_per_shard=8, batch_rows=8, log=lambda _: 0)
    teacher, student = load_model(tiny["root"] / "teacher"), load_model(tiny["root"] / "student")
    train, _ = build_datasets(rc, teacher.tokenizer)
    batch = CachedTeacherDataset(train, TeacherCache(out).split("train")).rows(np.array([3, 0, 9, 5]))
    assert np.isneginf(batch["teacher_rest"]).all()
    trainable = {"model": jax.tree.map(jnp.asarray, student.params)}
    online = make_loss_fn(rc, student.config, teacher.config)
    cached = make_loss_fn(make_rc(tiny, tmp_path / "run", "loss.alpha=0.5", f"teacher.logits_cache={out}"),
                          student.config, None)
    (v1, s1), g1 = jax.value_and_grad(online, has_aux=True)(trainable, jax.tree.map(jnp.asarray, teacher.params),
                                                           {k: jnp.asarray(batch[k]) for k in
                                                            ("tokens", "segment_ids", "positions", "loss_mask")})
    (v2, s2), g2 = jax.value_and_grad(cached, has_aux=True)(trainable, {}, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    np.testing.assert_allclose(float(s2["kd"]), float(s1["kd"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), g2, g1)


def test_dry_run_plans_no_teacher_and_the_cached_arrays_in_the_batch(tiny, cache_k8, tmp_path):
    from minitron_jax.planning import capacity as P
    from minitron_jax.planning.dryrun import make_plan
    from minitron_jax.planning.report import format_plan

    out, _ = cache_k8
    kw = dict(recipe=None, acc=P.accelerator("h100"), mfu=0.4, memory_fraction=0.9, devices=1,
              devices_per_host=None, total_tokens=None, abstract=False, verify=False, log=lambda *_: None)
    online = make_plan(make_rc(tiny, tmp_path / "r"), **kw)
    cached = make_plan(make_rc(tiny, tmp_path / "r", f"teacher.logits_cache={out}"), **kw)
    assert cached["models"]["teacher"] is None and online["models"]["teacher"] is not None
    assert cached["teacher_logits_cache"]["top_k"] == 8 and online["teacher_logits_cache"] is None
    extra = 8 * 32 * (8 * (2 + 4) + 4)  # rows × seq_len × (K uint16 ids + K float32 log-probs + float32 rest)
    for basis in ("compiled", "analytic"):
        on, off = online["memory_per_device"][basis], cached["memory_per_device"][basis]
        assert off["teacher"] == 0 < on["teacher"]
        assert off["batch"] - on["batch"] == extra
    assert "teacher   not loaded: top-8 log-probs (float32)" in format_plan(cached)


def test_two_processes_write_disjoint_shards_that_make_one_cache(tiny, cache_k8, tmp_path, monkeypatch):
    """Process p of P writes the shards i ≡ p (mod P): process 0 (index, its half) then process 1 (the rest) give
    the same cache as one process."""
    out, _ = cache_k8
    rc = make_rc(tiny, tmp_path / "unused")
    two = tmp_path / "two"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    summaries = []
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        summaries.append(write_teacher_cache(rc, two, top_k=8, dtype="float32", rows_per_shard=5, batch_rows=4,
                                             log=lambda _: 0))
    total = summaries[0]["shards"]
    assert summaries[0]["shards_written"] == (total + 1) // 2 and summaries[1]["shards_written"] == total // 2
    assert not summaries[0]["complete"] and summaries[1]["complete"]
    assert not (two / "summary.json").read_text().count('"complete": true')  # process 0 wrote it, before process 1
    for split in ("train", "validation"):
        a, b = TeacherCache(two).split(split), TeacherCache(out).split(split)
        for key, value in a.rows(np.arange(len(a))).items():
            np.testing.assert_array_equal(value, b.rows(np.arange(len(b)))[key])


def test_a_cache_inside_the_teacher_or_the_data_is_refused_before_the_teacher_pass(tiny, tmp_path):
    """Written inside the teacher's directory, the cache changed the files the teacher's fingerprint hashes, so every
    run refused it (teacher.weights_blake2b) after the whole teacher pass; inside a data directory it would be read
    as text by the next packing. Refused up front: one line, exit 2, nothing written."""
    import shutil

    r = tiny["root"]
    teacher, data = tmp_path / "teacher", tmp_path / "data"
    shutil.copytree(r / "teacher", teacher)
    data.mkdir()
    shutil.copy(r / "corpus.jsonl", data / "corpus.jsonl")
    for out, src in ((teacher / "logits", teacher), (data / "logits", data)):
        args = [a if a not in (r / "teacher", r / "corpus.jsonl") else {r / "teacher": teacher,
                                                                           r / "corpus.jsonl": data}[a]
                for a in _cli_args(tiny, out)]
        code, stdout, err = _cli(*args)
        assert code == 2 and err.strip() == (f"error: the destination {out} lies inside the source {src}; refusing to "
                                              "write there (choose a destination outside the source)"), err
        assert not out.exists() and "rows of 32 tokens" not in stdout  # refused before the teacher was loaded
