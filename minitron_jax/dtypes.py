"""Dtype names, in one place: what a config key or a command flag means by ``float32``, ``bfloat16``, ``float16``.

``STORAGE_DTYPES`` are the dtypes params can be held and written in (trainer params and teacher, exports,
``convert --dtype``); ``COMPUTE_DTYPES`` the ones the forward-only passes (perplexity, MMLU, importance, NAS) compute
in. :data:`DTYPES` maps each name to its NumPy dtype (``bfloat16`` from ml_dtypes, the type JAX uses).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                               "float16": np.dtype(np.float16)}
STORAGE_DTYPES: tuple[str, ...] = tuple(DTYPES)
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (a ValueError naming the known ones otherwise)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def itemsize(name: str) -> int:
    """Bytes per element of a dtype name."""
    return dtype(name).itemsize
