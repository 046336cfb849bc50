"""The pipeline's deliverable per student: ``export/<student>/`` holds what a user takes away and runs elsewhere.

::

    export/<student>/
      README.md                    model card for the GGUF (the Hugging Face convention for a GGUF repository)
      <name>-<quant>.gguf          llama.cpp / Ollama / LM Studio (``convert.gguf_export``)
      hf/                          transformers / vLLM: the final student's HF directory, byte for byte
        README.md                  model card (library_name: transformers)

The final student is the SFT'd one when the sft stage ran for it, else the distilled one. Both cards carry the
source's license and base model (read from the teacher as given: the GGUF's ``general.*`` keys or the HF directory's
card), the architecture before and after, how the student was made (the stage settings and measured budgets), and
the evaluation rows the pipeline measured for it. The directory is written whole or not at all.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["export_student", "card_evaluation", "card_method"]


def card_method(pc, student: str, importance: Mapping[str, Any], teacher_arch: Mapping[str, int],
                pruned: Mapping[str, Any], distilled: Mapping[str, Any], sft: Mapping[str, Any] | None,
                teacher_name: str) -> dict[str, dict]:
    """The "how it was made" steps of a student's card, from the pipeline config and the stage results (``arch``
    dicts as the stages record them: layers, hidden, ffn, heads, kv_heads)."""
    spec = pc.students[student]
    method: dict[str, dict] = {}
    if spec.puzzle:
        # The layer-by-layer search made this student: its own calibration and blockwise distillation, not the
        # importance stage's slicing.
        s = spec.puzzle
        method["layer-by-layer search"] = {
            "blocks": pruned["arch"].get("blocks"),
            "method": "blockwise local distillation of every block variant, replace-one-block KL, exact MIP "
                      "(Puzzle)",
            "summed replace-one-block KL": (None if pruned.get("summed_kl") is None
                                            else f"{pruned['summed_kl']:.4g}"),
            "targets": ", ".join(f"{k} ≤ {v:g}" for k, v in s.items() if k.startswith("target_")),
            "runtimes": s.get("runtime") or "vllm, llama.cpp"}
    elif spec.init == "pruned":
        i = pc.importance
        method["importance"] = {"calibration samples": importance.get("windows"),
                                "sequence length": importance.get("seq_len"),
                                "metric": f"activation magnitude (Minitron): {i.seq_agg} over tokens, "
                                          f"{i.batch_agg} over samples"}
    # Each pruned axis as (before, after), which the card writes "576 → 480".
    prune: dict[str, Any] = {k: (teacher_arch[k], pruned["arch"][k]) for k in ("layers", "hidden", "ffn", "heads")
                             if k in teacher_arch and pruned["arch"].get(k) is not None
                             and teacher_arch[k] != pruned["arch"].get(k, teacher_arch[k])}
    kept = pruned.get("kept") or {}
    if kept.get("dropped_layers"):
        prune["dropped layers"] = kept["dropped_layers"]
    if not spec.puzzle:
        prune["init"] = spec.init
        method["pruning"] = prune
    method["distillation"] = {"teacher": teacher_name,
                              "loss": "forward KL on logits (T=1)" if spec.loss == "kd" else "next-token CE",
                              "steps": distilled.get("steps"), "tokens": distilled.get("tokens")}
    if pc.distill.teacher_top_k is not None:
        method["distillation"]["teacher logits"] = f"cached top-{pc.distill.teacher_top_k}"
    if sft is not None:
        method["sft"] = {"data": pc.sft.data, "steps": sft.get("steps"), "tokens": sft.get("tokens"),
                         "loss": "forward KL to the teacher on assistant tokens" if pc.sft.loss == "kd"
                         else "CE on assistant tokens"}
    return method


def card_evaluation(rows: Sequence[tuple[str, Mapping[str, Any] | None, Mapping[str, Any] | None, int | None]]
                    ) -> list[dict[str, Any]]:
    """Card rows from ``(label, perplexity/MMLU eval result, chat eval result, params)`` tuples; a missing result
    leaves its cells empty."""
    out = []
    for label, ev, chat, params in rows:
        row: dict[str, Any] = {"model": label}
        if params is not None:
            row["params"] = params
        if ev:
            row["perplexity"] = ev.get("perplexity")
            if ev.get("mmlu"):
                row["mmlu"] = ev["mmlu"].get("accuracy")
                row["mmlu_n"] = ev["mmlu"].get("n")
        if chat:
            row["chat_nll"] = chat.get("nll")
            if chat.get("exact_match") is not None:
                row["exact_match"] = chat.get("exact_match")
        out.append(row)
    return out


def _gguf_metadata(source: str, name: str, card_fields: Mapping[str, Any]) -> dict[str, Any]:
    """``general.*`` keys for the GGUF: our name, the source's license, and the source as the base model. From a
    GGUF source also its tokenizer's pre-tokenizer name, which an HF tokenizer rebuilt from it cannot show."""
    meta: dict[str, Any] = {"name": name, "license": card_fields.get("license"),
                            "languages": list(card_fields.get("language") or []) or None}
    base = card_fields.get("base_model")
    if source.endswith(".gguf"):
        from minitron_jax.convert.gguf_export import gguf_source_metadata

        src = gguf_source_metadata(source)
        if src.get("tokenizer.ggml.pre"):
            meta["tokenizer.ggml.pre"] = src["tokenizer.ggml.pre"]
        base_entry = {"name": src.get("general.name"), "organization": src.get("general.organization")}
    else:
        base_entry = {"name": base}
    if base and "/" in base:
        base_entry["repo_url"] = f"https://huggingface.co/{base}"
    if any(v is not None for v in base_entry.values()):
        meta["base_models"] = [{k: v for k, v in base_entry.items() if v is not None}]
    return meta


