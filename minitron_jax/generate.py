"""KV-cached autoregressive generation: greedy or sampled (temperature, top-k, top-p), batched over prompts.

    from minitron_jax.convert import load_model
    from minitron_jax.generate import generate, generate_text

    m = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    generate_text(m, ["What is the capital of France?"], chat=True, max_new_tokens=32)
    generate(m.config, m.params, [[1, 2, 3], [4, 5]], max_new_tokens=8)     # token ids in, new token ids out

How it runs (two compiled programs per shape, no retracing per token):

- **Prefill** (one ``jit``): the prompts are LEFT-padded to a bucketed length ``P`` so every row's last prompt token
  sits in slot ``P - 1``. ``cache_valid`` marks the pad slots invalid, and RoPE positions count real tokens only
  (``cumsum(valid) - 1``), so a padded row computes exactly what it would alone. The prompt attends over a ``P``-slot
  cache, which is then padded to ``P + max_new_tokens`` slots.
- **Decode** (one ``jit`` around a ``jax.lax.while_loop``): each step writes one token's keys/values into slot
  ``P + step - 1`` of every row, marks it valid, and samples the next token. The loop stops after
  ``max_new_tokens`` tokens or as soon as every row has produced an EOS token.

Shapes depend only on (batch size, bucketed prompt length, ``max_new_tokens``) and the sampling settings, so
repeated calls with similar prompts reuse the compiled programs. ``TRACE_COUNTS`` counts how often each program
was traced (the tests check that generating N tokens traces the decode step once).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.arch import AnyConfig, base_config, hidden_states, init_cache, logits_from_hidden
from minitron_jax.model import Params

# Incremented while tracing (a Python side effect, so it runs once per trace, never per execution).
TRACE_COUNTS: collections.Counter = collections.Counter()

PAD_OUT = -1  # written into the output buffer after a row has finished (never returned)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax) and ignores top_k/top_p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [B] (int32) from logits [B, V] under ``sampling``.

    top-k keeps the k largest logits (ties at the k-th value are all kept); top-p keeps the smallest set of most
    likely tokens whose probability reaches p (the most likely token is always kept); then a categorical draw at
    the given temperature. top_k=1 is therefore greedy."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / sampling.temperature
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    if sampling.top_k is not None and sampling.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg_inf, x)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest kept logit: the last sorted entry whose preceding mass is still below p.
        kept = jnp.where(mass_before < sampling.top_p, sorted_x, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        x = jnp.where(x < threshold, neg_inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def bucket_length(n: int) -> int:
    """Prompt length rounded up so that nearby lengths share compiled programs: a power of two (at least 16) up to
    512, then a multiple of 512."""
    if n <= 512:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 512) * 512


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray, length: int | None = None,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts → (tokens [B, P] int32, valid [B, P] bool), each row right-aligned. ``length`` defaults to the
    bucketed longest prompt."""
    rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (e.g. a BOS token)")
    longest = max(len(r) for r in rows)
    P = bucket_length(longest) if length is None else length
    if P < longest:
        raise ValueError(f"pad length {P} is shorter than the longest prompt ({longest})")
    tokens = np.full((len(rows), P), pad_id, np.int32)
    valid = np.zeros((len(rows), P), bool)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = r
        valid[i, P - len(r):] = True
    return tokens, valid


# ------------------------------------------------------------------------------------------------------------------
# The two compiled programs
# ------------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "cache_len", "dtype", "cache_dtype"))
def prefill(config: AnyConfig, params: Params, tokens: jax.Array, valid: jax.Array, *, cache_len: int,
            dtype=jnp.float32, cache_dtype=jnp.float32):
    """Run left-padded prompts [B, P] through the model.

    Returns ``(last_logits [B, V] float32, cache (``arch.init_cache``'s layout: {"k","v": [L, B, cache_len, K, Hd]}
    for a uniform model, one such dict per attention segment of a heterogeneous one), cache_valid [B, cache_len],
    next_positions [B])``: the logits after each row's last prompt token, the cache with the prompt in slots
    ``0..P-1`` (pads invalid), and each row's RoPE position for its next token."""
    TRACE_COUNTS["prefill"] += 1
    B, P = tokens.shape
    if cache_len < P:
        raise ValueError(f"cache_len {cache_len} < prompt length {P}")
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    cache = init_cache(config, B, P, cache_dtype)
    h, _, cache = hidden_states(config, params, tokens, positions=positions, dtype=dtype, cache=cache,
                                cache_index=0, cache_valid=valid)
    logits = logits_from_hidden(config, params, h[:, -1])
    extra = cache_len - P
    # Slots are axis 2 of every cache array, uniform or per segment (segments without attention hold None).
    cache = jax.tree.map(lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))), cache)
    cache_valid = jnp.pad(valid, ((0, 0), (0, extra)))
    return logits, cache, cache_valid, positions[:, -1] + 1


