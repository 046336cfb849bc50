"""Data layer: text sources, token windows, packing, a tokenized-shard cache, a resumable batch iterator, chat SFT.

Every tool reads text through the functions here, so calibration, evaluation and distillation all see the same
bytes and the same tokens.

**Text rules** (a contract shared by every tool; see ``read_text``/``read_documents``):

- ``.jsonl``: one document per record. A record is a JSON object; its document is its ``text`` field, or, when it
  has no ``text`` key, its only string value. Anything else is a ``ValueError`` naming the file and line. Blank
  lines are skipped. ``read_text`` joins the documents with ``"\\n\\n"``.
- ``.parquet``: one document per row, from the ``text`` column (or the only string column).
- Any other file: plain UTF-8 text, read whole, one document.

**Windows** (perplexity, calibration): ``token_windows`` tokenizes a text once *without* special tokens and cuts it
into consecutive non-overlapping ``seq_len`` windows, dropping the remainder.

**Packing** (distillation): each document becomes ``[BOS?] + ids + [EOS]`` (BOS only where the tokenizer's own
convention adds one, i.e. what ``tokenizer(text)`` does by default) and the documents are streamed into rows of
``seq_len`` tokens. A row is filled completely before the next one starts: a document that does not fit in what is
left of a row is split, and its continuation opens the next row as a new segment. Only the final row is padded.
Per row:

- ``tokens``       int32 ids; padding uses the EOS id (it is masked out everywhere anyway).
- ``segment_ids``  1, 2, ... for the document pieces of the row in order; 0 for padding.
- ``positions``    0, 1, ... restarting at every segment (what ``model.default_positions`` computes too).
- ``loss_mask``    see below.

Loss convention: the target of position ``t`` is ``tokens[t + 1]`` (``next_token_targets``: tokens shifted left,
the last column is a dummy). ``loss_mask[t] = 1`` exactly when ``segment_ids[t] != 0`` and
``segment_ids[t + 1] == segment_ids[t]``, i.e. the prediction stays inside one document piece. So the last
position of every segment (a document's EOS, or the last token of a row-split piece) and the last column of every
row carry no loss, and no position ever predicts a token of another document or padding.

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

**Iterator**: ``PackedDataset.batches`` returns a ``BatchIterator`` whose whole state is
``{"epoch", "index", "seed", "batch_size", "num_rows"}`` (JSON-able); restoring it replays exactly the same
batches. Each epoch visits the rows in a permutation derived from (seed, epoch); each global batch holds
``batch_size`` rows and process ``p`` of ``P`` takes rows ``[p*B/P, (p+1)*B/P)`` of it, so hosts read disjoint
rows whose union is the single-host batch (and the state, being global, also resumes under a different process
count).

Why plain numpy instead of ``grain``: the work here is random access into memory-mapped arrays plus an index
permutation — a few dozen lines — and the guarantees we need are easy to state and test directly: the
permutation is our own integer hash (stable across numpy/grain versions, unlike ``Generator`` streams, so a resume
after an upgrade still replays the same data), the multi-host rule is "slice of every global batch" (grain's
process sharding splits the record set instead), and the state is a tiny dict rather than a framework checkpoint.
grain is also not a declared dependency of the project.

**Chat SFT**: ``sft_examples`` renders ``messages`` with the tokenizer's chat template and marks assistant tokens by
rendering the conversation prefix by prefix; rows use the same layout and loss convention as packed rows.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import numbers
import os
import shutil
import uuid
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".txt", ".jsonl", ".parquet")
CACHE_FORMAT_VERSION = 2  # 2: train/validation splits of whole documents
_GLOB_CHARS = set("*?[")


# ==================================================================================================================
# Sources and text rules
# ==================================================================================================================
def expand_sources(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve a source spec into an ordered, de-duplicated list of files.

    ``spec`` is a file, a directory (its ``.txt``/``.jsonl``/``.parquet`` files, sorted, not recursive), a glob
    (sorted matches; ``**`` recurses), or a list of those (concatenated in order).

    Raises:
      FileNotFoundError: naming every path or glob that does not exist / matches nothing.
      ValueError: when the spec resolves to no files at all.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[Path] = []
    missing: list[str] = []
    for item in items:
        text = os.fspath(item)
        if _GLOB_CHARS & set(text) and not os.path.exists(text):
            matches = sorted(globlib.glob(text, recursive=True))
            if not matches:
                missing.append(text)
            files += [Path(m) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(text):
            files += sorted(p for p in Path(text).iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)
        elif os.path.isfile(text):
            files.append(Path(text))
        else:
            missing.append(text)
    if missing:
        raise FileNotFoundError(f"data source(s) not found: {', '.join(missing)}")
    unique = list(dict.fromkeys(files))  # keep first occurrence, preserve order
    if not unique:
        raise ValueError(f"data source spec {spec!r} matched no {'/'.join(SOURCE_SUFFIXES)} files")
    return unique


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """One document per record: jsonl records, parquet rows, or a whole plain-text file (see module rules)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path)
    else:
        yield _read_utf8(path)


