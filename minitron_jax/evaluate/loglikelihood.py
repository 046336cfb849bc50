"""Log-likelihoods and generations by lm-evaluation-harness's rules, without lm-eval: the math under
:mod:`minitron_jax.evaluate.lm_eval_adapter` (the lm-eval model).

Pure functions usable without lm-eval, on a ``LoadedModel`` (``config``, ``params``, ``tokenizer``):

- ``loglikelihoods(model, [(context, continuation), ...]) -> [(logprob, is_greedy), ...]``: lm-eval's
  ``loglikelihood`` contract and tokenization (``TemplateLM``): trailing spaces of the context move to the
  continuation; the continuation's tokens are those of ``tok(context + continuation)`` after the first
  ``len(tok(context))``; an empty context becomes ``[prefix_token_id]``. The input is ``(context + continuation)
  [:-1]`` left-truncated to ``max_length`` tokens; ``logprob`` is the sum of the continuation tokens' log-probs and
  ``is_greedy`` says whether each of them is the argmax of its position.
- ``loglikelihood_tokens(config, params, [(context_ids, continuation_ids)])``: the same on token ids.
- ``rolling_loglikelihood(model, text, seq_len, rule=...)``: the log-likelihood of a whole text, two window rules:

  ``rule="eval"`` (default) is exactly ``minitron_jax.evaluate.perplexity``'s perplexity contract: tokenize without
  special tokens, consecutive non-overlapping windows of ``seq_len`` tokens, remainder dropped, ``seq_len - 1``
  predictions per window (the first token of each window is context only). ``-rolling_loglikelihood(...)`` equals
  ``perplexity.nll_sum`` on ``data.token_windows(...)``.

  ``rule="lm_eval"`` is lm-eval's ``loglikelihood_rolling``, which scores *every* token once: the text is tokenized
  with the tokenizer's default special tokens, ``prefix_token_id`` is put in front, and the windows are eval-style
  windows of ``seq_len + 1`` tokens over ``[prefix] + ids`` that overlap by one token (the last token of one window
  is the first, context-only, token of the next); the final, shorter window is extended to the left to a full
  ``seq_len`` inputs of context and scores only its new tokens (``rolling_windows``; ≡ lm-eval's
  ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``). The adapter's ``loglikelihood_rolling``
  uses this rule with ``seq_len = max_length`` so its numbers are comparable with lm-eval's other models.
- ``generate_until(model, [(context, gen_kwargs), ...]) -> [str, ...]``: ``minitron_jax.generate`` (KV-cached,
  greedy unless ``do_sample``/``temperature``), prompts left-truncated to ``max_length - max_gen_toks``. Decoding
  stops early only at EOS; the ``until`` strings (plus the EOS text, as lm-eval's HF model does) are applied to the
  decoded text afterwards, so a request costs up to ``max_gen_toks`` decode steps even when a stop string appears
  early.

Scoring batches (``loglikelihood_tokens``): requests are sorted longest first and cut into batches of
``batch_size`` rows (the last one filled with dummy rows); each batch is right-padded to a bucketed length
(``mmlu.bucket_length``) and only the last ``C`` positions of each row go through the lm_head, ``C`` the bucketed
longest continuation of the batch, so multiple-choice requests with long contexts pay for a handful of
vocabulary projections per row, not one per context token.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.arch import AnyConfig, hidden_states
from minitron_jax.evaluate.mmlu import bucket_length
from minitron_jax.evaluate.perplexity import token_logprobs
from minitron_jax.model import Params

RULES = ("eval", "lm_eval")
DEFAULT_MAX_GEN_TOKS = 256


# ------------------------------------------------------------------------------------------------------------------
# Tokenization (lm-eval's TemplateLM rules)
# ------------------------------------------------------------------------------------------------------------------
def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids; ``add_special_tokens=None`` follows the tokenizer's default (as lm-eval's HF model does)."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return list(tokenizer(text, verbose=False, **kwargs)["input_ids"])


def prefix_token(tokenizer, prefix_token_id: int | None = None) -> int:
    """The token that conditions an empty context: ``prefix_token_id``, else BOS, else EOS."""
    if prefix_token_id is not None:
        return int(prefix_token_id)
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither BOS nor EOS; pass prefix_token_id")


def encode_pair(tokenizer, context: str, continuation: str, *, add_special_tokens: bool | None = None,
                prefix_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` by lm-eval's rules (see the module docstring)."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token(tokenizer, prefix_token_id)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_special_tokens)
    ctx = tok_encode(tokenizer, context, add_special_tokens)
    return ctx, whole[len(ctx):]


def rolling_windows(ids: Sequence[int], seq_len: int, prefix: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows as ``(context_ids, continuation_ids)`` pairs: every token of ``ids`` is a
    continuation token exactly once, each pair's ``context + continuation`` minus its last token is at most
    ``seq_len`` inputs (rule in the module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = list(ids)
    if not ids:
        return []
    first = min(seq_len, len(ids))
    out = [([prefix], ids[:first])]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, seq_len)
        end = done + n
        window = ids[max(end - seq_len - 1, 0): end]  # seq_len inputs + the last target
        out.append((window[: len(window) - n], window[len(window) - n:]))
        done = end
    return out


# ------------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "dtype", "n_scored"))
def _score_batch(config: AnyConfig, params: Params, tokens: jax.Array, targets: jax.Array, lengths: jax.Array,
                 cont_lengths: jax.Array, *, n_scored: int, dtype=jnp.float32):
    """Right-padded inputs/targets [B, T], real lengths [B], continuation lengths [B] → (sum of continuation
    log-probs [B], all-greedy [B]). Only the last ``n_scored`` positions of each row reach the lm_head."""
    h, _, _ = hidden_states(config, params, tokens, dtype=dtype)
    B, T, D = h.shape
    offs = jnp.arange(n_scored)[None, :]
    pos = lengths[:, None] - n_scored + offs  # [B, C]: positions of the last C inputs of each row
    scored = offs >= (n_scored - cont_lengths[:, None])
    pos = jnp.clip(pos, 0, T - 1)
    h_sel = jnp.take_along_axis(h, pos[:, :, None], axis=1)
    t_sel = jnp.take_along_axis(targets, pos, axis=1)
    lp, greedy = token_logprobs(config, params, h_sel.reshape(-1, D), t_sel.reshape(-1))
    lp, greedy = lp.reshape(B, n_scored), greedy.reshape(B, n_scored)
    return jnp.sum(jnp.where(scored, lp, 0.0), axis=1), jnp.all(greedy | ~scored, axis=1)


def loglikelihood_tokens(config: AnyConfig, params: Params, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                         *, max_length: int | None = None, batch_size: int = 8, dtype=jnp.float32,
                         progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` per ``(context_ids, continuation_ids)`` request."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = config.max_position_embeddings if max_length is None else int(max_length)
    params = jax.tree.map(jnp.asarray, params)
    inputs, conts = [], []
    for ctx, cont in requests:
        ctx, cont = list(ctx), list(cont)
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")
        if cont and not ctx:
            raise ValueError("a continuation needs at least one context token (e.g. BOS); see encode_pair")
        whole = (ctx + cont)[-(max_length + 1):]
        inputs.append(whole)
        conts.append(len(cont))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(inputs)
    todo = [i for i in range(len(inputs)) if conts[i] > 0]
    todo.sort(key=lambda i: -len(inputs[i]))  # longest first, as lm-eval does
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        T = min(bucket_length(max(len(inputs[i]) - 1 for i in idx)), max(max_length, 16))
        C = min(bucket_length(max(conts[i] for i in idx), 16), T) if max(conts[i] for i in idx) > 1 else 1
        tokens = np.zeros((batch_size, T), np.int32)
        targets = np.zeros((batch_size, T), np.int32)
        lengths = np.ones(batch_size, np.int32)
        cont_lengths = np.zeros(batch_size, np.int32)
        for row, i in enumerate(idx):
            w = inputs[i]
            tokens[row, : len(w) - 1] = w[:-1]
            targets[row, : len(w) - 1] = w[1:]
            lengths[row] = len(w) - 1
            cont_lengths[row] = conts[i]
        lp, greedy = _score_batch(config, params, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(lengths),
                                  jnp.asarray(cont_lengths), n_scored=C, dtype=dtype)
        lp, greedy = np.asarray(lp), np.asarray(greedy)
        for row, i in enumerate(idx):
            results[i] = (float(lp[row]), bool(greedy[row]))
        if progress:
            progress(start + len(idx))
    return results


def loglikelihoods(model, requests: Sequence[tuple[str, str]], *, max_length: int | None = None,
                   batch_size: int = 8, dtype=jnp.float32, add_special_tokens: bool | None = None,
                   prefix_token_id: int | None = None) -> list[tuple[float, bool]]:
    """lm-eval's ``loglikelihood`` on ``(context, continuation)`` strings (rules in the module docstring)."""
    tok = require_tokenizer(model)
    pairs = [encode_pair(tok, c, x, add_special_tokens=add_special_tokens, prefix_token_id=prefix_token_id)
             for c, x in requests]
    return loglikelihood_tokens(model.config, model.params, pairs, max_length=max_length, batch_size=batch_size,
                                dtype=dtype)


