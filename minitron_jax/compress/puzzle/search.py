"""The layer-by-layer search end to end: parent + data + space + targets → the chosen heterogeneous model.

Phases (each timed in the report):

1. **data**: documents split by ``data.holdout_mask`` (by a hash of each document's text) into held-out documents,
   cut into ``eval_windows`` windows, and the rest, cut into ``calib_tokens / seq_len`` calibration windows; no
   evaluation window shares a document with the calibration windows.
2. **feasibility**: the targets checked against the space before any work (an infeasible target is refused with
   the smallest value reachable, from the solver).
3. **activations**: the parent over both window sets, kept on disk (:class:`.blockwise.ActivationStore`).
4. **importance** (optional): FFN channel scores from the same calibration windows, so narrower MLPs keep the
   most important channels.
5. **blockwise**: every attention and FFN option at every layer trained (:func:`.blockwise.blockwise_distill`).
6. **scoring**: replace-one-block KL of every (layer, variant) (:func:`.scoring.score_variants`).
7. **costs + solve**: ``targets.build_constraints`` (host timing of each variant only for a latency/throughput
   target) and the exact MIP maximising −Σ KL, with runner-ups.
8. **assemble + save**: the chosen blocks' trained halves stacked into a ``HeteroConfig`` model, saved as an Orbax
   checkpoint (``model/``) and, where ``convert.deci_hf`` exists, as an HF DeciLM directory (``hf/``); the report
   (``report.json``, ``report.md``, ``architecture.png``).

The run directory holds everything an interrupted run needs to continue (``run.json`` names the parent, data,
space and training settings; a rerun with another of these is refused, a rerun with other targets reuses every
trained block and score and only solves again). The target-independent part (``run.json``, ``acts/``,
``importance.npz``, ``blocks/``, the scores) can live in a separate ``work`` directory, so that several searches
of one parent for different targets (the pipeline's puzzle students) train and score once; ``out`` then holds
only what the targets chose (``model/``, ``hf/``, the report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from minitron_jax import hetero
from minitron_jax.blocks import DECI_FFN_MULTIPLE, AttentionSpec, BlockSpec, FFNSpec, check_blocks
from minitron_jax.config import LlamaConfig
from minitron_jax.exitcodes import BadInputError
from minitron_jax.fsutil import lock_directory, write_json_atomic

from . import costs as C
from .blockwise import (
    ActivationStore,
    BlockwiseSettings,
    blockwise_distill,
    fingerprint_arrays,
    params_fingerprint,
    parent_spec,
)
from .runtimes import DEFAULT_RUNTIMES, parse_runtimes
from .runtimes import allowed as allowed_blocks
from .scoring import SCORING_MODES, score_variants, whole_model_scores
from .solver import solve
from .targets import CostSettings, Targets, build_constraints

Params = dict[str, Any]
RUN_FILE = "run.json"
RUN_VERSION = 1


# ------------------------------------------------------------------------------------------------------------------
# The search space
# ------------------------------------------------------------------------------------------------------------------
def parse_attention(text: str) -> AttentionSpec:
    t = text.strip()
    try:
        return AttentionSpec("gqa", int(t[3:])) if t.startswith("gqa") else AttentionSpec(t)
    except ValueError as e:
        raise ValueError(f"--attention option {t!r}: {e} (write gqaK, linear or none)") from None


def parse_ffn(text: str) -> FFNSpec:
    t = text.strip()
    try:
        return FFNSpec("mlp", int(t[3:])) if t.startswith("mlp") else FFNSpec(t)
    except ValueError as e:
        raise ValueError(f"--ffn option {t!r}: {e} (write mlpWIDTH, linear or none)") from None


def default_attention(config: LlamaConfig) -> list[AttentionSpec]:
    """The parent's KV heads and every divisor below it, then linear and none."""
    K = config.num_kv_heads
    return [AttentionSpec("gqa", k) for k in range(K, 0, -1) if K % k == 0] + [AttentionSpec("linear"),
                                                                              AttentionSpec("none")]


