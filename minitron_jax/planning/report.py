"""What a dry run's plan looks like to a reader: the text a command prints, the refusal line, the JSON, and the
markdown tables of docs/scaling.md (``python -m minitron_jax.dryrun table PLAN.json ...``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from minitron_jax.fsutil import fmt_bytes
from minitron_jax.planning import capacity as P


def plan_json(p: dict[str, Any], indent: int | None = 2) -> str:
    """The plan as one JSON object (numpy scalars and dataclasses turned into plain values)."""
    return json.dumps(p, indent=indent, default=_json_default)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def format_plan(p: dict[str, Any]) -> str:
    if p["kind"] == "importance":
        return format_importance_plan(p)
    fb, ff, fs = fmt_bytes, P.fmt_flops, P.fmt_seconds
    acc, lo, m = p["accelerator"], p["layout"], p["memory_per_device"]
    st, te = p["models"]["student"], p["models"]["teacher"]
    b = p["batch"]
    lines = [f"Dry run of {p['recipe'] or 'the run config'} ({p['mode']}) on {p['devices']} × {acc['name']} "
             f"({p['hosts']} host{'s' if p['hosts'] > 1 else ''} of {p['devices_per_host']}), MFU {p['mfu']:g}"]
    if te:
        lines.append(f"  teacher   {te['config']}  {te['params'] / 1e9:.2f}B params ({te['dtype']})")
    cache = p.get("teacher_logits_cache")
    if cache:
        lines.append(f"  teacher   not loaded: top-{cache['top_k']} log-probs ({cache['logprobs_dtype']}) read from "
                     f"{cache['path']}, {cache['bytes_per_token']} bytes/token in the batch")
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
    msg = (f"error: this plan does not fit: {fmt_bytes(m['total'])} per device ({m['basis']}) > "
           f"{fmt_bytes(m['usable'])} usable on {p['accelerator']['name']}")
    sugg = p.get("suggestions") or []
    if sugg:
        msg += f"; nearest setting that fits: {' '.join(sugg[0]['changes'])}"
    return msg


def format_importance_plan(p: dict[str, Any]) -> str:
    fb = fmt_bytes
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


def markdown_tables(plans: Sequence[dict[str, Any]]) -> str:
    """Markdown tables (memory, compute and collectives, time) of distillation plans read from ``--json`` files."""
    fb, ff, fs = fmt_bytes, P.fmt_flops, P.fmt_seconds
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

