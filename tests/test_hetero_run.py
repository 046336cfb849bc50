"""Running a heterogeneous model with the tools that run uniform ones.

- ``hetero.hidden_states``: ``collect`` (per segment) against layer-by-layer calls, ``layer_keep`` against the model
  with that layer removed, the KV cache (greedy decoding ≡ recomputing the full forward every step);
- evaluation: perplexity and MMLU letter scores against the same numbers computed from ``hetero.forward`` by hand;
- training: a heterogeneous student saved with ``convert.orbax.save_model`` distilled from a uniform teacher by the
  trainer ``python -m minitron_jax.distill`` runs (loss falls, resume is bitwise exact, a sharded step ≡ one device);
- planning: the dry run compiles the real step for a heterogeneous student on fake devices;
- what cannot take a heterogeneous model (Minitron pruning) refuses with one line.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import persistent_compile_cache, tiny_distill_files

from minitron_jax import arch
from minitron_jax import hetero as X
from minitron_jax import model as M
from minitron_jax.blocks import BlockSpec
from minitron_jax.config import LlamaConfig

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the distilled
# heterogeneous student (~18 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("hetero_run")

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=4,
                   head_dim=8, rope_theta=10000.0, max_position_embeddings=128)
# Every kind of sub-block, runs of two (a scan of length > 1) and a removed layer in the middle.
BLOCKS = ("gqa2/mlp48", "gqa2/mlp48", "linear/mlp24", "none/none", "gqa1/linear", "gqa4/none", "none/mlp16")


def _blocks(texts=BLOCKS):
    return tuple(BlockSpec.parse(t) for t in texts)


def _hmodel(texts=BLOCKS, seed=0, base=BASE):
    hcfg = X.HeteroConfig(base, _blocks(texts))
    params = X.init_params(hcfg, jax.random.key(seed), std=0.2)
    # Linear sub-blocks start at zero when made from a parent; random ones here, so that a dropped one would show.
    return hcfg, params


def _tokens(shape=(2, 12), seed=1, vocab=BASE.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# collect / layer_keep / cache
# ----------------------------------------------------------------------------------------------------------------
def test_collect_gives_each_segments_layers_as_layer_by_layer_calls_do():
    hcfg, params = _hmodel()
    tokens = _tokens()
    h, collected, cache = X.hidden_states(hcfg, params, tokens, collect=True)
    assert cache is None and len(collected) == len(hcfg.segments())
    # The reference: one X.layer call per layer, in a Python loop, on the unstacked params.
    pos = M.default_positions(tokens)
    cos, sin = M.rope_cos_sin(BASE, pos)
    mask = M.attention_mask(pos, pos, None, None)
    x = jnp.take(params["embed"], tokens, axis=0)
    per_layer = X.unstack_layers(hcfg, params)
    i = 0
    for (start, stop, spec), seg in zip(hcfg.segments(), collected):
        assert {k: v.shape[0] for k, v in seg.items()} == {k: stop - start for k in seg}
        for j in range(stop - start):
            x_next, inter, _ = X.layer(BASE, spec, per_layer[i], x, cos, sin, mask, dtype=jnp.float32)
            assert set(seg) == set(inter), spec.describe()
            for k in inter:
                # Scan vs eager calls: XLA may fuse differently, so a few float32 ulps.
                np.testing.assert_allclose(np.asarray(seg[k][j]), np.asarray(inter[k]), atol=1e-5, rtol=1e-5,
                                           err_msg=f"layer {i} {k}")
            x, i = x_next, i + 1
    assert i == hcfg.num_layers
    np.testing.assert_allclose(np.asarray(h), np.asarray(M.rms_norm(x, params["final_norm"], BASE.rms_norm_eps)),
                               atol=1e-5, rtol=1e-5)
    # The kinds' keys: gqa/mlp has model.py's eight; a removed layer only passes its input through.
    assert set(collected[0]) == {"layer_in", "attn_norm_out", "attn_heads", "attn_out", "mlp_norm_out",
                                 "mlp_preact", "mlp_act", "layer_out"}
    np.testing.assert_array_equal(np.asarray(collected[2]["layer_in"]), np.asarray(collected[2]["layer_out"]))
    # A collect function sees each layer's dict; stacked over all layers it is one [L, ...] array.
    outs = arch.stacked_collected(hcfg, X.hidden_states(hcfg, params, tokens, collect=lambda d: d["layer_out"])[1])
    assert outs.shape == (hcfg.num_layers, 2, 12, BASE.hidden_size)
    np.testing.assert_allclose(np.asarray(outs[-1]), np.asarray(x), atol=1e-5, rtol=1e-5)


def test_layer_keep_zero_equals_the_model_without_that_layer():
    hcfg, params = _hmodel()
    tokens = _tokens()
    full = X.forward(hcfg, params, tokens)
    # All ones: multiplying by exactly 1 changes nothing.
    np.testing.assert_array_equal(np.asarray(X.forward(hcfg, params, tokens, layer_keep=jnp.ones(7))),
                                  np.asarray(full))
    layers = X.unstack_layers(hcfg, params)
    for drop in (1, 2, 4, 5):  # inside a segment of two, a linear/mlp, a gqa/linear and a gqa/none layer
        keep = jnp.ones(hcfg.num_layers).at[drop].set(0.0)
        texts = [t for i, t in enumerate(BLOCKS) if i != drop]
        smaller = X.HeteroConfig(BASE, _blocks(texts))
        sparams = {**{k: v for k, v in params.items() if k != "segments"},
                   "segments": X.stack_layers([p for i, p in enumerate(layers) if i != drop], smaller.blocks)}
        np.testing.assert_allclose(np.asarray(X.forward(hcfg, params, tokens, layer_keep=keep)),
                                   np.asarray(X.forward(smaller, sparams, tokens)), atol=2e-6, rtol=1e-6,
                                   err_msg=f"dropped layer {drop}")
        assert not np.allclose(np.asarray(X.forward(smaller, sparams, tokens)), np.asarray(full), atol=1e-4)


def test_kv_cache_decoding_equals_recomputing_the_full_forward():
    from minitron_jax.generate import generate

    hcfg, params = _hmodel()
    cache = X.init_cache(hcfg, 2, 5)
    # One cache entry per segment with GQA attention, None for the others.
    assert [c is not None for c in cache["segments"]] == [True, False, False, True, True, False]
    assert cache["segments"][0]["k"].shape == (2, 2, 5, 2, 8)
    prompts = [[3, 5, 7, 9, 11], [2, 4]]  # different lengths: left padding and per-row positions
    new, logits = generate(hcfg, params, prompts, max_new_tokens=6, return_logits=True)
    # The forward is causal, so one full forward of prompt + generated tokens holds every step's recomputed logits
    # (row i: the logits after the first i + 1 tokens), without one forward per step.
    for prompt, toks, lg in zip(prompts, new, logits):
        full = np.asarray(X.forward(hcfg, params, jnp.asarray([list(prompt) + list(toks)], jnp.int32)))[0]
        for i, (t, step_logits) in enumerate(zip(toks, lg)):
            ref = full[len(prompt) - 1 + i]
            np.testing.assert_allclose(step_logits, ref, atol=2e-5, rtol=1e-5)
            assert t == int(np.argmax(ref))
    # A model without any attention layer decodes too (no cache at all).
    hcfg2, params2 = _hmodel(("linear/mlp16", "none/linear"))
    assert X.init_cache(hcfg2, 1, 4)["segments"] == [None, None]
    toks = generate(hcfg2, params2, [[1, 2, 3]], max_new_tokens=3)[0]
    full = np.asarray(X.forward(hcfg2, params2, jnp.asarray([[1, 2, 3] + list(toks)])))[0]
    assert list(toks) == [int(np.argmax(full[2 + i])) for i in range(len(toks))]


def test_uniform_equivalent_cache_and_collect_match_model_py_exactly():
    """A one-segment heterogeneous model decodes and collects with model.py's own numbers, bit for bit."""
    config = BASE
    params = M.init_params(config, jax.random.key(3), std=0.2)
    hcfg, hparams = X.from_uniform(config, params)
    tokens = _tokens()
    _, c_u, _ = M.hidden_states(config, params, tokens, collect=True)
    _, c_h, _ = X.hidden_states(hcfg, hparams, tokens, collect=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), c_u, c_h[0])
    cache_u = arch.init_cache(config, 2, 12)
    cache_h = arch.init_cache(hcfg, 2, 12)
    kw = dict(cache_index=0, cache_valid=jnp.ones((2, 12), bool))
    h_u, _, new_u = M.hidden_states(config, params, tokens, cache=cache_u, **kw)
    h_h, _, new_h = X.hidden_states(hcfg, hparams, tokens, cache=cache_h, **kw)
    np.testing.assert_array_equal(np.asarray(h_u), np.asarray(h_h))
    np.testing.assert_array_equal(np.asarray(new_u["k"]), np.asarray(new_h["segments"][0]["k"]))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
