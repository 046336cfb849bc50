"""The pipeline's report: the comparison rows from the stage records, and their table (rich and markdown), JSON and
plot (``results.{md,json,png}`` in the run directory).

*Gap closed* is the share of the held-out loss lost to pruning (NLL of the pruned student minus the reference
teacher's) that distillation recovered; the reference is the corrected teacher when teacher correction ran.

With the sft stage, each fine-tuned student ``s`` gets a row ``s+sft`` after its own, and the table gains *chat NLL*
(mean NLL per assistant token) and *chat EM* (exact match of greedy answers) on the held-out chat records, shown
as before → after fine-tuning in the ``+sft`` rows (``evaluate.chat``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from minitron_jax.fsutil import write_json_atomic

__all__ = ["build_report", "write_report", "results_table", "results_markdown", "plot_results", "arch_str",
           "TABLE_HEADER", "CHAT_HEADER"]


# ======================================================================================================================
# The report
# ======================================================================================================================
def _chat(chats: Mapping[str, Any], label: str) -> dict[str, Any]:
    """A model's chat-evaluation summary (NLL, exact match) for the rows, or Nones when it was not evaluated."""
    rec = chats.get(label)
    if rec is None:
        return {"chat_nll": None, "chat_em": None}
    r = rec.result
    return {"chat_nll": r["nll"], "chat_em": r["exact_match"], "chat_em_n": r["exact_n"]}


