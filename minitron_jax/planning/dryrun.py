"""Dry runs: plan a distillation (or an importance pass) for hardware we do not have, by compiling the real step.

Usage::

    python -m minitron_jax.distill --config configs/distill_llama31_8b_to_4b_width.yaml --dry-run \
        [--accelerator h100|h200|a100|tpu-v5p] [--mfu 0.45] [--devices N] [--json [PATH]] [section.key=value ...]
    python -m minitron_jax.prune --config configs/prune_llama31_8b_width.yaml --model Llama-3.1-8B --dry-run

Nothing is loaded or allocated: the models' configs come from the recipe (``teacher.path`` is looked up in
``configs/models/<name>.json`` when it is not a local directory or file; the student is the recipe's pruning spec
applied to the teacher's config, ``prune.target_config``), every array is a ``jax.ShapeDtypeStruct`` carrying its
``NamedSharding``, and the mesh is made of fake CPU devices (``jax_num_cpu_devices``; a process whose backend is
already up with too few devices re-executes itself). The function compiled is the trainer's own jitted step
(``train.step.build_train_step``), so what is planned is what a run executes.

The plan puts the compiler's numbers (``memory_analysis``, ``cost_analysis``, the collectives parsed from the
compiled HLO with loop trip counts, see :mod:`~minitron_jax.planning.hlo`) beside the analytic ones
(:mod:`~minitron_jax.planning.capacity`),
estimates the step time and the whole token budget's wall time at a stated MFU, and refuses (exit code 4) a plan
that does not fit the accelerator's memory, naming the nearest settings that do (re-planned analytically,
then the best one compiled to confirm). ``--abstract`` only lowers on a ``jax.sharding.AbstractMesh`` (seconds,
no device count needed, no memory or collective numbers: the analytic plan alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from minitron_jax.exitcodes import ExitCode, cli_exit
from minitron_jax.planning import capacity as P

EXIT_OK, EXIT_CONFIG, EXIT_DOES_NOT_FIT = ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.DOES_NOT_FIT
CHILD_ENV = "MINITRON_DRYRUN_CHILD"
REPO_MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"

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


class DryRunError(ValueError):
    """A recipe that cannot be planned (unknown model, a mesh that does not match the devices, ...)."""


# ------------------------------------------------------------------------------------------------------------------
# Model configs without weights
# ------------------------------------------------------------------------------------------------------------------
def model_dirs(recipe: str | None) -> list[Path]:
    dirs = []
    if recipe:
        dirs.append(Path(recipe).resolve().parent / "models")
    dirs.append(REPO_MODELS)
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def known_models(recipe: str | None = None) -> list[str]:
    return sorted({p.stem for d in model_dirs(recipe) for p in d.glob("*.json")})


def _model_key(name: str) -> str:
    """Names compare case-insensitively and without Meta's old ``Meta-`` prefix (Meta-Llama-3.1-8B ≡ Llama-3.1-8B)."""
    key = name.lower()
    return key[5:] if key.startswith("meta-") else key


def resolve_model_config(ref: str, what: str, recipe: str | None = None, explicit: str | None = None):
    """The LlamaConfig of a model reference (path, HF repo id, ``asset:NAME``) without reading its weights."""
    from minitron_jax.config import LlamaConfig

    if explicit:
        return LlamaConfig.from_json_file(explicit)
    if ref.endswith(".json") and Path(ref).is_file():
        return LlamaConfig.from_json_file(ref)
    path = Path(ref).expanduser()
    if path.exists():
        from minitron_jax.convert import read_source_config

        return read_source_config(path)
    name = path.name[:-5] if path.name.endswith(".gguf") else path.name
    for d in model_dirs(recipe):
        for p in d.glob("*.json"):
            if _model_key(p.stem) == _model_key(name):
                return LlamaConfig.from_json_file(p)
    if ref.startswith("asset:"):
        from minitron_jax.convert import read_source_config
        from minitron_jax.train.config import resolve_path

        try:
            return read_source_config(resolve_path(ref))
        except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
            raise DryRunError(f"cannot read the config of {what} {ref} ({e})") from None
    raise DryRunError(f"{what} {ref!r} is not a local model and no configs/models/{name}.json describes it; add "
                      f"that file (the model's HF config.json) or pass --{what}-config FILE "
                      f"(known: {', '.join(known_models(recipe)) or 'none'})")