def test_perplexity_mmlu_and_loglikelihood_equal_hand_computations_from_the_forward():
    from minitron_jax.evaluate.loglikelihood import loglikelihood_tokens
    from minitron_jax.evaluate.mmlu import score_prompts
    from minitron_jax.evaluate.perplexity import nll_sum

    hcfg, params = _hmodel()
    windows = np.asarray(_tokens((5, 16), seed=4))
    total, count = nll_sum(hcfg, params, windows, batch_size=2)  # a padded last batch
    logp = jax.nn.log_softmax(X.forward(hcfg, params, jnp.asarray(windows)), axis=-1)
    ref = -np.take_along_axis(np.asarray(logp)[:, :-1], windows[:, 1:, None], axis=-1).sum()
    assert count == 5 * 15
    np.testing.assert_allclose(total, ref, rtol=1e-5)

    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    letters = [20, 21, 22, 23]
    got = score_prompts(hcfg, params, prompts, letters, batch_size=2, bucket_multiple=8)
    for p, row in zip(prompts, got):
        lp = np.asarray(jax.nn.log_softmax(X.forward(hcfg, params, jnp.asarray([p]))[0, -1]))
        np.testing.assert_allclose(row, lp[letters], atol=2e-5, rtol=1e-5)

    # lm-eval's loglikelihood requests (max_length defaults to the base's max_position_embeddings).
    requests = [([1, 2, 3], [4, 5]), ([9], [10, 11, 12])]
    for (ctx, cont), (lp_sum, _) in zip(requests, loglikelihood_tokens(hcfg, params, requests, batch_size=2)):
        whole = ctx + cont
        logp = np.asarray(jax.nn.log_softmax(X.forward(hcfg, params, jnp.asarray([whole[:-1]]))[0], axis=-1))
        ref = sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
        np.testing.assert_allclose(lp_sum, ref, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
TEACHER = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               max_position_embeddings=64)
STUDENT_BASE = dict(TEACHER, hidden_size=32, intermediate_size=64, num_layers=4)
# FFN widths are multiples of 256: what the DeciLM config.json (ffn_mult) can express.
STUDENT_BLOCKS = ("gqa2/mlp256", "gqa1/linear", "linear/mlp256", "none/mlp512")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")) as path:
        yield path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trainer tests' tiny teacher (HF) and corpus, plus a heterogeneous student saved as an Orbax model."""
    from minitron_jax.convert.orbax import save_model

    root = tmp_path_factory.mktemp("hetero_distill")
    out = tiny_distill_files(root, TEACHER, dict(TEACHER, hidden_size=32, intermediate_size=64))
    base = LlamaConfig(vocab_size=out["vocab"], **STUDENT_BASE)
    hcfg = X.HeteroConfig(base, _blocks(STUDENT_BLOCKS))
    params = jax.tree.map(np.array, X.init_params(hcfg, jax.random.key(1)))
    save_model(root / "hetero_student", hcfg, params, tokenizer=out["tokenizer"])
    return {**out, "hetero_cfg": hcfg, "hetero_params": params}


