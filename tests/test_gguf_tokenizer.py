"""The GGUF tokenizer we build with ``tokenizers`` alone (no torch) equals transformers' own GGUF conversion, for
both vocabulary kinds Llama-family GGUFs carry; and the whole GGUF path runs with torch unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from utils import finish_one_layer_llama_gguf

from minitron_jax.convert.gguf_tokenizer import GGUFTokenizerError, build_tokenizer, load_gguf_tokenizer

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes the least important heads, neurons and channels; distillation recovers the accuracy.",
    "In 1938, he earned a B.Sc. in forestry — naïve café, 東京.",
    "def f(x):\n    return x**2 + 3.14159  # comment",
    "I'm sure it's what they'd've wanted; don't.",
    "  Two  spaces,\ttabs\tand trailing spaces   ",
] * 4
PROBES = CORPUS[:6] + ["unseen wörds 🙂, 42 and <s> inside </s> text", "", " leading space", "ÿ\x00\x7f bytes"]


def _write_tokenizer_gguf(path: Path, fields: dict, extra: dict | None = None) -> None:
    """A GGUF holding only tokenizer metadata (enough for the tokenizer builders on both sides)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model(fields["model"])
    if "pre" in fields:
        w.add_tokenizer_pre(fields["pre"])
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    if "scores" in fields:
        w.add_token_scores(fields["scores"])
    if "merges" in fields:
        w.add_token_merges(fields["merges"])
    w.add_bos_token_id(fields["bos"])
    w.add_eos_token_id(fields["eos"])
    if "unk" in fields:
        w.add_unk_token_id(fields["unk"])
    for key, value in (extra or {}).items():
        getattr(w, key)(value)
    w.add_tensor("token_embd.weight", np.zeros((len(fields["tokens"]), 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _sentencepiece_fields(with_merges: bool) -> dict:
    """A Llama-2-style sentencepiece BPE vocabulary: <unk> <s> </s>, 256 byte tokens, then learned pieces in merge
    order with decreasing scores (as sentencepiece writes them)."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer(add_prefix_space=True)
    sp.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, show_progress=False, special_tokens=[])
    model = json.loads(sp.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    fields = {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2, "unk": 0}
    if with_merges:
        fields["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return fields


def _byte_level_fields() -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<think>"]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [3 if t in specials[:2] else 4 if t == "<think>" else 1 for t in tokens]
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges,
            "bos": 0, "eos": 1}


# HF's SmolLM2 tokenizer.json pre-tokenizer (also StarCoder's): every digit its own pre-token, then GPT-2's regex.
_DIGITS_THEN_BYTE_LEVEL = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def _reference(path: Path):
    """transformers' tokenizer built from the same GGUF (its GGUF route imports torch). transformers' GGUF converter
    has no entry for the ``smollm`` pre-tokenizer and falls back to a plain ByteLevel, which llama.cpp and HF's own
    SmolLM2 tokenizer.json do not use; so for such files the reference gets tokenizer.json's pre-tokenizer."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    pre = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    if pre is not None and pre.contents() == "smollm":
        reference.backend_tokenizer.pre_tokenizer = _pre_tokenizer_from_json(_DIGITS_THEN_BYTE_LEVEL)
    return reference


def _pre_tokenizer_from_json(spec: dict):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    state = json.loads(tok.to_str())
    state["pre_tokenizer"] = spec
    return Tokenizer.from_str(json.dumps(state)).pre_tokenizer


def _assert_same(ours, reference, texts=PROBES):
    for text in texts:
        for special in (False, True):
            want = reference(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == want, (text, special)
        assert ours.decode(want, skip_special_tokens=False) == reference.decode(want, skip_special_tokens=False)
        assert ours.decode(want, skip_special_tokens=True) == reference.decode(want, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token) == (reference.bos_token, reference.eos_token)


@pytest.mark.parametrize("with_merges", [True, False], ids=["merges", "merges-from-scores"])
def test_sentencepiece_vocabulary_matches_transformers(tmp_path, with_merges):
    path = tmp_path / "spm.gguf"
    _write_tokenizer_gguf(path, _sentencepiece_fields(with_merges))
    ours = load_gguf_tokenizer(path)
    _assert_same(ours, _reference(path))
    ids = ours("naïve 🙂")["input_ids"]
    assert ids[0] == 1, "a sentencepiece vocabulary adds BOS by default, as llama.cpp does"
    assert any(ours.convert_ids_to_tokens(i).startswith("<0x") for i in ids), "unknown bytes fall back to <0xNN>"
    assert ours.decode(ids, skip_special_tokens=True) == "naïve 🙂"


def test_byte_level_llama3_style_matches_transformers(tmp_path):
    """Llama-3 style: the llama-bpe split regex, control tokens kept whole, a user-defined token (<think>) kept whole,
    BOS added when the file says so."""
    path = tmp_path / "bpe.gguf"
    _write_tokenizer_gguf(path, _byte_level_fields(), extra={"add_add_bos_token": True})
    ours = load_gguf_tokenizer(path)
    reference = _reference(path)
    _assert_same(ours, reference, PROBES + ["<|end_of_text|> then <think>hmm</think>"])
    ids = ours("<think>")["input_ids"]
    assert ids == [0, ours.convert_tokens_to_ids("<think>")], ids


def test_unsupported_and_inconsistent_metadata(tmp_path):
    fields = _byte_level_fields()
    with pytest.raises(GGUFTokenizerError, match="'wordpiece' is not supported"):
        build_tokenizer({**fields, "model": "wordpiece"}, "x.gguf")
    path = tmp_path / "bad_bos.gguf"
    _write_tokenizer_gguf(path, {**fields, "bos": 10_000})
    with pytest.raises(GGUFTokenizerError, match="bad_bos.gguf.*bos_token_id = 10000 is not a token id"):
        load_gguf_tokenizer(path)
    path = tmp_path / "bad_merge.gguf"
    _write_tokenizer_gguf(path, {**fields, "merges": ["a b c"]})
    with pytest.raises(GGUFTokenizerError, match="malformed merge"):
        load_gguf_tokenizer(path)


def test_smollm2_tokenizer_matches_transformers(smollm2_assets):
    from minitron_jax.data.assets import load_texts

    smol_path = smollm2_assets["smollm2_gguf"]
    ours = load_gguf_tokenizer(smol_path)
    reference = _reference(smol_path)
    _assert_same(ours, reference, PROBES + load_texts("wikipedia", 30) + load_texts("owt", 30)
                 + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"])
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
    assert (ours.unk_token, ours.pad_token) == (reference.unk_token, reference.pad_token)


# Where pre-tokenizers disagree about digits: runs of digits, and runs of whitespace (spaces, tabs, newlines, CRLF)
# right before a digit — the digit split decides which pre-token that whitespace joins.
DIGIT_TEXTS = [
    "Washington.\n\n\n\n7362 ships", "12345", "Hello world! 123", "a  1 22  333\n\n 4444\t55555 ",
    "3.14159 and 1,000,000", "x\n\n\n1", "year 2024:   42\n  7", "1 2\t3\r\n4", "１２３ ٣٤ ² ½ Ⅻ",
    "  \t 9\n \n 10", "v1.2.3-rc4 (2019-07-31T23:59:59Z)", "0x1F 0b1010 1e-5 -42", "№1 — 2nd, 3rd   4th",
    "table:\n  1\t2\t3\n  40\t50\t60\n\n\n\n\n700", " 8", "  8", "\n8", "9 ",
]


def test_smollm2_matches_llama_cpp_on_digits_and_whitespace(smollm2_assets, tmp_path):
    """llama.cpp, the runtime our GGUFs are for, is the reference: our tokenizer (in memory, and as the saved
    tokenizer.json) gives its ids on digit- and whitespace-heavy text and on held-out documents."""
    from llama_cpp_runtime import UNAVAILABLE, load_runtime
    from transformers import AutoTokenizer

    from minitron_jax.convert.gguf import save_tokenizer
    from minitron_jax.data.assets import load_texts

    runtime = load_runtime()
    if runtime is None:
        pytest.skip(f"llama.cpp runtime unavailable: {UNAVAILABLE}")
    path = smollm2_assets["smollm2_gguf"]
    ours = load_gguf_tokenizer(path)
    save_tokenizer(path, tmp_path)
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = DIGIT_TEXTS + load_texts("wikipedia", 100) + load_texts("owt", 100)
    with runtime.load(path, n_ctx=64) as lm:
        for text in texts:
            want = lm.tokenize(text)
            assert ours(text, add_special_tokens=False)["input_ids"] == want, text
            assert saved(text, add_special_tokens=False)["input_ids"] == want, text
            assert ours.decode(want) == text  # byte-level BPE is lossless


def _digit_vocab_fields(pre: str) -> dict:
    """A byte-level vocabulary trained without a digit split on digit-heavy text, so it holds multi-digit tokens
    ("12", "345"...) that only the pre-tokenizer can keep out of a digit run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + ["12345 2024 12345\n\n12345 1938 2024"] * 20, trainer)
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": [3] + [1] * (len(tokens) - 1),
            "merges": merges, "bos": 0, "eos": 0}


@pytest.mark.parametrize("pre", ["smollm", "starcoder"])
def test_digit_split_pre_tokenizers_give_one_token_per_digit(pre):
    """No llama.cpp needed: with SmolLM2's pre-tokenizer (llama.cpp's ``\\p{N}`` split, HF's
    ``Digits(individual_digits=True)``) every digit is its own token, even where the vocabulary could merge them."""
    plain = build_tokenizer(_digit_vocab_fields("gpt-2"))  # GPT-2's regex: digit runs stay whole
    assert len(plain.encode("12345").ids) < 5, "the vocabulary must hold multi-digit tokens for this test to bite"
    tok = build_tokenizer(_digit_vocab_fields(pre))
    for text, digits in (("12345", "12345"), ("year 2024", "2024"), ("x\n\n12", "12")):
        pieces = [tok.decode([i]) for i in tok.encode(text).ids]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == list(digits), (text, pieces)
        assert tok.decode(tok.encode(text).ids) == text
    # The whitespace before a digit run is one pre-token of its own, not split around the digit.
    assert [tok.decode([i]) for i in tok.encode("a\n\n\n7").ids][-1] == "7"


def test_stale_cached_tokenizer_is_rebuilt(tmp_path, monkeypatch):
    """A tokenizer the code before the digit split cached for a GGUF (key "tok2:...", plain ByteLevel) is not
    reused: the cache key carries the builder's version, and bumping it builds a fresh directory."""
    import hashlib

    import minitron_jax.convert.gguf_tokenizer as builder
    from minitron_jax.convert import gguf_tokenizer_dir, load_tokenizer
    from minitron_jax.convert.gguf import save_tokenizer

    monkeypatch.setenv("MINITRON_JAX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "digits.gguf"
    _write_tokenizer_gguf(path, _digit_vocab_fields("smollm"))
    stat = path.stat()
    old_key = hashlib.sha1(f"tok2:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stale = tmp_path / "cache" / "gguf_tokenizers" / old_key
    stale.mkdir(parents=True)
    save_tokenizer(path, stale)
    state = json.loads((stale / "tokenizer.json").read_text())
    state["pre_tokenizer"] = _DIGITS_THEN_BYTE_LEVEL["pretokenizers"][1]  # what the old code built for "smollm"
    (stale / "tokenizer.json").write_text(json.dumps(state))
    assert len(load_tokenizer(stale)("12345")["input_ids"]) < 5

    fresh = gguf_tokenizer_dir(path)
    assert fresh != stale
    assert len(load_tokenizer(fresh)("12345")["input_ids"]) == 5
    assert gguf_tokenizer_dir(path) == fresh  # and it is reused while the builder is unchanged
    monkeypatch.setattr(builder, "TOKENIZER_BUILD_VERSION", builder.TOKENIZER_BUILD_VERSION + 1)
    assert gguf_tokenizer_dir(path) not in (fresh, stale)


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError, and transformers sees no torch
from minitron_jax.cli.convert import main
rc = main([sys.argv[1], sys.argv[2], "--quiet"])
from minitron_jax.convert import load_model
m = load_model(sys.argv[2])
print("IDS", m.tokenizer("Hello world")["input_ids"])
print("TORCH", [k for k, v in sys.modules.items() if v is not None and (k == "torch" or k.startswith("torch."))])
sys.exit(rc)
"""


def test_gguf_conversion_needs_no_torch(tmp_path):
    """The README's first command starts from a GGUF: converting one (weights and tokenizer) must work where torch
    is not installed. (CI also runs the whole demo in a fresh venv without torch: .ci/first_run.sh.)"""
    path = tmp_path / "tiny.gguf"
    fields = _byte_level_fields()
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", 8),
                       ("add_feed_forward_length", 16), ("add_head_count", 2), ("add_head_count_kv", 1),
                       ("add_rope_dimension_count", 4), ("add_layer_norm_rms_eps", 1e-5),
                       ("add_vocab_size", len(fields["tokens"])), ("add_tokenizer_model", "gpt2"),
                       ("add_tokenizer_pre", "llama-bpe"), ("add_token_list", fields["tokens"]),
                       ("add_token_types", fields["types"]), ("add_token_merges", fields["merges"]),
                       ("add_bos_token_id", 0), ("add_eos_token_id", 1)):
        getattr(w, add)(value)
    finish_one_layer_llama_gguf(w, vocab=len(fields["tokens"]), hidden=8, kv_dim=4, ffn=16)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MINITRON_JAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH []" in proc.stdout, proc.stdout
    expected = load_gguf_tokenizer(path)("Hello world")["input_ids"]
    assert f"IDS {expected}" in proc.stdout, proc.stdout
