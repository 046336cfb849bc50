"""The offline teacher: its top-k next-token distribution over a run's packed rows, computed once and stored.

A distillation run spends a large share of every step on the teacher's forward pass, the same pass for the same
rows at every epoch and in every run that distills from that teacher on that data. :func:`write_teacher_cache` runs
it once over the rows ``train/inputs.build_datasets`` produces for a run (same token cache, ``seq_len`` and held-out
documents; the ``train`` and the ``validation`` split) and stores, per token, the teacher's top-K ids, their
log-probabilities and the log of the remaining mass. A run with ``teacher.logits_cache: DIR`` then reads those
instead of loading the teacher (:func:`attach`), and trains with the sparse forward KL of
``losses.sparse_forward_kl`` (``train/sparse_loss.py``).

**Format** (a directory, ``.minitron_jax`` marker):

- ``index.json``: ``format``/``version``, ``top_k``, the dtypes (``ids_dtype`` uint16 when the vocabulary fits, else
  int32; ``logprobs_dtype`` float16 | bfloat16 | float32; ``rest_dtype`` float32), ``seq_len``, ``bytes_per_token``,
  the ``fingerprint`` (below) and per split the shards: ``{"name", "start", "stop"}`` (dataset row ids
  ``[start, stop)``). Written before the first shard.
- one directory per shard, ``train-00000/`` …: ``ids.npy`` ``[rows, T, K]``, ``logprobs.npy`` ``[rows, T, K]``,
  ``rest.npy`` ``[rows, T]`` (``log(1 − Σ_topk p)``, ``-inf`` when K = V) and ``shard.json`` (bfloat16 log-probs
  are stored as their uint16 bit pattern: ``.npy`` has no bfloat16). Each is written into a
  staging directory renamed into place (``fsutil.atomic_directory``), so a shard exists whole or not at all: a
  writer killed at any point (``kill -9`` included) leaves finished shards and at most a staging directory, which
  is never read and is removed when that shard is written again. A rerun writes only the missing shards.
- ``summary.json``: rows, tokens, measured bytes per token, seconds (written by process 0 at the end).

Rows are indexed by their dataset row id (the index ``BatchIterator`` draws), so a run looks up any batch order and
resumes exactly. Position ``t`` holds the teacher's distribution for the token after ``t``, for every position
(also those the loss mask excludes).

**Fingerprint**: the data (``seq_len``, the tokenizer's fingerprint, each split's row count and a SHA-256 of its
tokens and segment ids), the teacher (SHA-256 of its config, a BLAKE2 digest of the files at its path, the dtype
of its forward pass), ``top_k`` and the log-prob dtype. A cache whose fingerprint differs from what a run (or a
rerun of the writer) would produce is refused with one line naming ``index.json`` and what differs (exit 2).

**Multi-host**: process ``p`` of ``P`` writes the shards ``i ≡ p (mod P)``, each on its first local device; process
0 holds the directory's lock and writes ``index.json`` and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minitron_jax.exitcodes import BadInputError
from minitron_jax.fsutil import (
    MARKER_NAME,
    atomic_directory,
    check_free_space,
    check_outside_sources,
    lock_directory,
    save_npy,
    write_json_atomic,
    write_marker,
)

FORMAT = "minitron_jax.teacher_logits"
VERSION = 1
INDEX = "index.json"
SUMMARY = "summary.json"
SHARD_META = "shard.json"
SPLITS = ("train", "validation")
CACHE_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_rest")
CACHE_NDIM = {"teacher_ids": 3, "teacher_logprobs": 3, "teacher_rest": 2}  # [B, T, K], [B, T, K], [B, T]
_FILES = {"teacher_ids": "ids.npy", "teacher_logprobs": "logprobs.npy", "teacher_rest": "rest.npy"}
LOGPROB_DTYPES = ("float16", "bfloat16", "float32")
SHARD_BYTES = 256 << 20  # default shard size: bounded host memory while writing, few files


class TeacherCacheError(BadInputError):
    """A teacher-logits cache that is missing, incomplete, malformed or made for other data/teacher/settings."""


# ----------------------------------------------------------------------------------------------------------------
# Dtypes and sizes
# ----------------------------------------------------------------------------------------------------------------
def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65536), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def logprobs_dtype(name: str) -> np.dtype:
    if name not in LOGPROB_DTYPES:
        raise BadInputError(f"teacher log-prob dtype must be one of {LOGPROB_DTYPES}, got {name!r}")
    from minitron_jax.dtypes import dtype

    return dtype(name)


def bytes_per_token(top_k: int, ids: np.dtype, logprobs: np.dtype) -> int:
    """Array bytes per token: K ids, K log-probs and one float32 rest (file headers aside)."""
    return top_k * (np.dtype(ids).itemsize + np.dtype(logprobs).itemsize) + 4


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------------
def files_digest(path: str | os.PathLike) -> str:
    """BLAKE2b of a model's bytes: the file (a ``.gguf``), or every non-hidden file under the directory with its
    relative path (hidden files, such as our ``.minitron_jax`` marker with its timestamp, are not the model)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                              p.relative_to(path).parts))
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def rows_digest(dataset, chunk: int = 4096) -> str:
    """SHA-256 of a dataset's rows (tokens and segment ids, in row-id order): the data the cache was computed on."""
    h = hashlib.sha256()
    for start in range(0, len(dataset), chunk):
        rows = dataset.rows(np.arange(start, min(start + chunk, len(dataset))))
        h.update(np.ascontiguousarray(rows["tokens"], np.int32).tobytes())
        h.update(np.ascontiguousarray(rows["segment_ids"], np.int32).tobytes())
    return h.hexdigest()


