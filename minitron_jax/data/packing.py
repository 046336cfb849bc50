"""Token rows: windows for perplexity and calibration, and packing of documents for distillation.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from minitron_jax.data.text import encode, encode_batch, eos_token_id


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
