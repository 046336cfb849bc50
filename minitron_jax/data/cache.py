"""Held-out documents and the tokenized-shard cache.

**Held-out documents** (validation): whole documents are held out *before* packing and packed into their own rows,
so no validation row shares a document with a training row (a split of packed rows would: a document spans rows
and a row packs documents, so validation rows would mostly continue passages trained on). Which documents is
decided by a seeded hash of each document's text (``document_key``, ``holdout_mask``): the same on every host,
for every tokenizer, independent of file order, and identical documents always on the same side. Ask for a
fraction of the documents or for at least N validation rows' worth of them.

**Cache**: ``build_token_cache`` packs the sources once into ``.npy`` shards (``tokens``, ``segment_ids``) of a
``train`` and, with held-out documents, a ``validation`` split, under a directory named by a hash of (source
paths + sizes + mtimes, tokenizer fingerprint, seq_len, held-out settings, format version). The shards are
written into a private staging directory that is renamed into place at the end, so a cache directory is either
complete or absent, and concurrent builders cannot corrupt each other. Later runs memory-map the shards.
``positions`` and ``loss_mask`` are derived from ``segment_ids`` per batch (cheap) rather than stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import shutil
import uuid
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minitron_jax.data.packing import document_token_ids, pack_rows
from minitron_jax.data.text import eos_token_id, expand_sources, iter_source_documents, tokenizer_fingerprint
from minitron_jax.fsutil import save_npy

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: train/validation splits of whole documents


class HoldoutError(ValueError):
    """The requested validation documents cannot be held out of these sources (too few documents)."""


def check_holdout(validation: int | float) -> int | float:
    """``validation`` normalized: ``0`` (hold nothing out), an int >= 1 (at least that many validation rows' worth
    of documents) or a float in (0, 1) (that fraction of the documents). ValueError for anything else."""
    if isinstance(validation, bool) or not isinstance(validation, numbers.Real):
        raise ValueError(f"validation must be a row count or a fraction, got {validation!r}")
    if isinstance(validation, numbers.Integral):
        if validation < 0:
            raise ValueError(f"validation rows must be >= 0, got {validation}")
        return int(validation)
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"a validation fraction must be in [0, 1), got {validation} (a row count is an integer)")
    return float(validation) if validation > 0 else 0


def document_key(text: str, seed: int = 0) -> int:
    """A document's place in the held-out order: a seeded 64-bit hash of its UTF-8 text.

    Of the text rather than of the document's position: identical documents (common in web text, or when sources
    overlap) always land on the same side, so no validation document is a verbatim copy of a training one, and
    reordering or renaming source files holds out the same documents. Of the text rather than of its tokens: every
    tokenizer and ``seq_len`` holds out the same documents, so runs of different models validate on the same text.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "little")


def holdout_mask(keys: np.ndarray, lengths: np.ndarray, validation: int | float, seq_len: int,
                 source: str = "data") -> np.ndarray:
    """Which documents are validation documents, from their ``document_key``s and token counts (bool ``[n]``).

    - fraction ``f``: the documents whose key lies in the lowest ``f`` of the 64-bit range (at least the one with
      the smallest key). About ``f`` of them, and a document's side depends on its text alone, so documents
      appended to the sources later never move an earlier one across the split.
    - row count ``N``: the documents with the smallest keys, as many as it takes to fill at least ``N`` packed rows
      of ``seq_len`` tokens (packing fills rows completely, so ``ceil(tokens / seq_len)`` rows).

    Identical documents share a key and are always taken together. Raises ``HoldoutError`` naming ``source`` when
    there are fewer than two documents or the held-out set would leave nothing to train on.
    """
    keys, lengths = np.asarray(keys, np.uint64), np.asarray(lengths, np.int64)
    n = len(keys)
    if n < 2:
        raise HoldoutError(f"{source}: only {n} document: cannot hold out a validation document")
    if isinstance(validation, float):
        held = keys < np.uint64(min(int(validation * 2.0**64), 2**64 - 1))
        if not held.any():
            held = keys == keys.min()
        what = f"a fraction {validation} of the documents"
    else:
        order = np.argsort(keys, kind="stable")
        filled = np.cumsum(lengths[order])
        last = int(np.searchsorted(filled, (validation - 1) * seq_len + 1))  # first prefix filling N rows
        if last == n:
            raise HoldoutError(f"{source}: all {n} documents fill only {-(-int(filled[-1]) // seq_len)} rows of "
                               f"{seq_len} tokens, not the {validation} validation rows asked for and a training set")
        held = keys <= keys[order[last]]
        what = f"{validation} validation rows' worth of documents"
    if held.all():
        distinct = len(np.unique(keys))
        raise HoldoutError(f"{source}: holding out {what} takes all {n} documents"
                           + (f" ({distinct} distinct)" if distinct < n else "") + ": none left to train on")
    return held


