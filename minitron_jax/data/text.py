"""Text sources, the text rules every tool shares, and the tokenizer adapter.

Every tool reads text through these functions, so calibration, evaluation and distillation all see the same bytes
and the same tokens.

**Text rules** (a contract shared by every tool; see ``read_text``/``read_documents``):

- ``.jsonl``: one document per record. A record is a JSON object; its document is its ``text`` field, or, when it
  has no ``text`` key, its only string value. Anything else is a ``ValueError`` naming the file and line. Blank
  lines are skipped. ``read_text`` joins the documents with ``"\\n\\n"``.
- ``.parquet``: one document per row, from the ``text`` column (or the only string column).
- Any other file: plain UTF-8 text, read whole, one document. Text that is not UTF-8 is a ``ValueError`` naming
  the file (and jsonl line) and the offset of the first bad byte.

**Tokenizer adapter**: ``encode``/``encode_batch``/``eos_token_id``/``tokenizer_fingerprint`` accept a transformers
tokenizer or a bare ``tokenizers.Tokenizer`` alike.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SOURCE_SUFFIXES = (".txt", ".jsonl", ".parquet")
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
