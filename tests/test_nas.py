"""Architecture search: candidate enumeration within the tolerance, clear refusal of impossible targets, the
ranking-stability statistics on constructed cases, and a tiny end-to-end search."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from minitron_jax.cli.nas import main
from minitron_jax.compress.candidates import (
    Candidate,
    NASError,
    enumerate_candidates,
    kendall_tau,
    parse_params,
    ranking,
    ranking_stability,
    select_spread,
)
from minitron_jax.config import LlamaConfig
from minitron_jax.model import count_params

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------------------------------------
# Enumeration
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, tol", [(90e6, 0.05), (70e6, 0.05), (110e6, 0.02), (100e6, 0.10)])
def test_candidates_within_tolerance(target, tol):
    cands = enumerate_candidates(SMOLLM2, int(target), tol)
    assert cands
    for c in cands:
        cfg = c.config(SMOLLM2)
        assert c.params == count_params(cfg)
        assert abs(c.params - target) <= tol * target
        assert c.hidden <= 576 and c.ffn <= 1536 and c.layers <= 30 and 1 <= c.heads_per_group <= 3
    assert len({c.name for c in cands}) == len(cands)


def test_enumeration_is_exhaustive_on_its_grids():
    """Every grid point inside the bound is listed, every one outside is not."""
    grids = {"hidden": [576, 512, 448], "ffn": [1536, 1280, 1024], "heads_per_group": [3, 2], "layers": [30, 24, 18]}
    target = 95_000_000
    got = {c.name for c in enumerate_candidates(SMOLLM2, target, 0.05, grids)}
    want = set()
    for L in grids["layers"]:
        for D in grids["hidden"]:
            for F in grids["ffn"]:
                for G in grids["heads_per_group"]:
                    n = count_params(SMOLLM2.replace(num_layers=L, hidden_size=D, intermediate_size=F, num_heads=3 * G))
                    if abs(n - target) <= 0.05 * target:
                        want.add(f"L{L}-D{D}-F{F}-G{G}")
    assert got == want and got


def test_candidate_order_is_deep_to_shallow():
    cands = enumerate_candidates(SMOLLM2, 90_000_000)
    layers = [c.layers for c in cands]
    assert layers == sorted(layers, reverse=True)


@pytest.mark.parametrize("target, message", [
    (200_000_000, "not below the model's own"),
    (134_515_008, "not below the model's own"),
    (1_000, "no candidate within ±5%"),
])
def test_impossible_target_is_refused(target, message):
    with pytest.raises(NASError, match=message):
        enumerate_candidates(SMOLLM2, target)


def test_gap_in_grid_names_nearest_counts():
    with pytest.raises(NASError, match=r"nearest: [\d,]+ below, [\d,]+ above"):
        enumerate_candidates(SMOLLM2, 90_000_000, 0.001, {"hidden": [576], "ffn": [1536], "heads_per_group": [3],
                                                           "layers": [30, 18, 16]})


def test_bad_grid_values_are_refused():
    with pytest.raises(NASError, match="pruning cannot grow"):
        enumerate_candidates(SMOLLM2, 90_000_000, 0.05, {"hidden": [640]})
    with pytest.raises(NASError, match="tolerance"):
        enumerate_candidates(SMOLLM2, 90_000_000, 1.5)


def test_parse_params():
    assert parse_params("90M") == 90_000_000
    assert parse_params("0.09B") == 90_000_000
    assert parse_params("90e6") == 90_000_000
    assert parse_params("1,500k") == 1_500_000
    with pytest.raises(NASError):
        parse_params("lots")
    with pytest.raises(NASError):
        parse_params("-5M")


def test_select_spread():
    cands = [Candidate(30 - i, 576, 1536, 3, i) for i in range(10)]
    assert select_spread(cands, 0) == cands
    assert select_spread(cands, 20) == cands
    picked = select_spread(cands, 4)
    assert [c.params for c in picked] == [0, 3, 6, 9]
    assert len(select_spread(cands, 1)) == 1


def test_cli_list_and_impossible_target(tmp_path, capsys):
    from utils import save_tiny_hf

    save_tiny_hf(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--target-params", "100k", "--list", "--max-candidates", "3"]) == 0
    assert "would be searched" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "m"), "--target-params", "10M"]) == 2
    assert "not below the model's own" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "m"), "--target-params", "5k"]) == 2
    assert "no candidate within" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Ranking stability
# ----------------------------------------------------------------------------------------------------------------------
def test_kendall_tau_known_values():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # One swapped adjacent pair out of 6 pairs: (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with ties, against scipy's definition: (C - D) / sqrt((n0 - n1)(n0 - n2)).
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / np.sqrt(5 * 6))
    assert kendall_tau([5], [3]) == 1.0


def test_kendall_tau_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 9), rng.integers(0, 5, 9)
        want = stats.kendalltau(x, y).statistic
        if np.isfinite(want):
            assert kendall_tau(x, y) == pytest.approx(want)


def test_ranking_stability_constructed_case():
    """Four candidates A..D. At step 100 the order is B A D C, at 200 A B D C, at 300 and 400 A B C D: the top-1
    settles at 200, the whole ranking at 300."""
    steps = [100, 200, 300, 400]
    losses = [
        [2.0, 1.9, 2.6, 2.5],  # B A D C
        [1.8, 1.85, 2.4, 2.3],  # A B D C
        [1.7, 1.75, 1.9, 2.0],  # A B C D
        [1.6, 1.7, 1.8, 1.9],  # A B C D
    ]
    st = ranking_stability(steps, losses)
    assert st["final_ranking"] == [0, 1, 2, 3]
    assert [p["ranking"] for p in st["per_step"]] == [[1, 0, 3, 2], [0, 1, 3, 2], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert st["settled_at"] == 300
    assert st["top1_settled_at"] == 200
    taus = [p["tau_vs_final"] for p in st["per_step"]]
    assert taus == pytest.approx([2 / 6, 4 / 6, 1.0, 1.0])
    assert [p["top1_agrees_with_final"] for p in st["per_step"]] == [False, True, True, True]
    assert st["per_step"][0]["tau_vs_previous"] is None
    assert st["per_step"][1]["tau_vs_previous"] == pytest.approx(4 / 6)


def test_ranking_stability_flip_at_the_end_and_stable_from_start():
    st = ranking_stability([1, 2, 3], [[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
    assert st["settled_at"] == 3 and st["top1_settled_at"] == 3
    st = ranking_stability([1, 2, 3], [[1.0, 2.0, 3.0]] * 3)
    assert st["settled_at"] == 1 and st["top1_settled_at"] == 1
    with pytest.raises(ValueError):
        ranking_stability([2, 1], [[1.0], [2.0]])
    assert ranking([3.0, 1.0, 2.0]) == [1, 2, 0]


# ----------------------------------------------------------------------------------------------------------------------
# A tiny search end to end
# ----------------------------------------------------------------------------------------------------------------------
def _tiny_search_files(tmp_path, seed: int):
    """A tiny teacher HF dir and train/calib texts in ``tmp_path``; returns the teacher's config."""
    from utils import save_tiny_hf, tiny_tokenizer

    from minitron_jax.convert import load_model

    save_tiny_hf(tmp_path / "teacher", tokenizer=tiny_tokenizer(), max_position_embeddings=512)
    words = "the quick brown fox jumps over lazy dog pruning removes heads neurons teacher student".split()
    rng = random.Random(seed)
    for name, n in (("train", 40), ("calib", 10)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n")
    return load_model(tmp_path / "teacher", with_tokenizer=False).config


def test_tiny_search_end_to_end(tmp_path):

    from minitron_jax.compress.nas import SearchSettings, run_search
    from minitron_jax.convert import load_model

    base = _tiny_search_files(tmp_path, seed=0)
    target = 100_000
    cands = enumerate_candidates(base, target, 0.05)
    settings = SearchSettings(steps=4, eval_steps=(2, 4), seq_len=32, batch_size=2, peak_lr=1e-3, min_lr=1e-4,
                              warmup_steps=1, val_rows=4, val_batches=1, calib_samples=2, calib_seq_len=32)
    twice = select_spread(cands, 2)
    out = tmp_path / "nas"
    report = run_search(str(tmp_path / "teacher"), target, out=out, train_text=str(tmp_path / "train.jsonl"),
                        calib_text=str(tmp_path / "calib.jsonl"), settings=settings, candidates=twice,
                        mesh={"data": 1, "fsdp": 1, "tensor": 1})
    assert report["searched"] == 2
    assert report["compiled_shapes"] == 2
    for r in report["candidates"]:
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert abs(r["candidate"]["params"] - target) <= 0.05 * target
    assert report["stability"]["steps"] == [2, 4]
    winner = load_model(out / "winner", with_tokenizer=False).config
    assert report["winner"]["name"] == f"L{winner.num_layers}-D{winner.hidden_size}-F{winner.intermediate_size}-" \
                                       f"G{winner.q_per_kv}"
    assert (out / "nas_report.md").read_text().count("| ") > 5
    assert (out / "nas_curves.png").stat().st_size > 0
    # A rerun skips finished candidates and gives the same report.
    again = run_search(str(tmp_path / "teacher"), target, out=out, train_text=str(tmp_path / "train.jsonl"),
                       calib_text=str(tmp_path / "calib.jsonl"), settings=settings, candidates=twice,
                       mesh={"data": 1, "fsdp": 1, "tensor": 1})
    assert again["compiled_shapes"] == 0
    assert again["stability"] == report["stability"]


def test_search_from_a_cached_teacher_matches_the_online_teacher(tmp_path):
    """``teacher_top_k``: the teacher runs once into OUT/teacher_logits and every candidate trains from it. With
    K = the whole vocabulary in float32 the sparse KL is the full KL, so the candidates' curves equal the online
    search's; a rerun reuses the cache (no second teacher pass) and the finished candidates."""

    from minitron_jax.compress.nas import SearchSettings, run_search

    base = _tiny_search_files(tmp_path, seed=1)
    target = 100_000
    cands = select_spread(enumerate_candidates(base, target, 0.05), 2)
    common = dict(steps=3, eval_steps=(3,), seq_len=32, batch_size=2, peak_lr=1e-3, min_lr=1e-4, warmup_steps=1,
                  val_rows=4, val_batches=1, calib_samples=2, calib_seq_len=32, rank_by="kl")
    kw = dict(train_text=str(tmp_path / "train.jsonl"), calib_text=str(tmp_path / "calib.jsonl"), candidates=cands,
              mesh={"data": 1, "fsdp": 1, "tensor": 1})
    online = run_search(str(tmp_path / "teacher"), target, out=tmp_path / "online", settings=SearchSettings(**common),
                        **kw)
    cached_settings = SearchSettings(**common, teacher_top_k=base.vocab_size, teacher_logits_dtype="float32")
    cached = run_search(str(tmp_path / "teacher"), target, out=tmp_path / "cached", settings=cached_settings, **kw)
    index = json.loads((tmp_path / "cached" / "teacher_logits" / "index.json").read_text())
    assert index["top_k"] == base.vocab_size
    for a, b in zip(online["candidates"], cached["candidates"]):
        assert a["candidate"] == b["candidate"]
        for pa, pb in zip(a["curve"], b["curve"]):
            assert pb["ce"] == pytest.approx(pa["ce"], rel=1e-4, abs=1e-5)
            assert pb["kl"] == pytest.approx(pa["kl"], rel=1e-3, abs=1e-4)
    assert cached["winner"]["name"] == online["winner"]["name"]
    shards = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cached" / "teacher_logits").rglob("*.npy"))
    again = run_search(str(tmp_path / "teacher"), target, out=tmp_path / "cached", settings=cached_settings, **kw)
    assert again["compiled_shapes"] == 0
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cached" / "teacher_logits").rglob("*.npy")) == shards


def test_step_cache_builds_once_per_shape():
    import jax

    from minitron_jax.compress.nas import SearchSettings, StepCache, _run_config
    from minitron_jax.sharding import make_mesh

    rc = _run_config(SearchSettings(steps=4, eval_steps=(4,), seq_len=16, batch_size=2), __import__("pathlib").Path(
        "/tmp/unused"), "teacher", "train.jsonl", {"data": 1, "fsdp": 1, "tensor": 1})
    teacher = SMOLLM2.replace(vocab_size=64, num_layers=2, hidden_size=32, intermediate_size=48, head_dim=8)
    cache = StepCache(rc, make_mesh(1, 1, 1, devices=jax.devices()[:1]), teacher)
    a = cache.get(teacher.replace(hidden_size=24))
    b = cache.get(teacher.replace(hidden_size=24))
    c = cache.get(teacher.replace(num_layers=1))
    assert a is b and a is not c and cache.builds == 2
