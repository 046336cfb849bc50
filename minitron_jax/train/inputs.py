"""Training data of a run, through :mod:`minitron_jax.data`: datasets, the resumable iterator, global batches.

- ``distill`` / ``teacher_correction``: text sources are tokenized with the run's tokenizer and packed into
  ``data.seq_len`` rows with segment ids (cached on disk); ``data.val_rows`` worth of whole documents, chosen by
  ``data.split_seed``, are held out before packing and packed into their own validation rows.
- ``sft``: jsonl chat records (``{"messages": [...]}`` or ``{"input": ..., "ideal": ...}``, see
  :mod:`minitron_jax.data.chat`) → one conversation per row, loss on assistant tokens only.

Each process reads only its slice of every global batch (``BatchIterator(process_index=, process_count=)``); the
slices become one global ``jax.Array`` with ``jax.make_array_from_process_local_data``. The iterator state is
global, so a run can resume under a different process count.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

from minitron_jax import data
from minitron_jax.train.config import RunConfig, RunConfigError, resolve_path


def _sources(rc: RunConfig) -> list[str]:
    return [resolve_path(s) for s in rc.data.sources]


def _chat_records(files) -> Iterator[data.ChatRecord]:
    """The training conversations: every layout of :mod:`minitron_jax.data.chat`, less the records a file marks
    ``"split": "eval"`` (the embedded chat asset's held-out ones: never trained on, whatever the caller passes)."""
    for record in data.iter_chat_records(files):
        if record.split != "eval":
            yield record


def build_datasets(rc: RunConfig, tokenizer) -> tuple[data.PackedDataset, data.PackedDataset | None]:
    """(train, validation or None) datasets of the run.

    Packed text holds whole documents out before packing (``data.build_token_cache``), so validation never
    continues a passage trained on; an SFT row is one whole conversation, so there a row split is a document split.
    """
    try:
        if rc.mode == "sft":
            files = data.expand_sources(_sources(rc))
            dataset = data.PackedDataset(data.sft_examples(tokenizer, _chat_records(files), rc.data.seq_len))
        else:
            from minitron_jax.data.assets import cache_dir

            cache = data.build_token_cache(_sources(rc), tokenizer, rc.data.seq_len,
                                           rc.data.cache_dir or str(cache_dir() / "tokens"),
                                           validation=rc.data.val_rows, split_seed=rc.data.split_seed)
    except data.HoldoutError as e:
        raise RunConfigError(f"data.val_rows={rc.data.val_rows}: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise RunConfigError(f"data.sources: {e}") from None
    if rc.mode != "sft":
        train = data.PackedDataset.from_cache(cache)
        val = data.PackedDataset.from_cache(cache, "validation") if "validation" in cache.splits else None
    elif not rc.data.val_rows:
        train, val = dataset, None
    else:
        try:
            train, val = dataset.split_rows(rc.data.val_rows, seed=rc.data.split_seed)
        except ValueError as e:
            raise RunConfigError(f"data.val_rows: {e}") from None
    _check_usable(rc, train, val, n_rows=len(train) + (len(val) if val is not None else 0))
    return train, val


def _has_loss_tokens(dataset: data.PackedDataset, chunk: int = 256) -> bool:
    """Whether any row of ``dataset`` has a loss-bearing token. Stops at the first chunk of rows that has one, so
    real data costs one read of a few rows; only unusable data is read in full."""
    for start in range(0, len(dataset), chunk):
        if dataset.rows(np.arange(start, min(start + chunk, len(dataset))))["loss_mask"].any():
            return True
    return False


def _check_usable(rc: RunConfig, train: data.PackedDataset, val: data.PackedDataset | None, n_rows: int) -> None:
    """Refuse data that would train on nothing. Without it an empty text gives loss 0 and gradient 0 at every
    step: the run only decays the weights and reports success."""
    sources = ", ".join(rc.data.sources)
    if len(train) == 0:
        raise RunConfigError(f"data.sources ({sources}): no training rows")
    if not _has_loss_tokens(train):
        what = ("no conversation has an assistant token" if rc.mode == "sft"
                else "every document is empty or a single token")
        raise RunConfigError(f"data.sources ({sources}): the {len(train)} training rows hold no token to predict "
                             f"({what}): nothing to learn")
    if rc.data.val_rows and (val is None or len(val) == 0):
        raise RunConfigError(f"data.val_rows={rc.data.val_rows} asks for validation but selects 0 of the {n_rows} "
                             "packed rows: give a row count (e.g. data.val_rows=8), or data.val_rows=0 for none")
    if val is not None and not _has_loss_tokens(val):
        raise RunConfigError(f"data.sources ({sources}): the {len(val)} validation rows (data.val_rows="
                             f"{rc.data.val_rows}) hold no token to predict; validation would report 0")


def train_iterator(rc: RunConfig, dataset: data.PackedDataset, state: dict | None = None) -> data.BatchIterator:
    try:
        return dataset.batches(rc.data.batch_size, seed=rc.data.seed, shuffle=True, drop_remainder=True,
                               process_index=jax.process_index(), process_count=jax.process_count(), state=state)
    except ValueError as e:
        raise RunConfigError(f"data: {e} (the training split has {len(dataset)} rows of {rc.data.seq_len} tokens)") \
            from None


def validation_batches(rc: RunConfig, dataset: data.PackedDataset | None) -> list[dict[str, np.ndarray]]:
    """This process's slices of the first ``data.val_batches`` validation batches (fixed order, padded)."""
    if dataset is None:
        return []
    it = dataset.batches(rc.data.batch_size, shuffle=False, drop_remainder=False, num_epochs=1,
                         process_index=jax.process_index(), process_count=jax.process_count())
    limit = it.steps_per_epoch if rc.data.val_batches is None else min(rc.data.val_batches, it.steps_per_epoch)
    return [next(it) for _ in range(limit)]


def to_global(local: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding],
              global_rows: int) -> dict[str, jax.Array]:
    """This process's rows → global arrays of ``global_rows`` rows placed by ``shardings``."""
    out = {}
    for name, sharding in shardings.items():
        x = local[name]
        out[name] = jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])
    return out


class Prefetcher:
    """Reads the next batches on a background thread while the device computes.

    Yields ``(local_batch, iterator_state_after_it)``: the state to checkpoint once that batch has been trained
    on, so a prefetched-but-unused batch is never skipped on resume."""

    def __init__(self, iterator: data.BatchIterator, depth: int = 2):
        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="minitron-data")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            while self._put((next(self._iterator), self._iterator.get_state())):
                pass
        except BaseException as e:  # handed to the consumer (StopIteration included)
            self._put(e)

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
