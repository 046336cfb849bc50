"""Perplexity, the contract other tools compare with, and its CLI.

``python -m minitron_jax.eval --model PATH --text FILE --seq-len N [--max-tokens M] [--json]``

Semantics (keep them exactly): a ``.jsonl`` file is the ``text`` field of each record (or the only string value),
records joined by "\\n\\n"; plain text is read whole; it is tokenized once with the model's tokenizer without
special tokens, cut to the first M tokens, split into consecutive non-overlapping windows of N tokens (remainder
dropped); perplexity is exp of the mean NLL of every next-token prediction in every window (N − 1 per window).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.config import LlamaConfig
from minitron_jax.dtypes import COMPUTE_DTYPES
from minitron_jax.exitcodes import NonFiniteError, cli_exit
from minitron_jax.model import Params, hidden_states, lm_head

DTYPES = {name: getattr(jnp, name) for name in COMPUTE_DTYPES}  # name → JAX type (minitron_jax.dtypes)


def token_logprobs(config: LlamaConfig, params: Params, hidden: jax.Array, targets: jax.Array,
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


def token_nll(config: LlamaConfig, params: Params, hidden: jax.Array, targets: jax.Array,
              chunk: int = 512) -> jax.Array:
    """Per-token next-token NLL [N] from final hidden states [N, D] (chunked, see `token_logprobs`)."""
    return -token_logprobs(config, params, hidden, targets, chunk)[0]


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_nll(config: LlamaConfig, params: Params, tokens: jax.Array, weights: jax.Array,
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


def nll_sum(config: LlamaConfig, params: Params, windows: np.ndarray, *, batch_size: int = 8,
            dtype=jnp.float32, layer_keep=None, progress=None) -> tuple[float, int]:
    """(total NLL, predicted tokens) over windows [N, T]; one compiled shape (the last batch is padded)."""
    total, count = 0.0, 0
    for chunk, weights, done in padded_batches(windows, batch_size):
        s, c = _batch_nll(config, params, chunk, weights, layer_keep, dtype=dtype)
        total += float(s)
        count += int(c)
        if progress:
            progress(done)
    return total, count


def perplexity(config: LlamaConfig, params: Params, windows: np.ndarray, **kwargs) -> float:
    total, count = nll_sum(config, params, windows, **kwargs)
    return math.exp(total / count)


# ------------------------------------------------------------------------------------------------------------------
@cli_exit
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitron_jax.eval", description="Perplexity of a model on a text.")
    ap.add_argument("--model", required=True, help="HF directory, .gguf file or minitron_jax checkpoint")
    ap.add_argument("--text", required=True, help=".jsonl (text field per record) or plain text file")
    ap.add_argument("--seq-len", type=int, required=True, help="window length N (tokens)")
    ap.add_argument("--max-tokens", type=int, default=None, help="use only the first M tokens of the text")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    ap.add_argument("--json", action="store_true", help='print one line {"perplexity", "tokens", "windows"}')
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from minitron_jax.convert import load_model
    from minitron_jax.data import read_text, token_windows

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise ValueError(f"--max-tokens ({args.max_tokens}) is smaller than --seq-len ({args.seq_len})")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    text = read_text(args.text)
    m = load_model(args.model)
    if m.tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer; perplexity needs one")
    try:
        windows = token_windows(m.tokenizer, text, args.seq_len, args.max_tokens)
    except ValueError as e:  # "text has 0 tokens ...": say which text
        raise ValueError(f"{args.text}: {e}") from None
    t0 = time.perf_counter()
    total, count = nll_sum(m.config, m.params, windows, batch_size=args.batch_size, dtype=DTYPES[args.dtype])
    nll = total / count
    try:
        ppl = math.exp(nll)
    except OverflowError:  # a finite NLL above ~709 nats
        ppl = math.inf
    if not math.isfinite(ppl):  # a number nobody can use, and not JSON: exit 3 rather than print it
        raise NonFiniteError(f"perplexity of {args.model} on {args.text} is not finite (mean NLL {nll}): the model "
                             "produces NaN/inf logits or is wildly wrong; check its weights")
    if args.json:
        # "tokens" counts the tokens in the windows (windows × N); predictions are windows × (N − 1).
        print(json.dumps({"perplexity": ppl, "tokens": int(windows.size), "windows": int(len(windows))},
                         allow_nan=False))
    else:
        print(f"perplexity {ppl:.4f} over {count} predicted tokens in {len(windows)} windows of {args.seq_len} "
              f"({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
