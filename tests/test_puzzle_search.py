"""The layer-by-layer search end to end on a tiny random parent: blockwise local distillation (normalized MSE,
resume), replace-one-block scores (parent 0, removal ≥ 0, agreement with the report), the assembled model, and the
command (including a refused infeasible target)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import hetero
from minitron_jax.blocks import BlockSpec
from minitron_jax.compress.puzzle.blockwise import (
    ActivationStore,
    BlockwiseSettings,
    blockwise_distill,
    parent_spec,
    result_path,
)
from minitron_jax.compress.puzzle.scoring import Scorer, score_variants
from minitron_jax.compress.puzzle.search import SearchSettings, SearchSpace, run_search
from minitron_jax.compress.puzzle.targets import CostSettings, Targets
from minitron_jax.config import LlamaConfig
from minitron_jax.model import count_params, init_params

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the parent's
# activations and blockwise results (~14 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("puzzle_search")

ROOT = Path(__file__).resolve().parents[1]
P = BlockSpec.parse
CFG = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=256)
SEQ = 32
# Every kind of block, so "any" runtime: vLLM and llama.cpp run no linear FFN (runtimes.py, tested below).
SPACE = SearchSpace.parse(CFG, "gqa2,gqa1,linear,none", "mlp512,mlp256,linear,none", "any")
FAST = BlockwiseSettings(steps=12, batch_windows=4, lr=3e-3, warmup_steps=2, eval_batches=2)


def _params(seed=0):
    # std 0.1 so every layer matters to the logits (a 0.02 init is close to the identity everywhere)
    return jax.device_get(init_params(CFG, jax.random.PRNGKey(seed), std=0.1))


def _windows(n, seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, SEQ), dtype=np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny parent, its activation stores and the blockwise results (trained once for the module)."""
    run = tmp_path_factory.mktemp("bld")
    params = _params()
    calib = ActivationStore.open_or_build(run / "acts" / "calib", CFG, params, _windows(16, 1), key="k", batch=8)
    ev = ActivationStore.open_or_build(run / "acts" / "eval", CFG, params, _windows(4, 2), key="k", batch=4,
                                       with_logp=True)
    bw = blockwise_distill(CFG, params, calib, SPACE.variants(), run, FAST)
    return run, params, calib, ev, bw


def test_activation_store_holds_the_parent_layers(tiny):
    run, params, calib, _, _ = tiny
    h0, h1 = calib.h(0), calib.h(1)
    # layer 0 run on the stored input gives the stored output (the store is the parent's own trace)
    from minitron_jax.compress.puzzle.blockwise import parent_layer, rope_and_mask, run_base

    cos, sin, mask = rope_and_mask(CFG, 2, SEQ)
    out = hetero.apply_block(run_base(CFG), parent_spec(CFG), parent_layer(params, 0), jnp.asarray(h0[:2]), cos,
                             sin, mask, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(out), h1[:2], atol=1e-5)
    assert calib.mid(0).shape == (16, SEQ, 64) and calib.h(CFG.num_layers).shape == (16, SEQ, 64)


def test_activations_refused_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from minitron_jax.exitcodes import SystemRefusedError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SystemRefusedError,
                       match=r"acts/calib: the parent's activations need 294\.91 kB on disk and 1\.00 kB is free"):
        ActivationStore.open_or_build(tmp_path / "run" / "acts" / "calib", CFG, _params(), _windows(4, 1), key="k")
    assert not (tmp_path / "run").exists()  # nothing written


def test_blockwise_lowers_the_normalized_mse_of_a_linear_variant(tiny):
    *_, bw = tiny
    for i in range(CFG.num_layers):
        for half, opt in (("attention", P("linear/none").attention), ("ffn", P("none/linear").ffn)):
            info = bw.info(i, half, opt)
            # the least-squares start is already better than removal (1), and training never makes it worse
            assert info["loss_init"] < 0.95 and info["loss_final"] <= info["loss_init"], (i, half, info)
        # removal is exactly 1, the parent exactly 0
        assert bw.info(i, "ffn", P("none/none").ffn)["loss_final"] == pytest.approx(1.0, abs=1e-6)
        assert bw.info(i, "attention", parent_spec(CFG).attention)["loss_final"] == 0.0
    assert bw.step_builds <= 6  # per distinct sub-block shape, not per layer (gqa1, linear×2, mlp256, none×2)