def export_student(out: Path, *, name: str, model_path: str, source: str, teacher_path: str, quant: str | None,
                   method: Mapping[str, Mapping[str, Any]], evaluation: Sequence[Mapping[str, Any]],
                   eval_setup: Mapping[str, Any], log: Callable[[str], None] = print,
                   source_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (see the module docstring) for the model at ``model_path`` (an HF directory). ``source``: the
    teacher as the user gave it (a ``.gguf`` or an HF directory; where license and base model come from);
    ``teacher_path``: its HF directory (the architecture before). ``quant``: the GGUF's type, None for no GGUF.
    ``source_fields``: ``model_card.source_card_fields(source)`` when the caller already read them."""
    from minitron_jax.convert import load_model, read_source_config
    from minitron_jax.convert.model_card import (
        ModelCard,
        architecture_of,
        is_remote_code,
        source_card_fields,
        write_model_card,
    )
    from minitron_jax.fsutil import atomic_directory

    t0 = time.perf_counter()
    fields = dict(source_fields) if source_fields is not None else source_card_fields(source)
    before = architecture_of(read_source_config(teacher_path))
    m = load_model(model_path)
    after = architecture_of(m.config)
    chat = bool(getattr(m.tokenizer, "chat_template", None))
    gguf_name = f"{name}-{quant}.gguf" if quant else None
    files = {"hf": "hf/"} | ({"gguf": gguf_name} if gguf_name else {})
    common = dict(name=name, **fields, architecture_before=before, architecture_after=after, method=method,
                  evaluation=list(evaluation), eval_setup=eval_setup, chat_template=chat,
                  remote_code=is_remote_code(m.config))  # a heterogeneous student loads with trust_remote_code
    summary: dict[str, Any] = {"path": str(out), "hf": str(out / "hf"), "gguf": None, "quant": quant}
    with atomic_directory(out, overwrite=True, sources=[model_path]) as tmp:
        # The HF directory as the trainer exported it (same bytes; no second conversion that could differ).
        shutil.copytree(model_path, tmp / "hf", ignore=shutil.ignore_patterns(".minitron_jax", "README.md"))
        write_model_card(tmp / "hf", ModelCard(**common, files={"hf": "./"}, format="hf"))
        if gguf_name:
            from minitron_jax.convert.gguf_export import save_gguf

            g = save_gguf(tmp / gguf_name, m.config, m.params, tokenizer=m.tokenizer, quant=quant,
                          metadata=_gguf_metadata(source, name, fields))
            summary.update(gguf=str(out / gguf_name), gguf_bytes=g["bytes"], tensor_types=g["tensor_types"])
        write_model_card(tmp, ModelCard(**common, files=files, format="gguf" if gguf_name else "hf"))
    summary["card"] = str(out / "README.md")
    summary["seconds"] = time.perf_counter() - t0
    log(f"exported {name}: {out / 'hf'}" + (f", {out / gguf_name} ({summary['gguf_bytes'] / 2**20:.0f} MiB)"
                                               if gguf_name else "") + f", model card {out / 'README.md'}")
    return summary