def run_models(rc, recipe: str | None, teacher_config: str | None = None, student_config: str | None = None):
    """(student config, teacher config or None) of a run config, from configs only."""
    from minitron_jax.compress import prune

    if rc.mode == "teacher_correction":
        return resolve_model_config(rc.teacher.path, "teacher", recipe, teacher_config), None
    if rc.mode == "sft":
        return resolve_model_config(rc.student.path, "student", recipe, student_config), None
    teacher = resolve_model_config(rc.teacher.path, "teacher", recipe, teacher_config)
    if rc.student.prune is not None:
        spec = prune.PruneSpec.from_dict(rc.student.prune)
        prune.check_spec(teacher, spec)
        student = prune.target_config(teacher, spec)
    else:
        student = resolve_model_config(rc.student.path, "student", recipe, student_config)
    return student, teacher


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
                 devices_per_host: int | None) -> Compiled:
    """Build the trainer's jitted step for ``layout`` and lower (and compile) it with abstract inputs."""
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
              log=print) -> dict[str, Any]:
    from minitron_jax.model import count_params

    student, teacher = run_models(rc, recipe, teacher_config, student_config)
    layout = layout_of(rc, devices)
    if not valid_layout(rc, layout):
        raise DryRunError(f"data.batch_size {rc.data.batch_size} / train.grad_accum {layout.grad_accum} does not "
                          f"split over {layout.data * layout.fsdp} data-parallel devices")
    dph = devices_per_host or acc.devices_per_node
    platform = "tpu" if acc.name.startswith("TPU") else "cuda"
    log(f"[dry run] {'lowering' if abstract else 'compiling'} the train step for {layout.describe()} "
        f"on {layout.devices} {'abstract' if abstract else 'fake CPU'} devices ...")
    comp = compile_step(rc, layout, student, teacher, abstract=abstract, platform=platform, devices_per_host=dph)
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
        "accelerator": {"key": _acc_key(acc), **acc.to_dict()},
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
        "compile": {"method": comp.method, "backend": "cpu" if comp.method == "compile" else f"abstract:{platform}",
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


def _acc_key(acc: P.Accelerator) -> str:
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
    scores = rows * student.num_heads / (layout.tensor if student.num_kv_heads % layout.tensor == 0 else 1) * T * T * 4
    if layout.attention == "einsum" and comp.memory and scores > 0.1 * compiled_temp(comp):
        notes.append(f"attention materializes fp32 scores [B, H, T, T]: {P.fmt_bytes(scores)} per student layer "
                     f"per device at T={T} ({rows:g} rows/device); train.attention=blockwise bounds this by the key "
                     "block (512)")
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


# ------------------------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------------------------
def format_plan(p: dict[str, Any]) -> str:
    if p["kind"] == "importance":
        return format_importance_plan(p)
    fb, ff, fs = P.fmt_bytes, P.fmt_flops, P.fmt_seconds
    acc, lo, m = p["accelerator"], p["layout"], p["memory_per_device"]
    st, te = p["models"]["student"], p["models"]["teacher"]
    b = p["batch"]
    lines = [f"Dry run of {p['recipe'] or 'the run config'} ({p['mode']}) on {p['devices']} × {acc['name']} "
             f"({p['hosts']} host{'s' if p['hosts'] > 1 else ''} of {p['devices_per_host']}), MFU {p['mfu']:g}"]
    if te:
        lines.append(f"  teacher   {te['config']}  {te['params'] / 1e9:.2f}B params ({te['dtype']})")
    lines.append(f"  student   {st['config']}  {st['params'] / 1e9:.2f}B params ({st['param_dtype']} master, "
                 f"{st['compute_dtype']} compute)" + (f"  = teacher pruned by {st['pruned_from_teacher']}"
                                                      if st.get("pruned_from_teacher") else ""))
    lines.append(f"  layout    mesh data={lo['data']} fsdp={lo['fsdp']} tensor={lo['tensor']}; batch "
                 f"{b['global_rows']} × {b['seq_len']} = {b['tokens_per_step'] / 1e6:.2f}M tokens/step, grad_accum "
                 f"{b['grad_accum']} → {b['rows_per_device_per_micro_batch']} row(s)/device/micro-batch; "
                 f"remat {lo['remat']}; attention {lo['attention']}")
    c = p["compile"]
    if c["method"] == "compile":
        lines.append(f"  proof     the real train step compiled on {p['devices']} fake CPU devices "
                     f"(lower {c['lower_seconds']:.1f} s, compile {c['compile_seconds']:.1f} s)")
    else:
        lines.append(f"  proof     the real train step lowered on an AbstractMesh for {c['backend']} "
                     f"({c['lower_seconds']:.1f} s); no compile")
    lines.append("")
    comp = m["compiled"] or {}
    ana = m["analytic"]
    naive = m["naive"]
    lines.append(f"  {'memory per device':<30}{'compiled (CPU)':>16}{'analytic':>14}   naive N×bytes÷shards")
    for key, label in (("params", f"params ({st['param_dtype']})"), ("optimizer", "optimizer state (AdamW)"),
                       ("teacher", f"teacher ({te['dtype']})" if te else "teacher"), ("batch", "batch")):
        lines.append(f"  {label:<30}{fb(comp.get(key)):>16}{fb(ana[key]):>14}   "
                     f"{fb(naive.get(key)) if key in naive else ''}")
    lines.append(f"  {'temporaries (activations, ...)':<30}{fb(comp.get('temp')):>16}{fb(ana['temp']):>14}   "
                 "(analytic: GPU bf16 estimate)")
    if comp.get("cpu_param_upcasts"):
        lines.append(f"  {'(XLA:CPU f32 weight copies)':<30}{fb(comp['cpu_param_upcasts']):>16}{'':>14}   "
                     "excluded: a GPU multiplies bf16 directly")
    lines.append(f"  {'total':<30}{fb(comp.get('total')):>16}{fb(ana['total']):>14}   of {fb(m['usable'])} usable "
                 f"({fb(m['capacity'])} × {m['memory_fraction']:g})")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"  → {verdict} ({m['basis']} total {fb(m['total'])} vs {fb(m['usable'])})")
    lines.append("")
    f = p["flops_per_step"]
    lines.append(f"  FLOPs per step   model 6·N·tok+2·N_t·tok+attn {ff(f['model'])} ({ff(f['model_per_device'])}"
                 f"/device); executed incl. remat {ff(f['executed'])} ({ff(f['executed_per_device'])}/device)")
    if f["hlo_dots_per_device"] is not None:
        lines.append(f"                   compiled HLO dots ×trip counts {ff(f['hlo_dots_per_device'])}/device; "
                     f"cost_analysis (loop bodies once) {ff(f['cost_analysis_per_device'])}/device")
    col = p["collectives_per_device"]
    if col:
        lines.append("  collectives per device per step (compiled HLO, loop trip counts included):")
        for kind, s in col["collectives"].items():
            if s["count"]:
                lines.append(f"    {kind:<20} ×{s['count']:<8g} {fb(s['bytes']):>10}   wire {fb(s['wire_bytes']):>10}"
                             + (f"   cross-host {fb(s['cross_host_bytes'])}" if s["cross_host_bytes"] else ""))
        if not any(s["count"] for s in col["collectives"].values()):
            lines.append("    none")
    t = p["time"]
    lines.append("")
    lines.append(f"  time @ MFU {p['mfu']:g}: step {fs(t['step_seconds'])}, {t['tokens_per_second'] / 1e6:.2f}M "
                 f"tokens/s ({t['tokens_per_second_per_device'] / 1e3:.1f}k/device); collectives if serialized "
                 f"{fs(t['collective_seconds_if_serialized'])}"
                 + ("  ⚠ communication-bound" if t["communication_bound"] else ""))
    lines.append(f"  budget: {t['total_tokens'] / 1e9:.1f}B tokens = {t['steps']:.0f} steps → "
                 f"{fs(t['total_seconds'])}"
                 f" ({t['device_hours']:.0f} device-hours)")
    for n in p["notes"]:
        lines.append(f"  note: {n}")
    if not p["fits"]:
        lines.append("")
        sugg = p.get("suggestions") or []
        if not sugg:
            lines.append("  no nearby layout fits: use more devices or a larger accelerator")
        for i, s in enumerate(sugg):
            conf = ""
            if "compiled_total" in s:
                conf = (f"; compiled: {fb(s['compiled_total'])} → "
                        f"{'fits' if s['compiled_fits'] else 'still does not fit'}")
            lines.append(f"  suggestion {i + 1}: {' '.join(s['changes'])}  (estimated {fb(s['estimated_total'])}"
                         f"{conf})")
    return "\n".join(lines)