def test_linear_start_is_the_least_squares_map(tiny, tmp_path):
    """A linear sub-block starts at the least-squares map from its normed input to the parent half's residual
    update (checked against numpy's lstsq on the same tokens); from zero (the identity = removal) the same Adam
    steps end worse than from it."""
    from minitron_jax.compress.puzzle.blockwise import lstsq_linear, run_base
    from minitron_jax.model import rms_norm

    run, params, calib, _, bw = tiny
    base = run_base(CFG)
    norm = np.asarray(params["layers"]["attn_norm"][1])
    x, y = np.asarray(calib.h(1)), np.asarray(calib.mid(1))
    w = lstsq_linear(base, norm, x, y, batch=3)  # batches that do not divide the 16 windows
    a = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(norm), CFG.rms_norm_eps), np.float64).reshape(-1, 64)
    ref, *_ = np.linalg.lstsq(a, (y.astype(np.float64) - x).reshape(-1, 64), rcond=None)
    np.testing.assert_allclose(w, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())

    zero = blockwise_distill(CFG, params, calib, [P("linear/linear")], tmp_path,
                             dataclasses.replace(FAST, linear_init="zero"))
    for i in range(CFG.num_layers):
        for half, opt in (("attention", P("linear/none").attention), ("ffn", P("none/linear").ffn)):
            z, lsq = zero.info(i, half, opt), bw.info(i, half, opt)
            assert z["loss_init"] == pytest.approx(1.0, abs=1e-6)  # zero matrix = identity = removal
            assert lsq["loss_final"] < z["loss_final"], (i, half, z, lsq)
    with pytest.raises(ValueError, match="linear_init"):
        dataclasses.replace(FAST, linear_init="random").check()


def test_parent_scores_zero_and_removal_is_nonnegative(tiny):
    run, params, _, ev, bw = tiny
    scorer = Scorer(CFG, params, ev, batch=2)
    for i in (0, CFG.num_layers - 1):
        kl, lm = scorer.score(i, parent_spec(CFG), bw.layer_params(i, parent_spec(CFG)))
        assert abs(kl) < 1e-5
        assert lm == pytest.approx(scorer.parent_lm_loss(), rel=1e-5)
        kl_none, _ = scorer.score(i, P("none/none"), {})
        assert kl_none > 1e-4  # std-0.1 layers matter


def test_scores_matrix_and_resume_after_damage(tiny, tmp_path):
    run, params, calib, ev, bw = tiny
    sc = score_variants(CFG, params, ev, bw, SPACE.variants(), run, mode="joint")
    names = SPACE.names()
    p = names.index(parent_spec(CFG).describe())
    assert (sc.kl[:, p] == 0).all()
    assert (sc.kl[:, names.index("none/none")] > 0).all()
    assert np.nanmin(sc.kl) > -1e-6  # KL is non-negative up to float rounding
    again = score_variants(CFG, params, ev, bw, SPACE.variants(), run, mode="joint")
    assert again.evaluations == 0 and np.array_equal(again.kl, sc.kl)
    allowed = np.ones_like(sc.kl, bool)
    allowed[1, 0] = False
    masked = score_variants(CFG, params, ev, bw, SPACE.variants(), run, mode="joint", allowed=allowed)
    assert np.isnan(masked.kl[1, 0]) and np.isfinite(masked.kl[1, 1:]).all()

    # blockwise resume: delete one result, truncate another → exactly those two are trained again
    gone = result_path(run, 1, "attention", P("gqa1/none").attention)
    broken = result_path(run, 2, "ffn", P("none/mlp256").ffn)
    gone.unlink()
    broken.write_bytes(broken.read_bytes()[:100])
    before = {f: f.stat().st_mtime_ns for f in (run / "blocks").rglob("*.npz") if f not in (gone, broken)}
    bw2 = blockwise_distill(CFG, params, calib, SPACE.variants(), run, FAST)
    assert bw2.computed == 2
    assert gone.is_file() and bw2.info(2, "ffn", P("none/mlp256").ffn)["steps"] == FAST.steps
    assert {f: f.stat().st_mtime_ns for f in before} == before  # nothing else rewritten
    assert not list((run / "blocks").rglob(".*tmp-*"))


def _corpus(path: Path, n=120) -> Path:
    words = ("the quick brown fox jumps over lazy dog pruning removes least important heads neurons channels "
             "distillation teaches student match teacher distribution perplexity exponential mean jax compiles "
             "pure functions with xla shards them over mesh").split()
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for k in range(n):
            f.write(json.dumps({"text": f"doc {k}: " + " ".join(rng.choice(words, 40)) + "."}) + "\n")
    return path


