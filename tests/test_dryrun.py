"""Dry runs: the paper's recipes planned by compiling the real train step on fake CPU devices.

- the HLO reader (trip counts, collectives, replica groups) on a hand-written module and on a real scan;
- the recipes' model configs come from configs/models and the pruning spec, never from weights;
- Llama-3.1-8B → 4B width and depth compile on an 8-device mesh; per-device param / optimizer / teacher bytes as
  compiled equal params × bytes ÷ shards within 5%; FLOPs parsed from the HLO match the analytic count;
- a plan that cannot fit is refused (``distill --dry-run`` exits 4) with the numbers and the nearest setting that
  fits, compiled to confirm;
- the importance pass of ``prune --dry-run``; AbstractMesh lowering of the 70B recipe (64 devices) and, marked
  slow, its full compile on 64 fake devices in a re-executed process.

The 8B compiles share a persistent XLA cache (the refusal test re-plans the depth recipe's own program).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from utils import persistent_compile_cache

from minitron_jax.exitcodes import ExitCode
from minitron_jax.planning import capacity as P
from minitron_jax.planning import dryrun, hlo, models, report
from minitron_jax.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
WIDTH = ROOT / "configs" / "distill_llama31_8b_to_4b_width.yaml"
DEPTH = ROOT / "configs" / "distill_llama31_8b_to_4b_depth.yaml"
NEMO = ROOT / "configs" / "distill_mistral_nemo_12b_to_8b.yaml"
LLAMA70 = ROOT / "configs" / "distill_llama31_70b_to_40b_width.yaml"
H100 = P.accelerator("h100")


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    with persistent_compile_cache(tmp_path_factory.mktemp("dryrun_xla_cache")) as path:
        yield path


def _plan(recipe, *overrides, **kw):
    rc = load_config(recipe, list(overrides))
    args = dict(recipe=str(recipe), acc=H100, mfu=0.45, memory_fraction=P.DEFAULT_MEMORY_FRACTION, devices=None,
                devices_per_host=None, total_tokens=None, abstract=False, verify=False, log=lambda *a: None)
    args.update(kw)
    t0 = time.perf_counter()
    p = dryrun.make_plan(rc, **args)
    p["_wall"] = time.perf_counter() - t0
    return p


# ----------------------------------------------------------------------------------------------------------------
# The HLO reader
# ----------------------------------------------------------------------------------------------------------------
SYNTHETIC_HLO = """\
HloModule m, entry_computation_layout={()->f32[]}