@dataclass
class TokenCache:
    """A packed, tokenized copy of some sources on disk: a ``train`` split and, when documents were held out, a
    ``validation`` split (``build_token_cache``). ``hit`` says whether it already existed."""

    path: Path
    manifest: dict
    hit: bool

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def num_rows(self, split: str = "train") -> int:
        return self._split(split)["num_rows"]

    def columns(self, split: str = "train") -> dict[str, list[np.ndarray]]:
        """Memory-mapped shards per column of ``split``: ``{"tokens": [shard0, ...], "segment_ids": [...]}``."""
        shards = self._split(split)["shards"]
        return {n: [np.load(self.path / s[n], mmap_mode="r") for s in shards] for n in ("tokens", "segment_ids")}

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ValueError(f"token cache {self.path} has no {split!r} split (it has {', '.join(self.splits)})")
        return self.manifest["splits"][split]


def _cache_key(files: list[Path], tokenizer, seq_len: int, eos: int, holdout: dict | None) -> tuple[str, dict]:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    inputs = {"version": CACHE_FORMAT_VERSION, "sources": stats, "tokenizer": tokenizer_fingerprint(tokenizer),
              "seq_len": seq_len, "eos": eos, "holdout": holdout}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24], inputs


def build_token_cache(sources, tokenizer, seq_len: int, cache_dir: str | os.PathLike, *,
                      eos_id: int | None = None, rows_per_shard: int | None = None,
                      validation: int | float = 0, split_seed: int = 0) -> TokenCache:
    """Pack ``sources`` (any ``expand_sources`` spec) into ``cache_dir/<key>/`` once; afterwards return it as is.

    ``validation`` (``check_holdout``) holds whole documents out *before* packing (``holdout_mask``, keyed by
    ``document_key(text, split_seed)``): they are packed into their own ``validation`` rows, the rest into
    ``train`` rows, so no validation document has a token in a training row. 0 packs everything into ``train``.

    The key hashes the source paths, sizes and mtimes, the tokenizer fingerprint, ``seq_len``, the EOS id and the
    held-out settings, so editing a source, switching tokenizers or changing the split builds a new cache. Shards
    hold ``rows_per_shard`` rows (default: about 64M tokens) so memory stays bounded while building.
    """
    validation = check_holdout(validation)
    files = expand_sources(sources)
    eos = eos_token_id(tokenizer, eos_id)
    holdout = {"validation": validation, "seed": int(split_seed)} if validation else None
    key, inputs = _cache_key(files, tokenizer, seq_len, eos, holdout)
    final = Path(cache_dir) / key
    if (final / "manifest.json").exists():
        return TokenCache(final, json.loads((final / "manifest.json").read_text()), hit=True)

    rows_per_shard = rows_per_shard or max(1, (64 << 20) // seq_len)
    staging = Path(cache_dir) / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        manifest = _write_shards(staging, files, tokenizer, seq_len, eos, rows_per_shard, holdout)
        manifest["inputs"] = inputs
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(staging, final)  # the atomic commit of the whole cache
        except OSError:
            if not (final / "manifest.json").exists():
                raise
            logger.info("another process built %s first; using it", final)
            shutil.rmtree(staging, ignore_errors=True)
            return TokenCache(final, json.loads((final / "manifest.json").read_text()), hit=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("token cache %s: %s", final, "; ".join(
        f"{name} {s['num_rows']} rows x {seq_len} ({s['num_documents']} documents)"
        for name, s in manifest["splits"].items()))
    return TokenCache(final, manifest, hit=False)


def _write_shards(directory: Path, files: list[Path], tokenizer, seq_len: int, eos: int, rows_per_shard: int,
                  holdout: dict | None) -> dict:
    """Documents → (held-out choice) → packed rows of each split → ``.npy`` shards; returns the manifest."""
    keys = array("Q")

    def keyed_texts():
        for text in iter_source_documents(files):
            if holdout:
                keys.append(document_key(text, holdout["seed"]))
            yield text

    tokenized = document_token_ids(tokenizer, keyed_texts(), eos_id=eos)
    if not holdout:
        splits = {"train": _pack_split(directory, "train", tokenized, seq_len, eos, rows_per_shard)}
    else:
        # The held-out set depends on every document (a row count needs their token counts), so the tokens are
        # staged once in a flat file and then packed split by split: tokenizing twice would cost far more than
        # the temporary disk space (about the size of the cache).
        staged, lengths = directory / "documents.int32", array("q")
        with staged.open("wb") as f:
            for ids in tokenized:
                f.write(ids.tobytes())
                lengths.append(len(ids))
        splits = {}
        if lengths:
            n_tokens = np.frombuffer(lengths, np.int64)
            source = ", ".join(str(f) for f in files)
            held = holdout_mask(np.frombuffer(keys, np.uint64), n_tokens, holdout["validation"], seq_len, source)
            flat = np.memmap(staged, np.int32, mode="r")
            ends = np.cumsum(n_tokens)

            def documents(select: np.ndarray) -> Iterator[np.ndarray]:
                for i in np.flatnonzero(select):
                    yield flat[ends[i] - n_tokens[i]:ends[i]]

            for name, select in (("train", ~held), ("validation", held)):
                splits[name] = _pack_split(directory, name, documents(select), seq_len, eos, rows_per_shard)
            del flat
        staged.unlink()
    num_documents = sum(s["num_documents"] for s in splits.values())
    if not num_documents:
        raise ValueError(f"sources {[str(f) for f in files]} contain no documents")
    return {"version": CACHE_FORMAT_VERSION, "seq_len": seq_len, "num_documents": num_documents,
            "num_tokens": sum(s["num_tokens"] for s in splits.values()), "holdout": holdout, "splits": splits}


def _pack_split(directory: Path, split: str, docs: Iterable[np.ndarray], seq_len: int, eos: int,
                rows_per_shard: int) -> dict:
    """Stream ``docs`` → packed rows → ``{split}-tokens-XXXXX.npy`` / ``{split}-segment_ids-XXXXX.npy`` shards."""
    counts = {"num_documents": 0, "num_tokens": 0}

    def counted_docs():
        for doc in docs:
            counts["num_documents"] += 1
            counts["num_tokens"] += len(doc)
            yield doc

    # Segment ids never exceed seq_len, so int16 halves their disk footprint for any realistic seq_len.
    seg_dtype = np.int16 if seq_len <= np.iinfo(np.int16).max else np.int32
    shards, buffer = [], []

    def flush():
        name = f"{len(shards):05d}.npy"
        tokens, segments = (np.stack(x) for x in zip(*buffer))
        save_npy(directory / f"{split}-tokens-{name}", tokens)
        save_npy(directory / f"{split}-segment_ids-{name}", segments.astype(seg_dtype))
        shards.append({"tokens": f"{split}-tokens-{name}", "segment_ids": f"{split}-segment_ids-{name}",
                       "rows": len(buffer)})
        buffer.clear()

    for row in pack_rows(counted_docs(), seq_len, pad_id=eos):
        buffer.append(row)
        if len(buffer) == rows_per_shard:
            flush()
    if buffer:
        flush()
    return {"num_rows": sum(s["rows"] for s in shards), **counts, "shards": shards}
