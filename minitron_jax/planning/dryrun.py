"""Dry runs: plan a distillation for hardware we do not have, by compiling the real step.

The commands are ``python -m minitron_jax.distill --config RECIPE.yaml --dry-run`` (:mod:`minitron_jax.cli.distill`)
and ``python -m minitron_jax.prune ... --dry-run`` (:mod:`minitron_jax.cli.prune`); both re-execute into
``python -m minitron_jax.dryrun`` (:mod:`minitron_jax.cli.dryrun`) when they need more fake devices. docs/scaling.md.

Nothing is loaded or allocated: the models' configs come from the recipe (:mod:`~minitron_jax.planning.models`),
every array is a ``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``, and the mesh is made of fake CPU devices
(``jax_num_cpu_devices``; a process whose backend is already up with too few devices re-executes itself,
:func:`reexec`). The function compiled is the trainer's own jitted step (``train.step.build_train_step``), so what is
planned is what a run executes.

The plan puts the compiler's numbers (``memory_analysis``, ``cost_analysis``, the collectives parsed from the
compiled HLO with loop trip counts, see :mod:`~minitron_jax.planning.hlo`) beside the analytic ones
(:mod:`~minitron_jax.planning.capacity`), estimates the step time and the whole token budget's wall time at a stated
MFU, and marks a plan that does not fit the accelerator's memory (the command exits 4), naming the nearest settings
that do (re-planned analytically, then the best one compiled to confirm). ``abstract`` only lowers on a
``jax.sharding.AbstractMesh`` (seconds, no device count needed, no memory or collective numbers: the analytic plan
alone). The importance pass of ``prune`` is planned by :mod:`~minitron_jax.planning.importance`; plans are printed
by :mod:`~minitron_jax.planning.report`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

from minitron_jax.fsutil import fmt_bytes
from minitron_jax.planning import capacity as P
from minitron_jax.planning.models import DryRunError, run_models

CHILD_ENV = "MINITRON_DRYRUN_CHILD"

CPU_NOTES = (
    "XLA:CPU upcasts bf16 matmuls to fp32: activations that are bf16 on a GPU are partly fp32 in the CPU program "
    "(and FSDP all-gathers of bf16 weights move fp32), so the compiled temporaries are an upper bound of a GPU's. "
    "The f32 copies it makes of whole bf16 weight stacks are found in the HLO and left out of 'temporaries' and "
    "'total' (JSON: temp_raw, cpu_param_upcasts, total_raw).",
    "XLA:CPU does not turn all-reduce + dynamic-slice into reduce-scatter: FSDP gradient reductions appear as "
    "all-reduce (twice the wire bytes of the reduce-scatter a GPU runs).",
    "XLA:GPU schedules collectives asynchronously and overlaps them with compute; the 'if serialized' collective "
    "time is the no-overlap bound.",
)


# ------------------------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------------------------
def resolve_mesh(data: int, fsdp: int, tensor: int, devices: int | None) -> tuple[int, int, int]:
    """The recipe's mesh sizes on ``devices`` devices (``--devices``): ``sharding.resolve_mesh_sizes``."""
    from minitron_jax.sharding import resolve_mesh_sizes

    if -1 in (data, fsdp, tensor) and devices is None:
        raise DryRunError("the recipe's mesh has a -1 axis: pass --devices N to plan for N devices")
    try:
        return resolve_mesh_sizes(data, fsdp, tensor, devices)
    except ValueError as e:
        raise DryRunError(f"{e} (--devices {devices})") from None


def cpu_devices(n: int):
    """``n`` CPU devices, asking for them when JAX's backend is not up yet; None if it is up with fewer."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        if (int(m.group(1)) if m else 1) < n:
            jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")
    return devices[:n] if len(devices) >= n else None


def needed_devices(rc, devices: int | None) -> int:
    """Devices the run config's mesh asks for (``devices`` fills a -1 axis)."""
    d, f, t = resolve_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor, devices)
    return d * f * t


def reexec(module_argv: Sequence[str], n: int) -> int:
    """Run this dry run again in a fresh process with ``n`` fake CPU devices; its output is ours."""
    if os.environ.get(CHILD_ENV):
        raise DryRunError(f"could not get {n} CPU devices even in a fresh process")
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    return subprocess.call([sys.executable, "-m", "minitron_jax.dryrun", *module_argv], env=env)


