"""Dry run of the importance pass of ``python -m minitron_jax.prune --dry-run``: the real jitted calibration
functions lowered with abstract weights and windows on one CPU device, compiled, and costed over the recipe's
calibration set; nothing is loaded."""

from __future__ import annotations

import math
import time
from typing import Any

from minitron_jax.planning import capacity as P
from minitron_jax.planning.dryrun import CPU_NOTES, accelerator_key, cpu_devices
from minitron_jax.planning.models import resolve_model_config


def prune_model_config(spec, model: str | None, *, recipe: str | None = None, explicit: str | None = None):
    """The config of the model a prune recipe starts from (``model``: a path or a name in configs/models, or
    ``explicit``: an HF config.json), checked against ``spec``: refuses a size it cannot be pruned to."""
    from minitron_jax.arch import is_hetero
    from minitron_jax.compress.spec import check_spec
    from minitron_jax.planning.models import DryRunError

    cfg = resolve_model_config(model or "", "model", recipe, explicit)
    if is_hetero(cfg):
        raise DryRunError(f"{model or explicit}: a heterogeneous model ({cfg.describe()}) cannot be Minitron-pruned; "
                          "prune needs a uniform Llama model")
    check_spec(cfg, spec)
    return cfg


def plan_prune(spec, model_config, **kwargs) -> dict[str, Any]:
    """:func:`make_importance_plan` plus the config of the model the pruning yields (``pruned``)."""
    from minitron_jax.compress.spec import target_config

    p = make_importance_plan(spec, model_config, **kwargs)
    p["pruned"] = {"config": target_config(model_config, spec).describe()}
    return p


def make_importance_plan(spec, model_config, *, acc: P.Accelerator, mfu: float, memory_fraction: float,
                         recipe: str | None, log=print) -> dict[str, Any]:
    """The calibration pass of ``prune`` (one device, as the CLI runs it): the real jitted function lowered with
    abstract params and windows, compiled, and costed over the recipe's calibration set."""
    import jax
    import jax.numpy as jnp

    from minitron_jax.compress import importance as imp
    from minitron_jax.evaluate.perplexity import DTYPES, batch_nll
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
        passes.append(("activation statistics", imp.calibration_batch, (cfg, params, tokens, weights),
                       {"dtype": dtype}, 1))
    if spec.ranks_layers and spec.depth_metric in ("ppl", "contiguous"):
        k = 1 if spec.depth_metric == "ppl" else spec.drop_layers
        keep = jax.ShapeDtypeStruct((cfg.num_layers,), jnp.float32)
        passes.append((f"perplexity with {k} layer(s) dropped", batch_nll, (cfg, params, tokens, weights, keep),
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
        "dtype": spec.dtype, "accelerator": {"key": accelerator_key(acc), **acc.to_dict()}, "mfu": mfu, "devices": 1,
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