def read_text(path: str | os.PathLike) -> str:
    """The text of one file: jsonl documents joined by ``"\\n\\n"`` (parquet likewise), other files read whole."""
    path = Path(path)
    if path.suffix in (".jsonl", ".parquet"):
        return "\n\n".join(read_documents(path))
    return _read_utf8(path)


def iter_source_documents(spec) -> Iterator[str]:
    """Documents of every file of ``expand_sources(spec)``, in order."""
    for path in expand_sources(spec):
        yield from read_documents(path)


def _decode_utf8(raw: bytes, where: str, file_offset: int = 0) -> str:
    """``raw`` as UTF-8, or a ValueError naming ``where`` and the first bad byte's offset in the file (Python's own
    UnicodeDecodeError names neither the file nor the line, so a stray binary file was hard to find)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {file_offset + e.start})") \
            from None


def _read_utf8(path: Path) -> str:
    # The newline translation Path.read_text did (universal newlines), so a CRLF file keeps giving the same text.
    return _decode_utf8(path.read_bytes(), str(path)).replace("\r\n", "\n").replace("\r", "\n")


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each non-blank line of a JSON Lines file, ``where`` being ``"FILE:LINE"``; a line
    that is not UTF-8 or not JSON is a ValueError naming the file and line."""
    # Binary lines: JSON Lines separates records by b"\n" only, and decoding per line lets an encoding error name
    # its line.
    path = Path(path)
    offset = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, f"{path}:{line_no}", offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            yield f"{path}:{line_no}", record


def _jsonl_documents(path: Path) -> Iterator[str]:
    for where, record in jsonl_records(path):
        yield _record_text(record, where)


def _record_text(record: Any, where: str) -> str:
    """The document of a jsonl record: its ``text`` field, else its only string value."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        return record["text"]
    strings = [v for v in record.values() if isinstance(v, str)]
    if len(strings) != 1:
        raise ValueError(
            f"{where}: record has no 'text' key and {len(strings)} string values (need exactly one); "
            f"keys: {sorted(record)}")
    return strings[0]


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pat
    except ImportError as e:  # optional dependency: pip install minitron_jax[parquet]
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if "text" in schema.names:
        column = "text"
    else:
        strings = [f.name for f in schema if pat.is_string(f.type) or pat.is_large_string(f.type)]
        if len(strings) != 1:
            raise ValueError(f"{path}: no 'text' column and {len(strings)} string columns (need exactly one)")
        column = strings[0]
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                raise ValueError(f"{path}: null in column {column!r}")
            yield value


# ==================================================================================================================
# Tokenizer adapter: a transformers tokenizer or a bare `tokenizers.Tokenizer`
# ==================================================================================================================
def _is_bare_tokenizer(tokenizer) -> bool:
    import tokenizers

    return isinstance(tokenizer, tokenizers.Tokenizer)


def encode(tokenizer, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of one text (transformers tokenizers called as ``tokenizer(text, add_special_tokens=...)``)."""
    if _is_bare_tokenizer(tokenizer):
        return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    # verbose=False: long texts legitimately exceed model_max_length here; we cut them into windows ourselves.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def encode_batch(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Batched ``encode`` (the Rust backends tokenize a batch on all cores)."""
    if _is_bare_tokenizer(tokenizer):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


_COMMON_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


