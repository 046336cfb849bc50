"""Chat records in every common layout, one reader; and the deterministic train/eval split of a chat set.

Accepted layouts (one JSON object per line of a ``.jsonl`` file):

=======================================================  ============================================================
record                                                   becomes
=======================================================  ============================================================
``{"messages": [{"role", "content"}, ...]}``             the conversation as is (it must hold an assistant turn);
                                                         an optional ``"ideal"`` gives exact-match references
``{"input": [{"role", "content"}, ...], "ideal": str}``  ``input`` + an assistant turn holding ``ideal`` (OpenAI
                                                         evals' layout)
``{"input": "a prompt", "ideal": [str, ...]}``           one user message; with a list of acceptable answers the
                                                         assistant turn is the first one, all count for exact match
=======================================================  ============================================================

Optional keys kept: ``source`` (where a record came from, for reports) and ``split`` (``"train"`` or ``"eval"``: a
fixed split decided upstream, as in the embedded ``chat`` asset). Anything malformed is a :class:`ChatRecordError`
(a ``ValueError``) with one line naming the file, the line and the problem.

The **prompt** of a record is every message before its last assistant turn; that turn is the **answer**. The split
(:func:`split_records`) is by prompt: an evaluation prompt is never trained on, even when a file repeats it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from minitron_jax.data.text import jsonl_records

__all__ = ["ChatRecord", "ChatRecordError", "parse_chat_record", "read_chat_records", "iter_chat_records",
           "split_records", "prompt_key", "normalize_answer", "SPLITS"]

SPLITS = ("train", "eval")
ROLES = ("system", "user", "assistant")


class ChatRecordError(ValueError):
    """A chat record that is not in one of the accepted layouts (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class ChatRecord:
    """A conversation ending in an assistant answer, with optional exact-match references."""

    messages: tuple[dict[str, str], ...]
    ideal: tuple[str, ...] | None = None  # acceptable answers (exact match), None when the record gives none
    source: str | None = None
    split: str | None = None

    @property
    def answer_index(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The messages before the last assistant turn: what a model is asked."""
        return [dict(m) for m in self.messages[:self.answer_index]]

    def to_dict(self) -> dict[str, Any]:
        """The ``messages`` layout (what :func:`minitron_jax.data.sft.sft_examples` reads), extras included."""
        out: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        if self.ideal is not None:
            out["ideal"] = list(self.ideal)
        for key in ("source", "split"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ChatRecordError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatRecordError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatRecordError(f"{where}: {key}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _ideal(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value)
            or not value[0].strip()):
        raise ChatRecordError(f"{where}: 'ideal' must be a non-empty string or a non-empty list of strings")
    return tuple(value)


def parse_chat_record(record: Any, where: str) -> ChatRecord:
    """One record in any accepted layout (module docstring) → :class:`ChatRecord`; ``where`` is "FILE:LINE"."""
    if not isinstance(record, dict):
        raise ChatRecordError(f"{where}: a chat record must be a JSON object, got {type(record).__name__}")
    ideal = _ideal(record["ideal"], where) if record.get("ideal") is not None else None
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatRecordError(f"{where}: 'messages' has no assistant turn, so nothing to learn or score")
    elif "input" in record:
        if ideal is None:
            raise ChatRecordError(f"{where}: an 'input' record needs 'ideal' (the assistant's answer)")
        inp = record["input"]
        if isinstance(inp, str):
            if not inp.strip():
                raise ChatRecordError(f"{where}: 'input' is an empty string")
            messages = [{"role": "user", "content": inp}]
        else:
            messages = _messages(inp, where, "input")
        messages.append({"role": "assistant", "content": ideal[0]})
    else:
        raise ChatRecordError(f"{where}: a chat record needs 'messages' (a list of {{role, content}}) or 'input' "
                              f"and 'ideal'; got keys {sorted(record)[:6]}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ChatRecordError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    source = record.get("source")
    return ChatRecord(tuple(messages), ideal, source if isinstance(source, str) else None, split)


def iter_chat_records(paths: str | Path | Iterable[str | Path]) -> Iterator[ChatRecord]:
    """Records of one or more ``.jsonl`` files, in file order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths:
        for where, record in jsonl_records(path):
            yield parse_chat_record(record, where)


def read_chat_records(paths: str | Path | Iterable[str | Path]) -> list[ChatRecord]:
    """All records of one or more ``.jsonl`` files; a file without any is a :class:`ChatRecordError`."""
    records = list(iter_chat_records(paths))
    if not records:
        raise ChatRecordError(f"{paths}: no chat records")
    return records


def prompt_key(record: ChatRecord) -> str:
    """What the split compares: the prompt's messages (roles and contents), so equal prompts share a side."""
    return json.dumps(record.prompt, sort_keys=True, ensure_ascii=True)


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def split_records(records: Sequence[ChatRecord], eval_records: int, seed: int = 0
                  ) -> tuple[list[ChatRecord], list[ChatRecord]]:
    """``(train, eval)``, disjoint by prompt, deterministic, each in file order.

    Records that carry ``split`` keep it (the embedded asset's fixed split; records without one then train).
    Otherwise the ``eval_records`` distinct prompts of smallest seeded hash are held out: which ones depends only
    on the prompts and ``seed``, not on the file's order, and adding records moves few of them. Either way a
    prompt found on both sides is refused (ValueError), and every record whose prompt is held out is held out."""
    if eval_records < 0:
        raise ValueError(f"eval_records must be >= 0, got {eval_records}")
    keys = [prompt_key(r) for r in records]
    if any(r.split is not None for r in records):
        held = {k for k, r in zip(keys, records) if r.split == "eval"}
        both = {k for k, r in zip(keys, records) if r.split != "eval"} & held
        if both:
            raise ValueError(f"{len(both)} prompt(s) are in both the train and the eval split of the records")
    else:
        distinct = sorted(set(keys), key=lambda k: _rank(k, seed))
        if eval_records >= len(distinct):
            raise ValueError(f"eval_records={eval_records} leaves no training records ({len(distinct)} distinct "
                             "prompts)")
        held = set(distinct[:eval_records])
    train = [r for k, r in zip(keys, records) if k not in held]
    evals = [r for k, r in zip(keys, records) if k in held]
    return train, evals


_TRAILING = ".,;:!?\"'`)]}"  # what a model may append to a one-word answer ("Yes." for "Yes")


def normalize_answer(text: str) -> str:
    """Exact-match normalization: strip, case-fold, drop trailing punctuation (and the spaces it leaves)."""
    return text.strip().casefold().rstrip(_TRAILING + " \t\r\n").strip()
