"""Held-out chat evaluation: the assistant-token NLL (the SFT loss) and exact match of greedy answers.

- **NLL**: each record rendered with the chat template and masked exactly as SFT trains it
  (:func:`minitron_jax.data.sft.sft_examples` with the same ``seq_len``: same tokens, same truncation, same
  ``loss_mask``); the mean NLL per assistant token over all records (a token-weighted mean, like the training
  loss), and per record.
- **Exact match** (records that carry ``ideal``): the prompt (the messages before the answer) rendered with
  ``add_generation_prompt=True``, ``max_new_tokens`` greedy tokens (stopping at the model's end-of-turn/EOS),
  decoded without special tokens and compared with every acceptable answer after
  :func:`minitron_jax.data.chat.normalize_answer` (strip, case-fold, trailing punctuation dropped).

Batched for speed on a CPU: NLL rows are cut to the longest conversation (rounded up to a bucket, so models
evaluated on the same records compile one shape), and prompts are generated in batches sorted by length, so a
batch's left padding is small and few (batch, prompt-length bucket) programs are compiled.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.arch import AnyConfig, hidden_states
from minitron_jax.data.chat import ChatRecord, normalize_answer
from minitron_jax.data.sft import sft_examples
from minitron_jax.evaluate.perplexity import token_logprobs
from minitron_jax.generate import bucket_length, generate
from minitron_jax.model import Params

__all__ = ["chat_eval", "assistant_nll", "exact_match", "row_nll"]


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def row_nll(config: AnyConfig, params: Params, rows: dict[str, jax.Array], dtype=jnp.float32):
    """Per row: (Σ NLL over the loss-masked targets, Σ loss_mask) of packed-layout rows [B, T]."""
    tokens = rows["tokens"]
    h, _, _ = hidden_states(config, params, tokens, positions=rows["positions"], segment_ids=rows["segment_ids"],
                            dtype=dtype)
    B, T, D = h.shape
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((B, 1), tokens.dtype)], axis=1)  # t predicts t+1
    lp, _ = token_logprobs(config, params, h.reshape(-1, D), targets.reshape(-1))
    w = rows["loss_mask"].astype(jnp.float32)
    return -jnp.sum(lp.reshape(B, T) * w, axis=1), jnp.sum(w, axis=1)


def assistant_nll(config: AnyConfig, params: Params, tokenizer, records: Sequence[ChatRecord], *, seq_len: int,
                  batch_size: int = 8, dtype=jnp.float32, progress: Callable[[int], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, assistant-token count) per record, with SFT's rows and masks (``seq_len`` as in training)."""
    rows = sft_examples(tokenizer, records, seq_len, drop_empty=False)
    used = int(rows["segment_ids"].astype(bool).sum(axis=1).max())
    width = min(seq_len, bucket_length(used))  # only padding columns are cut: the masks are SFT's
    rows = {k: np.asarray(v[:, :width]) for k, v in rows.items()}
    n = len(records)
    sums, counts = np.zeros(n), np.zeros(n)
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        real = len(batch["tokens"])
        if real < batch_size:  # one compiled shape: pad with rows whose loss_mask is 0
            batch = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        s, c = row_nll(config, params, batch, dtype=dtype)
        sums[start:start + real], counts[start:start + real] = np.asarray(s)[:real], np.asarray(c)[:real]
        if progress:
            progress(start + real)
    return sums, counts


def _prompt_ids(tokenizer, record: ChatRecord) -> list[int]:
    text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def exact_match(config: AnyConfig, params: Params, tokenizer, records: Sequence[ChatRecord], *,
                eos_token_id: int | Sequence[int] | None, max_new_tokens: int = 8, batch_size: int = 8,
                dtype=jnp.float32, progress: Callable[[int], None] | None = None) -> list[str]:
    """The greedy answer (decoded text, special tokens dropped) to each record's prompt."""
    prompts = [_prompt_ids(tokenizer, r) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        # A short last batch is padded with copies of its first prompt: the batch size is part of the compiled
        # shape, and greedy decoding of a row does not depend on the other rows.
        batch = [prompts[i] for i in idx] + [prompts[idx[0]]] * (batch_size - len(idx))
        new = generate(config, params, batch, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                       dtype=dtype)
        for i, toks in zip(idx, new):
            answers[i] = tokenizer.decode(toks, skip_special_tokens=True)
        if progress:
            progress(start + len(idx))
    return answers


def chat_eval(config: AnyConfig, params: Params, tokenizer, records: Sequence[ChatRecord], *, seq_len: int,
              eos_token_id: int | Sequence[int] | None, batch_size: int = 8, max_new_tokens: int = 8,
              dtype=jnp.float32, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Assistant-token NLL and exact match on held-out chat records (module docstring); a JSON-able dict.

    ``nll`` is the token-weighted mean NLL per assistant token; ``exact_match`` the share of records with an
    ``ideal`` whose greedy answer matches one (None when no record has one); ``per_record`` the details."""
    if not records:
        raise ValueError("chat evaluation needs at least one record")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat evaluation needs a tokenizer with a chat template")
    t0 = time.perf_counter()
    n = len(records)
    sums, counts = assistant_nll(config, params, tokenizer, records, seq_len=seq_len, batch_size=batch_size,
                                 dtype=dtype, progress=progress and (lambda d: progress("chat NLL", d, n)))
    nll_seconds = time.perf_counter() - t0
    scored = [r for r in records if r.ideal is not None]
    answers = exact_match(config, params, tokenizer, scored, eos_token_id=eos_token_id,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                          progress=progress and (lambda d: progress("chat exact match", d, len(scored))))
    answer_of = dict(zip(map(id, scored), answers))
    per_record, hits = [], 0
    for r, s, c in zip(records, sums, counts):
        row = {"source": r.source, "nll": float(s / c) if c else None, "tokens": int(c)}
        if r.ideal is not None:
            answer = answer_of[id(r)]
            ok = normalize_answer(answer) in {normalize_answer(x) for x in r.ideal}
            hits += ok
            row.update(answer=answer, ideal=list(r.ideal), match=bool(ok))
        per_record.append(row)
    tokens = float(counts.sum())
    return {"nll": float(sums.sum() / tokens) if tokens else None, "tokens": int(tokens), "records": n,
            "exact_match": hits / len(scored) if scored else None, "exact_n": len(scored), "exact_hits": hits,
            "max_new_tokens": max_new_tokens, "seq_len": seq_len, "per_record": per_record,
            "nll_seconds": nll_seconds, "seconds": time.perf_counter() - t0}