%fused_dot (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %w = f32[8,16]{1,0} constant({...})
  %ag = f32[8,16]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %f = f32[4,16]{1,0} fusion(%x, %ag), kind=kOutput, calls=%fused_dot
  %ar = (f32[4,16]{1,0}, bf16[2]{0}) all-reduce(%f, %f), replica_groups=mesh['a'=2,'b'=4] {'a'}, to_apply=%add
  %rs = f32[2,16]{1,0} reduce-scatter(%f), replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, to_apply=%add
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

%cond (t: (s32[], f32[4,8])) -> pred[] {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[4,8]{1,0}) tuple(%z, %x)
  %w = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_hlo_reader_weights_loop_bodies_by_trip_count():
    s = hlo.analyze(SYNTHETIC_HLO, num_devices=8, devices_per_host=4)
    assert s.dot_flops == 7 * 2 * 4 * 16 * 8  # the dot sits in a fusion called from the loop body
    ag, ar, rs = (s.collectives[k] for k in ("all-gather", "all-reduce", "reduce-scatter"))
    assert (ag.count, ag.ops, ag.bytes) == (7, 1, 7 * 8 * 16 * 4)
    assert ag.wire_bytes == pytest.approx(ag.bytes * 3 / 4)  # iota groups [2,4]<=[8]: groups of 4
    assert ag.cross_host_bytes == 0  # {0..3} and {4..7}: each group within one host of 4
    assert ar.bytes == 7 * (4 * 16 * 4 + 2 * 2)  # a tuple all-reduce counts all its operands
    assert ar.wire_bytes == pytest.approx(ar.bytes * 2 * (2 - 1) / 2)  # groups along 'a' (size 2)
    assert ar.cross_host_bytes == ar.wire_bytes  # {0,4}: across the two hosts
    assert rs.bytes == 7 * 4 * 16 * 4  # reduce-scatter: its input
    assert s.loops[0]["trip_count"] == 7


def test_replica_group_spellings():
    assert hlo.replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hlo.replica_groups("replica_groups=mesh['x'=2,'y'=4] {'y'}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo.replica_groups("replica_groups=mesh['x'=2,'y'=4] {'x'}", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hlo.replica_groups("replica_groups={{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]


def test_hlo_reader_on_a_compiled_scan():
    """cost_analysis counts a scan body once; the reader multiplies by the loop's known trip count."""
    L, M, K = 64, 16, 32

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    c = jax.jit(f).lower(jax.ShapeDtypeStruct((L, K, K), jnp.float32),
                         jax.ShapeDtypeStruct((M, K), jnp.float32)).compile()
    s = hlo.analyze(c.as_text(), 1)
    assert s.dot_flops == L * 2 * M * K * K
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] < 2 * 2 * M * K * K  # the body, once
    assert any(loop["trip_count"] == L for loop in s.loops)


# ----------------------------------------------------------------------------------------------------------------
# Configs without weights
# ----------------------------------------------------------------------------------------------------------------
def test_recipes_resolve_models_from_configs_only():
    from minitron_jax.model import count_params

    want = {WIDTH: ((32, 3072, 9216), 4.51e9, 8.03e9), DEPTH: ((16, 4096, 14336), 4.54e9, 8.03e9),
            NEMO: ((40, 4096, 11520), 8.41e9, 12.25e9), LLAMA70: ((80, 6144, 20480), 40.8e9, 70.55e9)}
    for recipe, (shape, n_student, n_teacher) in want.items():
        rc = load_config(recipe)
        student, teacher = models.run_models(rc, str(recipe))
        assert (student.num_layers, student.hidden_size, student.intermediate_size) == shape, recipe
        assert count_params(student) == pytest.approx(n_student, rel=2e-3)
        assert count_params(teacher) == pytest.approx(n_teacher, rel=2e-3)
        # the paper's budget: ~94B tokens
        assert rc.train.steps * rc.data.batch_size * rc.data.seq_len == pytest.approx(94e9, rel=2e-3)
    with pytest.raises(models.DryRunError, match="configs/models/Nonexistent-7B.json"):
        models.resolve_model_config("org/Nonexistent-7B", "teacher")
    # KD-SFT (sft with a teacher) runs the teacher every step, so its plan has one; plain SFT has none.
    rc = load_config(WIDTH).replace(mode="sft", student=dataclasses.replace(
        load_config(WIDTH).student, prune=None, path="meta-llama/Llama-3.1-8B"))
    student, teacher = models.run_models(rc, str(WIDTH))
    assert count_params(teacher) == pytest.approx(8.03e9, rel=2e-3) and student.num_layers == 32
    plain = rc.replace(teacher=dataclasses.replace(rc.teacher, path=None))
    assert models.run_models(plain, str(WIDTH))[1] is None


def test_analytic_bytes_follow_the_sharding_rules():
    from minitron_jax.config import LlamaConfig
    from minitron_jax.sharding import DEFAULT_RULES

    cfg = LlamaConfig.from_json_file(ROOT / "configs" / "models" / "Llama-3.1-8B.json")
    exact = P.param_bytes(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, DEFAULT_RULES, 4)
    assert exact == pytest.approx(P.naive_param_bytes(cfg, 8, 4), rel=1e-6)  # every axis divides
    # 3 KV heads do not split over tensor=2: k/v stay replicated on that axis, so exact > naive
    odd = cfg.replace(num_kv_heads=3, num_heads=24)
    assert P.param_bytes(odd, {"data": 1, "fsdp": 4, "tensor": 2}, DEFAULT_RULES, 4) > \
        P.naive_param_bytes(odd, 8, 4)
    f = P.step_flops(cfg, cfg, tokens=1000, seq_len=100, remat="full")
    assert f.model == pytest.approx(1000 * 4 * (2 * P.matmul_params(cfg) + 4 * 32 * 32 * 128 * 100))
    assert f.executed > f.model


def test_analytic_attention_memory_by_implementation():
    """The analytic temporaries of the 8B depth student at T=8192: einsum and blockwise write scores ([T, T] and
    [T, 512] per head), fused attention in bf16 (cuDNN's flash attention) only per-row statistics; fused in fp32 is
    XLA's composition and costs what einsum costs."""
    from minitron_jax.config import LlamaConfig

    cfg = LlamaConfig.from_json_file(ROOT / "configs" / "models" / "Llama-3.1-8B.json").replace(num_layers=16)

    def temp(attention, remat="none", c=2):
        layout = P.Layout(data=1, fsdp=8, tensor=1, grad_accum=1, remat=remat, attention=attention)
        return P.activation_bytes(cfg, cfg, layout, global_rows=8, seq_len=8192, chunk_size=1024,
                                  param_bytes_per_device=1e9, compute_bytes=c)

    for remat in ("none", "dots"):  # the policies that keep scores for the backward pass
        einsum, blockwise, fused = (temp(a, remat)["saved_activations"] for a in ("einsum", "blockwise", "fused"))
        assert fused < blockwise < einsum
        # what fused saves over einsum is the scores: 16 layers × 32 heads × T² × (4 bytes or more), one row a device
        assert einsum - fused > 0.99 * 16 * 32 * 8192**2 * 4
    assert temp("fused", c=4) == temp("einsum", c=4)


# ----------------------------------------------------------------------------------------------------------------
# The 8B recipes, compiled on 8 fake devices
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def depth_plan(xla_cache):
    _need_8()
    return _plan(DEPTH)


def _check_compiled_plan(p, n_layers):
    m = p["memory_per_device"]
    comp, naive = m["compiled"], m["naive"]
    assert p["compile"]["method"] == "compile" and p["devices"] == 8
    for key in ("params", "optimizer", "teacher"):  # the compiled shards vs params × bytes ÷ shards
        assert comp[key] == pytest.approx(naive[key], rel=0.05), key
    # every argument is accounted for (params, Adam moments, teacher, batch, step/rng)
    assert sum(comp[k] for k in ("params", "optimizer", "teacher", "batch", "other")) == \
        pytest.approx(comp["arguments"], rel=1e-3)
    assert p["fits"] and m["basis"] == "compiled" and m["total"] < H100.memory
    assert comp["temp"] > 1e9  # activations of a one-row 8192-token micro-batch
    f = p["flops_per_step"]
    # The matmuls the device executes (HLO dots × loop trip counts) vs the analytic count, remat included.
    assert f["hlo_dots_per_device"] == pytest.approx(f["executed_per_device"], rel=0.15)
    assert f["cost_analysis_per_device"] < f["hlo_dots_per_device"] / 10  # loop bodies counted once there
    col = p["collectives_per_device"]["collectives"]
    assert col["all-gather"]["count"] >= 144 * n_layers  # FSDP gathers per layer per micro-batch
    t = p["time"]
    assert t["total_tokens"] == pytest.approx(94e9, rel=2e-3)
    assert t["step_seconds"] == pytest.approx(f["model"] / (8 * H100.peak_flops * 0.45))
    assert 1 < t["total_days"] < 100


def test_llama31_8b_depth_recipe_compiles_and_fits(depth_plan):
    _check_compiled_plan(depth_plan, 16)
    assert depth_plan["models"]["student"]["config"].startswith("L=16 D=4096")
    assert report.format_plan(depth_plan).count("FITS") == 1


def test_llama31_8b_width_recipe_compiles_and_fits(xla_cache):
    _need_8()
    p = _plan(WIDTH)
    _check_compiled_plan(p, 32)
    assert p["models"]["student"]["config"].startswith("L=32 D=3072 F=9216")


def test_plan_that_cannot_fit_is_refused(depth_plan, capsys, tmp_path):
    """The depth recipe on a device with 45% of an H100's memory usable: refused through the CLI with the numbers,
    exit 4, and the nearest setting that fits named and compiled to confirm. (The recipe's own program comes from
    the XLA cache the depth fixture filled; docs/scaling.md shows the remat=none refusal.)"""
    from minitron_jax.cli import distill

    out = tmp_path / "plan.json"
    code = distill.main(["--config", str(DEPTH), "--dry-run", "--memory-fraction", "0.45", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == ExitCode.DOES_NOT_FIT, captured.out + captured.err
    assert "error: this plan does not fit" in captured.err and "usable on NVIDIA H100" in captured.err
    assert "nearest setting that fits: " in captured.err and "DOES NOT FIT" in captured.out
    p = json.loads(out.read_text())
    m = p["memory_per_device"]
    assert not p["fits"] and m["total"] > m["usable"] == pytest.approx(0.45 * H100.memory)
    assert m["total"] == pytest.approx(depth_plan["memory_per_device"]["total"], rel=1e-6)  # same program
    best = p["suggestions"][0]
    assert best["estimated_total"] <= m["usable"]
    assert best["compiled_fits"] is True, best
    assert best["changes"][0] in captured.err


def test_abstract_mesh_lowering_of_the_70b_recipe():
    """64 devices without 64 devices: lowered (for CUDA) on an AbstractMesh; the plan is analytic."""
    p = _plan(LLAMA70, abstract=True)
    assert p["compile"]["method"] == "lower" and p["devices"] == 64 and p["hosts"] == 8
    assert p["memory_per_device"]["compiled"] is None and p["memory_per_device"]["basis"] == "analytic"
    naive = p["memory_per_device"]["naive"]
    assert naive["teacher"] == pytest.approx(70.55e9 * 2 / 64, rel=0.01)


def test_importance_pass_dry_run(xla_cache, tmp_path):
    """``prune --dry-run``: the calibration pass compiled for one device, weights never loaded."""
    from minitron_jax.cli import prune

    out = tmp_path / "importance.json"
    code = prune.main(["--config", str(ROOT / "configs" / "prune_llama31_8b_width.yaml"),
                       "--model", "meta-llama/Llama-3.1-8B", "--dry-run", "--json", str(out)])
    p = json.loads(out.read_text())
    assert code == 0 and p["fits"] and p["kind"] == "importance"
    ps = p["passes"][0]
    assert ps["name"] == "activation statistics"
    # bf16 weights on one device (the unused lm_head is dropped by the compiler)
    assert ps["arguments"] == pytest.approx((8.03e9 - 128256 * 4096) * 2, rel=0.01)
    assert ps["cpu_param_upcasts"] == pytest.approx(2 * (8.03e9 - 2 * 128256 * 4096) * 2, rel=0.01)
    assert p["pruned"]["config"].startswith("L=32 D=3072 F=9216")


@pytest.mark.slow
def test_llama31_70b_teacher_on_64_devices(tmp_path):
    """The 70B teacher on 8 nodes × 8 H100: the CLI re-executes itself with 64 fake CPU devices and compiles."""
    out = tmp_path / "plan70.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "minitron_jax.distill", "--config", str(LLAMA70), "--dry-run",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode in (0, ExitCode.DOES_NOT_FIT), proc.stderr[-3000:]
    p = json.loads(out.read_text())
    assert p["devices"] == 64 and p["hosts"] == 8 and p["compile"]["method"] == "compile"
    comp, naive = p["memory_per_device"]["compiled"], p["memory_per_device"]["naive"]
    for key in ("params", "optimizer", "teacher"):
        assert comp[key] == pytest.approx(naive[key], rel=0.05), key
    assert p["fits"], report.format_plan(p)


def test_on_device_plan_compiles_for_the_local_backend(tmp_path, capsys):
    """``--on-device`` compiles for JAX's default backend (a lent GPU in tools/gpu_check.sh); on the CPU backend it
    must be the very program the fake-CPU plan compiles, so the two plans' compiled bytes agree exactly."""
    from minitron_jax.cli import distill

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                                "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
                                "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
                                "rope_theta": 10000.0, "tie_word_embeddings": True,
                                "max_position_embeddings": 512}))
    common = ["--dry-run", "--devices", "1", "--teacher-config", str(tiny), "--student-config", str(tiny),
              "--no-verify", "teacher.path=tiny", "student.path=tiny", "data.sources=[unused]",
              "run_dir=" + str(tmp_path / "r"), "data.seq_len=64", "data.batch_size=2", "train.steps=100"]
    plans = {}
    for name, extra in (("fake", []), ("device", ["--on-device"])):
        out = tmp_path / f"{name}.json"
        assert distill.main([*common, *extra, "--json", str(out)]) == ExitCode.OK, capsys.readouterr().err
        plans[name] = json.loads(out.read_text())
    fake, device = plans["fake"], plans["device"]
    assert device["compile"]["backend"] == jax.default_backend() and device["compile"]["device_kind"]
    assert fake["compile"]["device_kind"] is None
    assert device["memory_per_device"]["compiled"] == fake["memory_per_device"]["compiled"]
    assert distill.main([*common, "--on-device", "--abstract"]) == ExitCode.BAD_INPUT
    assert "pick one" in capsys.readouterr().err