def test_search_under_a_params_target(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import tiny_tokenizer

    tok = tiny_tokenizer()
    params = _params(3)
    data = _corpus(tmp_path / "data.jsonl")
    space = SearchSpace.parse(CFG, "gqa2,gqa1,none", "mlp512,mlp256,none")
    target = 0.8 * count_params(CFG)
    settings = SearchSettings(seq_len=SEQ, calib_tokens=16 * SEQ, eval_windows=4, eval_batch=2, scoring="joint",
                              runner_ups=2, blockwise=FAST)
    res = run_search(CFG, params, tok, data, tmp_path / "run", space=space, targets=Targets(params=target),
                     settings=settings, parent_name="tiny")
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    assert r["chosen"]["params"] <= target and r["chosen"]["params"] == hetero.count_params(res.hcfg)
    # The default runtimes (vLLM and llama.cpp) run every chosen block: both exporters take the model.
    from minitron_jax.convert.deci_hf import vllm_problems
    from minitron_jax.convert.gguf_export import deci_problems

    assert r["space"]["runtimes"] == ["vllm", "llama.cpp"]
    assert not deci_problems(res.hcfg) and not vllm_problems(res.hcfg)
    assert all(not (b.endswith("/none") and not b.startswith("none/")) for b in r["chosen"]["blocks"])
    assert r["chosen"]["targets"]["target-params"]["achieved"] == r["chosen"]["params"]
    assert len(r["runner_ups"]) == 2 and all(s["summed_kl"] >= r["chosen"]["summed_kl"] for s in r["runner_ups"])
    assert (tmp_path / "run" / "architecture.png").stat().st_size > 1000
    assert "## Chosen" in (tmp_path / "run" / "report.md").read_text()

    from minitron_jax.convert import load_model

    m = load_model(tmp_path / "run" / "model")
    assert m.config == res.hcfg
    # the DeciLM HF export beside it reads back as the same model
    assert r["hf_export"].startswith("saved"), r["hf_export"]
    hf = load_model(tmp_path / "run" / "hf", with_tokenizer=False)
    assert hf.config.blocks == res.hcfg.blocks  # (its base gains the HF torch_dtype key)
    np.testing.assert_array_equal(hf.params["segments"][0]["attn_norm"], m.params["segments"][0]["attn_norm"])
    logits = hetero.forward(m.config, m.params, jnp.asarray(_windows(2, 5)))
    assert logits.shape == (2, SEQ, CFG.vocab_size) and bool(jnp.isfinite(logits).all())

    # each chosen block, loaded back from the saved model, replaced alone into the parent scores what the report says
    ev = ActivationStore(tmp_path / "run" / "acts" / "eval")
    scorer = Scorer(CFG, params, ev, batch=2)
    layers = hetero.unstack_layers(m.config, m.params)
    names = r["variants"]
    for i, b in enumerate(r["chosen"]["blocks"]):
        expected = r["scores"]["kl"][i][names.index(b)]
        kl, _ = scorer.score(i, P(b), layers[i])
        assert kl == pytest.approx(expected, rel=1e-4, abs=1e-6), (i, b)
    assert sum(r["scores"]["kl"][i][names.index(b)] for i, b in enumerate(r["chosen"]["blocks"])) == \
        pytest.approx(r["chosen"]["summed_kl"], rel=1e-9)
    # the report's whole-model numbers are the saved model's, measured against the stored parent log-probs
    lq = jax.nn.log_softmax(hetero.forward(m.config, m.params, jnp.asarray(ev.tokens)), axis=-1)
    lp = jnp.asarray(ev.logp)
    whole_kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))
    assert r["chosen"]["whole_model"]["kl"] == pytest.approx(whole_kl, rel=1e-4) and whole_kl > 0
    assert r["chosen"]["whole_model"]["parent_lm_loss"] == pytest.approx(scorer.parent_lm_loss(), rel=1e-9)

    # a rerun with another target trains nothing and scores nothing; another space is refused
    # a latency target times every variant on the host (costs.time_block_variants, tested with the solver; faked
    # here: 1 ms per block, 0.1 ms outside them) and becomes one more constraint
    from minitron_jax.compress.puzzle import costs

    monkeypatch.setattr(costs, "time_block_variants", lambda config, specs, **kw: {v: 1e-3 for v in specs})
    monkeypatch.setattr(costs, "time_overhead", lambda config, **kw: 1e-4)
    res2 = run_search(CFG, params, tok, data, tmp_path / "run", space=space,
                      targets=Targets(params=0.9 * count_params(CFG), latency_s=10.0),
                      cost_settings=CostSettings(weight_dtype="float32"),  # timed in f32: no bf16 emulation on CPU
                      settings=dataclasses.replace(settings, timing_seq_len=8), parent_name="tiny")
    assert res2.report["blockwise"]["trained_now"] == 0 and res2.report["scores"]["evaluations"] == 0
    assert set(res2.report["timings_s"]) == set(space.names())
    lat = res2.report["chosen"]["targets"]["target-latency"]
    assert lat["achieved"] == pytest.approx(1e-4 + CFG.num_layers * 1e-3) and lat["limit"] == 10.0
    with pytest.raises(ValueError, match="another search space"):
        run_search(CFG, params, tok, data, tmp_path / "run", space=SearchSpace.parse(CFG, "gqa2,none", "mlp512,none"),
                   targets=Targets(params=count_params(CFG)), settings=settings)

    # a search for another target with the stored work in another directory (the pipeline's puzzle students share
    # one): nothing trained or scored again, and its own directory holds only its choice
    res3 = run_search(CFG, params, tok, data, tmp_path / "other", space=space, targets=Targets(params=target),
                      settings=settings, parent_name="tiny", work=tmp_path / "run")
    assert res3.report["blockwise"]["trained_now"] == 0 and res3.report["scores"]["evaluations"] == 0
    assert res3.hcfg == res.hcfg
    assert {p.name for p in (tmp_path / "other").iterdir()} == {"model", "hf", "report.json", "report.md",
                                                                "architecture.png"}
    from minitron_jax.exitcodes import BadInputError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="notes.txt"):
        run_search(CFG, params, tok, data, tmp_path / "mine", space=space, targets=Targets(params=target),
                   settings=settings, work=tmp_path / "run")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "minitron_jax.puzzle", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_cli_end_to_end_and_refusals(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import tiny_tokenizer

    from minitron_jax.convert.orbax import save_model

    parent = save_model(tmp_path / "parent", CFG, _params(4), tokenizer=tiny_tokenizer())
    data = _corpus(tmp_path / "data.jsonl")
    common = ["--parent", str(parent), "--data", str(data), "--attention", "gqa2,none", "--ffn", "mlp512,mlp256,none",
              "--seq-len", str(SEQ), "--calib-tokens", str(8 * SEQ), "--eval-windows", "2", "--steps", "3",
              "--runner-ups", "1"]
    bad = _cli(*common, "--out", str(tmp_path / "bad"), "--target-params", "1000", cwd=ROOT)
    assert bad.returncode == 2, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: infeasible targets: target-params") and "smallest possible" in last
    assert not (tmp_path / "bad").exists()  # refused before any work

    out = tmp_path / "out"
    ok = _cli(*common, "--out", str(out), "--target-params", str(int(0.85 * count_params(CFG))), cwd=ROOT)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert str(out / "model") in ok.stdout and (out / "report.json").is_file()
    r = json.loads((out / "report.json").read_text())
    assert r["chosen"]["params"] <= 0.85 * count_params(CFG)

    other = _cli(*common[:4], "--attention", "gqa1,none", *common[6:], "--out", str(out), "--target-params",
                 str(int(0.85 * count_params(CFG))), cwd=ROOT)
    assert other.returncode == 2 and "another search space" in other.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_smollm2_search_small_budget(smollm2_assets, tmp_path):
    """The embedded SmolLM2-135M, a small space and a few steps: a model within the target that loads and runs,
    and scores that rank removing a whole layer above keeping it (minutes on a 2-core CPU)."""
    from minitron_jax.convert import load_model

    m = load_model(smollm2_assets["smollm2_gguf"])
    space = SearchSpace.parse(m.config, "gqa3,none", "mlp1536,mlp512,none")
    settings = SearchSettings(calib_tokens=8 * 256, eval_windows=2, runner_ups=1,
                              blockwise=BlockwiseSettings(steps=5, batch_windows=4))
    target = 100e6
    res = run_search(m.config, m.params, m.tokenizer, smollm2_assets["wikipedia"], tmp_path / "run", space=space,
                     targets=Targets(params=target), settings=settings, parent_name="SmolLM2-135M")
    r = res.report
    assert hetero.count_params(res.hcfg) == r["chosen"]["params"] <= target
    kl = np.array(r["scores"]["kl"], dtype=float)
    names = r["variants"]
    assert (kl[:, names.index("none/none")] > kl[:, names.index("gqa3/mlp1536")]).all()
    back = load_model(tmp_path / "run" / "model", with_tokenizer=False)
    ids = jnp.asarray(m.tokenizer("The capital of France is")["input_ids"])[None]
    logits = hetero.forward(back.config, back.params, ids)
    assert bool(jnp.isfinite(logits).all())


# ------------------------------------------------------------------------------------------------------------------
# Runtimes: the search never chooses a block the deployment runtime cannot run
# ------------------------------------------------------------------------------------------------------------------
def test_runtimes_mask_what_vllm_and_llama_cpp_cannot_run():
    from minitron_jax import hetero
    from minitron_jax.convert.deci_hf import vllm_problems
    from minitron_jax.convert.gguf_export import deci_problems

    space = SearchSpace.parse(CFG)  # default options, default runtimes (vLLM and llama.cpp)
    names = space.names()
    # vLLM builds no linear sub-block: the default options leave linear out instead of training it for nothing.
    assert all("linear" not in n for n in names) and space.runtimes == ("vllm", "llama.cpp")
    mask, why = space.allowed(CFG)
    L = CFG.num_layers
    for v, spec in enumerate(space.variants()):
        for i in range(L):
            # The mask is exactly what the exporters refuse, asked about a model made of this block.
            refused = [p for p in vllm_problems(hetero.HeteroConfig(CFG, (spec,) * L))
                       + deci_problems(hetero.HeteroConfig(CFG, (spec,) * L)) if p.startswith(f"layer {i} ")]
            assert mask[i, v] == (not refused), (i, spec.describe())
    gqa_none = names.index("gqa2/none")
    none_none = names.index("none/none")
    assert not mask[:, gqa_none].any() and "drops the attention output" in why[(0, gqa_none)]
    assert mask[:, none_none].all()  # a removed layer is left out of the GGUF: allowed anywhere, even last
    assert SearchSpace.parse(CFG, runtimes="any").allowed(CFG)[0].all()
    assert "linear" in SearchSpace.parse(CFG, runtimes="llama.cpp").describe()["attention"]


def test_a_parent_whose_own_blocks_no_runtime_runs(tmp_path):
    """A parent FFN width DeciLM cannot write (640, not a multiple of 256): on the default runtimes its own block is
    ruled out, the narrower multiples of 256 are searched, and the additive scores still run each option inside
    the parent layer. A parent whose every block but the removed layer is ruled out is refused in one line."""
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import tiny_tokenizer

    cfg = dataclasses.replace(CFG, intermediate_size=640)
    space = SearchSpace.parse(cfg)
    assert [f.describe() for f in space.ffn] == ["mlp512", "mlp256", "none"]
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(4), std=0.1))
    settings = SearchSettings(seq_len=SEQ, calib_tokens=8 * SEQ, eval_windows=2, eval_batch=2, runner_ups=0,
                              blockwise=dataclasses.replace(FAST, steps=2))
    res = run_search(cfg, params, tiny_tokenizer(), _corpus(tmp_path / "data.jsonl"), tmp_path / "run", space=space,
                     targets=Targets(params=0.9 * count_params(cfg)), settings=settings)
    assert all(b.ffn.kind != "mlp" or b.ffn.width in (256, 512) for b in res.hcfg.blocks)
    narrow = dataclasses.replace(CFG, intermediate_size=96)
    with pytest.raises(ValueError, match="no block of the space but a removed layer"):
        SearchSpace.parse(narrow).check(narrow)


def test_an_option_no_runtime_would_run_is_refused_naming_the_runtime():
    with pytest.raises(ValueError, match="vLLM's nemotron_nas builds no linear"):
        SearchSpace.parse(CFG, "gqa2,linear", "mlp512,none").check(CFG)
    with pytest.raises(ValueError, match="llama.cpp's deci architecture has no linear FFN"):
        SearchSpace.parse(CFG, "gqa2", "mlp512,linear", "llama.cpp").check(CFG)
    with pytest.raises(ValueError, match="not one of vllm, llama.cpp"):
        SearchSpace.parse(CFG, runtimes="tensorrt")
    SearchSpace.parse(CFG, "gqa2,linear", "mlp512,linear", "any").check(CFG)
