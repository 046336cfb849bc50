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


def test_non_utf8_names_file_line_and_offset(tmp_path):
    """A binary file among the sources is a ValueError naming the file (and the jsonl line) and the first bad byte
    with its offset in the file, not a bare UnicodeDecodeError."""
    blob = tmp_path / "blob.txt"
    blob.write_bytes(b"abc\n\xff\xfe rest")
    for read in (data.read_text, lambda p: list(data.read_documents(p))):
        with pytest.raises(ValueError, match=r"blob\.txt: not UTF-8 text \(byte 0xff at offset 4\)"):
            read(blob)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # a Latin-1 e-acute on line 2
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 28\)"):
        data.read_text(mixed)
    # Reading bytes keeps the newline translation text mode did.
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb\rc\n")
    assert data.read_text(crlf) == "a\nb\nc\n"


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
    assert not first.hit and len(first.manifest["splits"]["train"]["shards"]) > 1
    assert first.splits == ("train",)  # nothing held out
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
# Held-out documents
# ------------------------------------------------------------------------------------------------------------------
def marked_documents(n_docs, seed=0):
    """Documents with a unique marker each ("doc 17: ..."), of 1-6 sentences (many longer than a 16-token row),
    plus two exact copies of earlier documents (identical documents must land on the same side)."""
    rng = np.random.default_rng(seed)
    docs = [f"doc {i}: " + " ".join(rng.choice(SENTENCES, size=rng.integers(1, 7))) for i in range(n_docs)]
    return docs + [docs[3], docs[5]]


def write_sources(directory, docs, n_files):
    """``docs`` spread over ``n_files`` jsonl files (so the same corpus can come in different files)."""
    directory.mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(docs)), n_files)):
        write_jsonl(directory / f"part{k}.jsonl", [{"text": docs[i]} for i in part])
    return directory


def split_documents(ds, eos):
    """The documents of a packed split read back from its rows: packing is seamless, so the real tokens of the
    rows in order are the documents end to end, each ending in EOS."""
    rows = ds.rows(np.arange(len(ds)))
    stream = rows["tokens"][rows["segment_ids"] > 0]
    return [tuple(d) for d in np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]]


def held_out_texts(cache, tokenizer, docs):
    """``(train, validation)`` texts of a cache, identified from the packed rows alone."""
    text_of = {tuple(ids): text for ids, text in zip(data.document_token_ids(tokenizer, docs), docs)}
    eos = data.eos_token_id(tokenizer)
    return tuple([text_of[d] for d in split_documents(data.PackedDataset.from_cache(cache, split), eos)]
                 for split in ("train", "validation"))