def default_ffn(config: LlamaConfig) -> list[FFNSpec]:
    """The parent's width, 2/3 and 1/3 of it rounded to multiples of 256 (the saved config is DeciLM's, which
    has no other widths; SmolLM2: 1536, 1024, 512), then linear and none."""
    F = config.intermediate_size
    q = DECI_FFN_MULTIPLE
    widths = [F] + [w for w in (int(round(F * k / 3 / q)) * q for k in (2, 1)) if 0 < w < F]
    return [FFNSpec("mlp", w) for w in dict.fromkeys(widths)] + [FFNSpec("linear"), FFNSpec("none")]


def _only_removal(attention: Sequence[AttentionSpec], ffn: Sequence[FFNSpec]) -> bool:
    """True when these options make nothing but removed layers (none/none), i.e. no model."""
    return all(BlockSpec(a, f).is_identity for a in attention for f in ffn)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Attention options × FFN options, and the runtimes the chosen model must run on (``runtimes.RUNTIMES``; empty:
    only ours). A runtime removes the (layer, variant) pairs it cannot run (:meth:`allowed`); the default options
    leave out a sub-block kind that no allowed variant would use (vLLM: linear), so it is not trained for nothing."""

    attention: tuple[AttentionSpec, ...]
    ffn: tuple[FFNSpec, ...]
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES

    @classmethod
    def parse(cls, config: LlamaConfig, attention: str | None = None, ffn: str | None = None,
              runtimes: str | Sequence[str] | None = None) -> "SearchSpace":
        rts = parse_runtimes(runtimes)
        att = [parse_attention(t) for t in attention.split(",") if t.strip()] if attention else \
            default_attention(config)
        ff = [parse_ffn(t) for t in ffn.split(",") if t.strip()] if ffn else default_ffn(config)
        space = cls(tuple(dict.fromkeys(att)), tuple(dict.fromkeys(ff)), rts)
        unused_att, unused_ffn = space.unusable(config)
        # (Nothing left means the given options are wrong in themselves: check() then says how, so keep them.)
        kept_att = tuple(a for a in space.attention if a not in unused_att)
        kept_ffn = tuple(f for f in space.ffn if f not in unused_ffn)
        if _only_removal(kept_att, kept_ffn):
            return space  # nothing but empty layers would be left: check() names why the rest cannot run
        if not attention and kept_att:
            space = dataclasses.replace(space, attention=kept_att)
        if not ffn and kept_ffn:
            space = dataclasses.replace(space, ffn=kept_ffn)
        return space

    def allowed(self, config: LlamaConfig) -> tuple[np.ndarray, dict[tuple[int, int], str]]:
        """Mask [L, V] of the (layer, variant) pairs every runtime of the space runs, and why the others not."""
        return allowed_blocks(config, self.variants(), self.runtimes)

    def unusable(self, config: LlamaConfig) -> tuple[set[AttentionSpec], set[FFNSpec]]:
        """Options no allowed (layer, variant) uses: training them would be wasted."""
        mask, _ = self.allowed(config)
        used = [v for v, ok in zip(self.variants(), mask.any(axis=0)) if ok]
        return ({a for a in self.attention if all(v.attention != a for v in used)},
                {f for f in self.ffn if all(v.ffn != f for v in used)})

    def check(self, config: LlamaConfig) -> None:
        if not self.attention or not self.ffn:
            raise ValueError("the search space needs at least one attention and one FFN option")
        for a in self.attention:
            if a.kind == "gqa" and (a.kv_heads > config.num_kv_heads or config.num_kv_heads % a.kv_heads):
                raise ValueError(f"--attention gqa{a.kv_heads}: KV heads are merged from the parent's "
                                 f"{config.num_kv_heads}, so the count must divide {config.num_kv_heads}")
        for f in self.ffn:
            if f.kind == "mlp" and f.width > config.intermediate_size:
                raise ValueError(f"--ffn mlp{f.width}: wider than the parent's FFN ({config.intermediate_size}); "
                                 "a variant keeps a subset of the parent's channels")
            if f.kind == "mlp" and f.width != config.intermediate_size and f.width % DECI_FFN_MULTIPLE:
                raise ValueError(f"--ffn mlp{f.width}: the chosen model is saved in the DeciLM layout, whose FFN "
                                 f"widths are multiples of {DECI_FFN_MULTIPLE}")
        check_blocks(config, self.variants())
        mask, why = self.allowed(config)
        if not any(mask[:, v].any() for v, b in enumerate(self.variants()) if not b.is_identity):
            example = next(iter(why.values()), "")
            raise ValueError(f"on {' and '.join(self.runtimes) or 'any runtime'} no block of the space but a removed "
                             f"layer (none/none) can run: {example}; widen the space or pass --runtime any")
        stuck = [i for i in range(config.num_layers) if not mask[i].any()]
        if stuck:
            example = next(w for (i, _), w in why.items() if i == stuck[0])
            raise ValueError(f"no block of the space can be layer {stuck[0]}"
                             f"{f' (nor {len(stuck) - 1} more layers)' if len(stuck) > 1 else ''} on "
                             f"{' and '.join(self.runtimes)}: {example}; widen the space or pass --runtime any")
        unused_att, unused_ffn = self.unusable(config)
        if unused_att or unused_ffn:
            names = [o.describe() for o in (*unused_att, *unused_ffn)]
            _, why = self.allowed(config)
            example = next((w for (i, v), w in why.items()
                            if self.variants()[v].attention in unused_att or self.variants()[v].ffn in unused_ffn), "")
            raise ValueError(f"{', '.join(sorted(names))}: no layer could use it on {' and '.join(self.runtimes)} "
                             f"({example}); leave it out, or name the runtimes that run it (--runtime llama.cpp, "
                             "vllm or any)")

    def variants(self) -> list[BlockSpec]:
        return [BlockSpec(a, f) for a in self.attention for f in self.ffn]

    def names(self) -> list[str]:
        return [v.describe() for v in self.variants()]

    def describe(self) -> dict[str, list[str]]:
        return {"attention": [a.describe() for a in self.attention], "ffn": [f.describe() for f in self.ffn],
                "runtimes": list(self.runtimes) or ["any"]}


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    seq_len: int = 256
    calib_tokens: int = 16384
    eval_windows: int = 8
    eval_batch: int = 2
    activation_batch: int = 4
    scoring: str = "additive"
    runner_ups: int = 3
    importance: bool = True
    timing_seq_len: int = 256
    blockwise: BlockwiseSettings = BlockwiseSettings()

    def check(self) -> None:
        for name in ("seq_len", "calib_tokens", "eval_windows", "eval_batch", "activation_batch", "timing_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.runner_ups < 0:
            raise ValueError(f"runner-ups must be >= 0, got {self.runner_ups}")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {SCORING_MODES}, got {self.scoring!r}")
        if self.calib_tokens < self.seq_len:
            raise ValueError(f"calib-tokens {self.calib_tokens} is less than one window of {self.seq_len}")
        self.blockwise.check()

    def run_key(self) -> dict[str, Any]:
        """What the trained blocks and scores depend on (targets, runner-ups and timing do not)."""
        return {"seq_len": self.seq_len, "calib_tokens": self.calib_tokens, "eval_windows": self.eval_windows,
                "scoring": self.scoring, "importance": self.importance,
                "blockwise": dataclasses.asdict(self.blockwise)}


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def split_windows(tokenizer, source, seq_len: int, calib_tokens: int, eval_windows: int, *, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(calibration windows [Nc, T], held-out evaluation windows [eval_windows, T]) from the documents of
    ``source`` (a path or the ``data.expand_sources`` spec). Documents are read until there are 4× the tokens
    needed, so a large corpus is not tokenized whole."""
    from minitron_jax.data import document_key, holdout_mask, iter_source_documents

    need = calib_tokens + eval_windows * seq_len
    texts, ids = [], []
    total = 0
    docs = iter_source_documents(source)
    for text, tok in zip_docs(docs, tokenizer):
        texts.append(text)
        ids.append(tok)
        total += len(tok)
        if total >= 4 * need:
            break
    if not ids:
        raise ValueError(f"{source}: no documents")
    keys = np.array([document_key(t, seed) for t in texts], np.uint64)
    lengths = np.array([len(t) for t in ids], np.int64)
    # holdout_mask fills N rows with at least (N-1)·T + 1 tokens (packed rows may end short): ask one row more
    # so that eval_windows whole windows are there.
    held = holdout_mask(keys, lengths, eval_windows + 1, seq_len, source=str(source))
    ev = np.concatenate([ids[k] for k in np.flatnonzero(held)])
    cal = np.concatenate([ids[k] for k in np.flatnonzero(~held)])
    n_eval = len(ev) // seq_len
    if n_eval < eval_windows:
        raise ValueError(f"{source}: the held-out documents give {n_eval} windows of {seq_len}, not "
                         f"{eval_windows}")
    n_cal = min(calib_tokens // seq_len, len(cal) // seq_len)
    if n_cal < 1:
        raise ValueError(f"{source}: after holding out {eval_windows} windows, {len(cal)} tokens are left for "
                         f"calibration, less than one window of {seq_len}")
    return (cal[: n_cal * seq_len].reshape(n_cal, seq_len).astype(np.int32),
            ev[: eval_windows * seq_len].reshape(eval_windows, seq_len).astype(np.int32))


def zip_docs(docs, tokenizer, batch: int = 64):
    from minitron_jax.data import document_token_ids

    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) == batch:
            yield from zip(buf, document_token_ids(tokenizer, buf))
            buf = []
    if buf:
        yield from zip(buf, document_token_ids(tokenizer, buf))