def eos_token_id(tokenizer, eos_id: int | None = None) -> int:
    """The document separator: ``eos_id`` if given, else the tokenizer's EOS (a bare ``tokenizers.Tokenizer``
    has no declared EOS, so a few common EOS spellings are looked up in its vocabulary)."""
    if eos_id is not None:
        return int(eos_id)
    if _is_bare_tokenizer(tokenizer):
        for token in _COMMON_EOS:
            tid = tokenizer.token_to_id(token)
            if tid is not None:
                return tid
    elif getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has no EOS token; pass eos_id explicitly")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes when tokenization would: vocab size, the backend json, EOS and a probe encoding (the
    probe captures BOS conventions that transformers keeps outside the backend json)."""
    if _is_bare_tokenizer(tokenizer):
        backend, vocab_size = tokenizer.to_str(), tokenizer.get_vocab_size()
    else:
        backend_tok = getattr(tokenizer, "backend_tokenizer", None)
        backend = backend_tok.to_str() if backend_tok is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        vocab_size = len(tokenizer)
    try:
        eos = eos_token_id(tokenizer)
    except ValueError:
        eos = None
    probe = encode(tokenizer, "Fingerprint probe: 123 ünïcode.", add_special_tokens=True)
    payload = json.dumps({"vocab_size": vocab_size, "backend_sha256": hashlib.sha256(backend.encode()).hexdigest(),
                          "eos": eos, "probe": probe})
    return hashlib.sha256(payload.encode()).hexdigest()


# ==================================================================================================================
# Windows for perplexity and calibration
# ==================================================================================================================
def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """``[n_windows, seq_len]`` int32: ``text`` tokenized once without special tokens, cut to its first
    ``max_tokens`` tokens, split into consecutive non-overlapping windows; the remainder is dropped.

    Raises ValueError when there are fewer than ``seq_len`` tokens (not even one window).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = np.asarray(encode(tokenizer, text, add_special_tokens=False), dtype=np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = len(ids) // seq_len
    if n_windows < 1:
        raise ValueError(f"text has {len(ids)} tokens (after max_tokens={max_tokens}), "
                         f"fewer than one window of seq_len={seq_len}")
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


# ==================================================================================================================
# Packing
# ==================================================================================================================
def document_token_ids(tokenizer, documents: Iterable[str], *, eos_id: int | None = None,
                       batch_size: int = 256) -> Iterator[np.ndarray]:
    """Each document as ``[BOS?] + ids + [EOS]`` (int32). BOS follows the tokenizer's default
    ``add_special_tokens=True`` behaviour; EOS is appended unless the tokenizer already ended with it."""
    eos = eos_token_id(tokenizer, eos_id)
    batch: list[str] = []

    def flush():
        for ids in encode_batch(tokenizer, batch, add_special_tokens=True):
            if not ids or ids[-1] != eos:
                ids = list(ids) + [eos]
            yield np.asarray(ids, dtype=np.int32)

    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def pack_rows(docs: Iterable[np.ndarray], seq_len: int, pad_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream token-id documents into full rows ``(tokens, segment_ids)`` of length ``seq_len``.

    Rows are filled completely; a document that does not fit in the rest of a row is split and continues at the
    start of the next row as a new segment. Only the last row is padded (``pad_id``, segment 0).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for next-token training, got {seq_len}")
    tokens = np.full(seq_len, pad_id, np.int32)
    segments = np.zeros(seq_len, np.int32)
    fill = n_segments = 0
    for doc in docs:
        offset = 0
        while offset < len(doc):
            take = min(seq_len - fill, len(doc) - offset)
            n_segments += 1
            tokens[fill:fill + take] = doc[offset:offset + take]
            segments[fill:fill + take] = n_segments
            fill += take
            offset += take
            if fill == seq_len:
                yield tokens.copy(), segments.copy()
                tokens[:] = pad_id
                segments[:] = 0
                fill = n_segments = 0
    if fill:
        yield tokens, segments


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Positions 0, 1, ... restarting at every segment change along the last axis (int32)."""
    seg = np.asarray(segment_ids)
    idx = np.broadcast_to(np.arange(seg.shape[-1], dtype=np.int32), seg.shape)
    starts = np.ones(seg.shape, bool)
    starts[..., 1:] = seg[..., 1:] != seg[..., :-1]
    start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
    return (idx - start_idx).astype(np.int32)


def loss_mask_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """``1`` at ``t`` when the target ``tokens[t+1]`` is in the same (non-padding) segment as ``tokens[t]``."""
    seg = np.asarray(segment_ids)
    mask = np.zeros(seg.shape, np.int32)
    mask[..., :-1] = (seg[..., :-1] != 0) & (seg[..., 1:] == seg[..., :-1])
    return mask


def next_token_targets(tokens: np.ndarray, fill: int = 0) -> np.ndarray:
    """Targets for next-token prediction: tokens shifted left by one; the last column is ``fill`` (masked out)."""
    tokens = np.asarray(tokens)
    targets = np.full_like(tokens, fill)
    targets[..., :-1] = tokens[..., 1:]
    return targets


def complete_rows(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the derived ``positions`` / ``loss_mask`` columns where missing and cast everything to int32."""
    out = {k: np.asarray(v, dtype=np.int32) for k, v in columns.items()}
    if "positions" not in out:
        out["positions"] = positions_from_segments(out["segment_ids"])
    if "loss_mask" not in out:
        out["loss_mask"] = loss_mask_from_segments(out["segment_ids"])
    return out


def pack_documents(tokenizer, documents: Iterable[str], seq_len: int, *,
                   eos_id: int | None = None) -> dict[str, np.ndarray]:
    """In-memory packing of ``documents``: ``{"tokens", "segment_ids", "positions", "loss_mask"}``, each
    ``[n_rows, seq_len]`` int32 (layout and loss convention in the module docstring)."""
    eos = eos_token_id(tokenizer, eos_id)
    rows = list(pack_rows(document_token_ids(tokenizer, documents, eos_id=eos), seq_len, pad_id=eos))
    if not rows:
        raise ValueError("no tokens to pack")
    tokens, segments = (np.stack(x) for x in zip(*rows))
    return complete_rows({"tokens": tokens, "segment_ids": segments})


# ==================================================================================================================
# Tokenized-shard cache
# ==================================================================================================================
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
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

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
        np.save(directory / f"{split}-tokens-{name}", tokens)
        np.save(directory / f"{split}-segment_ids-{name}", segments.astype(seg_dtype))
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


# ==================================================================================================================
# Dataset and the resumable iterator
# ==================================================================================================================
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 with good avalanche (wrapping arithmetic intended)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by the integers ``key`` only (no numpy RNG stream involved, so it
    is identical on every host and every numpy version)."""
    salt = np.zeros(1, np.uint64)
    for k in key:
        with np.errstate(over="ignore"):
            salt = _mix64(salt + np.uint64(k % 2**64))
    with np.errstate(over="ignore"):
        keys = _mix64(np.arange(n, dtype=np.uint64) + salt)  # distinct inputs → distinct keys (bijection)
    return np.argsort(keys, kind="stable")


class PackedDataset:
    """Random access to rows of equal-length columns (``tokens`` and ``segment_ids`` at least).

    Columns are arrays ``[n_rows, seq_len]`` or lists of such shards (e.g. memory-mapped cache shards). A
    dataset can be a view on a subset of rows (``split_rows``). ``rows(indices)`` returns complete int32 batches with
    ``positions`` and ``loss_mask`` derived from ``segment_ids`` where they are not stored.
    """

    def __init__(self, columns: Mapping[str, np.ndarray | Sequence[np.ndarray]], row_ids: np.ndarray | None = None):
        self._shards = {k: [v] if isinstance(v, np.ndarray) else list(v) for k, v in columns.items()}
        for required in ("tokens", "segment_ids"):
            if required not in self._shards:
                raise ValueError(f"a PackedDataset needs a {required!r} column; got {sorted(self._shards)}")
        sizes = {k: [len(s) for s in shards] for k, shards in self._shards.items()}
        if len({tuple(v) for v in sizes.values()}) != 1:
            raise ValueError(f"columns have different row/shard sizes: {sizes}")
        self._offsets = np.concatenate([[0], np.cumsum(sizes["tokens"])]).astype(np.int64)
        total = int(self._offsets[-1])
        self._row_ids = np.arange(total, dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
        self.seq_len = int(self._shards["tokens"][0].shape[1])

    @classmethod
    def from_cache(cls, cache: TokenCache, split: str = "train") -> PackedDataset:
        return cls(cache.columns(split))

    @classmethod
    def from_sources(cls, sources, tokenizer, seq_len: int, cache_dir, *, split: str = "train",
                     **cache_kwargs) -> PackedDataset:
        """Build (or reuse) the token cache of ``sources`` (``build_token_cache`` arguments) and open ``split``."""
        return cls.from_cache(build_token_cache(sources, tokenizer, seq_len, cache_dir, **cache_kwargs), split)

    def __len__(self) -> int:
        return len(self._row_ids)

    def rows(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The rows at dataset ``indices`` as complete int32 columns ``[len(indices), seq_len]``. An index of -1
        yields an empty padding row (segment 0, no loss) so partial final batches keep a static shape."""
        indices = np.asarray(indices, np.int64)
        real = indices >= 0
        global_rows = self._row_ids[indices[real]]
        batch = {}
        for name, shards in self._shards.items():
            out = np.zeros((len(indices),) + shards[0].shape[1:], np.int32)
            out[real] = self._gather(shards, global_rows)
            batch[name] = out
        return complete_rows(batch)

    def _gather(self, shards: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Read ``rows`` shard by shard in ascending order (sequential access on memory maps), then restore order."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_of = np.searchsorted(self._offsets, sorted_rows, side="right") - 1
        out = np.empty((len(rows),) + shards[0].shape[1:], np.int32)
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[order[sel]] = shards[s][sorted_rows[sel] - self._offsets[s]]
        return out

    def split_rows(self, validation: float | int, seed: int = 0) -> tuple[PackedDataset, PackedDataset]:
        """``(train, validation)`` views by *row*: ``validation`` is a fraction in [0, 1) or a number of rows; which
        rows go where is a seeded permutation (the same on every host).

        Honest only when every row is one whole document (chat SFT). Packed text rows continue each other's
        documents, so a row split would validate on passages trained on: hold documents out before packing
        instead (``build_token_cache(validation=...)``)."""
        n = len(self)
        if isinstance(validation, float):
            if not 0.0 <= validation < 1.0:
                raise ValueError(f"validation fraction must be in [0, 1), got {validation}")
            n_val = int(round(validation * n))
        else:
            n_val = int(validation)
        if not 0 <= n_val < n:
            raise ValueError(f"validation of {n_val} rows leaves no training rows out of {n}")
        perm = permutation(n, seed, 0x5EED5)  # distinct stream from the epoch shuffles
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        return (PackedDataset(self._shards, self._row_ids[train]),
                PackedDataset(self._shards, self._row_ids[val]))

    def batches(self, batch_size: int, **kwargs) -> BatchIterator:
        """A ``BatchIterator`` over this dataset (see its arguments)."""
        return BatchIterator(self, batch_size, **kwargs)


class BatchIterator:
    """Deterministic, resumable iterator of global batches, each process yielding its own slice.

    Args:
      dataset: a ``PackedDataset``.
      batch_size: global batch size B (rows), divisible by ``process_count``.
      seed: shuffling seed; epoch ``e`` visits rows in ``permutation(n, seed, e)``.
      shuffle: False visits rows in order every epoch (evaluation).
      drop_remainder: True drops the last ``n % B`` rows of each epoch (different rows every epoch when
        shuffling); False pads the final batch with empty rows (no loss) so shapes stay static.
      num_epochs: stop after this many epochs; None iterates forever.
      process_index, process_count: this host's slice ``[p*B/P, (p+1)*B/P)`` of every global batch
        (e.g. ``jax.process_index()``, ``jax.process_count()``).
      state: a ``get_state()`` dict to resume from.

    The state ``{"epoch", "index", "seed", "batch_size", "num_rows"}`` points at the *next* batch; ``index`` is the
    batch number within the epoch. After the last batch of an epoch it reads ``{"epoch": e + 1, "index": 0}``.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, state: Mapping[str, int] | None = None):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be positive and divisible by process_count "
                             f"{process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        n = len(dataset)
        self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"dataset of {n} rows cannot fill one batch of {batch_size}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.num_epochs = num_epochs
        self.local_batch_size = batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.epoch, self.index = int(seed), 0, 0
        self._perm_epoch, self._perm = None, None
        if state is not None:
            self.set_state(state)

    # -- state ----------------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "num_rows": len(self.dataset)}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Resume at ``state``. Refuses a state from a different batch size or dataset size, which would silently
        replay different data; the process layout may differ (the state is global)."""
        for key, mine in (("batch_size", self.batch_size), ("num_rows", len(self.dataset))):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"iterator state has {key}={state[key]} but this iterator has {mine}")
        if not 0 <= int(state["index"]) < self.steps_per_epoch:
            raise ValueError(f"state index {state['index']} out of range [0, {self.steps_per_epoch})")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])

    # -- iteration ------------------------------------------------------------------------------------------------
    def global_indices(self, epoch: int, index: int) -> np.ndarray:
        """Dataset row indices of global batch ``index`` of ``epoch`` (-1 marks padding rows)."""
        order = self._epoch_order(epoch)
        chunk = order[index * self.batch_size:(index + 1) * self.batch_size]
        return np.concatenate([chunk, np.full(self.batch_size - len(chunk), -1, np.int64)])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != (self.seed, epoch):
            n = len(self.dataset)
            self._perm = permutation(n, self.seed, epoch) if self.shuffle else np.arange(n, dtype=np.int64)
            self._perm_epoch = (self.seed, epoch)
        return self._perm

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        lo = self.process_index * self.local_batch_size
        local = self.global_indices(self.epoch, self.index)[lo:lo + self.local_batch_size]
        batch = self.dataset.rows(local)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch


# ==================================================================================================================
# Chat SFT
# ==================================================================================================================
def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def assistant_spans(tokenizer, messages: list[dict], **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of each assistant turn's content plus
    its end-of-turn marker (what the model must generate; trailing whitespace excluded).

    Found by rendering prefixes: the turn of message ``i`` is what ``render(messages[:i+1])`` adds to
    ``render(messages[:i])``; its content starts after the generation prompt (``render(messages[:i],
    add_generation_prompt=True)``) at the first occurrence of the (stripped) content. Templates that re-render
    earlier turns differently (not prefix-stable) are refused with a ValueError.
    """
    full = _render(tokenizer, messages, **template_kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], **template_kwargs)
        upto = _render(tokenizer, messages[:i + 1], **template_kwargs)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError(f"chat template is not prefix-stable at message {i}; cannot locate assistant tokens")
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, **template_kwargs)
        lo = len(prompt) if i and upto.startswith(prompt) else len(before)
        content = message.get("content")
        found = upto.find(content.strip(), lo) if isinstance(content, str) and content.strip() else -1
        start = found if found >= 0 else lo
        end = len(upto.rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def assistant_token_mask(tokenizer, messages: list[dict], **template_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``: the conversation's token ids (chat template, no extra special tokens) and 1 on every
    token whose first character lies in an assistant span (``assistant_spans``)."""
    text, spans = assistant_spans(tokenizer, messages, **template_kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), np.int32)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return ids, mask


