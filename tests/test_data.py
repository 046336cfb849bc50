"""Tests of minitron_jax.data: text rules, windows, packing, cache, resumable iterator, multi-host slices, SFT."""

import json
import os
import time

import numpy as np
import pytest

from minitron_jax import data

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "hello world, how are you today?",
    "Sphinx of black quartz, judge my vow.",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny byte-level BPE tokenizer (with a BOS-adding post-processor, like Llama 3), no downloads.
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def tokenizer(bare_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=bare_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_corpus(tmp_path, n_docs=40, seed=0):
    """A directory with a jsonl and a txt file of documents of varied length (some longer than a row)."""
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(SENTENCES, size=rng.integers(1, 8))) for _ in range(n_docs)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": d} for d in docs[:-1]])
    (corpus / "b.txt").write_text(docs[-1], encoding="utf-8")
    return corpus, docs


# ------------------------------------------------------------------------------------------------------------------
# Text rules and sources
# ------------------------------------------------------------------------------------------------------------------
def test_jsonl_text_field_and_only_string_fallback(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"text": "first", "meta": "ignored"},
        {"id": 7, "body": "second"},  # no text key: its only string value
    ])
    with open(path, "a") as f:
        f.write("\n")  # blank lines are skipped
    assert data.read_text(path) == "first\n\nsecond"
    assert list(data.read_documents(path)) == ["first", "second"]


@pytest.mark.parametrize("bad", [{"a": "x", "b": "y"}, {"id": 3}, {"text": 5}, ["text"]])
def test_jsonl_bad_record_names_file_and_line(tmp_path, bad):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, bad])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        data.read_text(path)


def test_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        data.read_text(path)


def test_plain_text_read_whole(tmp_path):
    text = "line one\n\n{\"text\": \"not json-parsed\"}\nünïcode\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert data.read_text(path) == text
    assert list(data.read_documents(path)) == [text]


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": [1, 2, 3]}), path)
    assert list(data.read_documents(path)) == ["a", "b", "c"]
    assert data.read_text(path) == "a\n\nb\n\nc"