# ------------------------------------------------------------------------------------------------------------------
# The run directory
# ------------------------------------------------------------------------------------------------------------------
def _check_run(out: Path, record: dict) -> None:
    """Refuse an ``out`` that holds a search of another parent, data, space or training settings (its trained
    blocks would be mixed into this one), or a directory that is not a search's."""
    f = out / RUN_FILE
    if not f.is_file():
        if out.exists() and any(p.name not in {".minitron_jax"} for p in out.iterdir()):
            raise BadInputError(f"{out} exists and is not a puzzle search directory (no {RUN_FILE}); choose a new "
                                "--out")
        return
    try:
        old = json.loads(f.read_text())
    except (OSError, ValueError):
        raise BadInputError(f"{f} is unreadable; choose a new --out") from None
    for key, what in (("parent", "parent model"), ("space", "search space"), ("data", "data"),
                      ("settings", "training/scoring settings")):
        if old.get(key) != record[key]:
            raise BadInputError(f"{out} holds a search of another {what} ({old.get(key)} ≠ {record[key]}); "
                                "rerun with the same one or choose a new --out")


OUT_ENTRIES = {"model", "hf", "report.json", "report.md", "architecture.png", ".minitron_jax"}


def _check_out(out: Path) -> None:
    """With a separate ``work`` directory, ``out`` holds only a search's results: refuse one with anything else in
    it (the results are overwritten, and nothing of the user's must be)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} is a file, not a directory; choose a new --out")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUT_ENTRIES)
        if other:
            raise BadInputError(f"{out} holds {', '.join(other[:3])}{' …' if len(other) > 3 else ''}, which are not "
                                "a search's results; choose a new --out")


@dataclasses.dataclass
class SearchResult:
    hcfg: hetero.HeteroConfig
    params: Params
    report: dict[str, Any]
    out: Path


def _constraints(config, variants, targets, cost_settings, settings, log):
    timings, overhead, tokens, device = None, 0.0, None, "host"
    if (targets.latency_s is not None or targets.throughput is not None) and cost_settings.accelerator:
        timings, overhead, tokens, device = _accelerator_seconds(config, variants, cost_settings)
    elif targets.latency_s is not None or targets.throughput is not None:
        import jax.numpy as jnp

        from minitron_jax.dtypes import dtype as dtype_of

        dt = jnp.dtype(dtype_of(cost_settings.weight_dtype))
        if log:
            log(f"timing {len(variants)} variants on the host (batch {cost_settings.batch}, "
                f"{settings.timing_seq_len} tokens) ...")
        timings = C.time_block_variants(config, variants, batch=cost_settings.batch,
                                        seq_len=settings.timing_seq_len, dtype=dt)
        overhead = C.time_overhead(config, batch=cost_settings.batch, seq_len=settings.timing_seq_len, dtype=dt)
        tokens = cost_settings.batch * settings.timing_seq_len
    cons = build_constraints(config, variants, config.num_layers, targets, cost_settings, timings=timings,
                             overhead_seconds=overhead, timed_tokens=tokens, device=device)
    return cons, timings


@functools.lru_cache(maxsize=256)
def _prefill_cost(config: LlamaConfig, spec: BlockSpec, batch: int, seq_len: int, dtype: str) -> C.CompiledCost:
    # Compiled from abstract shapes (nothing runs); cached because feasibility and the search both price the space.
    from minitron_jax.dtypes import dtype as dtype_of

    return C.compiled_cost(config, spec, batch=batch, seq_len=seq_len, dtype=dtype_of(dtype))


def _accelerator_seconds(config, variants, cost: CostSettings) -> tuple[dict, float, int, str]:
    """(seconds per variant, seconds outside the blocks, tokens, where) of the accelerator-priced latency: a decode
    step of ``batch`` tokens, or the prefill of ``batch × context`` prompt tokens (each block's compiled cost on a
    roofline; the head only for the last position's logits, as a decode step prices it)."""
    kw = cost.roofline_kwargs()
    overhead = C.decode_overhead_seconds(config, **kw)
    where = f"{cost.accelerator}, {cost.latency_phase} roofline"
    if cost.latency_phase == "decode":
        return C.decode_step_seconds(config, variants, **kw), overhead, cost.batch, where
    seconds = {v: C.roofline_seconds(_prefill_cost(config, v, cost.batch, cost.context, cost.weight_dtype),
                                     peak_flops=cost.peak_flops, memory_bandwidth=cost.memory_bandwidth)
               for v in dict.fromkeys(variants)}
    return seconds, overhead, cost.batch * cost.context, where


def _accelerator_constraints(config, variants, targets, cost_settings):
    """Every target as a constraint, the latency/throughput ones priced on ``cost_settings``' accelerator (one
    decode step of ``batch`` tokens, or one prefill of ``batch × context``: the throughput target is those tokens
    over the priced seconds)."""
    seconds, overhead, tokens, where = _accelerator_seconds(config, variants, cost_settings)
    return build_constraints(config, variants, config.num_layers, targets, cost_settings, timings=seconds,
                             overhead_seconds=overhead, timed_tokens=tokens, device=where)


def check_feasible(config: LlamaConfig, space: SearchSpace, targets: Targets,
                   cost_settings: CostSettings | None = None) -> None:
    """Refuse targets no architecture of the space meets (before any training): the solver's message names the
    smallest reachable value. Latency/throughput targets timed on the host are checked after timing, in the search
    itself; priced on a described accelerator, they are checked here with the rest."""
    cost_settings = cost_settings or CostSettings()
    variants = space.variants()
    if cost_settings.accelerator:
        if not targets.given():
            return
        cons = _accelerator_constraints(config, variants, targets, cost_settings)
    else:
        analytic = dataclasses.replace(targets, latency_s=None, throughput=None)
        if not analytic.given():
            return
        cons = build_constraints(config, variants, config.num_layers, analytic, cost_settings)
    mask, _ = space.allowed(config)
    solve(np.where(mask, 0.0, np.nan), cons, variant_names=space.names())


def run_search(config: LlamaConfig, params: Params, tokenizer, data_source, out: str | Path, *,
               space: SearchSpace, targets: Targets, cost_settings: CostSettings | None = None,
               settings: SearchSettings = SearchSettings(), parent_name: str = "parent",
               progress: Callable[[str, int, int], None] | None = None,
               log: Callable[[str], None] | None = None, work: str | Path | None = None) -> SearchResult:
    """The whole search (module docstring); returns the chosen model and the report (also written under ``out``).
    ``work`` (default ``out``) holds the stored activations, trained blocks and scores, which do not depend on the
    targets: searches for other targets pointed at the same ``work`` only solve again."""
    from minitron_jax.convert.orbax import save_model

    from .report import write_report

    cost_settings = cost_settings or CostSettings()
    if not isinstance(config, LlamaConfig):
        raise ValueError("the parent must be a uniform (Llama) model")
    settings.check()
    space.check(config)
    if not targets.given():
        raise ValueError("give at least one target (--target-params, --target-memory, --target-flops, "
                         "--target-latency or --target-throughput)")
    check_feasible(config, space, targets, cost_settings)
    out = Path(out).absolute()
    work = out if work is None else Path(work).absolute()
    if work != out:
        _check_out(out)
    phases: dict[str, float] = {}
    t_all = time.perf_counter()
    with lock_directory(work), (lock_directory(out) if work != out else contextlib.nullcontext()):
        t0 = time.perf_counter()
        calib, evalw = split_windows(tokenizer, data_source, settings.seq_len, settings.calib_tokens,
                                     settings.eval_windows, seed=settings.blockwise.seed)
        parent_fp = params_fingerprint(params)
        record = {"version": RUN_VERSION, "parent": {"name": parent_name, "fingerprint": parent_fp,
                                                     "config": config.to_hf()},
                  "space": space.describe(), "data": fingerprint_arrays(calib, evalw),
                  "settings": settings.run_key()}
        record["parent"].pop("name")  # the same weights from another path are the same parent
        _check_run(work, record)
        work.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / RUN_FILE, record)
        phases["data_s"] = time.perf_counter() - t0
        if log:
            log(f"data: {calib.size:,} calibration tokens ({len(calib)} windows), {len(evalw)} held-out windows "
                f"of {settings.seq_len}")

        t0 = time.perf_counter()
        key = f"{parent_fp}:{record['data']}"
        calib_store = ActivationStore.open_or_build(work / "acts" / "calib", config, params, calib, key=key,
                                                    batch=settings.activation_batch, progress=progress)
        eval_store = ActivationStore.open_or_build(work / "acts" / "eval", config, params, evalw, key=key,
                                                   batch=settings.eval_batch, with_logp=True, progress=progress)
        phases["activations_s"] = time.perf_counter() - t0

        neuron_scores = None
        if settings.importance:
            t0 = time.perf_counter()
            neuron_scores = _neuron_scores(work, config, params, calib, settings)
            phases["importance_s"] = time.perf_counter() - t0

        variants = space.variants()
        bw = blockwise_distill(config, params, calib_store, variants, work, settings.blockwise,
                               neuron_scores=neuron_scores, progress=progress, log=log)
        phases["blockwise_s"] = bw.seconds

        sc = score_variants(config, params, eval_store, bw, variants, work, mode=settings.scoring,
                            batch=settings.eval_batch, progress=progress)
        phases["scoring_s"] = sc.seconds

        t0 = time.perf_counter()
        cons, timings = _constraints(config, variants, targets, cost_settings, settings, log)
        phases["costs_s"] = time.perf_counter() - t0
        mask, _ = space.allowed(config)  # what the runtimes cannot run is never chosen
        result = solve(np.where(mask, -sc.kl, np.nan), cons, top_n=settings.runner_ups + 1,
                       variant_names=space.names())
        phases["solve_s"] = result.seconds

        t0 = time.perf_counter()
        blocks = tuple(variants[v] for v in result.best.choices)
        hcfg, new_params = assemble(config, params, bw, blocks)
        save_model(out / "model", hcfg, new_params, tokenizer=tokenizer, overwrite=True)
        hf_note = _save_hf(out / "hf", hcfg, new_params, tokenizer)
        phases["save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        whole = whole_model_scores(hcfg, new_params, eval_store, batch=settings.eval_batch)
        phases["whole_model_eval_s"] = time.perf_counter() - t0
        phases["total_s"] = time.perf_counter() - t_all

        report = build_report(config, hcfg, space, targets, cost_settings, settings, result, sc, bw, timings,
                              phases, parent_name=parent_name, hf_note=hf_note, calib=calib, evalw=evalw,
                              whole=whole)
        write_report(out, report, space)
    return SearchResult(hcfg, new_params, report, out)


def _neuron_scores(out: Path, config, params, calib, settings) -> np.ndarray:
    """FFN channel scores [L, F] from the calibration windows (cached in ``importance.npz``)."""
    from minitron_jax.compress.importance_cache import CalibrationSettings, Importance

    f = out / "importance.npz"
    if f.is_file():
        try:
            with np.load(f) as z:
                if z["neurons"].shape == (config.num_layers, config.intermediate_size):
                    return np.asarray(z["neurons"])
        except Exception:  # noqa: BLE001 - damaged: computed again
            pass
    imp = Importance(config, params, calib, CalibrationSettings(calib_samples=len(calib), seq_len=calib.shape[1],
                                                                batch_size=settings.activation_batch))
    neurons = np.asarray(imp.width()["neurons"])
    from minitron_jax.fsutil import atomic_file

    with atomic_file(f) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, neurons=neurons)
    return neurons