def make_rc(tiny, run_dir, *extra):
    """tests/test_distill.py's fast fp32 run config, with the heterogeneous student."""
    from minitron_jax.train.config import load_config

    r = tiny["root"]
    base = [f"run_dir={run_dir}", f"teacher.path={r / 'teacher'}", f"student.path={r / 'hetero_student'}",
            f"data.sources={r / 'corpus.jsonl'}", f"data.cache_dir={r / 'cache'}", "data.seq_len=32",
            "data.batch_size=8", "data.val_rows=0", "train.steps=12", "optim.warmup_steps=1", "optim.peak_lr=1e-2",
            "train.compute_dtype=float32", "teacher.dtype=float32", "loss.chunk_size=64", "checkpoint.every=2",
            "checkpoint.async_save=false", "log.progress=false", "log.tensorboard=false", "export.at_end=false"]
    return load_config(None, base + list(extra))


def test_distill_a_heterogeneous_student_loss_falls_and_resume_is_bitwise_exact(tiny, tmp_path):
    """8 steps straight (KD falls) ≡ 4 steps, a fresh process-like start from the checkpoint (which holds the
    ``segments`` list), 4 more: identical params, optimizer state and losses."""
    from minitron_jax.train.checkpoints import restore_student_params
    from minitron_jax.train.loop import run

    straight = run(make_rc(tiny, tmp_path / "a", "train.stop_at=8", "checkpoint.every=4"), keep_state=True)
    assert straight.step == 8
    kd = [h["kd"] for h in straight.history]
    assert np.mean(kd[-2:]) < 0.95 * np.mean(kd[:2]), kd  # ~9% down in 8 steps
    first = run(make_rc(tiny, tmp_path / "b", "train.stop_at=4", "checkpoint.every=4"))
    assert first.step == 4
    second = run(make_rc(tiny, tmp_path / "b", "train.stop_at=8", "checkpoint.every=4"), keep_state=True)
    assert second.resumed_from == 4 and second.step == 8
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in first.history + second.history]  # bitwise
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (straight.state.params, straight.state.opt_state), (second.state.params, second.state.opt_state))
    segs = second.state.params["model"]["segments"]
    assert isinstance(segs, list) and len(segs) == len(tiny["hetero_cfg"].segments())
    # The checkpoint restores as the heterogeneous model it was (config from the run dir, params by segment).
    _, cfg, params, step = restore_student_params(tmp_path / "b")
    assert step == 8 and cfg == tiny["hetero_cfg"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), params,
                 second.state.params["model"])
    # distill --export-from: the checkpoint's student as a DeciLM HF directory that loads back as itself.
    from minitron_jax.convert import load_model
    from minitron_jax.train.checkpoints import export_to_hf

    out = export_to_hf(tmp_path / "b", tmp_path / "hf", dtype="float32")
    back = load_model(out)
    # (The HF config records torch_dtype, as every HF export does: equal but for that.)
    assert back.config.blocks == cfg.blocks and back.config.base.replace(extra=()) == cfg.base.replace(extra=())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), params, back.params)
    # The trained student scores with the eval functions; training moved it away from the saved start.
    from minitron_jax.evaluate.perplexity import nll_sum

    windows = np.asarray(_tokens((2, 16), vocab=tiny["vocab"]))
    before = nll_sum(cfg, tiny["hetero_params"], windows)[0]
    after = nll_sum(cfg, params, windows)[0]
    assert np.isfinite(after) and after != before


