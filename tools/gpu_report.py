"""The tables of ``tools/gpu_check.sh``: reads its pieces' JSON outputs and exit codes, prints markdown for docs/.

    python tools/gpu_report.py PIECES_DIR [--json ALL.json]

``PIECES_DIR`` holds ``NAME.json`` (a piece's stdout) and ``NAME.rc`` (its exit code) for the pieces
forward_bf16, attention, distill, distill_remat_none, distill_remat_dots, plan8b_gpu, plan8b_cpu; a missing or
failed piece is reported as such, never skipped silently. ``--json`` writes every piece (parsed, or the raw text
when it is not JSON) and its exit code into one file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GB = 1e9
DISTILL_PIECES = ("distill", "distill_remat_none", "distill_remat_dots")
PIECES = ("forward_bf16", "attention", *DISTILL_PIECES, "plan8b_gpu", "plan8b_cpu")


def read_pieces(directory: Path) -> dict[str, dict]:
    out = {}
    for name in PIECES:
        path, rc_path = directory / f"{name}.json", directory / f"{name}.rc"
        if not rc_path.exists():
            out[name] = {"rc": None, "result": None, "note": "not run"}
            continue
        rc = int(rc_path.read_text().strip() or -1)
        text = path.read_text() if path.exists() else ""
        try:
            result = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            result = {"raw": text[-4000:]}
        out[name] = {"rc": rc, "result": result}
    return out


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def forward_table(piece: dict) -> list[str]:
    r = piece["result"]
    if not r or "results" not in r:
        return [f"forward: no result (exit {piece['rc']})"]
    env = r["env"]
    lines = [f"Forward, {env['model']}, {env['dtype']}: jax {env['jax']} on {env['jax_device']} "
             f"(attention={env.get('attention', 'einsum')}), "
             f"torch {env.get('torch', '—')} on {env.get('torch_device', '—')} (attn={env.get('torch_attn')}).", "",
             "| batch × seq | ours tok/s | torch tok/s | ours/torch | max abs Δlogit |", "|---|---:|---:|---:|---:|"]
    for row in r["results"]:
        lines.append(f"| {row['batch']} × {row['seq_len']} | {row['ours_tok_s']:,.0f} | "
                     f"{_fmt(row.get('torch_tok_s'), ',.0f')} | {_fmt(row.get('ratio'), '.2f')} | "
                     f"{_fmt(row.get('max_abs_logit_diff'), '.2e')} |")
    return lines


def attention_table(piece: dict) -> list[str]:
    """tools/attention_check.py: per implementation, the leak between packed documents (must be 0), the largest
    relative error against float32 einsum, and forward + backward time."""
    r = piece["result"]
    if not r or "check" not in r:
        return [f"attention check: no result (exit {piece['rc']})"]
    times = r.get("time", {}).get("impls", {})
    lines = [f"Attention on {r['device']}, {r['dtype']} (fused uses cuDNN: {r['fused_uses_cudnn']}): packed rows "
             f"{r['check']['shape']}, {r['check']['documents_per_row']} documents per row; time: "
             f"{r.get('time', {}).get('shape', 'not measured')}, forward + backward.", "",
             "| attention | leak between documents | max rel. error vs float32 (out, dq, dk, dv) | ms | tok/s |",
             "|---|---:|---|---:|---:|"]
    for name, c in r["check"]["impls"].items():
        t = times.get(name, {})
        err = ", ".join(f"{v:.1e}" for v in c["error"].values())
        timing = (f"{t['ms']:.2f} | {t['tokens_per_s']:,.0f}" if "ms" in t
                  else f"{t.get('error', '—')[:60]} | —")
        lines.append(f"| {name} | {'**' + format(c['leak'], '.1e') + '**' if c['leak'] else '0'} | {err} | "
                     f"{timing} |")
    return lines


def distill_table(pieces: dict) -> list[str]:
    """One table for the distillation pieces: the step as gpu_check runs it (remat full, with the cached teacher),
    then the same online step with lighter remat. A piece without a result is a row naming its exit code."""
    def step_of(name):  # the piece's bench_distill report, or None when it gave none
        r = pieces[name]["result"]
        return r if r and "distill" in r else None

    first = next((step_of(n) for n in DISTILL_PIECES if step_of(n)), None)
    if first is None:
        codes = ", ".join(f"{name} {pieces[name]['rc']}" for name in DISTILL_PIECES)
        return [f"distillation step: no result (exit codes: {codes})"]
    lines = [f"Distillation step on {first['device']}, batch {first['batch']} × {first['seq_len']}, attention "
             f"{first.get('attention', 'einsum')}; teacher {first['teacher']}, student {first['student']}. "
             "MFU counts the model FLOPs of the models that run (the cached step: the student's alone), not what "
             "remat recomputes.", "",
             "| step | remat | s/step | tok/s | TFLOP/s | MFU | first step s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in DISTILL_PIECES:
        r = step_of(name)
        if r is None:
            lines.append(f"| {name} | no result (exit {pieces[name]['rc']}) | | | | | |")
            continue
        rows = [("distill, online teacher", "distill"), ("CE only (no teacher)", "ce_only")]
        if "distill_cached" in r:
            rows.append((f"distill, cached top-{r['distill_cached']['top_k']} teacher", "distill_cached"))
        for label, key in rows:
            st = r[key]
            lines.append(f"| {label} | {r['remat']} | {st['seconds_per_step']:.3f} | {st['tokens_per_s']:,.0f} | "
                         f"{st['tflops_per_s']:.1f} | {_fmt(st['mfu'], '.1%')} | {st['first_step_s']:.1f} |")
    return lines


def profile_table(pieces: dict) -> list[str]:
    """Where one traced online step of the ``distill`` piece spends its device time (bench_distill --profile):
    time by category, then the largest kernels/ops. Nothing when the piece ran without a profile."""
    r = pieces["distill"]["result"]
    prof = (r or {}).get("distill", {}).get("profile") if isinstance(r, dict) else None
    if not prof:
        return []
    if "categories" not in prof:
        return [f"One traced online step: no summary ({prof.get('error', 'unknown layout')}).", ""]
    lines = [f"One traced online step (`distill` piece, {prof['source']}, {prof['events']} events): "
             f"{prof.get('wall_ms', 0):.1f} ms wall, {prof['busy_ms']:.1f} ms with ops running "
             f"({_fmt(prof.get('busy_over_wall'), '.0%')}), {prof['sum_ms']:.1f} ms summed over events.", "",
             "| category | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['ms']:.1f} | {_fmt(v['share'], '.1%')} |" for k, v in prof["categories"].items()]
    lines += ["", "| kernel / op | ms | count | share |", "|---|---:|---:|---:|"]
    lines += [f"| `{t['name']}` | {t['ms']:.1f} | {t['count']} | {t['share']:.1%} |" for t in prof["top"][:10]]
    return [*lines, ""]


def plan_table(pieces: dict) -> list[str]:
    lines = ["| compiled by | device | compile s | params GB | Adam GB | teacher GB | temp GB | total GB | fits |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in ("plan8b_gpu", "plan8b_cpu"):
        piece = pieces[name]
        r = piece["result"]
        if not r or "memory_per_device" not in r:
            lines.append(f"| {name} | no result (exit {piece['rc']}) | | | | | | | |")
            continue
        c = r["memory_per_device"]["compiled"] or {}
        comp = r["compile"]
        lines.append(f"| {comp['backend']} | {comp.get('device_kind') or 'fake CPU'} | "
                     f"{_fmt(comp.get('compile_seconds'), '.1f')} | {_fmt(c.get('params', 0) / GB, '.2f')} | "
                     f"{_fmt(c.get('optimizer', 0) / GB, '.2f')} | {_fmt(c.get('teacher', 0) / GB, '.2f')} | "
                     f"{_fmt(c.get('temp', 0) / GB, '.2f')} | {_fmt(r['memory_per_device']['total'] / GB, '.2f')} | "
                     f"{r['fits']} |")
    return lines


def _plan_shape(pieces: dict) -> str:
    for name in ("plan8b_gpu", "plan8b_cpu"):
        r = pieces[name]["result"]
        if r and "batch" in r:
            b = r["batch"]
            return f" ({b['global_rows']} × {b['seq_len']} tokens, {b['grad_accum']} micro-batches)"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pieces", type=Path)
    ap.add_argument("--json", type=Path, help="write all pieces and exit codes to this file")
    args = ap.parse_args(argv)
    pieces = read_pieces(args.pieces)
    if args.json:
        args.json.write_text(json.dumps(pieces, indent=2) + "\n")
    out = ["## GPU check (`tools/gpu_check.sh`)", "",
           "Exit codes: " + ", ".join(f"{k} {v['rc']}" for k, v in pieces.items()), "",
           *forward_table(pieces["forward_bf16"]), "", *attention_table(pieces["attention"]), "",
           *distill_table(pieces), "", *profile_table(pieces),
           f"The Llama-3.1-8B → 4B width recipe's train step on one device{_plan_shape(pieces)}, compiled by the "
           "device's compiler and for a fake CPU device (the planner's basis):", "", *plan_table(pieces)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