# ------------------------------------------------------------------------------------------------------------------
# Compiling the real step
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Compiled:
    method: str  # "compile" | "lower"
    lower_seconds: float
    compile_seconds: float | None
    memory: dict[str, float] | None  # memory_analysis fields
    cost: dict[str, float] | None  # cost_analysis (loop bodies counted once)
    hlo: Any  # hlo.HloStats | None
    arg_bytes: dict[str, float] | None  # per device, by category, from the compiled input shardings
    top_collectives: list[dict] | None


def _shard_bytes(leaves, shardings) -> float:
    total = 0.0
    for a, s in zip(leaves, shardings):
        shape = s.shard_shape(tuple(a.shape)) if hasattr(s, "shard_shape") else a.shape
        total += math.prod(shape) * a.dtype.itemsize
    return total


def compile_step(rc, layout: P.Layout, student, teacher, *, abstract: bool, platform: str,
                 devices_per_host: int | None, on_device: bool = False) -> Compiled:
    """Build the trainer's jitted step for ``layout`` and lower (and compile) it with abstract inputs.

    ``on_device``: compile for this process's own accelerator devices (JAX's default backend) instead of fake CPU
    devices, so the planner's CPU-compiled numbers can be checked against the real compiler's on a lent GPU."""
    import jax
    from jax.sharding import AbstractMesh

    from minitron_jax.planning import hlo
    from minitron_jax.sharding import MESH_AXES, make_mesh
    from minitron_jax.train.state import abstract_teacher, abstract_train_state
    from minitron_jax.train.step import abstract_batch, build_train_step

    rc = with_layout(rc, layout)
    sizes = (layout.data, layout.fsdp, layout.tensor)
    if abstract:
        mesh = AbstractMesh(sizes, MESH_AXES)
    elif on_device:
        devices = jax.devices()
        if len(devices) < layout.devices:
            raise DryRunError(f"needs {layout.devices} devices, this process has {len(devices)} "
                              f"{devices[0].platform} device(s): plan for fewer with --devices or mesh overrides")
        mesh = make_mesh(*sizes, devices=devices[:layout.devices])
    else:
        devices = cpu_devices(layout.devices)
        if devices is None:
            raise DryRunError(f"needs {layout.devices} CPU devices, the backend has {len(jax.devices('cpu'))}")
        mesh = make_mesh(*sizes, devices=devices)
    t0 = time.perf_counter()
    ts = build_train_step(rc, mesh, student, teacher)
    args = (abstract_train_state(rc, mesh, student, teacher), abstract_teacher(rc, mesh, teacher),
            abstract_batch(rc, mesh))
    if abstract:
        lowered = ts.step.trace(*args).lower(lowering_platforms=(platform,))
        lower_s = time.perf_counter() - t0
        return Compiled("lower", lower_s, None, None, None, None, None, None)
    lowered = ts.step.lower(*args)
    lower_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t1

    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {k: float(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                       "alias_size_in_bytes", "temp_size_in_bytes",
                                                       "generated_code_size_in_bytes")}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost = {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed", "transcendentals")}
    text = compiled.as_text()
    stats = hlo.analyze(text, layout.devices, devices_per_host)

    in_shardings = compiled.input_shardings[0]  # positional args: (state, teacher, batch)
    state, teacher_args, batch = args
    arg_bytes = {
        "params": _shard_bytes(jax.tree.leaves(state.params), jax.tree.leaves(in_shardings[0].params)),
        "optimizer": _shard_bytes(jax.tree.leaves(state.opt_state), jax.tree.leaves(in_shardings[0].opt_state)),
        "teacher": _shard_bytes(jax.tree.leaves(teacher_args), jax.tree.leaves(in_shardings[1])),
        "batch": _shard_bytes(jax.tree.leaves(batch), jax.tree.leaves(in_shardings[2])),
        "other": _shard_bytes([state.step, state.rng], [in_shardings[0].step, in_shardings[0].rng]),
    }
    return Compiled("compile", lower_s, compile_s, memory, cost, stats, arg_bytes,
                    hlo.top_collectives(text, layout.devices, 8))


def with_layout(rc, layout: P.Layout):
    """The run config with ``layout``'s mesh, accumulation and remat."""
    mesh = dataclasses.replace(rc.mesh, data=layout.data, fsdp=layout.fsdp, tensor=layout.tensor)
    train = dataclasses.replace(rc.train, grad_accum=layout.grad_accum, remat=layout.remat,
                                attention=layout.attention)
    return dataclasses.replace(rc, mesh=mesh, train=train)


# ------------------------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------------------------
def _itemsize(name: str) -> int:
    from minitron_jax.dtypes import itemsize

    return itemsize(name)


def analytic(rc, layout: P.Layout, student, teacher) -> dict[str, Any]:
    """Per-device bytes of every part of the step, without a compiler."""
    from minitron_jax.train.state import mesh_rules

    rules = mesh_rules(rc)
    shape = layout.mesh_shape
    pbytes = _itemsize(rc.train.param_dtype)
    params = P.param_bytes(student, shape, rules, pbytes)
    out = {
        "params": params,
        "optimizer": 2 * P.param_bytes(student, shape, rules, 4),  # AdamW mu and nu (fp32, as the params)
        "teacher": P.param_bytes(teacher, shape, rules, _itemsize(rc.teacher.dtype)) if teacher else 0.0,
        "batch": P.batch_bytes(rc.data.batch_size, rc.data.seq_len, layout.data * layout.fsdp),
    }
    if rc.teacher.logits_cache is not None:  # the cached teacher's ids, log-probs and rest ride in the batch
        out["batch"] += (rc.data.batch_size * rc.data.seq_len * _cache_index(rc)["bytes_per_token"]
                         / (layout.data * layout.fsdp))
    act = P.activation_bytes(student, teacher, layout, global_rows=rc.data.batch_size, seq_len=rc.data.seq_len,
                             chunk_size=rc.loss.chunk_size, param_bytes_per_device=P.param_bytes(student, shape,
                                                                                                 rules, 4),
                             compute_bytes=_itemsize(rc.train.compute_dtype))
    out["temp"] = act["total"]
    out["temp_components"] = act
    out["total"] = out["params"] + out["optimizer"] + out["teacher"] + out["batch"] + out["temp"]
    shards = layout.fsdp * layout.tensor
    out["naive"] = {
        "params": P.naive_param_bytes(student, shards, pbytes),
        "optimizer": 2 * P.naive_param_bytes(student, shards, 4),
        "teacher": P.naive_param_bytes(teacher, shards, _itemsize(rc.teacher.dtype)) if teacher else 0.0,
    }
    return out


def _cache_index(rc) -> dict[str, Any]:
    """The index of the run's teacher-logits cache (K, dtypes, bytes per token); refused when there is none."""
    from minitron_jax.train.teacher_cache import TeacherCache

    return TeacherCache(rc.teacher.logits_cache).index


def compiled_total(c: Compiled, *, raw: bool = False) -> float | None:
    """Peak bytes per device of the compiled program: arguments + temporaries + outputs not aliased to donated
    arguments, less (unless ``raw``) the f32 copies of bf16 weights that only XLA:CPU makes (`hlo.param_upcasts`)."""
    if c.memory is None:
        return None
    m = c.memory
    total = (m["argument_size_in_bytes"] + m["temp_size_in_bytes"]
             + max(0.0, m["output_size_in_bytes"] - m["alias_size_in_bytes"]))
    return total if raw or c.hlo is None else total - c.hlo.param_upcast_bytes


def compiled_temp(c: Compiled) -> float:
    return c.memory["temp_size_in_bytes"] - (c.hlo.param_upcast_bytes if c.hlo else 0.0)


def layout_of(rc, devices: int | None) -> P.Layout:
    data, fsdp, tensor = resolve_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor, devices)
    return P.Layout(data, fsdp, tensor, rc.train.grad_accum, rc.train.remat, rc.train.attention)