def assemble(config: LlamaConfig, params: Params, bw, blocks: Sequence[BlockSpec]
             ) -> tuple[hetero.HeteroConfig, Params]:
    """The heterogeneous model of ``blocks`` from the trained halves: the parent's embedding, final norm and head
    around the stacked per-layer params."""
    hcfg = hetero.HeteroConfig(config, tuple(blocks))
    layers = [bw.layer_params(i, b) for i, b in enumerate(blocks)]
    new = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    new["segments"] = [jax.device_get(s) for s in hetero.stack_layers(layers, blocks)]
    hetero.check_params(hcfg, new)
    return hcfg, new


def _save_hf(path: Path, hcfg, params, tokenizer) -> str:
    try:
        from minitron_jax.convert.deci_hf import save_deci_hf
    except ImportError:
        return "skipped: convert.deci_hf.save_deci_hf is not available"
    save_deci_hf(path, hcfg, params, tokenizer=tokenizer, overwrite=True)
    return f"saved to {path}"


def build_report(config, hcfg, space, targets, cost_settings, settings, result, sc, bw, timings, phases, *,
                 parent_name, hf_note, calib, evalw, whole) -> dict[str, Any]:
    from minitron_jax.model import count_params

    names = space.names()
    best = result.best
    measured = C.model_cost(config, hcfg.blocks, **cost_settings.block_kwargs())
    parent_cost = C.model_cost(config, (parent_spec(config),) * config.num_layers, **cost_settings.block_kwargs())
    sols = []
    for k, sol in enumerate(result.solutions[: settings.runner_ups + 1]):
        sols.append({"rank": k + 1, "blocks": sol.labels(names), "score": sol.score,
                     "summed_kl": -sol.score,
                     "targets": {c.name: {"achieved": sol.costs[c.name], "limit": c.budget,
                                          "shown": c.show(sol.costs[c.name]), "limit_shown": c.show(c.budget)}
                                 for c in result.constraints},
                     "proved_optimal": sol.optimal})
    halves = {f"{i}:{h}:{o.describe()}": {k: v for k, v in info.items() if k != "curve"}
              for (i, h, o), (_, info) in bw.halves.items()}
    return {
        "parent": {"name": parent_name, "config": config.describe(), "params": count_params(config),
                   "cost": dataclasses.asdict(parent_cost) | {"memory_bytes": parent_cost.memory_bytes}},
        "space": space.describe(), "variants": names,
        "targets": {k: getattr(targets, k) for k in targets.given()},
        "cost_settings": dataclasses.asdict(cost_settings),
        "settings": settings.run_key() | {"eval_batch": settings.eval_batch, "runner_ups": settings.runner_ups},
        "data": {"calibration_windows": int(len(calib)), "calibration_tokens": int(calib.size),
                 "eval_windows": int(len(evalw)), "seq_len": int(calib.shape[1])},
        "chosen": {"blocks": best.labels(names), "summed_kl": -best.score, "score": best.score,
                   "params": hetero.count_params(hcfg),
                   "measured_cost": dataclasses.asdict(measured) | {"memory_bytes": measured.memory_bytes},
                   "targets": sols[0]["targets"],
                   "lm_loss_sum_of_replacements": float(sum(sc.lm_loss[i, v] - sc.parent_lm_loss
                                                            for i, v in enumerate(best.choices))),
                   # the assembled model itself on the same held-out windows (the scores add single replacements)
                   "whole_model": {"kl": whole[0], "lm_loss": whole[1], "parent_lm_loss": sc.parent_lm_loss}},
        "runner_ups": sols[1:],
        "scores": {"mode": sc.mode, "kl": sc.kl.tolist(), "lm_loss": sc.lm_loss.tolist(),
                   "parent_lm_loss": sc.parent_lm_loss, "evaluations": sc.evaluations, "compiled": sc.compiled,
                   "eval_seconds_all_runs": sc.eval_seconds},
        "blockwise": {"trained_now": bw.computed, "step_builds": bw.step_builds,
                      "train_seconds_all_runs": sum(float(info.get("seconds", 0.0)) for _, info in bw.halves.values()),
                      "halves": halves},
        "timings_s": {v.describe(): t for v, t in timings.items()} if timings else None,
        "solver": {"seconds": result.seconds, "exhausted": result.exhausted, "text": result.report()},
        "hf_export": hf_note,
        "phases_s": phases,
    }