def test_expand_sources(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ["b.jsonl", "a.txt", "c.parquet", "skip.csv"]:
        (d / name).write_text("x")
    assert [p.name for p in data.expand_sources(d)] == ["a.txt", "b.jsonl", "c.parquet"]
    assert [p.name for p in data.expand_sources(str(d / "*.t*"))] == ["a.txt"]
    listed = data.expand_sources([d / "b.jsonl", str(d), d / "skip.csv"])  # explicit files of any suffix
    assert [p.name for p in listed] == ["b.jsonl", "a.txt", "c.parquet", "skip.csv"]
    with pytest.raises(FileNotFoundError, match="nope.txt.*zz"):
        data.expand_sources([d / "nope.txt", str(d / "zz*")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        data.expand_sources(empty)


# ------------------------------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------------------------------
def test_token_windows_arithmetic(tokenizer, bare_tokenizer):
    text = " ".join(SENTENCES * 4)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id  # no special tokens
    seq_len = 16
    w = data.token_windows(tokenizer, text, seq_len)
    assert w.dtype == np.int32 and w.shape == (len(ids) // seq_len, seq_len)
    np.testing.assert_array_equal(w.reshape(-1), ids[: w.size])
    w_cut = data.token_windows(tokenizer, text, seq_len, max_tokens=3 * seq_len + 5)
    np.testing.assert_array_equal(w_cut, w[:3])
    np.testing.assert_array_equal(data.token_windows(bare_tokenizer, text, seq_len), w)  # bare Tokenizer too
    with pytest.raises(ValueError, match="fewer than one window"):
        data.token_windows(tokenizer, text, seq_len, max_tokens=seq_len - 1)


# ------------------------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------------------------
def check_packed_invariants(rows, doc_ids):
    """Segments, positions, loss mask and exact token coverage of packed ``rows`` built from ``doc_ids``."""
    tokens, seg, pos, loss = rows["tokens"], rows["segment_ids"], rows["positions"], rows["loss_mask"]
    stream, owner = [], []  # non-padding tokens in row order, and the document each came from
    doc_of_stream = np.concatenate([np.full(len(d), i) for i, d in enumerate(doc_ids)])
    for r in range(len(tokens)):
        real = seg[r] > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
        if r < len(tokens) - 1:
            assert n == tokens.shape[1], "only the last row is padded"
        s = seg[r, :n]
        assert s[0] == 1 and set(np.diff(s)) <= {0, 1}, "segments 1..k in order"
        for k in range(1, s.max() + 1):
            np.testing.assert_array_equal(pos[r][seg[r] == k], np.arange((seg[r] == k).sum()))
        expected_loss = np.zeros_like(loss[r])
        expected_loss[:-1] = real[:-1] & (seg[r, 1:] == seg[r, :-1])
        np.testing.assert_array_equal(loss[r], expected_loss)
        stream += list(tokens[r, :n])
        owner += list(doc_of_stream[len(owner):len(owner) + n])
    # Every token of every document appears exactly once, in order.
    np.testing.assert_array_equal(stream, np.concatenate(doc_ids))
    # No loss across documents: wherever loss_mask is 1, the target belongs to the same document.
    flat_owner = np.full(tokens.shape, -1)
    i = 0
    for r in range(len(tokens)):
        n = int((seg[r] > 0).sum())
        flat_owner[r, :n] = owner[i:i + n]
        i += n
    rr, tt = np.nonzero(loss)
    np.testing.assert_array_equal(flat_owner[rr, tt], flat_owner[rr, tt + 1])
    # Each segment is one document's piece.
    for r in range(len(tokens)):
        for k in range(1, seg[r].max() + 1):
            assert len(set(flat_owner[r][seg[r] == k])) == 1


def test_packing_invariants(tokenizer):
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(SENTENCES, size=rng.integers(1, 9))) for _ in range(25)]
    docs.append("tiny")
    seq_len = 32
    doc_ids = list(data.document_token_ids(tokenizer, docs))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert all(d[0] == bos and d[-1] == eos and (d == eos).sum() == 1 for d in doc_ids)
    assert max(map(len, doc_ids)) > 2 * seq_len, "a document spanning three rows is exercised"
    rows = data.pack_documents(tokenizer, docs, seq_len)
    assert {k: v.dtype for k, v in rows.items()} == dict.fromkeys(rows, np.dtype(np.int32))
    assert rows["tokens"].shape[1] == seq_len
    check_packed_invariants(rows, doc_ids)
    assert rows["segment_ids"][-1, -1] == 0, "this corpus leaves a padded final row"


def test_packing_with_bare_tokenizer_matches(tokenizer, bare_tokenizer):
    docs = SENTENCES * 3
    a = data.pack_documents(tokenizer, docs, 24)
    b = data.pack_documents(bare_tokenizer, docs, 24)  # EOS found by name, BOS from the post-processor
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_targets_and_derived_columns():
    seg = np.array([[1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(data.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1]])
    np.testing.assert_array_equal(data.loss_mask_from_segments(seg), [[1, 1, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(data.next_token_targets(np.array([[5, 6, 7]])), [[6, 7, 0]])


# ------------------------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------------------------
def test_cache_hit_and_invalidation(tmp_path, tokenizer):
    corpus, docs = make_corpus(tmp_path)
    cache_dir = tmp_path / "cache"
    seq_len = 32
    first = data.build_token_cache(corpus, tokenizer, seq_len, cache_dir, rows_per_shard=3)
    assert not first.hit and len(first.manifest["shards"]) > 1
    second = data.build_token_cache(corpus, tokenizer, seq_len, cache_dir, rows_per_shard=3)
    assert second.hit and second.path == first.path
    cols = second.columns()
    assert all(isinstance(s, np.memmap) for s in cols["tokens"])
    assert not any(p.name.startswith(".") for p in cache_dir.iterdir()), "no staging leftovers"

    # The cached rows equal in-memory packing, read back across shard boundaries in any order.
    expected = data.pack_documents(tokenizer, docs, seq_len)
    ds = data.PackedDataset.from_cache(second)
    order = np.random.default_rng(0).permutation(len(ds))
    got = ds.rows(order)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k][order])

    # Another seq_len is another cache; editing a source invalidates.
    assert data.build_token_cache(corpus, tokenizer, 16, cache_dir).path != first.path
    src = corpus / "b.txt"
    src.write_text(src.read_text() + " One more sentence.")
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = data.build_token_cache(corpus, tokenizer, seq_len, cache_dir)
    assert not third.hit and third.path != first.path
    assert third.manifest["num_tokens"] > first.manifest["num_tokens"]


def test_cache_key_tracks_tokenizer(tmp_path, tokenizer, bare_tokenizer):
    corpus, _ = make_corpus(tmp_path, n_docs=5)
    a = data.build_token_cache(corpus, tokenizer, 32, tmp_path / "c")
    b = data.build_token_cache(corpus, tokenizer, 32, tmp_path / "c", eos_id=0)
    assert a.path != b.path


# ------------------------------------------------------------------------------------------------------------------
# Dataset, iterator, multi-host
# ------------------------------------------------------------------------------------------------------------------
def toy_dataset(n_rows=23, seq_len=8):
    """Rows whose first token is the row number, so batches are easy to identify."""
    tokens = np.arange(n_rows * seq_len, dtype=np.int32).reshape(n_rows, seq_len) // seq_len
    return data.PackedDataset({"tokens": [tokens[:10], tokens[10:]],
                               "segment_ids": [np.ones((10, seq_len), np.int32),
                                               np.ones((n_rows - 10, seq_len), np.int32)]})


def row_ids(batch):
    return batch["tokens"][:, 0].tolist()


def take(it, k):
    return [row_ids(next(it)) for _ in range(k)]


def test_iterator_deterministic_and_epoch_permutation():
    ds = toy_dataset()
    a = take(ds.batches(4, seed=3), 12)
    assert a == take(ds.batches(4, seed=3), 12)
    assert a != take(ds.batches(4, seed=4), 12)
    steps = 23 // 4
    for e in range(2):
        epoch = sum(a[e * steps:(e + 1) * steps], [])
        assert len(set(epoch)) == len(epoch) == steps * 4  # each row at most once per epoch
    assert a[:steps] != a[steps:2 * steps], "a fresh permutation every epoch"


@pytest.mark.parametrize("stop_after", [2, 5, 7])  # mid-epoch, exactly at the boundary (5 steps/epoch), past it
def test_iterator_exact_resume(stop_after):
    ds = toy_dataset()
    it = ds.batches(4, seed=11)
    take(it, stop_after)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 9)  # crosses at least one epoch boundary
    if stop_after == 5:
        assert state["epoch"] == 1 and state["index"] == 0
    resumed = ds.batches(4, seed=999, state=state)  # the seed comes from the state
    assert take(resumed, 9) == expected
    fresh = ds.batches(4)
    fresh.set_state(state)
    assert take(fresh, 9) == expected
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(2, state=state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_multihost_slices_disjoint_and_complete(process_count):
    ds = toy_dataset()
    single = ds.batches(8, seed=5)
    hosts = [ds.batches(8, seed=5, process_index=p, process_count=process_count) for p in range(process_count)]
    for _ in range(6):  # crosses an epoch boundary (2 steps/epoch)
        full = row_ids(next(single))
        parts = [row_ids(next(h)) for h in hosts]
        assert all(len(p) == 8 // process_count for p in parts)
        assert sum(parts, []) == full
        assert len(set(sum(parts, []))) == 8


def test_eval_pass_pads_and_stops():
    ds = toy_dataset()
    batches = list(ds.batches(5, shuffle=False, drop_remainder=False, num_epochs=1))
    assert len(batches) == 5 and all(b["tokens"].shape == (5, 8) for b in batches)
    last = batches[-1]
    assert (last["segment_ids"][3:] == 0).all() and (last["loss_mask"][3:] == 0).all()
    seen = sum((row_ids(b)[: int((b["segment_ids"][:, 0] > 0).sum())] for b in batches), [])
    assert seen == list(range(23))


def test_split():
    ds = toy_dataset()
    train, val = ds.split(0.2, seed=1)
    assert (len(train), len(val)) == (18, 5)
    t, v = row_ids(train.rows(np.arange(len(train)))), row_ids(val.rows(np.arange(len(val))))
    assert not set(t) & set(v) and sorted(t + v) == list(range(23))
    _, val2 = ds.split(0.2, seed=1)
    assert row_ids(val2.rows(np.arange(5))) == v
    assert len(ds.split(3)[1]) == 3
    with pytest.raises(ValueError):
        ds.split(23)
    it = train.batches(6, seed=0)
    assert set(sum(take(it, 3), [])) == set(t)


def test_permutation_is_pinned():
    # The epoch order must never change across library versions (resume after an upgrade): pin a value.
    assert sorted(data.permutation(1000, 7, 3).tolist()) == list(range(1000))
    assert data.permutation(8, 1, 2).tolist() == [7, 6, 3, 1, 0, 2, 4, 5]


# ------------------------------------------------------------------------------------------------------------------
# Chat SFT
# ------------------------------------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "The quick brown fox jumps."},
]


def test_sft_mask_covers_only_assistant_content(tokenizer):
    ids, mask = data.assistant_token_mask(tokenizer, CONVERSATION)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    np.testing.assert_array_equal(ids, tokenizer(text, add_special_tokens=False)["input_ids"])
    # Decode each contiguous run of masked tokens: exactly the assistant answers with their end-of-turn marker.
    runs, current = [], []
    for tid, m in zip(ids, mask):
        if m:
            current.append(int(tid))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tokenizer.decode(r) for r in runs]
    assert decoded == ["hello world<|end|>", "The quick brown fox jumps.<|end|>"]

    seq_len = 64
    rows = data.sft_examples(tokenizer, [{"messages": CONVERSATION}], seq_len)
    assert rows["tokens"].shape == (1, seq_len)
    n = len(ids)
    np.testing.assert_array_equal(rows["tokens"][0, :n], ids)
    assert (rows["tokens"][0, n:] == tokenizer.pad_token_id).all()
    assert (rows["segment_ids"][0] == (np.arange(seq_len) < n)).all()
    # loss at t trains the target tokens[t + 1]: exactly the assistant tokens.
    np.testing.assert_array_equal(rows["loss_mask"][0, : n - 1], mask[1:])
    assert not rows["loss_mask"][0, n - 1:].any()


def test_sft_truncation_and_dataset(tokenizer):
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    ids, _ = data.assistant_token_mask(tokenizer, CONVERSATION[:3])
    short = data.sft_examples(tokenizer, records, len(ids) - 3)
    assert short["tokens"].shape == (2, len(ids) - 3) and short["loss_mask"].any(axis=1).all()
    # Truncated before any assistant token: dropped (or kept with an all-zero mask on request).
    user_only_len = len(data.assistant_token_mask(tokenizer, CONVERSATION[:2] + [
        {"role": "assistant", "content": ""}])[0])
    cut = user_only_len - 2
    with pytest.raises(ValueError, match="no SFT examples"):
        data.sft_examples(tokenizer, records[1:], cut)
    kept = data.sft_examples(tokenizer, records[1:], cut, drop_empty=False)
    assert not kept["loss_mask"].any()
    # SFT rows feed the same dataset/iterator.
    ds = data.PackedDataset(data.sft_examples(tokenizer, records * 3, 64))
    batch = next(ds.batches(2, seed=0))
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}


@pytest.mark.parametrize("template, first_answer", [
    # Llama-3-like header with a blank line; the template trims the content.
    ("{% for m in messages %}<|{{ m['role'] }}|>\n\n{{ m['content'] | trim }}<|end|>{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}", "hello world"),
    # A template that ignores add_generation_prompt (and keeps whitespace): content is located by search.
    ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}", "hello world  "),
])
def test_sft_mask_other_templates(tokenizer, template, first_answer):
    conv = [dict(m) for m in CONVERSATION]
    conv[2]["content"] = "  hello world  "
    ids, mask = data.assistant_token_mask(tokenizer, conv, chat_template=template)
    masked = tokenizer.decode(ids[mask == 1])
    assert masked == first_answer + "<|end|>The quick brown fox jumps.<|end|>"


def test_sft_refuses_non_prefix_stable_template(tokenizer):
    # Renders only the last message: earlier turns change as the conversation grows.
    template = "{{ messages[-1]['content'] }}"
    with pytest.raises(ValueError, match="prefix-stable"):
        data.assistant_token_mask(tokenizer, CONVERSATION, chat_template=template)