def build_report(pc, run_dir: Path, records: Mapping[str, Any], teacher, active, pruned: Mapping[str, Any],
                 distilled: Mapping[str, Any], evals: Mapping[str, Any], t_start: float, *,
                 tuned: Mapping[str, Any] | None = None, chats: Mapping[str, Any] | None = None,
                 exports: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report dict of a finished run from its stage records (``StageRecord``s; ``active`` is the teacher the
    students were pruned from: the corrected one when correction ran); ``t_start``: when this invocation began.
    ``tuned``: the ``sft.<s>`` records, ``chats``: the ``chat.<m>`` records (when the sft stage ran); each
    fine-tuned student gets a row ``<s>+sft`` after its own, with its chat NLL / exact match before → after.
    ``exports``: the ``export.<s>`` records (what each student was handed over as: HF directory, GGUF, cards)."""
    from minitron_jax.train.observe import read_metrics

    tuned, chats = tuned or {}, chats or {}
    teacher_ppl = evals["teacher"].result["perplexity"]
    ref_label = "teacher_corrected" if pc.teacher_correction.enabled else "teacher"
    ref_nll = evals[ref_label].result["nll"]
    rows = []
    for label in ["teacher"] + (["teacher_corrected"] if pc.teacher_correction.enabled else []):
        rec = teacher if label == "teacher" else active
        ev = evals[label].result
        rows.append({"model": label, "arch": rec.result["arch"], "params": rec.result["params"],
                     "ppl_pruned": None, "ppl": ev["perplexity"], "gap_closed": None,
                     "mmlu": (ev["mmlu"] or {}).get("accuracy"), "mmlu_n": (ev["mmlu"] or {}).get("n"),
                     "tokens": rec.result.get("tokens", 0), "seconds": rec.seconds, "init": None,
                     "loss": None, "export": rec.result["path"], "window_nll": ev.get("window_nll"),
                     **_chat(chats, label)})
    curves = {}
    for s, spec in pc.students.items():
        before, after = evals[f"{s}.pruned"].result, evals[f"{s}.distilled"].result
        d = distilled[s].result
        lost = before["nll"] - ref_nll
        gap = (before["nll"] - after["nll"]) / lost if lost > 1e-9 else None
        rows.append({"model": s, "arch": d["arch"], "params": d["params"], "ppl_pruned": before["perplexity"],
                     "ppl": after["perplexity"], "gap_closed": gap,
                     "mmlu": (after["mmlu"] or {}).get("accuracy"), "mmlu_n": (after["mmlu"] or {}).get("n"),
                     "mmlu_pruned": (before["mmlu"] or {}).get("accuracy"),
                     "tokens": d["tokens"], "seconds": pruned[s].seconds + distilled[s].seconds,
                     "train_seconds": d["train_seconds"], "init": spec.init, "loss": spec.loss,
                     "export": d["path"], "window_nll": after.get("window_nll"),
                     "window_nll_pruned": before.get("window_nll"), **_chat(chats, f"{s}.distilled")})
        curves[s] = {"train": [(r["step"], r["loss"], r.get("ce")) for r in read_metrics(d["run_dir"], "train")],
                     "val": [(r["step"], r["ce"], r.get("kl")) for r in read_metrics(d["run_dir"], "val")]}
        if s in tuned:
            t, ev = tuned[s].result, evals[f"{s}.sft"].result
            before_chat = _chat(chats, f"{s}.distilled")
            rows.append({"model": f"{s}+sft", "arch": t["arch"], "params": t["params"], "ppl_pruned": None,
                         "ppl": ev["perplexity"], "ppl_before_sft": after["perplexity"], "gap_closed": None,
                         "mmlu": (ev["mmlu"] or {}).get("accuracy"), "mmlu_n": (ev["mmlu"] or {}).get("n"),
                         "tokens": t["tokens"], "loss_tokens": t["loss_tokens"], "seconds": tuned[s].seconds,
                         "train_seconds": t["train_seconds"], "init": None, "loss": None, "sft_loss": t["loss"],
                         "export": t["path"], "window_nll": ev.get("window_nll"), **_chat(chats, f"{s}.sft"),
                         "chat_nll_before": before_chat["chat_nll"], "chat_em_before": before_chat["chat_em"]})
    return {"name": pc.name, "run_dir": str(run_dir), "teacher_perplexity": teacher_ppl,
            "reference": ref_label, "rows": rows, "curves": curves,
            "eval": {"heldout_tokens": evals["teacher"].result["tokens"], "seq_len": pc.eval.seq_len,
                     "mmlu_shots": pc.eval.mmlu_shots, "mmlu_limit": pc.eval.mmlu_limit},
            "distill": {"steps": pc.distill.steps, "batch_size": pc.distill.batch_size,
                        "seq_len": pc.distill.seq_len},
            "sft": _sft_summary(pc, records, chats),
            "exports": {s: {k: rec.result.get(k) for k in ("path", "hf", "gguf", "quant", "gguf_bytes", "card")}
                        for s, rec in (exports or {}).items()},
            # memory: the process's peak RSS so far and its RSS after the stage released what it freed (None
            # off Linux); a skipped stage carries the reading of the run that did it.
            "stages": {n: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "skipped": r.skipped,
                           "memory": r.memory}
                       for n, r in records.items()},
            "wall_seconds_this_invocation": time.perf_counter() - t_start,
            "wall_seconds_all_stages": sum(r.seconds for r in records.values())}


def _sft_summary(pc, records: Mapping[str, Any], chats: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fine-tuning settings and data of the run, and every chat evaluation's details (per record)."""
    if not chats:
        return None
    f = pc.sft
    data = records["sft_data"].result
    return {"steps": f.steps, "loss": f.loss, "batch_size": f.batch_size, "seq_len": f.seq_len,
            "data": data["source"], "records": data["records"], "eval_records": f.eval_records,
            "max_new_tokens": f.max_new_tokens, "chat_eval": {label: rec.result for label, rec in chats.items()}}


def write_report(report: dict[str, Any], run_dir: Path, console) -> None:
    """``results.json``, ``results.md`` and ``results.png`` in ``run_dir`` (each whole or absent); the table printed."""
    write_json_atomic(run_dir / "results.json", report)
    md = results_markdown(report)
    tmp = run_dir / ".results.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, run_dir / "results.md")
    plot_results(report, run_dir / "results.png")
    console.print(results_table(report))
    console.print(f"wrote {run_dir / 'results.md'}, results.json and results.png "
                  f"(stages took {report['wall_seconds_all_stages']:.0f}s in all; this invocation "
                  f"{report['wall_seconds_this_invocation']:.0f}s)")
    for s, e in report.get("exports", {}).items():
        # Where to take each student from: the last lines of the run, so a user does not have to look for them.
        console.print(f"student {s}: transformers/vLLM {e['hf']}" + (f", llama.cpp {e['gguf']}" if e["gguf"] else "")
                      + f", model card {e['card']}", soft_wrap=True)


# ======================================================================================================================
# Table and plot
# ======================================================================================================================
def arch_str(a: Mapping[str, Any]) -> str:
    if a.get("ffn") is None:  # heterogeneous: every layer its own FFN width and KV heads
        return f"L{a['layers']} D{a['hidden']} per-layer H{a['heads']}"
    return f"L{a['layers']} D{a['hidden']} F{a['ffn']} H{a['heads']}"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _before_after(before, after, spec: str) -> str:
    return _fmt(after, spec) if before is None else f"{before:{spec}} → {_fmt(after, spec)}"


def _has_chat(report: dict[str, Any]) -> bool:
    return any(r.get("chat_nll") is not None for r in report["rows"])


def _table_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    chat = _has_chat(report)
    for r in report["rows"]:
        mmlu = _fmt(r["mmlu"], ".3f")
        if r.get("mmlu_pruned") is not None:
            mmlu = f"{r['mmlu_pruned']:.3f} → {mmlu}"
        ppl = f"{r['ppl']:.2f}"
        if r.get("ppl_before_sft") is not None:  # what fine-tuning cost (or gained) on held-out text
            ppl = f"{r['ppl_before_sft']:.2f} → {ppl}"
        out.append([r["model"] + ("" if r["init"] in (None, "pruned") else f" ({r['init']} init)")
                    + ("" if r["loss"] in (None, "kd") else f" [{r['loss']}]"),
                    arch_str(r["arch"]), _fmt_params(r["params"]), _fmt(r["ppl_pruned"], ".2f"),
                    ppl, _fmt(None if r["gap_closed"] is None else 100 * r["gap_closed"], ".0f") +
                    ("%" if r["gap_closed"] is not None else ""), mmlu]
                   + ([_before_after(r.get("chat_nll_before"), r.get("chat_nll"), ".3f"),
                       _before_after(r.get("chat_em_before"), r.get("chat_em"), ".3f")] if chat else [])
                   + [f"{r['tokens']:,}" if r["tokens"] else "–", f"{r['seconds']:.0f}s"])
    return out


TABLE_HEADER = ["model", "architecture", "params", "ppl pruned", "ppl final", "gap closed", "MMLU", "train tokens",
                "wall time"]
CHAT_HEADER = ["chat NLL", "chat EM"]  # after MMLU, when the sft stage ran


def _header(report: dict[str, Any]) -> list[str]:
    if not _has_chat(report):
        return TABLE_HEADER
    i = TABLE_HEADER.index("MMLU") + 1
    return TABLE_HEADER[:i] + CHAT_HEADER + TABLE_HEADER[i:]


def results_table(report: dict[str, Any]):
    from rich.table import Table

    title = (f"{report['name']}: held-out perplexity ({report['eval']['heldout_tokens']:,} tokens) and MMLU "
             f"({report['eval']['mmlu_shots']}-shot, first {report['eval']['mmlu_limit']})")
    if report.get("sft"):
        title += (f"; chat: assistant-token NLL and exact match on {report['sft']['eval_records']} held-out records "
                  f"(before → after {report['sft']['steps']} SFT steps, loss {report['sft']['loss']})")
    t = Table(title=title)
    for h in _header(report):
        # With the chat columns the table is wider than a 150-column log: keep each model on one line (rich then
        # wraps the header words instead).
        t.add_column(h, justify="left" if h in ("model", "architecture") else "right",
                     no_wrap=h in ("model", "architecture", "params", "ppl final", *CHAT_HEADER))
    for row in _table_rows(report):
        t.add_row(*row)
    return t


def results_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['name']}", "",
             f"Held-out perplexity on {report['eval']['heldout_tokens']:,} tokens ({report['eval']['seq_len']}-token "
             f"windows); MMLU {report['eval']['mmlu_shots']}-shot on the first {report['eval']['mmlu_limit']} "
             f"questions; distillation {report['distill']['steps']} steps × {report['distill']['batch_size']} × "
             f"{report['distill']['seq_len']} tokens. *Gap closed*: the share of the loss lost to pruning "
             f"(held-out NLL of the pruned student minus the {report['reference']}'s) recovered by distillation. "
             "*Wall time*: pruning + distillation (students) or conversion/correction (teacher), compilation "
             "included.", ""]
    sft = report.get("sft")
    if sft:
        lines += [f"Chat fine-tuning (`<student>+sft` rows): {sft['steps']} steps × {sft['batch_size']} "
                      f"conversations of ≤ {sft['seq_len']} tokens from {sft['data']} (loss `{sft['loss']}` on the "
                      f"assistant tokens only); *chat NLL*: mean NLL per assistant token and *chat EM*: exact match of "
                      f"greedy answers, on {sft['eval_records']} held-out chat records never trained on (before → "
                      "after SFT); *ppl final* of a `+sft` row: before → after SFT.", ""]
    header = _header(report)
    lines += ["| " + " | ".join(header) + " |",
              "|" + "|".join("---" if h in ("model", "architecture") else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(report)]
    return "\n".join(lines) + "\n"


def plot_results(report: dict[str, Any], path: Path) -> None:
    """Validation loss curves (left) and held-out perplexity before/after distillation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, c) in enumerate(report["curves"].items()):
        color = colors[i % len(colors)]
        if c["train"]:
            steps, loss, _ = zip(*c["train"])
            ax1.plot(steps, loss, color=color, alpha=0.3, lw=1)
        if c["val"]:
            steps, ce, kl = zip(*c["val"])
            ax1.plot(steps, ce, "o-", color=color, label=f"{s}: validation CE")
            if all(k is not None for k in kl):
                ax1.plot(steps, kl, "s--", color=color, label=f"{s}: validation KL to teacher")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("distillation (faint: training loss)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    rows = report["rows"]
    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    before = [r["ppl_pruned"] if r["ppl_pruned"] is not None else np.nan for r in rows]
    after = [r["ppl"] for r in rows]
    ax2.bar(x - 0.2, before, 0.4, label="after pruning", color="#d62728", alpha=0.7)
    ax2.bar(x + 0.2, after, 0.4, label="final (distilled / teacher)", color="#2ca02c", alpha=0.8)
    for xi, (b, a) in enumerate(zip(before, after)):
        if not np.isnan(b):
            ax2.text(xi - 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=7)
        ax2.text(xi + 0.2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xticks(x, names, rotation=20, fontsize=8)
    ax2.set_ylabel("held-out perplexity (log scale)")
    ax2.set_title("held-out perplexity")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