@pytest.mark.parametrize("validation", [0.25, 6])
def test_validation_holds_out_whole_documents(tmp_path, tokenizer, validation):
    docs = marked_documents(60)
    seq_len = 16
    cache = data.build_token_cache(write_sources(tmp_path / "src", docs, 3), tokenizer, seq_len, tmp_path / "c",
                                   rows_per_shard=4, validation=validation, split_seed=3)
    assert cache.splits == ("train", "validation")
    assert not list((tmp_path / "c").glob("*/documents.*")), "the staged tokens are removed"
    ids = [tuple(x) for x in data.document_token_ids(tokenizer, docs)]
    assert sum(len(d) > seq_len for d in ids) > 20, "documents span rows, so a row split would leak"
    train, val = held_out_texts(cache, tokenizer, docs)
    # Every document exactly once, whole, and no validation document on a training row (copies included).
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val) and val
    assert (docs[3] in val) == (train.count(docs[3]) == 0)
    if isinstance(validation, int):  # at least that many rows, and not a document more than needed
        assert cache.num_rows("validation") >= validation
        assert sum(map(len, ids)) > 0
        val_tokens = sum(len(i) for i, d in zip(ids, docs) if d in set(val))
        largest = max(set(val), key=lambda d: data.document_key(d, 3))
        assert -(-(val_tokens - val.count(largest) * len(ids[docs.index(largest)])) // seq_len) < validation
    else:
        assert 0.1 < len(set(val)) / len(set(docs)) < 0.4


def test_holdout_deterministic_and_independent_of_files_shards_and_tokenizer(tmp_path, tokenizer, bare_tokenizer):
    docs = marked_documents(60)
    reordered = list(reversed(docs))
    a = data.build_token_cache(write_sources(tmp_path / "a", docs, 1), tokenizer, 16, tmp_path / "c",
                               rows_per_shard=2, validation=0.3)
    b = data.build_token_cache(write_sources(tmp_path / "b", reordered, 4), tokenizer, 16, tmp_path / "c",
                               rows_per_shard=50, validation=0.3)
    c = data.build_token_cache(tmp_path / "a", bare_tokenizer, 24, tmp_path / "c", eos_id=2, validation=0.3)
    held_a, held_b = held_out_texts(a, tokenizer, docs)[1], held_out_texts(b, tokenizer, docs)[1]
    assert sorted(held_a) == sorted(held_b)  # other files, order and shard size: the same documents
    again = data.build_token_cache(tmp_path / "a", tokenizer, 16, tmp_path / "c2", rows_per_shard=2, validation=0.3)
    assert not again.hit
    for split in ("train", "validation"):  # a rebuild elsewhere (another host) packs identical rows
        for col, shards in a.columns(split).items():
            np.testing.assert_array_equal(np.concatenate(shards), np.concatenate(again.columns(split)[col]))
    # Another tokenizer and seq_len hold out the same texts (the key hashes the text, not its tokens).
    eos = data.eos_token_id(bare_tokenizer, 2)
    text_of = {tuple(i): t for i, t in zip(data.document_token_ids(bare_tokenizer, docs, eos_id=2), docs)}
    val_c = [text_of[d] for d in split_documents(data.PackedDataset.from_cache(c, "validation"), eos)]
    assert sorted(val_c) == sorted(held_a)
    other_seed = data.build_token_cache(tmp_path / "a", tokenizer, 16, tmp_path / "c", validation=0.3, split_seed=1)
    assert sorted(held_out_texts(other_seed, tokenizer, docs)[1]) != sorted(held_a)


def test_holdout_mask_fraction_and_rows():
    keys = np.array([data.document_key(f"document {i}") for i in range(4000)], np.uint64)
    lengths = np.random.default_rng(0).integers(1, 50, len(keys))
    held = data.holdout_mask(keys, lengths, 0.1, seq_len=8)
    assert 0.08 < held.mean() < 0.12
    # A document's side depends on its text alone: appending documents moves none across the split.
    np.testing.assert_array_equal(data.holdout_mask(keys[:1000], lengths[:1000], 0.1, 8), held[:1000])
    assert data.holdout_mask(keys[:5], lengths[:5], 0.01, 8).sum() == 1  # at least one document
    rows = data.holdout_mask(keys, lengths, 30, seq_len=8)
    assert -(-lengths[rows].sum() // 8) >= 30
    last = np.flatnonzero(rows)[np.argmax(keys[rows])]
    assert -(-(lengths[rows].sum() - lengths[last]) // 8) < 30  # the smallest-key prefix that fills 30 rows


def test_holdout_refuses_too_few_documents(tmp_path, tokenizer):
    one = tmp_path / "one.txt"
    one.write_text("just one document", encoding="utf-8")
    cache_dir = tmp_path / "c"
    for validation in (2, 0.5):
        with pytest.raises(data.HoldoutError,
                           match=r"one\.txt: only 1 document: cannot hold out a validation document"):
            data.build_token_cache(one, tokenizer, 16, cache_dir, validation=validation)
    assert not list(cache_dir.iterdir()), "no staging leftovers"
    assert data.build_token_cache(one, tokenizer, 16, cache_dir).splits == ("train",)  # without validation: fine
    copies = write_jsonl(tmp_path / "copies.jsonl", [{"text": "the same"}] * 3)
    with pytest.raises(ValueError, match=r"copies\.jsonl: holding out .* takes all 3 documents \(1 distinct\)"):
        data.build_token_cache(copies, tokenizer, 16, cache_dir, validation=1)
    corpus = write_jsonl(tmp_path / "small.jsonl", [{"text": s} for s in SENTENCES])
    with pytest.raises(ValueError, match=r"small\.jsonl: all 5 documents fill only \d+ rows of 16 tokens, not the "
                                         r"100 validation rows"):
        data.build_token_cache(corpus, tokenizer, 16, cache_dir, validation=100)
    for bad in (1.0, -1, True, "8"):
        with pytest.raises(ValueError):
            data.build_token_cache(corpus, tokenizer, 16, cache_dir, validation=bad)


def test_cache_key_tracks_holdout(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in SENTENCES * 2])
    build = lambda **kw: data.build_token_cache(corpus, tokenizer, 16, tmp_path / "c", **kw).path  # noqa: E731
    paths = {build(), build(validation=0.3), build(validation=0.3, split_seed=1), build(validation=2)}
    assert len(paths) == 4
    assert build(split_seed=5) == build()  # nothing held out: the split seed does not matter


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


def test_split_rows():
    """The row split (for SFT, where a row is one conversation) is explicitly named: packed text is split by
    document before packing instead, and the old ``split`` of packed rows is gone."""
    assert not hasattr(data.PackedDataset, "split")
    ds = toy_dataset()
    train, val = ds.split_rows(0.2, seed=1)
    assert (len(train), len(val)) == (18, 5)
    t, v = row_ids(train.rows(np.arange(len(train)))), row_ids(val.rows(np.arange(len(val))))
    assert not set(t) & set(v) and sorted(t + v) == list(range(23))
    _, val2 = ds.split_rows(0.2, seed=1)
    assert row_ids(val2.rows(np.arange(5))) == v
    assert len(ds.split_rows(3)[1]) == 3
    with pytest.raises(ValueError):
        ds.split_rows(23)
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