def sft_examples(tokenizer, records: Iterable[Mapping], seq_len: int, *, drop_empty: bool = True,
                 **template_kwargs) -> dict[str, np.ndarray]:
    """Chat records ``{"messages": [{"role", "content"}, ...]}`` → rows ``[n, seq_len]`` in the packed layout.

    One conversation per row, truncated to ``seq_len`` tokens and padded after (pad token, else EOS; segment 0).
    ``loss_mask`` follows the packed convention — position ``t`` predicts ``tokens[t+1]`` — and is 1 exactly when
    that target is an assistant token (``assistant_token_mask``), so only assistant content (and its end-of-turn
    marker) is learned. ``drop_empty`` skips rows left with no loss (e.g. truncated before the first answer).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)
    rows = {k: [] for k in ("tokens", "segment_ids", "loss_mask")}
    n_truncated = n_dropped = 0
    for record in records:
        ids, amask = assistant_token_mask(tokenizer, list(record["messages"]), **template_kwargs)
        n_truncated += len(ids) > seq_len
        ids, amask = ids[:seq_len], amask[:seq_len]
        n = len(ids)
        loss = np.zeros(seq_len, np.int32)
        loss[:n - 1] = amask[1:n]
        if drop_empty and not loss.any():
            n_dropped += 1
            continue
        rows["tokens"].append(np.concatenate([ids, np.full(seq_len - n, pad, np.int32)]))
        rows["segment_ids"].append((np.arange(seq_len) < n).astype(np.int32))
        rows["loss_mask"].append(loss)
    if n_truncated or n_dropped:
        logger.info("sft: %d conversations truncated to %d tokens, %d dropped with no assistant tokens left",
                    n_truncated, seq_len, n_dropped)
    if not rows["tokens"]:
        raise ValueError("no SFT examples with assistant tokens")
    return complete_rows({k: np.stack(v) for k, v in rows.items()})
