"""The search's report: ``report.json`` (everything), ``report.md`` (for people) and ``architecture.png`` (one
column per layer: the attention and FFN of the chosen model as bars sized by KV heads and FFN width, linear and
removed sub-blocks in their own colours; the runner-ups as smaller rows beneath)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minitron_jax.blocks import BlockSpec
from minitron_jax.fsutil import atomic_file, write_json_atomic

COLOURS = {"gqa": "#3b75af", "mlp": "#ef8636", "linear": "#8c8c8c", "none": "#ffffff"}


def write_report(out: Path, report: dict[str, Any], space) -> None:
    write_json_atomic(out / "report.json", report)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    with atomic_file(out / "architecture.png") as tmp:
        plot_architecture(report, space, tmp)


def _fmt(x: float) -> str:
    return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def markdown(r: dict[str, Any]) -> str:
    c = r["chosen"]
    lines = [f"# Puzzle search of {r['parent']['name']}", "",
             f"Parent: {r['parent']['config']} ({r['parent']['params']:,} params). Space: attention "
             f"{', '.join(r['space']['attention'])} × FFN {', '.join(r['space']['ffn'])} "
             f"({len(r['variants'])} variants per layer, scores {r['scores']['mode']}).", "",
             f"Data: {r['data']['calibration_tokens']:,} calibration tokens, {r['data']['eval_windows']} held-out "
             f"windows of {r['data']['seq_len']}; {r['settings']['blockwise']['steps']} Adam steps per sub-block.",
             "", "## Chosen", "",
             f"Σ KL(parent ‖ replace-one-block) = {c['summed_kl']:.4g} nats/token; {c['params']:,} params.", "",
             f"The assembled model on the held-out windows: KL(parent ‖ model) {c['whole_model']['kl']:.4g} "
             f"nats/token, LM loss {c['whole_model']['lm_loss']:.4g} (parent {c['whole_model']['parent_lm_loss']:.4g})"
             ".", "",
             "| target | achieved | limit |", "|---|---|---|"]
    for name, t in c["targets"].items():
        lines.append(f"| {name} | {t['shown']} | {t['limit_shown']} |")
    mc = c["measured_cost"]
    lines += ["", f"Measured: {mc['params']:,} params, weights {mc['weight_bytes'] / 1e9:.4g} GB, KV cache "
              f"{mc['kv_cache_bytes'] / 1e9:.4g} GB, {mc['flops_per_token'] / 1e9:.4g} GFLOP/token "
              f"({r['cost_settings']}).", "", "| layer | block | KL | LM loss |", "|---|---|---|---|"]
    names = r["variants"]
    for i, b in enumerate(c["blocks"]):
        v = names.index(b)
        lines.append(f"| {i} | {b} | {_fmt(r['scores']['kl'][i][v])} | {_fmt(r['scores']['lm_loss'][i][v])} |")
    if r["runner_ups"]:
        lines += ["", "## Runner-ups", ""]
        for s in r["runner_ups"]:
            diff = [f"{i}: {a} → {b}" for i, (a, b) in enumerate(zip(c["blocks"], s["blocks"])) if a != b]
            lines.append(f"- #{s['rank']}: Σ KL {s['summed_kl']:.4g}; differs at {', '.join(diff)}")
    lines += ["", "## Phases", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.1f} |" for k, v in r["phases_s"].items()]
    lines += ["", "(This invocation; a resumed run loads finished results. The work itself, over every run: "
              f"blockwise training {r['blockwise']['train_seconds_all_runs']:.0f} s, scoring "
              f"{r['scores']['eval_seconds_all_runs']:.0f} s.)"]
    lines += ["", f"HF export: {r['hf_export']}", "", "```", r["solver"]["text"], "```", ""]
    return "\n".join(lines)


def _bars(ax, blocks: list[str], y0: float, height: float, max_kv: int, max_ffn: int) -> None:
    """One row of the picture: per layer an attention bar (left half) and an FFN bar (right half)."""
    from matplotlib.patches import Rectangle

    for i, name in enumerate(blocks):
        spec = BlockSpec.parse(name)
        for k, (kind, size, full) in enumerate(((spec.attention.kind, spec.attention.kv_heads, max_kv),
                                                (spec.ffn.kind, spec.ffn.width, max_ffn))):
            frac = size / full if size else (0.25 if kind == "linear" else 0.0)
            x = i + 0.05 + 0.45 * k
            ax.add_patch(Rectangle((x, y0), 0.4, height, fill=False, edgecolor="#cccccc", lw=0.5))
            if frac > 0:
                ax.add_patch(Rectangle((x, y0), 0.4, height * frac, color=COLOURS[kind], lw=0))
            elif kind == "none":
                ax.plot([x, x + 0.4], [y0, y0 + height], color="#d62728", lw=0.6)


def plot_architecture(r: dict[str, Any], space, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    best = r["chosen"]["blocks"]
    runners = [s["blocks"] for s in r["runner_ups"]]
    L = len(best)
    kv = max([a.kv_heads for a in space.attention if a.kind == "gqa"] or [1])
    ffn = max([f.width for f in space.ffn if f.kind == "mlp"] or [1])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * L + 2), 3.0 + 0.6 * len(runners)))
    _bars(ax, best, 0.0, 1.0, kv, ffn)
    ticks, labels = [0.5], ["best"]
    for k, blocks in enumerate(runners):
        y = -0.5 - 0.55 * (k + 1)
        _bars(ax, blocks, y, 0.45, kv, ffn)
        ticks.append(y + 0.22)
        labels.append(f"#{k + 2}")
    ax.set_xlim(0, L)
    ax.set_ylim(-0.5 - 0.55 * len(runners) - 0.1, 1.1)
    ax.set_xticks([i + 0.5 for i in range(L)])
    ax.set_xticklabels([str(i) for i in range(L)], fontsize=7)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels)
    ax.set_xlabel("layer (left bar: attention, height ∝ KV heads; right bar: FFN, height ∝ width)")
    c = r["chosen"]
    ax.set_title(f"{r['parent']['name']}: {c['params'] / 1e6:.1f}M params, Σ KL {c['summed_kl']:.3g}", fontsize=9)
    ax.legend(handles=[Patch(color=COLOURS["gqa"], label="gqa"), Patch(color=COLOURS["mlp"], label="mlp"),
                       Patch(color=COLOURS["linear"], label="linear"),
                       Patch(facecolor="white", edgecolor="#d62728", label="none")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    fig.tight_layout()
    with open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def load_report(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "report.json").read_text())