def test_sharded_hetero_step_equals_single_device(tiny, tmp_path):
    """One update on a 2×2×2 mesh (FSDP + tensor + data, a segment whose KV heads the tensor axis does not divide)
    ≡ one device, with the hidden-state loss across the student's segments."""
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train.state import init_train_state, place_teacher
    from minitron_jax.train.step import build_train_step

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)")
    from minitron_jax.data import complete_rows

    rc = make_rc(tiny, tmp_path, "loss.hidden.pairs=[[1,0],[3,1]]", "loss.hidden.weight=0.1", "loss.alpha=0.7",
                 "optim.warmup_steps=0", "optim.eps=1e-3")
    s_cfg, t_cfg = tiny["hetero_cfg"], tiny["teacher_cfg"]
    rng = np.random.default_rng(0)
    batch = complete_rows({"tokens": rng.integers(0, tiny["vocab"], (8, 32)), "segment_ids": np.ones((8, 32),
                                                                                                       np.int32)})
    t_params = jax.tree.map(np.array, M.init_params(t_cfg, jax.random.key(0), std=0.3))
    results = {}
    for shape in [(1, 1, 1), (2, 2, 2)]:
        mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        ts = build_train_step(rc, mesh, s_cfg, t_cfg)
        state = init_train_state(rc, mesh, s_cfg, t_cfg, tiny["hetero_params"])
        teacher = place_teacher(rc, mesh, t_cfg, t_params)
        state, m = ts.step(state, teacher, jax.device_put(batch, ts.batch_shardings))
        if shape == (2, 2, 2):
            seg0 = state.params["model"]["segments"][0]
            assert seg0["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
            assert seg0["attn_norm"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
        results[shape] = (jax.tree.map(np.array, state.params), jax.device_get(m))
    (p1, m1), (p8, m8) = results[(1, 1, 1)], results[(2, 2, 2)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), p1, p8)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)
    assert m1["hidden"] > 0
    # And the update did something.
    assert not np.allclose(p1["model"]["segments"][2]["attn_linear"], tiny["hetero_params"]["segments"][2]
                           ["attn_linear"])


