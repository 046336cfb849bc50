"""A GGUF's tokenizer rebuilt from its metadata with the ``tokenizers`` library alone — no torch.

transformers can build this tokenizer too (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), but its GGUF
path imports torch (``transformers/integrations/gguf``), and torch is not a runtime dependency of ours: the
README's first command failed on a machine without it. So we assemble the same ``tokenizers.Tokenizer`` here
from llama.cpp's metadata keys and only wrap it in transformers' torch-free ``PreTrainedTokenizerFast``. The test
suite checks that it encodes and decodes exactly like transformers' own conversion (real SmolLM2 and synthetic
byte-level and sentencepiece vocabularies) and, for SmolLM2, like llama.cpp itself. (transformers' converter has no
digit split for ``smollm``; we follow llama.cpp and HF's SmolLM2 tokenizer.json there — see ``DIGIT_SPLIT_PRE``.)

The two vocabularies Llama-family GGUFs carry (``tokenizer.ggml.model``):

- ``gpt2`` — byte-level BPE (Llama 3, SmolLM2, Mistral-NeMo's tekken...): every token is spelled in the GPT-2
  byte alphabet; text is split by a regex that depends on ``tokenizer.ggml.pre`` and then mapped to bytes.
- ``llama`` — sentencepiece BPE (Llama 1/2, Mistral 7B): ``▁`` marks spaces, unknown bytes fall back to
  ``<0xNN>`` tokens, merges may be absent (then rebuilt from the token scores), BOS is added by default.

Token types (``tokenizer.ggml.token_type``, llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control tokens become special added tokens, user-defined ones plain added tokens, so neither is
cut into pieces when it appears in text.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

# Pre-tokenizer regexes by ``tokenizer.ggml.pre``: the split the vocabulary's merges were learned with (llama.cpp
# keeps the same table in llama-vocab.cpp). Names not listed use GPT-2's own regex, built into ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# Vocabularies trained with every digit its own pre-token: llama.cpp splits on ``\p{N}`` first, then applies GPT-2's
# regex (its STARCODER/REFACT/COMMAND_R/SMOLLM/CODESHELL/EXAONE/MINERVA group in llama-vocab.cpp), and HF's
# tokenizer.json for SmolLM2 (and StarCoder) says the same: ``Sequence[Digits(individual_digits=True), ByteLevel]``.
# Without the digit split, whitespace before a digit joins the wrong pre-token ("\n\n\n\n7" → "\n\n\n" + "\n" + "7"
# instead of "\n\n\n\n" + "7"), and a vocabulary with multi-digit tokens would merge digit runs llama.cpp keeps
# apart.
DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
# Bumped whenever a change here tokenizes some GGUF differently: the on-disk cache of built tokenizers
# (``convert.gguf_tokenizer_dir``) keys on it, so a tokenizer saved by older code is never reused.
# 3: the digit split for DIGIT_SPLIT_PRE (SmolLM2's "smollm" was a plain ByteLevel before).
TOKENIZER_BUILD_VERSION = 3
# Llama 3's tokenizer looks a whole pre-token up in the vocabulary before applying merges (``ignore_merges`` in
# its tokenizer.json, the same switch in llama.cpp for these pre-tokenizers).
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe"})

_METADATA_KEYS = {
    "tokenizer.ggml.model": "model", "tokenizer.ggml.pre": "pre", "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores", "tokenizer.ggml.token_type": "token_type", "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.bos_token_id": "bos_id", "tokenizer.ggml.eos_token_id": "eos_id",
    "tokenizer.ggml.unknown_token_id": "unk_id", "tokenizer.ggml.padding_token_id": "pad_id",
    "tokenizer.ggml.add_bos_token": "add_bos", "tokenizer.ggml.add_eos_token": "add_eos",
    "tokenizer.ggml.add_space_prefix": "add_space_prefix", "tokenizer.chat_template": "chat_template",
}


class GGUFTokenizerError(ValueError):
    """A GGUF whose tokenizer metadata is missing, inconsistent, or of a kind we do not build."""


def read_tokenizer_fields(reader, source: Any) -> dict[str, Any]:
    """The tokenizer metadata of an open ``GGUFReader`` under short names (see ``_METADATA_KEYS``)."""
    fields = {short: reader.fields[key].contents() for key, short in _METADATA_KEYS.items() if key in reader.fields}
    if "tokens" not in fields or "model" not in fields:
        raise GGUFTokenizerError(f"{source} carries no tokenizer (no tokenizer.ggml.tokens / tokenizer.ggml.model)")
    n = len(fields["tokens"])
    for key in ("scores", "token_type"):
        if key in fields and len(fields[key]) != n:
            raise GGUFTokenizerError(f"{source}: tokenizer.ggml.{key} has {len(fields[key])} entries for {n} tokens")
    for key in ("bos_id", "eos_id", "unk_id", "pad_id"):
        if key in fields and not (isinstance(fields[key], int) and 0 <= fields[key] < n):
            raise GGUFTokenizerError(f"{source}: tokenizer.ggml.{key.replace('_id', '')}_token_id = "
                                     f"{fields[key]!r} is not a token id (vocabulary of {n})")
    return fields


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what ``ByteLevel`` uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges(fields: dict[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges, or — for sentencepiece files that store none — the merges its token scores imply:
    every split of a token into two tokens, best (highest-scoring) merged token first."""
    if "merges" in fields:
        out = []
        for m in fields["merges"]:
            parts = m.split(" ")
            if len(parts) != 2:
                raise GGUFTokenizerError(f"malformed merge {m!r} (expected two tokens separated by one space)")
            out.append((parts[0], parts[1]))
        return out
    scores = fields.get("scores") or [0.0] * len(vocab)
    found = []
    for token, index in vocab.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, scores[index]) for left, right in local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def build_tokenizer(fields: dict[str, Any], source: Any = "GGUF"):
    """A ``tokenizers.Tokenizer`` from :func:`read_tokenizer_fields`'s dict."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind, tokens = fields["model"], list(fields["tokens"])
    types = list(fields.get("token_type") or [1] * len(tokens))
    if kind == "gpt2":
        alphabet = _byte_alphabet()
        letters = set(alphabet.values())
        # A few files store a token as plain text instead of in the byte alphabet: respell it, as llama.cpp reads it.
        spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        pre = fields.get("pre")
        tok = Tokenizer(BPE(vocab, _merges(fields, vocab), dropout=None, unk_token=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                            ignore_merges=pre in _IGNORE_MERGES))
        split = PRE_TOKENIZER_SPLITS.get(pre)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in DIGIT_SPLIT_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif split is None:
            tok.pre_tokenizer = byte_level
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # A control token spelled outside the byte alphabet is a mislabel in some files; adding it would grow the
        # vocabulary past the embedding's rows, so it stays an ordinary (unreachable) entry.
        control = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL and set(t) <= letters]
        add_bos_default = False
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = tokens[fields["unk_id"]] if "unk_id" in fields else ("<unk>" if "<unk>" in vocab else None)
        tok = Tokenizer(BPE(vocab, _merges(fields, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True,
                            dropout=None))
        prefix = bool(fields.get("add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
        control = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
        add_bos_default = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
    else:
        raise GGUFTokenizerError(f"{source}: tokenizer.ggml.model = {kind!r} is not supported (gpt2 or llama)")

    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    bos = tokens[fields["bos_id"]] if "bos_id" in fields else None
    eos = tokens[fields["eos_id"]] if "eos_id" in fields else None
    add_bos = bool(fields.get("add_bos", add_bos_default)) and bos is not None
    add_eos = bool(fields.get("add_eos", False)) and eos is not None
    single, pair, special = ["$A:0"], ["$A:0"], []
    if add_bos:
        single, pair = [f"{bos}:0", *single], [f"{bos}:0", *pair, f"{bos}:1"]
        special.append((bos, fields["bos_id"]))
    pair.append("$B:1")
    if add_eos:
        single, pair = [*single, f"{eos}:0"], [*pair[:-1], f"{eos}:0", "$B:1", f"{eos}:1"]
        if eos != bos or not add_bos:
            special.append((eos, fields["eos_id"]))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok


def load_gguf_tokenizer(path: str | Path, reader=None):
    """The GGUF's tokenizer as a transformers ``PreTrainedTokenizerFast`` (torch-free), with its special tokens,
    BOS/EOS convention and chat template. ``reader``: an open ``GGUFReader`` of ``path`` (default: opened here,
    after the header check)."""
    from transformers import PreTrainedTokenizerFast

    if reader is None:
        from gguf import GGUFReader

        from minitron_jax.convert.gguf_header import check_gguf_file

        check_gguf_file(Path(path))
        reader = GGUFReader(Path(path), "r")
    fields = read_tokenizer_fields(reader, path)
    backend = build_tokenizer(fields, path)
    tokens = fields["tokens"]
    named = {name: tokens[fields[key]] for name, key in (("bos_token", "bos_id"), ("eos_token", "eos_id"),
                                                           ("unk_token", "unk_id"), ("pad_token", "pad_id"))
             if key in fields}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **named)
    if fields.get("chat_template"):
        fast.chat_template = fields["chat_template"]
    return fast