def fingerprint(*, teacher_path: str, teacher_config, teacher_dtype: str, tokenizer, seq_len: int,
                datasets: Mapping[str, Any], top_k: int, dtype: str) -> dict[str, Any]:
    """What a cache's numbers depend on (module docstring); equal fingerprints ⇒ the same numbers."""
    from minitron_jax.data import tokenizer_fingerprint

    config_json = json.dumps(teacher_config.to_hf(), sort_keys=True)
    return {
        "data": {"seq_len": int(seq_len), "tokenizer": tokenizer_fingerprint(tokenizer),
                 **{f"{name}_rows": len(ds) for name, ds in datasets.items()},
                 **{f"{name}_sha256": rows_digest(ds) for name, ds in datasets.items()}},
        "teacher": {"config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
                    "weights_blake2b": files_digest(teacher_path), "dtype": teacher_dtype},
        "top_k": int(top_k),
        "dtype": dtype,
    }


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 16 else s


def fingerprint_diff(stored: Mapping, expected: Mapping) -> list[str]:
    """``["teacher.weights_blake2b (cache 1a2b… vs now 3c4d…)", ...]`` for every field that differs."""
    a, b = _flat(stored), _flat(expected)
    return [f"{k} (cache {_short(a.get(k, 'absent'))} vs now {_short(b.get(k, 'absent'))})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
class CachedSplit:
    """The cached teacher values of one split, by dataset row id; shards are memory-mapped on first use."""

    def __init__(self, cache: TeacherCache, split: str):
        self.cache, self.split = cache, split
        info = cache.index["splits"].get(split)
        if info is None:
            raise TeacherCacheError(f"{cache.index_path}: no {split!r} split in this teacher-logits cache")
        self.shards = info["shards"]
        self.num_rows = int(info["rows"])
        self._starts = np.asarray([s["start"] for s in self.shards], np.int64)  # they tile the split (TeacherCache)
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_rows

    def _arrays(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._open:
            self._open[i] = self.cache.read_shard(self.split, self.shards[i])
        return self._open[i]

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """``{"teacher_ids", "teacher_logprobs", "teacher_rest"}`` of dataset rows ``indices``; an index of -1 (the
        loader's padding row) gets a harmless filler: K distinct ids of equal probability and no rest (its tokens
        carry no loss)."""
        c = self.cache
        indices = np.asarray(indices, np.int64)
        n, T, K = len(indices), c.seq_len, c.top_k
        out = {"teacher_ids": np.empty((n, T, K), c.ids_dtype),
               "teacher_logprobs": np.empty((n, T, K), c.logprobs_dtype),
               "teacher_rest": np.empty((n, T), np.float32)}
        pad = indices < 0
        out["teacher_ids"][pad] = np.arange(K, dtype=c.ids_dtype)
        out["teacher_logprobs"][pad] = -np.log(K)
        out["teacher_rest"][pad] = -np.inf
        real = np.flatnonzero(~pad)
        rows = indices[real]
        if len(rows) and (rows.max() >= self.num_rows):
            raise TeacherCacheError(f"{c.index_path}: row {int(rows.max())} of split {self.split!r} is beyond the "
                                    f"cache's {self.num_rows} rows")
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            arrays = self._arrays(int(s))
            offset = rows[sel] - self.shards[s]["start"]
            order = np.argsort(offset, kind="stable")
            local = offset[order]  # ascending: sequential reads of the memory map
            dst = real[sel][order]
            values = {key: arrays[key][local] for key in CACHE_KEYS}  # one copy out of the memory map
            c.check_values(self.shards[s]["name"], values)
            for key in CACHE_KEYS:
                out[key][dst] = values[key]
        return out


class TeacherCache:
    """An existing teacher-logits cache directory (its ``index.json``); :meth:`split` reads rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.index_path = self.path / INDEX
        if not self.index_path.is_file():
            raise TeacherCacheError(f"{self.index_path} does not exist: {self.path} is not a teacher-logits cache "
                                    "(write one with python -m minitron_jax.teacher_logits)")
        try:
            index = json.loads(self.index_path.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"format is {index.get('format')!r}, not {FORMAT!r}")
            if index.get("version") != VERSION:
                raise ValueError(f"version {index.get('version')} (this code reads version {VERSION})")
            self.top_k = int(index["top_k"])
            self.seq_len = int(index["seq_len"])
            self.ids_dtype = np.dtype(index["ids_dtype"])
            self.logprobs_dtype = logprobs_dtype(index["logprobs_dtype"])
            self.vocab_size = int(index["vocab_size"])
            for split in index["splits"].values():
                int(split["rows"])
                for s in split["shards"]:
                    str(s["name"]), int(s["start"]), int(s["stop"])
            index["fingerprint"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TeacherCacheError(f"{self.index_path} is not a valid teacher-logits index "
                                    f"({type(e).__name__}: {e})") from None
        for name, split in index["splits"].items():
            self._check_tiling(name, split)
        self.index = index

    def _check_tiling(self, name: str, split: Mapping) -> None:
        """A split's row lookup maps a row to the last shard starting at or before it: right only when the shards
        tile ``[0, rows)`` in order. A hand-edited or mixed-up index would otherwise read past a shard's end."""
        expect = 0
        for s in split["shards"]:
            lo, hi = int(s["start"]), int(s["stop"])
            if lo != expect or hi <= lo:
                raise TeacherCacheError(f"{self.index_path}: shard {s['name']} of split {name!r} covers rows "
                                        f"[{lo}, {hi}), expected rows from {expect} on: the shards must cover the "
                                        "split in order")
            expect = hi
        if expect != int(split["rows"]):
            raise TeacherCacheError(f"{self.index_path}: the shards of split {name!r} cover {expect} rows, the index "
                                    f"says {split['rows']}")

    @property
    def fingerprint(self) -> dict:
        return self.index["fingerprint"]

    def check(self, expected: Mapping) -> None:
        """Refuse (one line naming the index and the differing fields) a cache made for anything else."""
        diffs = fingerprint_diff(self.fingerprint, expected)
        if diffs:
            raise TeacherCacheError(f"{self.index_path}: this teacher-logits cache was computed for something else: "
                                    f"{'; '.join(diffs)}. Rewrite it (python -m minitron_jax.teacher_logits) or "
                                    "point to the cache of this teacher and data")

    def shard_complete(self, split: str, shard: Mapping) -> bool:
        """A shard directory exists only whole (atomic rename); the marker and its metadata say it is ours: this
        split, these rows, this cache's fingerprint (a shard directory copied in from another cache is not)."""
        d = self.path / shard["name"]
        return (d / MARKER_NAME).is_file() and _shard_is_ours(d, _shard_meta(self.index, split, shard))

    def missing(self) -> list[str]:
        return [s["name"] for name, split in self.index["splits"].items() for s in split["shards"]
                if not self.shard_complete(name, s)]

    def check_complete(self) -> None:
        missing = self.missing()
        if missing:
            total = sum(len(s["shards"]) for s in self.index["splits"].values())
            raise TeacherCacheError(f"{self.path}: teacher-logits cache incomplete ({len(missing)} of {total} shards "
                                    f"missing, first {missing[0]}); rerun python -m minitron_jax.teacher_logits with "
                                    "the same arguments to finish it")

    def read_shard(self, split: str, shard: Mapping) -> dict[str, np.ndarray]:
        """The memory-mapped arrays of a complete shard, shapes checked (a half shard is never read)."""
        d = self.path / shard["name"]
        if not self.shard_complete(split, shard):
            raise TeacherCacheError(f"{d}: shard missing or incomplete; rerun python -m minitron_jax.teacher_logits "
                                    "to finish the cache")
        rows = int(shard["stop"]) - int(shard["start"])
        expect = {"teacher_ids": ((rows, self.seq_len, self.top_k), self.ids_dtype),
                  "teacher_logprobs": ((rows, self.seq_len, self.top_k), self.logprobs_dtype),
                  "teacher_rest": ((rows, self.seq_len), np.dtype(np.float32))}
        out = {}
        for key, (shape, dt) in expect.items():
            f = d / _FILES[key]
            try:
                a = np.load(f, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise TeacherCacheError(f"{f}: unreadable ({e})") from None
            if dt.name == "bfloat16" and a.dtype == np.uint16:  # stored as its bit pattern (see _stored)
                a = a.view(dt)
            if a.shape != shape or a.dtype != dt:
                raise TeacherCacheError(f"{f}: holds {a.dtype}{list(a.shape)}, the index says {dt}{list(shape)}")
            out[key] = a
        return out

    def check_values(self, shard: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse (one line naming the shard) rows whose values no teacher can have written: an id outside the
        vocabulary, a NaN, or a log-probability above 0. A damaged or hand-made file would otherwise train on
        without a word (an out-of-range id gathers NaN, a NaN log-prob masked out by chance is never seen) or stop
        later as a "non-finite loss" that blames the learning rate. Whole-array reductions over one batch's rows:
        cheap next to a train step. Finite wrong values (a flipped mantissa bit) are not detectable this way."""
        ids, lp, rest = (np.asarray(arrays[k]) for k in CACHE_KEYS)
        where = f"{self.path / shard}"
        fix = (f"a damaged cache: delete {where} and rerun python -m minitron_jax.teacher_logits with the same "
               "arguments to rewrite it")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise TeacherCacheError(f"{where}/{_FILES['teacher_ids']}: token id {bad} outside the "
                                    f"vocabulary of {self.vocab_size}; {fix}")
        for key, a in (("teacher_logprobs", lp), ("teacher_rest", rest)):
            a = a.astype(np.float32, copy=False)  # float16/bfloat16 widened; float32 read as is
            # A log-probability is <= 0; the writer's float32 log-softmax rounds the top one to 0 at most. The slack
            # only keeps a future writer's rounding from tripping it.
            if a.size and not (a.max() <= 1e-3):  # also False for a NaN anywhere
                bad = "NaN" if np.isnan(a).any() else f"{float(a.max()):.4g}"
                raise TeacherCacheError(f"{where}/{_FILES[key]}: log-probability {bad} (must be <= 0); {fix}")

    def split(self, name: str) -> CachedSplit:
        return CachedSplit(self, name)


class CachedTeacherDataset:
    """A ``PackedDataset`` whose rows also carry the cached teacher values of the same dataset row ids; what a run
    with ``teacher.logits_cache`` iterates (``BatchIterator`` needs only ``len`` and ``rows``)."""

    def __init__(self, dataset, cached: CachedSplit):
        if len(dataset) != len(cached):
            raise TeacherCacheError(f"{cached.cache.index_path}: split {cached.split!r} has {len(cached)} rows, the "
                                    f"run's data {len(dataset)}")
        self.dataset, self.cached = dataset, cached
        self.seq_len = dataset.seq_len

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices) -> dict[str, np.ndarray]:
        return {**self.dataset.rows(indices), **self.cached.rows(indices)}

    def batches(self, batch_size: int, **kwargs):
        from minitron_jax.data import BatchIterator

        return BatchIterator(self, batch_size, **kwargs)


def read_layout(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{batch key: (shape after [B, T], dtype)}`` of a cache's batch arrays (what the train step is built for).
    Opening the index checks it whole (its shards must tile each split), so a dry run refuses a malformed one too."""
    c = TeacherCache(path)
    return {"teacher_ids": ((c.top_k,), c.ids_dtype), "teacher_logprobs": ((c.top_k,), c.logprobs_dtype),
            "teacher_rest": ((), np.dtype(np.float32))}


def run_fingerprint(rc, teacher_config, tokenizer, datasets: Mapping[str, Any], *, top_k: int, dtype: str) -> dict:
    """The fingerprint of the cache a run config calls for (its teacher, dtype and data)."""
    from minitron_jax.train.config import resolve_path

    return fingerprint(teacher_path=resolve_path(rc.teacher.path), teacher_config=teacher_config,
                       teacher_dtype=rc.teacher.dtype, tokenizer=tokenizer, seq_len=rc.data.seq_len,
                       datasets=datasets, top_k=top_k, dtype=dtype)


def attach(rc, teacher_config, tokenizer, train_ds, val_ds, log: Callable[[str], None] = print):
    """The run's datasets with ``rc.teacher.logits_cache`` attached: checked against the run's teacher and data
    (refused with one line otherwise), complete, both splits. Returns ``(train, validation or None)``."""
    cache = TeacherCache(rc.teacher.logits_cache)
    datasets = {"train": train_ds, **({"validation": val_ds} if val_ds is not None else {})}
    cache.check(run_fingerprint(rc, teacher_config, tokenizer, datasets, top_k=cache.top_k,
                                dtype=cache.index["logprobs_dtype"]))
    cache.check_complete()
    log(f"teacher logits: {cache.path} (top-{cache.top_k}, {cache.index['logprobs_dtype']}, "
        f"{cache.index['bytes_per_token']} bytes/token); the teacher itself is not loaded")
    return (CachedTeacherDataset(train_ds, cache.split("train")),
            CachedTeacherDataset(val_ds, cache.split("validation")) if val_ds is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def plan_shards(split: str, rows: int, rows_per_shard: int) -> list[dict[str, Any]]:
    return [{"name": f"{split}-{i:05d}", "start": lo, "stop": min(lo + rows_per_shard, rows)}
            for i, lo in enumerate(range(0, rows, rows_per_shard))]


def top_k_fn(config, *, top_k: int, dtype, chunk_size: int, ids: np.dtype, logprobs: np.dtype,
             attention: str = "einsum"):
    """Jitted ``(params, tokens, segment_ids, positions) -> (ids, logprobs, rest)`` ``[B, T, K]``/``[B, T]``: the
    teacher's forward in ``dtype``, then its logits one chunk of tokens at a time (``lax.map``: never
    ``[B·T, V]``), each chunk's log-softmax, top-k and the log of the mass outside the top-k (a logsumexp over the
    other ids, not ``log(1 − Σ p)``, which loses everything below float32's resolution of 1)."""
    import jax
    import jax.numpy as jnp

    from minitron_jax.arch import hidden_states, lm_head

    low = float(np.finfo(logprobs).min) if logprobs == np.float16 else -np.inf  # float16 cannot hold −70000

    def chunk_top_k(h, head):
        z = jnp.dot(h, head, preferred_element_type=jnp.float32)
        lp = jax.nn.log_softmax(z, axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, top_k)
        in_top = jnp.zeros(lp.shape, bool).at[jnp.arange(lp.shape[0])[:, None], top_ids].set(True)
        rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, lp), axis=-1)
        return top_ids.astype(ids), jnp.maximum(top_lp, low).astype(logprobs), rest

    @jax.jit
    def fn(params, tokens, segment_ids, positions):
        h, _, _ = hidden_states(config, params, tokens, positions=positions, segment_ids=segment_ids, dtype=dtype,
                                attention=attention)
        head = lm_head(config, params).astype(dtype)
        B, T, D = h.shape
        n = B * T
        num_chunks = max(1, -(-n // chunk_size))
        chunk = -(-n // num_chunks)
        flat = jnp.pad(h.reshape(n, D), [(0, num_chunks * chunk - n), (0, 0)]).reshape(num_chunks, chunk, D)
        out_ids, out_lp, out_rest = jax.lax.map(lambda hc: chunk_top_k(hc, head), flat)
        return (out_ids.reshape(-1, top_k)[:n].reshape(B, T, top_k),
                out_lp.reshape(-1, top_k)[:n].reshape(B, T, top_k), out_rest.reshape(-1)[:n].reshape(B, T))

    return fn


def _shard_is_ours(d: Path, meta: Mapping) -> bool:
    try:
        return json.loads((d / SHARD_META).read_text()) == meta
    except (OSError, ValueError):
        return False


def write_teacher_cache(rc, out: str | os.PathLike, *, top_k: int, dtype: str = "float16",
                        rows_per_shard: int | None = None, batch_rows: int = 8, chunk_size: int | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write (or finish) the teacher-logits cache of run config ``rc`` in ``out``; returns the summary.

    ``rc`` gives the teacher (``teacher.path``, ``teacher.dtype``) and the data (``data.*``: the rows are
    ``inputs.build_datasets(rc, tokenizer)``'s, both splits). ``top_k`` ids per token with log-probs in ``dtype``;
    ``rows_per_shard`` rows per shard file (default ~256 MB), ``batch_rows`` rows per teacher forward,
    ``chunk_size`` tokens per logits chunk (default ``loss.chunk_size``). Shards already written for the same
    fingerprint are kept; a directory holding a cache of anything else is refused (:class:`TeacherCacheError`)."""
    import jax

    from minitron_jax.train import inputs
    from minitron_jax.train.config import resolve_path
    from minitron_jax.train.models import load_teacher

    out = Path(out).absolute()
    lp_dtype = logprobs_dtype(dtype)
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise BadInputError(f"--top-k must be a positive integer, got {top_k!r}")
    if batch_rows < 1 or (rows_per_shard is not None and rows_per_shard < 1):
        raise BadInputError("batch rows and rows per shard must be >= 1")
    if rc.teacher.path is None:
        raise BadInputError("no teacher: give --teacher PATH or a run config with teacher.path")
    # A cache written inside the teacher's directory changes the files its fingerprint hashes: every run would then
    # refuse it, after the whole teacher pass. Inside (or around) a data file it would be read as text next time.
    check_outside_sources(out, [resolve_path(rc.teacher.path),
                                *(src for src in rc.data.sources if Path(src).exists())])
    teacher = load_teacher(rc)
    config = teacher.config
    if top_k > config.vocab_size:
        raise BadInputError(f"--top-k {top_k} exceeds the teacher's vocabulary of {config.vocab_size} tokens")
    train_ds, val_ds = inputs.build_datasets(rc, teacher.tokenizer)
    datasets = {"train": train_ds, **({"validation": val_ds} if val_ds is not None else {})}
    log(f"teacher {resolve_path(rc.teacher.path)} ({config.describe()}); "
        + ", ".join(f"{name} {len(ds)} rows" for name, ds in datasets.items()) + f" of {rc.data.seq_len} tokens")
    fp = run_fingerprint(rc, config, teacher.tokenizer, datasets, top_k=top_k, dtype=dtype)
    id_dtype = ids_dtype(config.vocab_size)
    bpt = bytes_per_token(top_k, id_dtype, lp_dtype)
    rows_per_shard = rows_per_shard or max(1, SHARD_BYTES // (rc.data.seq_len * bpt))
    index = {"format": FORMAT, "version": VERSION, "top_k": int(top_k), "seq_len": rc.data.seq_len,
             "vocab_size": config.vocab_size, "ids_dtype": id_dtype.name, "logprobs_dtype": dtype,
             "rest_dtype": "float32", "bytes_per_token": bpt, "rows_per_shard": rows_per_shard, "fingerprint": fp,
             "splits": {name: {"rows": len(ds), "shards": plan_shards(name, len(ds), rows_per_shard)}
                        for name, ds in datasets.items()}}

    proc, nproc = jax.process_index(), jax.process_count()
    t0 = time.perf_counter()
    if proc == 0:
        with lock_directory(out):  # a second writer of this cache gets BusyError (exit 5) at once
            if not (out / INDEX).is_file():  # a new cache: refused for room before its directory is made
                _check_room(out, index, [s for split in index["splits"].values() for s in split["shards"]])
            index = _open_for_writing(out, index)
            counts = _write_shards(out, index, datasets, teacher, rc, top_k, lp_dtype, id_dtype, batch_rows,
                                   chunk_size or rc.loss.chunk_size, proc, nproc, log)
            summary = _summary(out, index, counts, time.perf_counter() - t0)
            write_json_atomic(out / SUMMARY, summary)
    else:
        index = _open_for_writing(out, index, create=False)
        counts = _write_shards(out, index, datasets, teacher, rc, top_k, lp_dtype, id_dtype, batch_rows,
                               chunk_size or rc.loss.chunk_size, proc, nproc, log)
        summary = _summary(out, index, counts, time.perf_counter() - t0)
    return summary


def _check_room(out: Path, index: Mapping, shards: Sequence[Mapping]) -> None:
    """Refuse (exit 6) when ``out``'s file system cannot hold ``shards``: now, not after the teacher pass over the
    shards that fit. A shard's size is exact (its arrays) plus a few kB of headers and shard.json."""
    rows = sum(int(s["stop"]) - int(s["start"]) for s in shards)
    check_free_space(out, rows * index["seq_len"] * index["bytes_per_token"] + len(shards) * 4096,
                     f"the {len(shards)} shard(s) to write", "lower --top-k or write the cache elsewhere (--out)")


def _open_for_writing(out: Path, index: dict, create: bool = True) -> dict:
    """The index to write shards under: the existing one when it has the same fingerprint (resume), refused when it
    has another; a fresh directory otherwise (process 0 only: ``create``)."""
    if (out / INDEX).is_file():
        existing = TeacherCache(out)
        existing.check(index["fingerprint"])
        return existing.index  # same fingerprint: keep its shard plan (rows per shard) so shards line up
    if not create:
        for _ in range(600):  # process 0 writes the index first
            time.sleep(1.0)
            if (out / INDEX).is_file():
                return _open_for_writing(out, index, create=False)
        raise TeacherCacheError(f"{out / INDEX} did not appear in 10 minutes (process 0 writes it)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TeacherCacheError(f"{out} exists and is not a teacher-logits cache (no {INDEX}); choose an empty or "
                                "new directory")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out)
    write_json_atomic(out / INDEX, index)
    return index


def _write_shards(out, index, datasets, teacher, rc, top_k, lp_dtype, id_dtype, batch_rows, chunk_size, proc,
                  nproc, log) -> dict[str, int]:
    import jax

    from minitron_jax.train.state import dtype_of

    shards = [(name, s) for name in index["splits"] for s in index["splits"][name]["shards"]]
    mine = [(i, name, s) for i, (name, s) in enumerate(shards) if i % nproc == proc]
    todo = [(i, name, s) for i, name, s in mine if not _shard_is_ours(out / s["name"], _shard_meta(index, name, s))]
    counts = {"shards": len(shards), "kept": len(mine) - len(todo), "written": 0}
    if counts["kept"]:
        log(f"{counts['kept']} shard(s) already written; computing the {len(todo)} missing")
    if not todo:
        return counts
    _check_room(out, index, [s for _, _, s in todo])
    dtype = dtype_of(rc.teacher.dtype)
    device = jax.local_devices()[0]
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), teacher.params), device)
    fn = top_k_fn(teacher.config, top_k=top_k, dtype=dtype, chunk_size=chunk_size, ids=id_dtype, logprobs=lp_dtype,
                  attention=rc.train.attention)  # blockwise for long rows, as the run would
    T = index["seq_len"]
    for n_done, (_, name, s) in enumerate(todo, 1):
        t0 = time.perf_counter()
        ds, lo, hi = datasets[name], int(s["start"]), int(s["stop"])
        arrays = {"teacher_ids": np.empty((hi - lo, T, top_k), id_dtype),
                  "teacher_logprobs": np.empty((hi - lo, T, top_k), lp_dtype),
                  "teacher_rest": np.empty((hi - lo, T), np.float32)}
        for start in range(lo, hi, batch_rows):
            idx = np.arange(start, start + batch_rows)
            real = idx < hi
            rows = ds.rows(np.where(real, idx, -1))  # -1: padding rows, so every call has one static shape
            result = jax.device_get(fn(params, *(jax.device_put(rows[k], device)
                                                  for k in ("tokens", "segment_ids", "positions"))))
            for key, value in zip(CACHE_KEYS, result):
                arrays[key][start - lo:start - lo + int(real.sum())] = np.asarray(value)[real]
        # overwrite: a shard directory that is not this cache's (another cache's copy, a damaged shard.json) is
        # replaced; one that is not ours at all (no marker) is still refused by atomic_directory.
        with atomic_directory(out / s["name"], overwrite=True) as tmp:
            for key, value in arrays.items():
                save_npy(tmp / _FILES[key], _stored(value))
            (tmp / SHARD_META).write_text(json.dumps(_shard_meta(index, name, s), indent=1) + "\n")
        counts["written"] += 1
        log(f"shard {n_done}/{len(todo)} {s['name']}: rows {lo}-{hi} in {time.perf_counter() - t0:.1f}s")
    return counts


def _stored(a: np.ndarray) -> np.ndarray:
    """``.npy`` has no bfloat16 (numpy writes an opaque ``|V2`` that reads back as raw bytes): bfloat16 arrays are
    written as their uint16 bit pattern and viewed back as bfloat16 when read."""
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


def _shard_meta(index: Mapping, split: str, shard: Mapping) -> dict[str, Any]:
    return {"split": split, "start": int(shard["start"]), "stop": int(shard["stop"]), "top_k": index["top_k"],
            "fingerprint_sha256": hashlib.sha256(json.dumps(index["fingerprint"], sort_keys=True).encode()).hexdigest()}


def _summary(out: Path, index: Mapping, counts: Mapping, seconds: float) -> dict[str, Any]:
    """Rows, tokens and bytes per token as measured on disk (the shards present: all of them once complete)."""
    cache = TeacherCache(out)
    tokens = file_bytes = 0
    for name, split in index["splits"].items():
        for s in split["shards"]:
            if cache.shard_complete(name, s):
                tokens += (int(s["stop"]) - int(s["start"])) * index["seq_len"]
                file_bytes += sum((out / s["name"] / f).stat().st_size for f in _FILES.values())
    missing = cache.missing()
    return {"path": str(out), "top_k": index["top_k"], "logprobs_dtype": index["logprobs_dtype"],
            "ids_dtype": index["ids_dtype"], "rows": {k: v["rows"] for k, v in index["splits"].items()},
            "tokens": tokens, "bytes": file_bytes, "bytes_per_token": file_bytes / tokens if tokens else None,
            "array_bytes_per_token": index["bytes_per_token"], "shards": counts["shards"],
            "shards_written": counts["written"], "shards_kept": counts["kept"], "shards_missing": len(missing),
            "complete": not missing, "seconds": round(seconds, 2)}