def refusal_message(p: dict[str, Any]) -> str:
    m = p["memory_per_device"]
    msg = (f"error: this plan does not fit: {P.fmt_bytes(m['total'])} per device ({m['basis']}) > "
           f"{P.fmt_bytes(m['usable'])} usable on {p['accelerator']['name']}")
    sugg = p.get("suggestions") or []
    if sugg:
        msg += f"; nearest setting that fits: {' '.join(sugg[0]['changes'])}"
    return msg


# ------------------------------------------------------------------------------------------------------------------
# Importance pass (python -m minitron_jax.prune --dry-run)
# ------------------------------------------------------------------------------------------------------------------
def make_importance_plan(spec, model_config, *, acc: P.Accelerator, mfu: float, memory_fraction: float,
                         recipe: str | None, log=print) -> dict[str, Any]:
    """The calibration pass of ``prune`` (one device, as the CLI runs it): the real jitted function lowered with
    abstract params and windows, compiled, and costed over the recipe's calibration set."""
    import jax
    import jax.numpy as jnp

    from minitron_jax.compress import importance as imp
    from minitron_jax.evaluate.perplexity import DTYPES
    from minitron_jax.model import abstract_params, count_params
    from minitron_jax.planning import hlo

    dtype = DTYPES[spec.dtype]
    cfg = model_config
    cpu = cpu_devices(1)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(
        cpu[0])), abstract_params(cfg, dtype))
    B, T = spec.batch_size, spec.seq_len
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    weights = jax.ShapeDtypeStruct((B,), jnp.float32)
    passes = []
    if spec.prunes_width and spec.importance == "activation" or (spec.ranks_layers and spec.depth_metric == "bi"):
        passes.append(("activation statistics", imp._calibration_batch, (cfg, params, tokens, weights),
                       {"dtype": dtype}, 1))
    if spec.ranks_layers and spec.depth_metric in ("ppl", "contiguous"):
        from minitron_jax.evaluate.perplexity import _batch_nll

        k = 1 if spec.depth_metric == "ppl" else spec.drop_layers
        keep = jax.ShapeDtypeStruct((cfg.num_layers,), jnp.float32)
        passes.append((f"perplexity with {k} layer(s) dropped", _batch_nll, (cfg, params, tokens, weights, keep),
                       {"dtype": dtype}, cfg.num_layers - k + 1))
    n_batches = math.ceil(spec.calib_samples / B)
    out_passes = []
    peak = 0.0
    total_flops = 0.0
    for name, fn, args, kwargs, repeats in passes:
        log(f"[dry run] compiling the importance pass: {name} ...")
        t0 = time.perf_counter()
        compiled = fn.lower(*args, **kwargs).compile()
        secs = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        stats = hlo.analyze(compiled.as_text(), 1)
        per_batch = (2.0 * P.matmul_params(cfg) + P.attention_flops_per_token(cfg, T)) * B * T
        temp = float(mem.temp_size_in_bytes) - stats.param_upcast_bytes  # less XLA:CPU's f32 weight copies
        total = float(mem.argument_size_in_bytes) + temp + max(0.0, float(mem.output_size_in_bytes
                                                                           - mem.alias_size_in_bytes))
        peak = max(peak, total)
        total_flops += per_batch * n_batches * repeats
        out_passes.append({"name": name, "compile_seconds": secs, "runs": repeats * n_batches,
                           "arguments": float(mem.argument_size_in_bytes), "temp": temp, "total": total,
                           "temp_raw": float(mem.temp_size_in_bytes), "cpu_param_upcasts": stats.param_upcast_bytes,
                           "flops_per_batch": per_batch, "hlo_dot_flops_per_batch": stats.dot_flops})
    usable = acc.memory * memory_fraction
    seconds = total_flops / (acc.peak_flops * mfu)
    weights_bytes = count_params(cfg) * jnp.dtype(dtype).itemsize
    scores = B * cfg.num_heads * T * T * 4
    p = {
        "kind": "importance", "recipe": recipe, "model": cfg.describe(), "params": count_params(cfg),
        "dtype": spec.dtype, "accelerator": {"key": _acc_key(acc), **acc.to_dict()}, "mfu": mfu, "devices": 1,
        "calibration": {"samples": spec.calib_samples, "seq_len": T, "batch_size": B, "batches": n_batches},
        "passes": out_passes,
        "memory_per_device": {"weights_analytic": weights_bytes, "attention_scores_per_layer": scores,
                              "total": peak, "usable": usable, "capacity": acc.memory, "basis": "compiled",
                              "fits": peak <= usable},
        "flops": total_flops, "time": {"seconds": seconds},
        "fits": peak <= usable,
        "notes": list(CPU_NOTES[:1]),
    }
    if not p["fits"]:
        per_row = max((ps["temp"] for ps in out_passes), default=0.0) / B
        sugg = []
        for b in (B // 2, B // 4, 1):
            if b >= 1 and weights_bytes + per_row * b <= usable:
                sugg.append(f"batch_size={b}")
                break
        if spec.dtype == "float32":
            sugg.append("dtype=bfloat16")
        p["suggestions"] = [{"changes": sugg}] if sugg else []
    return p


def format_importance_plan(p: dict[str, Any]) -> str:
    fb = P.fmt_bytes
    c = p["calibration"]
    lines = [f"Dry run of the importance pass of {p['recipe'] or 'prune'} on 1 × {p['accelerator']['name']}, "
             f"MFU {p['mfu']:g}",
             f"  model     {p['model']}  {p['params'] / 1e9:.2f}B params ({p['dtype']})",
             f"  calib     {c['samples']} windows of {c['seq_len']} tokens in {c['batches']} batches of "
             f"{c['batch_size']}"]
    for ps in p["passes"]:
        lines.append(f"  pass      {ps['name']}: ×{ps['runs']} batches; compiled in {ps['compile_seconds']:.1f} s; "
                     f"arguments {fb(ps['arguments'])} + temporaries {fb(ps['temp'])} = {fb(ps['total'])}"
                     + (f" (the CPU program also holds {fb(ps['cpu_param_upcasts'])} of f32 weight copies)"
                        if ps.get("cpu_param_upcasts") else "") + f"; {P.fmt_flops(ps['flops_per_batch'])}/batch")
    m = p["memory_per_device"]
    lines.append(f"  memory    peak {fb(m['total'])} of {fb(m['usable'])} usable → "
                 f"{'FITS' if p['fits'] else 'DOES NOT FIT'}; attention scores {fb(m['attention_scores_per_layer'])}"
                 " per layer")
    lines.append(f"  time      {P.fmt_flops(p['flops'])} → {P.fmt_seconds(p['time']['seconds'])} at MFU {p['mfu']:g}")
    for n in p["notes"]:
        lines.append(f"  note: {n}")
    for s in p.get("suggestions", []):
        lines.append(f"  suggestion: {' '.join(s['changes'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# CLIs
# ------------------------------------------------------------------------------------------------------------------
def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="plan, do not run (implied here)")
    ap.add_argument("--accelerator", default="h100", help=f"one of {', '.join(P.ACCELERATORS)} (default h100)")
    ap.add_argument("--mfu", type=float, default=P.DEFAULT_MFU, help="model FLOPs utilization for the time estimate")
    ap.add_argument("--memory-fraction", type=float, default=P.DEFAULT_MEMORY_FRACTION,
                    help="share of device memory the program may use (default %(default)s)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write the plan as one JSON object to PATH (or stdout with no PATH)")


def distill_parser(prog: str = "python -m minitron_jax.distill") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{prog} --dry-run", description="Plan a distillation run without its hardware: "
                                 "compile the real train step on fake devices and report memory, FLOPs, "
                                 "collectives and time.")
    ap.add_argument("--config", help="run config YAML")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    _common_args(ap)
    ap.add_argument("--devices", type=int, help="devices to plan for (needed when the recipe's mesh has a -1)")
    ap.add_argument("--devices-per-host", type=int, help="default: the accelerator's devices per node")
    ap.add_argument("--tokens", type=float, help="token budget (default: train.steps × data.batch_size × seq_len)")
    ap.add_argument("--abstract", action="store_true", help="only lower on an AbstractMesh (no compile)")
    ap.add_argument("--no-verify", action="store_true", help="do not compile the best suggestion of a refusal")
    ap.add_argument("--teacher-config", help="HF config.json of the teacher (instead of configs/models lookup)")
    ap.add_argument("--student-config", help="HF config.json of the student when student.path is given")
    return ap


