"""Chat SFT rows.

``sft_examples`` renders ``messages`` with the tokenizer's chat template and marks assistant tokens by rendering the
conversation prefix by prefix; rows use the same layout and loss convention as packed rows
(:mod:`minitron_jax.data.packing`), one conversation per row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np

from minitron_jax.data.chat import ChatRecord
from minitron_jax.data.packing import complete_rows
from minitron_jax.data.text import eos_token_id

logger = logging.getLogger(__name__)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def assistant_spans(tokenizer, messages: list[dict], **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of each assistant turn's content plus
    its end-of-turn marker (what the model must generate; trailing whitespace excluded).

    Found by rendering prefixes: the turn of message ``i`` is what ``render(messages[:i+1])`` adds to
    ``render(messages[:i])``; its content starts after the generation prompt (``render(messages[:i],
    add_generation_prompt=True)``) at the first occurrence of the (stripped) content. Templates that re-render
    earlier turns differently (not prefix-stable) are refused with a ValueError.
    """
    full = _render(tokenizer, messages, **template_kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], **template_kwargs)
        upto = _render(tokenizer, messages[:i + 1], **template_kwargs)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError(f"chat template is not prefix-stable at message {i}; cannot locate assistant tokens")
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, **template_kwargs)
        lo = len(prompt) if i and upto.startswith(prompt) else len(before)
        content = message.get("content")
        found = upto.find(content.strip(), lo) if isinstance(content, str) and content.strip() else -1
        start = found if found >= 0 else lo
        end = len(upto.rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def assistant_token_mask(tokenizer, messages: list[dict], **template_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``: the conversation's token ids (chat template, no extra special tokens) and 1 on every
    token whose first character lies in an assistant span (``assistant_spans``)."""
    text, spans = assistant_spans(tokenizer, messages, **template_kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), np.int32)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return ids, mask


def sft_examples(tokenizer, records: Iterable[Mapping | ChatRecord], seq_len: int, *, drop_empty: bool = True,
                 **template_kwargs) -> dict[str, np.ndarray]:
    """Chat records (``{"messages": [{"role", "content"}, ...]}`` or :class:`~minitron_jax.data.chat.ChatRecord`,
    any layout once read by :mod:`minitron_jax.data.chat`) → rows ``[n, seq_len]`` in the packed layout.

    One conversation per row, truncated to ``seq_len`` tokens and padded after (pad token, else EOS; segment 0).
    ``loss_mask`` follows the packed convention — position ``t`` predicts ``tokens[t+1]`` — and is 1 exactly when
    that target is an assistant token (``assistant_token_mask``), so only assistant content (and its end-of-turn
    marker) is learned. ``drop_empty`` skips rows left with no loss (e.g. truncated before the first answer).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)
    rows = {k: [] for k in ("tokens", "segment_ids", "loss_mask")}
    n_truncated = n_dropped = 0
    for record in records:
        messages = record.messages if isinstance(record, ChatRecord) else record["messages"]
        ids, amask = assistant_token_mask(tokenizer, [dict(m) for m in messages], **template_kwargs)
        n_truncated += len(ids) > seq_len
        ids, amask = ids[:seq_len], amask[:seq_len]
        n = len(ids)
        loss = np.zeros(seq_len, np.int32)
        loss[:n - 1] = amask[1:n]
        if drop_empty and not loss.any():
            n_dropped += 1
            continue
        rows["tokens"].append(np.concatenate([ids, np.full(seq_len - n, pad, np.int32)]))
        rows["segment_ids"].append((np.arange(seq_len) < n).astype(np.int32))
        rows["loss_mask"].append(loss)
    if n_truncated or n_dropped:
        logger.info("sft: %d conversations truncated to %d tokens, %d dropped with no assistant tokens left",
                    n_truncated, seq_len, n_dropped)
    if not rows["tokens"]:
        raise ValueError("no SFT examples with assistant tokens")
    return complete_rows({k: np.stack(v) for k, v in rows.items()})
