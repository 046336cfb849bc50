"""Random access to packed rows and the deterministic, resumable, multi-host batch iterator.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from minitron_jax.data.cache import TokenCache
from minitron_jax.data.packing import complete_rows

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

