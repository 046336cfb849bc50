"""Perplexity, the contract other tools compare with (the command is :mod:`minitron_jax.cli.eval`).

Semantics (keep them exactly): a ``.jsonl`` file is the ``text`` field of each record (or the only string value),
records joined by "\\n\\n"; plain text is read whole; it is tokenized once with the model's tokenizer without
special tokens, cut to the first M tokens, split into consecutive non-overlapping windows of N tokens (remainder
dropped); perplexity is exp of the mean NLL of every next-token prediction in every window (N − 1 per window).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.arch import AnyConfig, hidden_states, lm_head
from minitron_jax.dtypes import COMPUTE_DTYPES
from minitron_jax.exitcodes import NonFiniteError
from minitron_jax.model import Params

DTYPES = {name: getattr(jnp, name) for name in COMPUTE_DTYPES}  # name → JAX type (minitron_jax.dtypes)


def token_logprobs(config: AnyConfig, params: Params, hidden: jax.Array, targets: jax.Array,
                   chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """Per-token ``log p(target)`` [N] (float32) and ``argmax == target`` [N] from final hidden states [N, D],
    computing logits one chunk of tokens at a time so [N × V] float32 logits never exist at once."""
    n = hidden.shape[0]
    chunk = min(chunk, n)
    pad = (-n) % chunk
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, hidden.shape[-1])
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    head = lm_head(config, params)

    def one(args):
        hc, tc = args
        logits = jnp.einsum("nd,dv->nv", hc, head.astype(hc.dtype), preferred_element_type=jnp.float32)
        target = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tc

    lp, greedy = jax.lax.map(one, (h, t))
    return lp.reshape(-1)[:n], greedy.reshape(-1)[:n]


def token_nll(config: AnyConfig, params: Params, hidden: jax.Array, targets: jax.Array,
              chunk: int = 512) -> jax.Array:
    """Per-token next-token NLL [N] from final hidden states [N, D] (chunked, see `token_logprobs`)."""
    return -token_logprobs(config, params, hidden, targets, chunk)[0]


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def batch_nll(config: AnyConfig, params: Params, tokens: jax.Array, weights: jax.Array,
               layer_keep: jax.Array | None, dtype=jnp.float32):
    """Sum of next-token NLL over a [B, T] batch; ``weights`` [B] zeroes padding rows."""
    h, _, _ = hidden_states(config, params, tokens, dtype=dtype, layer_keep=layer_keep)
    B, T, D = h.shape
    nll = token_nll(config, params, h[:, :-1].reshape(-1, D), tokens[:, 1:].reshape(-1)).reshape(B, T - 1)
    return jnp.sum(nll * weights[:, None]), jnp.sum(weights) * (T - 1)


def padded_batches(windows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(tokens [batch_size, T] int32, weights [batch_size] float32, windows done so far)`` over windows [N, T].

    Every batch has the same shape, so one compiled function serves them all: the last one is padded with
    all-zero rows whose weight is 0 (callers multiply per-row results by the weights)."""
    windows = np.asarray(windows, np.int32)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[: len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), windows.shape[1]), np.int32)])
        yield chunk, weights, start + int(weights.sum())


def nll_sum(config: AnyConfig, params: Params, windows: np.ndarray, *, batch_size: int = 8,
            dtype=jnp.float32, layer_keep=None, progress=None) -> tuple[float, int]:
    """(total NLL, predicted tokens) over windows [N, T]; one compiled shape (the last batch is padded)."""
    total, count = 0.0, 0
    for chunk, weights, done in padded_batches(windows, batch_size):
        s, c = batch_nll(config, params, chunk, weights, layer_keep, dtype=dtype)
        total += float(s)
        count += int(c)
        if progress:
            progress(done)
    return total, count


def perplexity(config: AnyConfig, params: Params, windows: np.ndarray, **kwargs) -> float:
    total, count = nll_sum(config, params, windows, **kwargs)
    return math.exp(total / count)


def text_perplexity(model: str | Path, text: str | Path, seq_len: int, *, max_tokens: int | None = None,
                    batch_size: int = 8, dtype: str = "float32") -> dict[str, Any]:
    """Perplexity of a model (any path ``convert.load_model`` reads) on a text file, by the contract above.

    Returns ``{"perplexity", "nll" (mean per prediction), "predicted" (windows × (N − 1)), "tokens" (windows × N),
    "windows", "seconds" (scoring only)}``. Raises ValueError for a model without a tokenizer or a text too short
    for one window (naming the text), NonFiniteError when the perplexity is NaN or infinite."""
    from minitron_jax.convert import load_model
    from minitron_jax.data import read_text, token_windows

    text_str = read_text(text)
    m = load_model(model)
    if m.tokenizer is None:
        raise ValueError(f"{model} carries no tokenizer; perplexity needs one")
    try:
        windows = token_windows(m.tokenizer, text_str, seq_len, max_tokens)
    except ValueError as e:  # "text has 0 tokens ...": say which text
        raise ValueError(f"{text}: {e}") from None
    t0 = time.perf_counter()
    total, count = nll_sum(m.config, m.params, windows, batch_size=batch_size, dtype=DTYPES[dtype])
    nll = total / count
    try:
        ppl = math.exp(nll)
    except OverflowError:  # a finite NLL above ~709 nats
        ppl = math.inf
    if not math.isfinite(ppl):  # a number nobody can use, and not JSON
        raise NonFiniteError(f"perplexity of {model} on {text} is not finite (mean NLL {nll}): the model "
                             "produces NaN/inf logits or is wildly wrong; check its weights")
    return {"perplexity": ppl, "nll": nll, "predicted": count, "tokens": int(windows.size),
            "windows": int(len(windows)), "seconds": time.perf_counter() - t0}
