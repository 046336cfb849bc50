"""Puzzle search: the block-variant costs (against count_params and by hand), the exact MIP (against brute force on
small instances), its runner-ups, its infeasibility messages, the targets, and host timing of tiny variants."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from minitron_jax.blocks import BlockSpec, uniform_blocks
from minitron_jax.compress.puzzle.costs import (
    block_cost,
    compiled_cost,
    cost_matrices,
    decode_overhead_seconds,
    decode_step_seconds,
    model_cost,
    model_overhead,
    roofline_seconds,
    time_block_variants,
)
from minitron_jax.compress.puzzle.solver import Constraint, solve
from minitron_jax.compress.puzzle.targets import CostSettings, Targets, build_constraints
from minitron_jax.config import LlamaConfig
from minitron_jax.model import count_params
from minitron_jax.planning.capacity import forward_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
LLAMA_8B = LlamaConfig.from_json_file(ROOT / "configs/models/Llama-3.1-8B.json")
FP16 = dict(weight_bytes_per_param=2, context=2048, batch=1, kv_bytes_per_value=2)
P = BlockSpec.parse


# ------------------------------------------------------------------------------------------------------------------
# Costs
# ------------------------------------------------------------------------------------------------------------------
BIASED = LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=200, num_layers=3, num_heads=6,
                     num_kv_heads=2, head_dim=16, attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA_8B, BIASED], ids=["smollm2", "llama-3.1-8b", "biased"])
def test_uniform_model_cost_is_count_params_and_capacity_flops(config):
    cost = model_cost(config, uniform_blocks(config), **FP16)
    assert cost.params == count_params(config)
    assert cost.weight_bytes == 2 * count_params(config)
    # the same FLOPs convention as planning.capacity (PaLM: 2·matmul params + attention at full context)
    assert cost.flops_per_token == pytest.approx(forward_flops_per_token(config, 2048), rel=1e-12)


def test_smollm2_kv_cache_by_hand():
    cost = model_cost(SMOLLM2, uniform_blocks(SMOLLM2), **FP16)
    assert cost.kv_cache_bytes == 2 * 3 * 64 * 2048 * 30 * 2
    assert cost.memory_bytes == cost.weight_bytes + cost.kv_cache_bytes
    assert model_overhead(SMOLLM2, **FP16).kv_cache_bytes == 0


def test_removing_attention_drops_its_params_and_cache_exactly():
    full = uniform_blocks(SMOLLM2)
    cut = full[:7] + (P("none/mlp1536"),) + full[8:]
    a, b = model_cost(SMOLLM2, full, **FP16), model_cost(SMOLLM2, cut, **FP16)
    D, H, K, Hd = 576, 9, 3, 64
    attn = D + D * H * Hd + 2 * D * K * Hd + H * Hd * D  # norm, q, k, v, o
    assert a.params - b.params == attn
    assert a.kv_cache_bytes - b.kv_cache_bytes == 2 * K * Hd * 2048 * 1 * 2
    assert a.flops_per_token - b.flops_per_token == 2 * attn + 4 * H * Hd * 2048
    lin = block_cost(SMOLLM2, P("linear/linear"), **FP16)
    assert lin.params == 2 * (D + D * D) and lin.kv_cache_bytes == 0
    assert block_cost(SMOLLM2, P("none/none"), **FP16).params == 0


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA_8B], ids=["smollm2", "llama-3.1-8b"])
def test_uniform_minitron_students_are_points_of_the_space(config):
    F, K = config.intermediate_size, config.num_kv_heads
    width = config.replace(intermediate_size=F * 2 // 3)
    assert model_cost(config, uniform_blocks(width), **FP16).params == count_params(width)
    kv = config.replace(num_kv_heads=1)
    assert model_cost(config, uniform_blocks(kv), **FP16).params == count_params(kv)
    # depth: removed layers are none/none blocks
    depth = config.replace(num_layers=config.num_layers // 2)
    blocks = uniform_blocks(depth) + (P("none/none"),) * (config.num_layers - depth.num_layers)
    assert model_cost(config, blocks, **FP16).params == count_params(depth)
    assert model_cost(config, blocks, **FP16).flops_per_token == pytest.approx(forward_flops_per_token(depth, 2048))
    assert K >= 1


def test_width_student_1024_costs_count_params():
    student = SMOLLM2.replace(intermediate_size=1024)
    assert model_cost(SMOLLM2, (P("gqa3/mlp1024"),) * 30, **FP16).params == count_params(student)


def test_cost_matrices_shape_and_overhead():
    variants = [P("gqa3/mlp1536"), P("gqa1/mlp1024"), P("none/none")]
    mats, over = cost_matrices(SMOLLM2, variants, 30, **FP16)
    assert mats["params"].shape == (30, 3)
    total = over["params"] + mats["params"][:, 0].sum()
    assert total == count_params(SMOLLM2)
    assert (mats["kv_cache_bytes"][:, 2] == 0).all()


# ------------------------------------------------------------------------------------------------------------------
# Solver vs brute force
# ------------------------------------------------------------------------------------------------------------------
def brute_force(scores, constraints):
    """Every feasible assignment as (score, choices), best first; ties in lexicographic order of choices."""
    L, V = scores.shape
    out = []
    for ch in itertools.product(range(V), repeat=L):
        if any(np.isnan(scores[l, v]) for l, v in enumerate(ch)):
            continue
        if all(c.overhead + sum(c.costs[l, v] for l, v in enumerate(ch)) <= c.budget + 1e-9 for c in constraints):
            out.append((float(sum(scores[l, v] for l, v in enumerate(ch))), ch))
    return sorted(out, key=lambda t: (-t[0], t[1]))


def assert_matches_brute_force(scores, constraints, top_n):
    res = solve(scores, constraints, top_n=top_n)
    ref = brute_force(scores, constraints)
    got = [(s.score, s.choices) for s in res.solutions]
    assert len(got) == min(top_n, len(ref))
    assert res.exhausted == (len(ref) < top_n)
    assert len({c for _, c in got}) == len(got)  # distinct
    ref_scores = {c: s for s, c in ref}
    for rank, (score, choices) in enumerate(got):
        # the k-th solution has the k-th best score (which assignment among equal scores is free)
        assert score == pytest.approx(ref[rank][0], abs=1e-9)
        assert ref_scores[choices] == pytest.approx(score, abs=1e-12)  # feasible and scored right
    for sol in res.solutions:
        for c in constraints:
            achieved = c.overhead + sum(c.costs[l, v] for l, v in enumerate(sol.choices))
            assert sol.costs[c.name] == pytest.approx(achieved) and achieved <= c.budget + 1e-9
            assert sol.slack[c.name] == pytest.approx(c.budget - achieved)
        assert sol.optimal
    return res, ref


def hand_instance():
    # variants: full, slim (fewer params, same memory), drop (nearly free, no memory)
    scores = np.array([[0, -1, -5], [0, -0.2, -0.5], [0, -2, -6], [0, -0.3, -4]], float)
    params = Constraint("target-params", np.tile([10.0, 6.0, 1.0], (4, 1)), budget=35, overhead=5)
    memory = Constraint("target-memory", np.tile([4.0, 4.0, 0.0], (4, 1)), budget=12)
    return scores, [params, memory]


def test_hand_built_instance_known_optimum_and_runner_ups():
    scores, constraints = hand_instance()
    # Memory forces one drop (cheapest at layer 1, -0.5, params 40 → 31); params then need one slim (cheapest
    # left: layer 3, -0.3): optimum [full, drop, full, slim], score -0.8, memory exactly at its limit.
    res, ref = assert_matches_brute_force(scores, constraints, top_n=4)
    assert res.best.choices == (0, 2, 0, 1)
    assert res.best.score == pytest.approx(-0.8)
    assert res.best.costs == {"target-params": 32.0, "target-memory": 12.0}
    assert res.best.slack["target-memory"] == 0.0
    assert [c for _, c in ref[:2]] == [(0, 2, 0, 1), (1, 2, 0, 0)]
    assert res.solutions[1].choices == (1, 2, 0, 0)
    report = res.report()
    assert "best: score -0.8" in report and "#2: score -1.5 (-0.7)" in report and "target-memory: 12" in report


def test_every_feasible_solution_listed_then_exhausted():
    scores, constraints = hand_instance()
    res, ref = assert_matches_brute_force(scores, constraints, top_n=100)
    assert res.exhausted and len(res.solutions) == len(ref)
    assert {s.choices for s in res.solutions} == {c for _, c in ref}


@pytest.mark.parametrize("seed", range(20))
def test_random_instances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, V = int(rng.integers(3, 6)), int(rng.integers(2, 4))
    # one decimal: ties are common, so rank-by-score (not by assignment) is what is checked
    scores = np.round(rng.normal(size=(L, V)), 1)
    scores[rng.random((L, V)) < 0.15] = np.nan
    scores[np.arange(L), rng.integers(0, V, L)] = np.round(rng.normal(size=L), 1)  # ≥ 1 allowed per layer
    allowed = np.isfinite(scores)
    # budgets sit between one random allowed assignment's cost and the dearest: jointly feasible by construction
    witness = [int(rng.choice(np.flatnonzero(row))) for row in allowed]
    constraints = []
    for k in range(int(rng.integers(1, 4))):
        costs = rng.uniform(0.1, 3.0, (L, V)) * 10.0 ** rng.integers(-3, 9)
        at_witness = costs[np.arange(L), witness].sum()
        hi = np.where(allowed, costs, -np.inf).max(1).sum()
        overhead = float(rng.uniform(0, hi))
        constraints.append(Constraint(f"c{k}", costs, overhead + at_witness + rng.uniform(0, 0.5) * (hi - at_witness),
                                      overhead))
    assert_matches_brute_force(scores, constraints, top_n=6)


def test_not_allowed_variants_never_chosen():
    # the not-allowed variant would be free and the only way to meet the budget cheaply
    scores = np.array([[0.0, None, -3.0], [0.0, None, -3.0], [0.0, -1.0, -3.0]], dtype=object)
    costs = np.array([[5.0, 0.0, 2.0], [5.0, 0.0, 2.0], [5.0, 0.0, 2.0]])
    res = solve(scores, [Constraint("c", costs, budget=9.0)], top_n=50)
    assert res.solutions and all(s.choices[0] != 1 and s.choices[1] != 1 for s in res.solutions)
    assert res.best.choices in {(0, 2, 1), (2, 0, 1)}
    assert res.exhausted


def test_fixed_choices_are_kept():
    scores, constraints = hand_instance()
    res = solve(scores, constraints, fixed={1: 0})
    assert res.best.choices[1] == 0
    ref = [(s, c) for s, c in brute_force(scores, constraints) if c[1] == 0]
    assert res.best.score == pytest.approx(ref[0][0])
    with pytest.raises(ValueError, match="not allowed"):
        solve(np.array([[0.0, np.nan]]), [], fixed={0: 1})


def test_infeasible_target_names_the_tightest_and_the_minimum():
    costs = np.tile([0.02e9, 0.01e9], (7, 1))  # smallest possible: 0.001 + 7 × 0.01 = 0.071 GB
    mem = Constraint("target-memory", costs, budget=0.05e9, overhead=0.001e9, unit="GB", unit_scale=1e9)
    ok = Constraint("target-params", np.ones((7, 2)), budget=100)
    with pytest.raises(ValueError, match=r"target-memory 0\.05 GB is below the smallest possible 0\.071 GB "
                                         r"\(tightest: target-memory\)"):
        solve(np.zeros((7, 2)), [ok, mem])


def test_jointly_infeasible_targets_say_so():
    # variant 0 is cheap in a, dear in b; variant 1 the reverse: each budget alone is met, both together are not
    a = Constraint("a", np.tile([0.0, 1.0], (2, 1)), budget=0.5)
    b = Constraint("b", np.tile([1.0, 0.0], (2, 1)), budget=0.5)
    with pytest.raises(ValueError, match="not all together.*dropping any one of a, b"):
        solve(np.zeros((2, 2)), [a, b])


def test_input_errors():
    with pytest.raises(ValueError, match="no variant is allowed at layer"):
        solve(np.array([[np.nan, np.nan], [0.0, 1.0]]), [])
    with pytest.raises(ValueError, match="shape"):
        solve(np.zeros((2, 2)), [Constraint("c", np.zeros((3, 2)), 1.0)])
    with pytest.raises(ValueError, match="not finite"):
        solve(np.zeros((2, 2)), [Constraint("c", np.array([[np.nan, 0], [0, 0]]), 1.0)])


def test_large_scale_costs_are_exact():
    # parameter counts in the billions next to per-variant differences of a few: the shifted, scaled rows keep the
    # budget exact to the parameter
    base = 10**9
    costs = np.tile([base + 3.0, base + 1.0, float(base)], (4, 1))
    scores = np.tile([0.0, -1.0, -2.5], (4, 1))
    con = Constraint("target-params", costs, budget=4 * base + 7.0, overhead=0.0)
    res, _ = assert_matches_brute_force(scores, [con], top_n=3)
    assert res.best.costs["target-params"] <= 4 * base + 7


# ------------------------------------------------------------------------------------------------------------------
# Targets, end to end on SmolLM2's 30 layers
# ------------------------------------------------------------------------------------------------------------------
SMOL_VARIANTS = [P(t) for t in ("gqa3/mlp1536", "gqa1/mlp1536", "gqa3/mlp1024", "gqa1/mlp1024", "gqa3/mlp512",
                                "linear/mlp1536", "none/mlp1536", "gqa3/none", "none/none")]


def made_up_scores(seed=0):
    """Minus a made-up block-distillation loss (nats): a per-variant loss, heavier at the first and last layers,
    with ±20% noise per layer."""
    rng = np.random.default_rng(seed)
    loss = np.array([0.0, 0.02, 0.05, 0.07, 0.15, 0.3, 0.4, 1.0, 1.5])  # in SMOL_VARIANTS' order
    depth = 0.5 + np.abs(np.linspace(-1, 1, 30))[:, None]
    return -depth * loss * rng.uniform(0.8, 1.2, (30, len(SMOL_VARIANTS)))


def test_targets_end_to_end_on_smollm2():
    settings = CostSettings(context=2048, batch=1, weight_dtype="float16", kv_dtype="float16")
    timings = {v: 1e-3 * (1 + block_cost(SMOLLM2, v, **FP16).params / 1e6) for v in SMOL_VARIANTS}
    targets = Targets(params=100e6, memory_gb=0.25, flops_per_token=0.2e9, latency_s=0.1, throughput=20000)
    cons = build_constraints(SMOLLM2, SMOL_VARIANTS, 30, targets, settings, timings=timings,
                             overhead_seconds=0.002, timed_tokens=2048, device="made-up")
    assert [c.name for c in cons] == ["target-params", "target-memory", "target-flops", "target-latency",
                                      "target-throughput"]
    res = solve(made_up_scores(), cons, top_n=3, variant_names=[v.describe() for v in SMOL_VARIANTS])
    chosen = [SMOL_VARIANTS[v] for v in res.best.choices]
    cost = model_cost(SMOLLM2, chosen, **FP16)
    assert res.best.costs["target-params"] == cost.params <= 100e6
    assert res.best.costs["target-memory"] == pytest.approx(cost.memory_bytes) and cost.memory_bytes <= 0.25e9
    assert cost.flops_per_token <= 0.2e9
    seconds = 0.002 + sum(timings[v] for v in chosen)
    assert seconds <= 0.1 and 2048 / seconds >= 20000
    assert len(res.solutions) == 3 and res.solutions[0].score >= res.solutions[1].score >= res.solutions[2].score
    report = res.report()
    assert "tok/s (made-up)" in report and "layers: " in report


def test_targets_memory_infeasible_message():
    settings = CostSettings(context=2048, weight_dtype="float16", kv_dtype="float16")
    cons = build_constraints(SMOLLM2, SMOL_VARIANTS, 30, Targets(memory_gb=0.05), settings)
    # the smallest model is the embedding alone: (49152·576 + 576) × 2 bytes
    smallest = (49152 * 576 + 576) * 2 / 1e9
    with pytest.raises(ValueError, match=f"target-memory 0.05 GB is below the smallest possible {smallest:.4g} GB"):
        solve(np.zeros((30, len(SMOL_VARIANTS))), cons)
    with pytest.raises(ValueError, match="need timings"):
        build_constraints(SMOLLM2, SMOL_VARIANTS, 30, Targets(latency_s=1.0), settings)
    with pytest.raises(ValueError, match="no target"):
        build_constraints(SMOLLM2, SMOL_VARIANTS, 30, Targets(), settings)


# ------------------------------------------------------------------------------------------------------------------
# Timing and compiled cost (tiny shapes)
# ------------------------------------------------------------------------------------------------------------------
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16)


def test_time_block_variants_tiny():
    import jax.numpy as jnp

    specs = [P("gqa2/mlp128"), P("none/linear"), P("gqa2/mlp128")]
    t = time_block_variants(TINY, specs, batch=1, seq_len=16, dtype=jnp.float32, repeats=3)
    assert list(t) == [P("gqa2/mlp128"), P("none/linear")]  # distinct variants, in order
    assert all(s > 0 for s in t.values())


def test_compiled_cost_close_to_analytic_flops():
    import jax.numpy as jnp

    spec, T = P("gqa2/mlp128"), 32
    cc = compiled_cost(TINY, spec, batch=1, seq_len=T, dtype=jnp.float32)
    analytic = block_cost(TINY, spec, weight_bytes_per_param=4, context=T, batch=1, kv_bytes_per_value=4)
    # XLA also counts the elementwise work (norms, RoPE, softmax, SiLU): a little above the matmuls
    assert analytic.flops_per_token * T <= cc.flops <= 1.5 * analytic.flops_per_token * T
    assert cc.bytes_accessed > 0
    assert roofline_seconds(cc, peak_flops=1e12, memory_bandwidth=1e9) == pytest.approx(
        max(cc.flops / 1e12, cc.bytes_accessed / 1e9))


# ------------------------------------------------------------------------------------------------------------------
# Latency on a described accelerator (decode-step roofline)
# ------------------------------------------------------------------------------------------------------------------
def test_decode_step_roofline_by_hand():
    from minitron_jax.planning.capacity import accelerator

    h100 = accelerator("h100")
    kw = dict(peak_flops=h100.peak_flops, memory_bandwidth=h100.hbm_bandwidth, context=2048,
              weight_bytes_per_param=2, kv_bytes_per_value=2)
    full, none = P("gqa3/mlp1536"), P("none/mlp1536")
    one = decode_step_seconds(SMOLLM2, [full, none, full], batch=1, **kw)
    assert list(one) == [full, none]
    # batch 1 is memory-bound: every bf16 weight and the layer's whole K and V cache read once
    params = 576 * (576 + 2 * 3 * 64 + 576) + 3 * 576 * 1536 + 2 * 576
    kv = 2 * 3 * 64 * 2048 * 2
    assert one[full] == pytest.approx((2 * params + kv) / h100.hbm_bandwidth)
    assert one[none] == pytest.approx(2 * (3 * 576 * 1536 + 576) / h100.hbm_bandwidth)
    # a batch large enough turns it compute-bound: batch × FLOPs/token over the peak
    big = decode_step_seconds(SMOLLM2, [full], batch=4096, **kw)[full]
    flops = 2 * params + 4 * 9 * 64 * 2048
    assert big == pytest.approx(max(4096 * flops / h100.peak_flops, (2 * params + 4096 * kv) / h100.hbm_bandwidth))
    assert decode_overhead_seconds(SMOLLM2, batch=1, **kw) == pytest.approx(2 * (49152 * 576 + 576)
                                                                              / h100.hbm_bandwidth)
    with pytest.raises(ValueError, match="positive"):
        decode_step_seconds(SMOLLM2, [full], batch=1, **{**kw, "peak_flops": 0})


def test_latency_and_throughput_targets_on_an_accelerator():
    """A decode-step latency target priced on an H100: the chosen model meets it by the same roofline, the
    throughput target is batch / step seconds, and an unreachable latency is refused before any work."""
    import dataclasses

    from minitron_jax.compress.puzzle.search import SearchSpace, _accelerator_constraints, check_feasible
    from minitron_jax.planning.capacity import accelerator

    h100 = accelerator("h100")
    cost = CostSettings(context=8192, batch=8, accelerator=h100.name, peak_flops=h100.peak_flops,
                        memory_bandwidth=h100.hbm_bandwidth)
    space = SearchSpace.parse(SMOLLM2, "gqa3,gqa1,none", "mlp1536,mlp1024,mlp512,none")
    variants = space.variants()
    rk = cost.roofline_kwargs()
    step = decode_step_seconds(SMOLLM2, variants, **rk)
    over = decode_overhead_seconds(SMOLLM2, **rk)
    parent = over + 30 * step[P("gqa3/mlp1536")]
    targets = Targets(latency_s=0.6 * parent, throughput=cost.batch / (0.7 * parent))
    cons = _accelerator_constraints(SMOLLM2, variants, targets, cost)
    assert [c.name for c in cons] == ["target-latency", "target-throughput"] and "H100" in cons[0].unit
    mask, _ = space.allowed(SMOLLM2)
    rng = np.random.default_rng(0)
    scores = -rng.uniform(0, 1, mask.shape) * np.array([0 if v == P("gqa3/mlp1536") else 1 for v in variants])
    res = solve(np.where(mask, scores, np.nan), cons)
    chosen = [variants[v] for v in res.best.choices]
    seconds = over + sum(step[v] for v in chosen)
    assert seconds <= 0.6 * parent and res.best.costs["target-latency"] == pytest.approx(seconds)
    check_feasible(SMOLLM2, space, targets, cost)  # reachable: no error
    with pytest.raises(ValueError, match="target-latency"):
        check_feasible(SMOLLM2, space, Targets(latency_s=0.5 * over), cost)
    with pytest.raises(ValueError, match="peak_flops"):
        dataclasses.replace(cost, peak_flops=0.0)


def test_prefill_latency_on_an_accelerator_is_the_compiled_cost_on_a_roofline():
    import jax.numpy as jnp

    from minitron_jax.compress.puzzle.search import SearchSpace, _accelerator_constraints
    from minitron_jax.planning.capacity import accelerator

    a100 = accelerator("a100")
    cost = CostSettings(context=64, batch=2, weight_dtype="float32", accelerator=a100.name,
                        peak_flops=a100.peak_flops, memory_bandwidth=a100.hbm_bandwidth, latency_phase="prefill")
    space = SearchSpace.parse(TINY, "gqa2,none", "mlp128,none", "any")
    cons = _accelerator_constraints(TINY, space.variants(), Targets(throughput=1e3), cost)
    (c,) = cons
    assert c.name == "target-throughput" and "prefill roofline" in c.unit and c.inverse == 2 * 64
    for j, v in enumerate(space.variants()):
        cc = compiled_cost(TINY, v, batch=2, seq_len=64, dtype=jnp.float32)
        assert c.costs[0, j] == pytest.approx(roofline_seconds(cc, peak_flops=a100.peak_flops,
                                                               memory_bandwidth=a100.hbm_bandwidth))
    assert c.costs[0].argmin() == space.variants().index(P("none/none"))  # (it still copies its input)
    with pytest.raises(ValueError, match="latency phase"):
        CostSettings(latency_phase="training")