def valid_layout(rc, layout: P.Layout) -> bool:
    """Micro-batches split evenly over the data-parallel devices (as ``train.step.check_batch_layout`` demands)."""
    rows = rc.data.batch_size
    return rows % layout.grad_accum == 0 and (rows // layout.grad_accum) % (layout.data * layout.fsdp) == 0


def make_plan(rc, *, recipe: str | None, acc: P.Accelerator, mfu: float, memory_fraction: float,
              devices: int | None, devices_per_host: int | None, total_tokens: float | None, abstract: bool,
              verify: bool, teacher_config: str | None = None, student_config: str | None = None,
              log=print, on_device: bool = False) -> dict[str, Any]:
    from minitron_jax.arch import count_params

    student, teacher = run_models(rc, recipe, teacher_config, student_config)
    cache = None
    if rc.mode == "distill" and rc.teacher.logits_cache is not None:
        # The teacher's top-k come from disk in the batch: the step has no teacher (params, forward, activations).
        index = _cache_index(rc)
        cache = {"path": rc.teacher.logits_cache, "top_k": index["top_k"], "logprobs_dtype": index["logprobs_dtype"],
                 "ids_dtype": index["ids_dtype"], "bytes_per_token": index["bytes_per_token"],
                 "teacher_not_loaded": teacher.describe()}
        teacher = None
    layout = layout_of(rc, devices)
    if not valid_layout(rc, layout):
        raise DryRunError(f"data.batch_size {rc.data.batch_size} / train.grad_accum {layout.grad_accum} does not "
                          f"split over {layout.data * layout.fsdp} data-parallel devices")
    dph = devices_per_host or acc.devices_per_node
    platform = "tpu" if acc.name.startswith("TPU") else "cuda"
    import jax

    where = "abstract" if abstract else (jax.devices()[0].device_kind if on_device else "fake CPU")
    log(f"[dry run] {'lowering' if abstract else 'compiling'} the train step for {layout.describe()} "
        f"on {layout.devices} {where} devices ...")
    comp = compile_step(rc, layout, student, teacher, abstract=abstract, platform=platform, devices_per_host=dph,
                        on_device=on_device)
    ana = analytic(rc, layout, student, teacher)

    T = rc.data.seq_len
    tokens_per_step = rc.data.batch_size * T
    total_tokens = total_tokens or rc.train.steps * tokens_per_step
    flops = P.step_flops(student, teacher, tokens_per_step, T, layout.remat)
    stats = comp.hlo
    time_est = P.estimate_time(flops.model, layout.devices, acc, mfu, tokens_per_step=tokens_per_step,
                               total_tokens=total_tokens, wire_bytes=stats.wire_bytes if stats else 0.0,
                               cross_host_bytes=stats.cross_host_bytes if stats else 0.0)
    usable = acc.memory * memory_fraction
    total_c = compiled_total(comp)
    basis = "compiled" if total_c is not None else "analytic"
    total = total_c if total_c is not None else ana["total"]
    fits = total <= usable

    micro_rows = rc.data.batch_size // layout.grad_accum // (layout.data * layout.fsdp)
    plan: dict[str, Any] = {
        "kind": "distill",
        "recipe": recipe,
        "mode": rc.mode,
        "accelerator": {"key": accelerator_key(acc), **acc.to_dict()},
        "mfu": mfu,
        "devices": layout.devices,
        "hosts": max(1, layout.devices // dph),
        "devices_per_host": dph,
        "layout": dataclasses.asdict(layout),
        "models": {
            "student": {"config": student.describe(), "params": count_params(student),
                        "param_dtype": rc.train.param_dtype, "compute_dtype": rc.train.compute_dtype,
                        "pruned_from_teacher": rc.student.prune},
            "teacher": ({"config": teacher.describe(), "params": count_params(teacher), "dtype": rc.teacher.dtype,
                         "path": rc.teacher.path} if teacher else None),
        },
        "batch": {"global_rows": rc.data.batch_size, "seq_len": T, "grad_accum": layout.grad_accum,
                  "rows_per_device_per_micro_batch": micro_rows, "tokens_per_step": tokens_per_step,
                  "loss_chunk_tokens": rc.loss.chunk_size},
        "teacher_logits_cache": cache,
        "compile": {"method": comp.method,
                    "backend": (f"abstract:{platform}" if comp.method != "compile"
                                else jax.default_backend() if on_device else "cpu"),
                    "device_kind": jax.devices()[0].device_kind if on_device else None,
                    "lower_seconds": comp.lower_seconds, "compile_seconds": comp.compile_seconds},
        "memory_per_device": {
            "compiled": _compiled_memory(comp),
            "analytic": {k: v for k, v in ana.items() if k not in ("naive",)},
            "naive": ana["naive"],
            "capacity": acc.memory, "usable": usable, "memory_fraction": memory_fraction,
            "basis": basis, "total": total, "fits": fits,
        },
        "flops_per_step": {
            "model": flops.model, "executed": flops.executed, "model_per_device": flops.model / layout.devices,
            "executed_per_device": flops.executed / layout.devices,
            "hlo_dots_per_device": stats.dot_flops if stats else None,
            "cost_analysis_per_device": comp.cost.get("flops") if comp.cost else None,
        },
        "collectives_per_device": (stats.to_dict() if stats else None),
        "top_collectives": comp.top_collectives,
        "time": time_est,
        "fits": fits,
        "notes": _notes(rc, layout, student, teacher, comp, ana),
    }
    if not fits:
        plan["suggestions"] = suggest(rc, layout, student, teacher, comp, ana, acc=acc, usable=usable,
                                      verify=verify and not abstract, abstract=abstract, dph=dph, log=log)
    return plan


def accelerator_key(acc: P.Accelerator) -> str:
    """The name under which ``acc`` stands in ``capacity.ACCELERATORS`` (``h100``, ...)."""
    return next(k for k, v in P.ACCELERATORS.items() if v == acc)


def _compiled_memory(c: Compiled) -> dict[str, Any] | None:
    if c.memory is None:
        return None
    out = dict(c.arg_bytes or {})
    out["temp_raw"] = c.memory["temp_size_in_bytes"]
    out["cpu_param_upcasts"] = c.hlo.param_upcast_bytes if c.hlo else 0.0
    out["temp"] = compiled_temp(c)
    out["arguments"] = c.memory["argument_size_in_bytes"]
    out["outputs_not_aliased"] = max(0.0, c.memory["output_size_in_bytes"] - c.memory["alias_size_in_bytes"])
    out["total_raw"] = compiled_total(c, raw=True)
    out["total"] = compiled_total(c)
    return out


def _notes(rc, layout, student, teacher, comp: Compiled, ana) -> list[str]:
    notes = []
    rows = rc.data.batch_size / layout.grad_accum / (layout.data * layout.fsdp)
    T = rc.data.seq_len
    # The largest attention layer's scores (a heterogeneous student's layers have their own KV heads; none: 0).
    scores = max(rows * v.num_heads / (layout.tensor if v.num_kv_heads % layout.tensor == 0 else 1) * T * T * 4
                 for _, v in P.layer_views(student))
    if layout.attention == "einsum" and comp.memory and scores > 0.1 * compiled_temp(comp):
        notes.append(f"attention materializes fp32 scores [B, H, T, T]: {fmt_bytes(scores)} per student layer "
                     f"per device at T={T} ({rows:g} rows/device); train.attention=blockwise bounds this by the key "
                     "block (512), and on an NVIDIA GPU in bf16 train.attention=fused never writes them (cuDNN's "
                     "flash attention)")
    if comp.method == "compile":
        notes.extend(CPU_NOTES)
        if comp.hlo and comp.hlo.unknown_trip_counts:
            notes.append(f"{len(comp.hlo.unknown_trip_counts)} while loops without a known trip count were counted "
                         "once")
    else:
        notes.append("lowered on an AbstractMesh only: memory and collectives are the analytic estimates")
    return notes


def suggest(rc, layout: P.Layout, student, teacher, comp: Compiled, ana, *, acc, usable, verify, abstract, dph,
            log=print) -> list[dict[str, Any]]:
    """Layouts near ``layout`` that fit by the analytic model (temporaries scaled by the compiled/analytic ratio
    of the plan at hand), best first; the best one is compiled to confirm when ``verify``."""
    ratio = 1.0
    if comp.memory is not None and ana["temp"] > 0:
        ratio = min(max(compiled_temp(comp) / ana["temp"], 0.5), 4.0)
    out = []
    for cand in P.candidates(layout, rc.data.batch_size, allow_blockwise=True):
        if not valid_layout(rc, cand):
            continue
        a = analytic(rc, cand, student, teacher)
        est = a["total"] - a["temp"] + a["temp"] * ratio
        if est <= usable:
            out.append({"layout": cand, "estimated_total": est, "analytic_total": a["total"],
                        "cost": P.layout_cost(cand, layout)})
    out.sort(key=lambda d: (d["cost"], d["estimated_total"]))
    out = out[:5]
    for s in out:
        s["changes"] = _overrides(layout, s["layout"])
        s["layout"] = dataclasses.asdict(s["layout"])
    if out and verify:
        best = P.Layout(**out[0]["layout"])
        log(f"[dry run] compiling the best suggestion to confirm: {best.describe()} ...")
        c = compile_step(rc, best, student, teacher, abstract=False, platform="cuda", devices_per_host=dph)
        total = compiled_total(c)
        out[0]["compiled_total"] = total
        out[0]["compiled_fits"] = total is not None and total <= usable
        out[0]["compile_seconds"] = c.compile_seconds
    return out


def _overrides(base: P.Layout, cand: P.Layout) -> list[str]:
    out = []
    for f, key in (("data", "mesh.data"), ("fsdp", "mesh.fsdp"), ("tensor", "mesh.tensor"),
                   ("grad_accum", "train.grad_accum"), ("remat", "train.remat"), ("attention", "train.attention")):
        if getattr(base, f) != getattr(cand, f):
            out.append(f"{key}={getattr(cand, f)}")
    return out