def test_dry_run_compiles_the_step_for_a_heterogeneous_student(tiny, tmp_path):
    from minitron_jax.planning import capacity as P
    from minitron_jax.planning import dryrun

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)")
    rc = make_rc(tiny, tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    plan = dryrun.make_plan(rc, recipe=None, acc=P.accelerator("h100"), mfu=0.45,
                            memory_fraction=P.DEFAULT_MEMORY_FRACTION, devices=None, devices_per_host=None,
                            total_tokens=None, abstract=False, verify=False, log=lambda *a: None)
    hcfg = tiny["hetero_cfg"]
    assert plan["models"]["student"]["params"] == X.count_params(hcfg)
    assert plan["models"]["student"]["config"] == hcfg.describe()
    mem = plan["memory_per_device"]
    assert plan["compile"]["method"] == "compile" and mem["basis"] == "compiled" and mem["compiled"]["total"] > 0
    assert mem["analytic"]["params"] > 0 and mem["analytic"]["temp"] > 0
    # Analytic bytes of a heterogeneous model walk its segments' own shapes: fp32, one device = 4 bytes/param.
    assert P.param_bytes(hcfg, {"data": 1, "fsdp": 1, "tensor": 1}, {}, 4) == 4 * X.count_params(hcfg)
    # Attention FLOPs count only the layers that attend.
    assert P.attention_flops_per_token(hcfg, 32) == 4.0 * 2 * hcfg.num_heads * hcfg.head_dim * 32


def test_minitron_pruning_of_a_heterogeneous_teacher_is_refused(tiny, tmp_path):
    from minitron_jax.train.config import RunConfigError
    from minitron_jax.train.loop import run

    rc = make_rc(tiny, tmp_path, f"teacher.path={tiny['root'] / 'hetero_student'}", "student.path=null",
                 "student.prune={hidden: 16, calib_samples: 2, seq_len: 16}",
                 f"student.calib={tiny['root'] / 'corpus.jsonl'}")
    with pytest.raises(RunConfigError, match=r"^student\.prune: the teacher .* is heterogeneous"):
        run(rc, prune_student=lambda *a: pytest.fail("the pruner must not be called"))


def test_eval_command_on_a_heterogeneous_checkpoint(tiny, capsys):
    """``python -m minitron_jax.eval`` on the Orbax directory: the perplexity of the windows by hand."""
    import json
    import math

    from minitron_jax.cli.eval import main
    from minitron_jax.data import read_text, token_windows

    path = tiny["root"] / "hetero_student"
    text = tiny["root"] / "corpus.jsonl"
    assert main(["--model", str(path), "--text", str(text), "--seq-len", "16", "--max-tokens", "64", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    windows = token_windows(tiny["tokenizer"], read_text(text), 16, 64)
    logp = np.asarray(jax.nn.log_softmax(X.forward(tiny["hetero_cfg"], tiny["hetero_params"], jnp.asarray(windows)),
                                         axis=-1))
    nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], axis=-1).mean()
    assert got["windows"] == len(windows) == 4
    np.testing.assert_allclose(got["perplexity"], math.exp(nll), rtol=1e-5)


def test_offline_teacher_top_k_of_a_heterogeneous_teacher():
    """The teacher-logits cache's jitted top-k (teacher_logits command) on a heterogeneous teacher: the top-k of
    ``hetero.forward``'s log-softmax and the log of the mass outside it."""
    from minitron_jax.train.teacher_cache import top_k_fn

    hcfg, params = _hmodel()
    tokens = _tokens((2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    fn = top_k_fn(hcfg, top_k=4, dtype=jnp.float32, chunk_size=10, ids=np.dtype(np.int32),
                  logprobs=np.dtype(np.float32))
    ids, lp, rest = fn(params, tokens, seg, M.default_positions(tokens))
    ref = np.asarray(jax.nn.log_softmax(X.forward(hcfg, params, tokens), axis=-1))
    np.testing.assert_allclose(np.asarray(lp), -np.sort(-ref, axis=-1)[..., :4], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(ref, np.asarray(ids), axis=-1), atol=2e-5)
    outside = np.log1p(-np.exp(np.asarray(lp)).sum(-1))
    np.testing.assert_allclose(np.asarray(rest), outside, atol=1e-4)