def decode_step(config: AnyConfig, params: Params, tokens: jax.Array, positions: jax.Array, cache: dict,
                cache_valid: jax.Array, index: jax.Array, *, dtype=jnp.float32):
    """Feed one token per row (tokens, positions [B]) into cache slot ``index``.

    Returns ``(logits [B, V] float32, cache, cache_valid)`` with slot ``index`` written and marked valid."""
    B = tokens.shape[0]
    cache_valid = jax.lax.dynamic_update_slice(cache_valid, jnp.ones((B, 1), bool), (0, index))
    h, _, cache = hidden_states(config, params, tokens[:, None], positions=positions[:, None], dtype=dtype,
                                cache=cache, cache_index=index, cache_valid=cache_valid)
    return logits_from_hidden(config, params, h[:, 0]), cache, cache_valid


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_ids", "dtype",
                                             "return_logits"))
def decode(config: AnyConfig, params: Params, first_logits: jax.Array, cache: dict, cache_valid: jax.Array,
           positions: jax.Array, start_index: jax.Array, key: jax.Array, *, max_new_tokens: int, sampling: Sampling,
           eos_ids: tuple[int, ...] = (), dtype=jnp.float32, return_logits: bool = False):
    """Sample ``max_new_tokens`` tokens after a prefill, inside one ``while_loop``.

    Token ``i`` is drawn from the logits of step ``i`` with key ``fold_in(key, i)``; step 0's logits come from the
    prefill. Returns ``(tokens [B, N] int32, steps_run, logits [B, N, V] or None)``; entries after a row's EOS are
    ``PAD_OUT``, and the loop ends early once every row has produced an EOS."""
    TRACE_COUNTS["decode"] += 1
    B = first_logits.shape[0]
    N = max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None

    def is_eos(t):
        return jnp.zeros(t.shape, bool) if eos is None else jnp.any(t[:, None] == eos[None, :], axis=-1)

    tok0 = sample_logits(first_logits, jax.random.fold_in(key, 0), sampling)
    out = jnp.full((B, N), PAD_OUT, jnp.int32).at[:, 0].set(tok0)
    logits_buf = None
    if return_logits:
        logits_buf = jnp.zeros((B, N, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)
    state = dict(step=jnp.int32(1), tok=tok0, done=is_eos(tok0), out=out, cache=cache, valid=cache_valid,
                 pos=positions.astype(jnp.int32), logits=logits_buf)

    def cond(s):
        return (s["step"] < N) & ~jnp.all(s["done"])

    def body(s):
        TRACE_COUNTS["decode_step"] += 1
        step = s["step"]
        logits, cache, valid = decode_step(config, params, s["tok"], s["pos"], s["cache"], s["valid"],
                                           start_index + step - 1, dtype=dtype)
        tok = sample_logits(logits, jax.random.fold_in(key, step), sampling)
        tok = jnp.where(s["done"], PAD_OUT, tok)
        new = dict(step=step + 1, tok=jnp.maximum(tok, 0), done=s["done"] | is_eos(tok),
                   out=jax.lax.dynamic_update_slice(s["out"], tok[:, None], (0, step)), cache=cache, valid=valid,
                   pos=s["pos"] + 1, logits=None)
        if return_logits:
            new["logits"] = jax.lax.dynamic_update_slice(s["logits"], logits[:, None], (0, step, 0))
        return new

    final = jax.lax.while_loop(cond, body, state)
    return final["out"], final["step"], final["logits"]


# ------------------------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------------------------
def _eos_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(sorted({int(e) for e in eos_token_id}))


def generate(config: AnyConfig, params: Params, prompt_tokens: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_token_id: int | Sequence[int] | None = None, dtype=jnp.float32, cache_dtype=None,
             return_logits: bool = False):
    """New tokens for each prompt (lists of token ids; different lengths are fine).

    Args:
      max_new_tokens: tokens to generate per prompt (fewer for a row that produces EOS).
      temperature: 0 (default) is greedy; otherwise sample from softmax(logits / temperature).
      top_k, top_p: restrict sampling to the k most likely tokens / the smallest set reaching probability p.
      seed: sampling seed; the same seed and inputs give the same tokens.
      eos_token_id: an id or several; a row stops after producing one (the EOS token is included in its output).
      dtype: compute dtype (params are cast at use). cache_dtype: KV-cache dtype (default: ``dtype``).
      return_logits: also return, per row, the float32 logits [n_i, V] each returned token was chosen from.

    Returns:
      ``list[list[int]]`` of new tokens per prompt, or ``(tokens, logits)`` with ``return_logits=True``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(float(temperature), top_k, top_p)
    eos_ids = _eos_tuple(eos_token_id)
    dtype = jnp.dtype(dtype)
    cache_dtype = dtype if cache_dtype is None else jnp.dtype(cache_dtype)
    tokens, valid = left_pad(prompt_tokens)
    P = tokens.shape[1]
    params = jax.tree.map(jnp.asarray, params)

    logits, cache, cache_valid, positions = prefill(config, params, jnp.asarray(tokens), jnp.asarray(valid),
                                                    cache_len=P + max_new_tokens, dtype=dtype,
                                                    cache_dtype=cache_dtype)
    out, _, step_logits = decode(config, params, logits, cache, cache_valid, positions, jnp.int32(P),
                                 jax.random.key(seed), max_new_tokens=max_new_tokens, sampling=sampling,
                                 eos_ids=eos_ids, dtype=dtype, return_logits=return_logits)
    out = np.asarray(out)
    results, lengths = [], []
    for row in out:
        n = len(row)
        if eos_ids:
            hits = np.flatnonzero(np.isin(row, eos_ids))
            if len(hits):
                n = int(hits[0]) + 1
        results.append([int(t) for t in row[:n]])
        lengths.append(n)
    if not return_logits:
        return results
    step_logits = np.asarray(step_logits)
    return results, [step_logits[i, :n] for i, n in enumerate(lengths)]


def default_eos(model) -> tuple[int, ...]:
    """End-of-sequence ids of a :class:`~minitron_jax.convert.LoadedModel`: the config's ``eos_token_id`` (one or a
    list) plus the tokenizer's, sorted; empty when neither names one."""
    ids: set[int] = set()
    cfg_eos = base_config(model.config).extra_dict.get("eos_token_id")
    if cfg_eos is not None:
        ids.update([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
    tok_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(tok_eos)
    return tuple(sorted(ids))


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], *, chat: bool = False,
                   system: str | None = None) -> list[list[int]]:
    """Token ids per prompt. With ``chat=True`` each prompt (a string: one user message, or a list of
    ``{"role", "content"}`` messages) is rendered with the tokenizer's chat template plus the generation prompt."""
    ids = []
    for p in prompts:
        if chat:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("chat=True but the tokenizer has no chat template")
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if system is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}] + messages
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            if not isinstance(p, str):
                raise TypeError("plain (chat=False) prompts must be strings")
            ids.append(list(tokenizer(p)["input_ids"]))
    return ids


def generate_text(model: Any, prompts: Sequence[str | list[dict]], *, chat: bool = False,
                  system: str | None = None, max_new_tokens: int = 64, skip_special_tokens: bool = True,
                  **kw) -> list[str]:
    """Completions (new text only) for string prompts, with a :class:`~minitron_jax.convert.LoadedModel`.

    ``chat=True`` applies the tokenizer's chat template (``system`` adds a system message). EOS defaults to the
    model config's ``eos_token_id`` plus the tokenizer's; other keyword arguments are those of :func:`generate`."""
    if model.tokenizer is None:
        raise ValueError(f"model from {model.source} has no tokenizer; use generate() with token ids")
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = encode_prompts(model.tokenizer, prompts, chat=chat, system=system)
    kw.setdefault("eos_token_id", default_eos(model) or None)
    new = generate(model.config, model.params, ids, max_new_tokens=max_new_tokens, **kw)
    return [model.tokenizer.decode(t, skip_special_tokens=skip_special_tokens) for t in new]