def rolling_loglikelihood(model, text: str, seq_len: int, *, rule: str = "eval", batch_size: int = 8,
                          dtype=jnp.float32, add_special_tokens: bool | None = None,
                          prefix_token_id: int | None = None) -> float:
    """Total log-likelihood of ``text`` over windows of ``seq_len`` tokens under ``rule`` ("eval" or "lm_eval";
    see the module docstring). ``add_special_tokens``/``prefix_token_id`` only matter for ``"lm_eval"``."""
    from minitron_jax.data import token_windows

    tok = require_tokenizer(model)
    if rule == "eval":
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        pairs = [(w[:1].tolist(), w[1:].tolist()) for w in token_windows(tok, text, seq_len)]
    elif rule == "lm_eval":
        pairs = rolling_windows(tok_encode(tok, text, add_special_tokens), seq_len,
                                prefix_token(tok, prefix_token_id))
    else:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    scores = loglikelihood_tokens(model.config, model.params, pairs, max_length=seq_len, batch_size=batch_size,
                                  dtype=dtype)
    return float(sum(lp for lp, _ in scores))


# ------------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------------
def _gen_settings(gen_kwargs: dict, default_max: int) -> dict:
    """lm-eval's generation kwargs → ``until`` (list), ``max_gen_toks`` and ``generate`` sampling arguments."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    max_gen = default_max
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        if kw.get(key) is not None:
            max_gen = int(kw[key])
            break
    do_sample = kw.get("do_sample")
    temperature = float(kw.get("temperature", 0.0) or 0.0)
    if do_sample is False:
        temperature = 0.0
    elif do_sample is True and temperature == 0.0:
        temperature = 1.0  # HF's default temperature for sampling
    top_k = kw.get("top_k")
    top_p = kw.get("top_p")
    return {"until": until, "max_gen_toks": max_gen, "temperature": temperature,
            "top_k": int(top_k) if top_k not in (None, 0) else None,
            "top_p": float(top_p) if top_p is not None and float(top_p) < 1.0 else None}


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any non-empty stop string (lm-eval's post-processing)."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


def generate_until(model, requests: Sequence[tuple[str, dict]], *, max_length: int | None = None,
                   batch_size: int = 8, dtype=jnp.float32, add_special_tokens: bool | None = None,
                   default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0) -> list[str]:
    """lm-eval's ``generate_until``: the continuation of each context, cut at its stop strings."""
    from minitron_jax.generate import default_eos, generate

    tok = require_tokenizer(model)
    max_length = model.config.max_position_embeddings if max_length is None else int(max_length)
    eos_ids = list(default_eos(model))
    eos_id = getattr(tok, "eos_token_id", None)
    eos_text = tok.decode([eos_id], skip_special_tokens=False) if eos_id is not None else None
    groups: dict[str, list[int]] = {}
    for i, (_, kw) in enumerate(requests):
        groups.setdefault(json.dumps(kw or {}, sort_keys=True, default=str), []).append(i)
    out: list[str] = [""] * len(requests)
    for members in groups.values():
        s = _gen_settings(requests[members[0]][1], default_max_gen_toks)
        stops = s["until"] + ([eos_text] if eos_text and eos_text not in s["until"] else [])
        max_ctx = max_length - s["max_gen_toks"]
        if max_ctx < 1:
            raise ValueError(f"max_gen_toks={s['max_gen_toks']} leaves no room for context in "
                             f"max_length={max_length}")
        ids = {i: tok_encode(tok, requests[i][0], add_special_tokens)[-max_ctx:] or [prefix_token(tok)]
               for i in members}
        order = sorted(members, key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            new = generate(model.config, model.params, [ids[i] for i in idx], max_new_tokens=s["max_gen_toks"],
                           temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=seed,
                           eos_token_id=eos_ids or None, dtype=dtype)
            for i, toks in zip(idx, new):
                out[i] = cut_at_stop(tok.decode(toks, skip_special_tokens=True), stops)
    return out


def require_tokenizer(model):
    """The model's tokenizer, or a ValueError saying that scoring needs one."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model carries no tokenizer; lm-eval scoring needs one")
    return model.tokenizer