def _emit(p: dict[str, Any], json_dest: str | None) -> int:
    """Print the plan (and write its JSON); the exit code: OK, or DOES_NOT_FIT with the refusal on stderr."""
    text = json.dumps(p, indent=None if json_dest == "-" else 2, default=_json_default)
    if json_dest == "-":
        print(text)
    else:
        print(format_plan(p))
        if json_dest:
            Path(json_dest).parent.mkdir(parents=True, exist_ok=True)
            Path(json_dest).write_text(text + "\n")
            print(f"plan written to {json_dest}")
    if not p["fits"]:
        print(refusal_message(p), file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_OK


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def _needed_devices(rc, devices: int | None) -> int:
    d, f, t = resolve_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor, devices)
    return d * f * t


@cli_exit
def distill_main(argv: Sequence[str] | None = None, prog: str = "python -m minitron_jax.distill") -> int:
    from minitron_jax.train.config import RunConfigError, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args = distill_parser(prog).parse_args(argv)
    if not args.config and not args.overrides:
        print("error: --dry-run needs --config FILE (and/or section.key=value overrides)", file=sys.stderr)
        return EXIT_CONFIG
    quiet = args.json == "-"
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if quiet else print
    try:
        acc = P.accelerator(args.accelerator)
        rc = load_config(args.config, args.overrides)
        n = _needed_devices(rc, args.devices)
        if not args.abstract and cpu_devices(n) is None:
            log(f"[dry run] re-running in a fresh process with {n} fake CPU devices")
            return reexec(["distill", *argv], n)
        p = make_plan(rc, recipe=args.config, acc=acc, mfu=args.mfu, memory_fraction=args.memory_fraction,
                      devices=args.devices, devices_per_host=args.devices_per_host, total_tokens=args.tokens,
                      abstract=args.abstract, verify=not args.no_verify, teacher_config=args.teacher_config,
                      student_config=args.student_config, log=log)
    except (RunConfigError, DryRunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return _emit(p, args.json)


@cli_exit
def prune_main(argv: Sequence[str] | None = None, prog: str = "python -m minitron_jax.prune") -> int:
    """``prune --dry-run``: the options of the prune CLI (``--config``, ``--model``, sizes, calibration shape)."""
    from minitron_jax.compress import prune

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = prune._parser()
    ap.prog = f"{prog} --dry-run"
    _common_args(ap)
    ap.add_argument("--model-config", help="HF config.json of --model (instead of configs/models lookup)")
    args = ap.parse_args(argv)
    quiet = args.json == "-"
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if quiet else print
    try:
        acc = P.accelerator(args.accelerator)
        plan_keys = {"dry_run", "accelerator", "mfu", "memory_fraction", "json", "model_config"}
        ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in plan_keys})
        opts = prune._merged_options(ns)
        if not opts.get("model") and not args.model_config:
            raise DryRunError("--dry-run needs --model (a path or a name in configs/models) or --model-config")
        spec = prune.PruneSpec.from_dict({k: v for k, v in opts.items() if k not in prune._PATH_KEYS})
        cfg = resolve_model_config(opts.get("model") or "", "model", args.config, args.model_config)
        prune.check_spec(cfg, spec)
        if cpu_devices(1) is None:
            return reexec(["prune", *argv], 1)
        p = make_importance_plan(spec, cfg, acc=acc, mfu=args.mfu, memory_fraction=args.memory_fraction,
                                 recipe=args.config, log=log)
        p["pruned"] = {"config": prune.target_config(cfg, spec).describe()}
    except (DryRunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return _emit(p, args.json)


def markdown_tables(plans: Sequence[dict[str, Any]]) -> str:
    """Markdown tables (memory, compute and collectives, time) of distillation plans read from ``--json`` files."""
    fb, ff, fs = P.fmt_bytes, P.fmt_flops, P.fmt_seconds
    rows = [p for p in plans if p.get("kind") == "distill"]

    def name(p):
        lo = p["layout"]
        mesh = f"{lo['data']}×{lo['fsdp']}×{lo['tensor']}"
        return (f"{Path(p['recipe']).stem if p['recipe'] else '?'} | {p['devices']}× {p['accelerator']['key']} "
                f"| {mesh} | {p['batch']['grad_accum']} | {lo['remat']} | {lo['attention']}")

    head = "| recipe | devices | mesh d×f×t | accum | remat | attention "
    out = [] if not rows else ["**Memory per device** (compiled on CPU; analytic GPU estimate in brackets)", "",
           head + "| params | optimizer | teacher | temporaries | total | fits |",
           "|" + "---|" * 12]
    for p in rows:
        m = p["memory_per_device"]
        c, a = m["compiled"] or {}, m["analytic"]
        out.append(f"| {name(p)} | {fb(c.get('params', a['params']))} | {fb(c.get('optimizer', a['optimizer']))} "
                   f"| {fb(c.get('teacher', a['teacher']))} | {fb(c.get('temp'))} ({fb(a['temp'])}) "
                   f"| {fb(c.get('total'))} ({fb(a['total'])}) "
                   f"| {'yes' if p['fits'] else '**no**'} of {fb(m['usable'])} |")
    out += [] if not rows else [
            "", "**Compute and collectives per step** (one step = the whole global batch; per device unless noted)", "",
            head + "| model FLOPs (all devices) | HLO dot FLOPs | all-gather | all-reduce | other | wire bytes "
            "| cross-host |", "|" + "---|" * 13]
    for p in rows:
        f, col = p["flops_per_step"], p["collectives_per_device"]
        if col:
            cc = col["collectives"]
            other = sum(v["bytes"] for k, v in cc.items() if k not in ("all-gather", "all-reduce"))
            ag, ar = cc["all-gather"], cc["all-reduce"]
            coll = (f"×{ag['count']:.0f} {fb(ag['bytes'])} | ×{ar['count']:.0f} {fb(ar['bytes'])} "
                    f"| {fb(other)} | {fb(col['wire_bytes'])} | "
                    f"{fb(col['cross_host_bytes'])}")
        else:
            coll = "- | - | - | - | -"
        out.append(f"| {name(p)} | {ff(f['model'])} | {ff(f['hlo_dots_per_device'])} | {coll} |")
    out += [] if not rows else [
            "", "**Time** at the stated MFU (budget: the recipe's tokens)", "",
            head + "| MFU | step | tokens/s | collectives if serialized | tokens | wall time | device-hours |",
            "|" + "---|" * 13]
    for p in rows:
        t = p["time"]
        out.append(f"| {name(p)} | {p['mfu']:g} | {fs(t['step_seconds'])} | {t['tokens_per_second'] / 1e3:.0f}k "
                   f"| {fs(t['collective_seconds_if_serialized'])}{' ⚠' if t['communication_bound'] else ''} "
                   f"| {t['total_tokens'] / 1e9:.1f}B | {fs(t['total_seconds'])} | {t['device_hours']:,.0f} |")
    imp = [p for p in plans if p.get("kind") == "importance"]
    if imp:
        out += ["", "**Importance passes** (one device)", "",
                "| recipe | model | calibration | pass | batches | weights + temporaries | (CPU f32 weight copies) "
                "| fits | FLOPs | time |", "|" + "---|" * 10]
        for p in imp:
            c = p["calibration"]
            for ps in p["passes"]:
                out.append(f"| {Path(p['recipe']).stem if p['recipe'] else '?'} | {p['model'].split(' V=')[0]} "
                           f"({p['dtype']}) | {c['samples']} × {c['seq_len']}, batch {c['batch_size']} "
                           f"| {ps['name']} | {ps['runs']} | {fb(ps['total'])} | {fb(ps.get('cpu_param_upcasts'))} "
                           f"| {'yes' if p['fits'] else '**no**'} | {ff(p['flops'])} "
                           f"| {fs(p['time']['seconds'])} @ {p['mfu']:g} |")
    return "\n".join(out)


@cli_exit
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minitron_jax.dryrun distill|prune ...`` (what the CLIs re-execute into), and
    ``python -m minitron_jax.dryrun table PLAN.json ...`` (markdown tables of saved plans, as in docs/scaling.md)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table":
        print(markdown_tables([json.loads(Path(a).read_text()) for a in argv[1:]]))
        return EXIT_OK
    if not argv or argv[0] not in ("distill", "prune"):
        print("usage: python -m minitron_jax.dryrun distill|prune [options of that CLI's --dry-run]\n"
              "       python -m minitron_jax.dryrun table PLAN.json [PLAN.json ...]", file=sys.stderr)
        return EXIT_CONFIG
    return distill_main(argv[1:]) if argv[0] == "distill" else prune_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
