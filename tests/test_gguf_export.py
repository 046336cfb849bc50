"""GGUF export (``convert.gguf_export``): back through our own GGUF reader, and through llama.cpp itself.

The embedded SmolLM2 is exported once per type (module fixtures); llama.cpp (``llama_cpp_runtime``: the
llama-cpp-cffi wheel's CPU build) loads the files, tokenizes and scores the same tokens as our forward pass.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from utils import tiny_tokenizer

from minitron_jax.cli.convert import main as convert_main
from minitron_jax.config import LlamaConfig, RopeScaling
from minitron_jax.convert import load_model
from minitron_jax.convert.gguf_export import QUANT_TYPES, gguf_source_metadata, save_gguf, tensor_type
from minitron_jax.convert.hf import iter_hf_tensors, save_hf
from minitron_jax.evaluate.perplexity import perplexity
from minitron_jax.exitcodes import BadInputError, NonFiniteError, classify

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the four
# SmolLM2 exports (~20 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("gguf_exports")

# Code, accents, emoji, CJK, digits, runs of spaces and tabs: where byte-level pre-tokenizers differ.
MIXED_TEXT = ("def f(x):\n    return x**2 + 3.14159  # naïve café, 東京 🙂🚀\n\tI'm sure it's 1938 or 2024; "
              "don't   stop.\nÀ bientôt — ¿qué tal? Ελληνικά, русский: 12345678")
WINDOW = 128


@pytest.fixture(scope="module")
def llama_cpp():
    from llama_cpp_runtime import UNAVAILABLE, load_runtime

    rt = load_runtime()
    if rt is None:
        pytest.skip(f"llama.cpp runtime unavailable: {UNAVAILABLE}")
    return rt


@pytest.fixture(scope="module")
def source(smollm2_assets):
    return load_model(smollm2_assets["smollm2_gguf"])


@pytest.fixture(scope="module")
def windows(source, smollm2_assets):
    """Two windows of held-out Wikipedia text, tokenized by our tokenizer (both runtimes score these ids)."""
    from minitron_jax.data.assets import load_texts

    text = "\n\n".join(load_texts("wikipedia", limit=8))
    ids = source.tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids[: 2 * WINDOW], np.int32).reshape(2, WINDOW)


@pytest.fixture(scope="module")
def exports(source, smollm2_assets, tmp_path_factory):
    """The embedded model exported as f32, f16, q8_0 and q4_0: {quant: (path, summary)}."""
    out = tmp_path_factory.mktemp("gguf_exports")
    src = smollm2_assets["smollm2_gguf"]
    meta = gguf_source_metadata(src)
    return {q: (out / f"smollm2.{q}.gguf",
                save_gguf(out / f"smollm2.{q}.gguf", source.config, source.params, tokenizer=source.tokenizer,
                          quant=q, metadata=meta, sources=[src]))
            for q in ("f32", "f16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def reloaded(exports):
    """Each export read back by our reader (without tokenizer), once: {quant: LoadedModel}."""
    cache = {}

    def get(quant):
        if quant not in cache:
            cache[quant] = load_model(exports[quant][0], with_tokenizer=False)
        return cache[quant]

    return get


def _hf_tensors(config, params):
    return dict(iter_hf_tensors(config, params))


def _fields(path, keys=None):
    """A GGUF's metadata (``keys`` only, when given: decoding the 49k-entry vocabulary arrays takes seconds)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items()
            if not k.startswith("GGUF.") and (keys is None or k in keys)}


# ---------------------------------------------------------------------------------------------------------------
# Back through our own reader


def test_f32_export_reads_back_bit_exact(source, exports):
    path, summary = exports["f32"]
    back = load_model(path)
    assert back.config == source.config
    for name, arr in jax.tree_util.tree_leaves_with_path(source.params):
        got = back.params
        for k in name:
            got = got[k.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(arr), err_msg=str(name))
    assert summary["tensor_types"] == {"F32": 272} and summary["params"] == 134_515_008
    # The tokenizer our reader rebuilds from the exported metadata is the source's.
    assert back.tokenizer(MIXED_TEXT)["input_ids"] == source.tokenizer(MIXED_TEXT)["input_ids"]
    assert back.tokenizer.chat_template == source.tokenizer.chat_template


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_export_within_block_bound(source, exports, reloaded, quant):
    """Every weight within its block quantizer's bound: Q8_0 rounds to amax/127 steps, Q4_0 to amax/8 steps (the
    block's extreme may clip one step); the f16 block scale adds ≤ 2^-11 relative per step counted."""
    _, summary = exports[quant]
    back = reloaded(quant)
    ours, theirs = _hf_tensors(source.config, source.params), _hf_tensors(back.config, back.params)
    bound_steps = {"Q8_0": (127, 0.5 + 127 * 2**-11), "Q4_0": (8, 1 + 8 * 2**-11)}
    changed = 0
    for name, w in ours.items():
        gname = name  # only the shape matters for the type rule; names map 1:1
        ttype = tensor_type("token_embd.weight" if "embed_tokens" in name else gname, w.shape, quant)
        err = np.abs(theirs[name] - w)
        if ttype == "F32":
            assert err.max() == 0, name
            continue
        levels, steps = bound_steps[ttype]
        blocks = w.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) / levels * steps * (1 + 1e-6) + 1e-12
        assert (err.reshape(-1, 32) <= bound).all(), f"{name}: {quant} error beyond the block bound"
        changed += err.max() > 0
    assert changed > 100  # the matrices really were quantized (the source's Q4_1 grid is not Q4_0's)
    assert summary["tensor_types"] == ({"F32": 61, "Q8_0": 211} if quant == "q8_0"
                                       else {"F32": 61, "Q4_0": 210, "Q8_0": 1})  # embedding kept at Q8_0


def test_metadata_carries_every_source_key(exports, smollm2_assets):
    """Every key of the source GGUF (what llama.cpp and our reader read: hyperparameters, the whole vocabulary,
    merges, token types, special ids, chat template, general.*) is in the export with the same value."""
    from gguf import GGUFReader

    source_meta = _fields(smollm2_assets["smollm2_gguf"])
    ours = _fields(exports["f32"][0])
    missing = sorted(set(source_meta) - set(ours))
    assert not missing, f"keys of the source GGUF missing from the export: {missing}"
    differ = sorted(k for k in source_meta if k != "general.file_type" and ours[k] != source_meta[k])
    assert not differ, f"values differ from the source's: {differ}"
    assert ours["general.parameter_count"] == 134_515_008
    # The quantized files carry the same keys (one checked: opening a reader costs seconds); only file_type differs.
    fields = GGUFReader(exports["q4_0"][0]).fields
    assert {k for k in fields if not k.startswith("GGUF.")} == set(ours)
    assert fields["general.file_type"].contents() == QUANT_TYPES["q4_0"][1] and ours["general.file_type"] == 0
    # The SmolLM2 export keeps hidden = heads × head_dim, so no key_length is needed (the student test has it).
    assert "llama.attention.key_length" not in ours


# ---------------------------------------------------------------------------------------------------------------
# Through llama.cpp


@pytest.mark.parametrize("quant,rtol", [("f32", 1e-3), ("f16", 1e-3), ("q8_0", 0.05), ("q4_0", 0.1)])
def test_llama_cpp_perplexity_equals_ours(llama_cpp, exports, reloaded, windows, quant, rtol):
    """llama.cpp's perplexity on the exported file equals ours on the weights the file holds (read back). F32/F16:
    within 1e-3. Quantized files: llama.cpp also quantizes the activations (Q8 dot products), so only a loose
    sanity bound here; ``tools/gguf_vs_llama_cpp.py`` reports the differences."""
    path, _ = exports[quant]
    back = reloaded(quant)
    ours = perplexity(back.config, back.params, windows, batch_size=2)
    with llama_cpp.load(path, n_ctx=WINDOW) as lm:
        theirs = lm.perplexity(windows)
    assert abs(theirs - ours) / ours < rtol, (quant, theirs, ours)


def test_llama_cpp_tokenizes_like_the_source(llama_cpp, exports, source, smollm2_assets):
    """llama.cpp reads our tokenizer metadata exactly as the source's (long held-out text included), and on mixed
    text its ids equal our tokenizer's."""
    from minitron_jax.data.assets import load_texts

    text = "\n\n".join(load_texts("wikipedia", limit=6))[:6000] + "\n" + MIXED_TEXT
    with llama_cpp.load(exports["f32"][0], n_ctx=64) as ours, \
            llama_cpp.load(smollm2_assets["smollm2_gguf"], n_ctx=64) as theirs:
        assert ours.tokenize(text) == theirs.tokenize(text)
        assert ours.tokenize(MIXED_TEXT) == source.tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"]
        # Special tokens in text (chat turns) map to the same control ids.
        chat = source.tokenizer.apply_chat_template([{"role": "user", "content": "Hi 👋"}], tokenize=False)
        assert ours.tokenize(chat, parse_special=True) == source.tokenizer(chat, add_special_tokens=False)["input_ids"]


def test_llama_cpp_and_ours_agree_on_whitespace_before_digits(llama_cpp, exports, source):
    text = "Washington.\n\n\n\n7362 ships"
    with llama_cpp.load(exports["f32"][0], n_ctx=64) as lm:
        assert lm.tokenize(text) == source.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Students and other shapes


@pytest.fixture(scope="module")
def student(source):
    """A pruned SmolLM2: 4 of 30 layers, hidden 576 → 480, FFN 1536 → 1024, all 9 heads of head_dim 64 (so
    heads × head_dim = 576 ≠ 480: llama.cpp needs key_length/value_length)."""
    from minitron_jax.compress.prune import drop_layers, prune_ffn, prune_hidden

    rng = np.random.default_rng(0)
    config, params = drop_layers(source.config, source.params, list(range(4, 30)))
    config, params = prune_hidden(config, params, np.sort(rng.permutation(576)[:480]))
    config, params = prune_ffn(config, params, np.sort(rng.permutation(1536)[:1024]))
    assert (config.hidden_size, config.num_heads, config.head_dim) == (480, 9, 64)
    return config, jax.tree.map(np.asarray, params)


def test_pruned_student_round_trips_and_runs_in_llama_cpp(llama_cpp, student, source, windows, tmp_path):
    config, params = student
    path = tmp_path / "student.gguf"
    save_gguf(path, config, params, tokenizer=source.tokenizer, quant="f32",
              metadata={"name": "smollm2 student", "base_models": [{"name": "SmolLM2 135M Instruct",
                                                                    "organization": "HuggingFaceTB"}],
                        "tokenizer.ggml.pre": "smollm"})
    meta = _fields(path, {"llama.attention.key_length", "llama.attention.value_length", "llama.embedding_length",
                          "general.base_model.0.organization"})
    assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == 64
    assert meta["llama.embedding_length"] == 480 and meta["general.base_model.0.organization"] == "HuggingFaceTB"
    back = load_model(path, with_tokenizer=False)
    assert back.config.replace(extra=()) == config.replace(extra=())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(a, b)
    ours = perplexity(config, params, windows, batch_size=2)
    with llama_cpp.load(path, n_ctx=WINDOW) as lm:
        theirs = lm.perplexity(windows)
    assert abs(theirs - ours) / ours < 1e-3, (theirs, ours)


def _tiny(tmp_path, **overrides):
    """A random untied Llama-3.1-style model (llama3 RoPE scaling, head_dim ≠ hidden/heads) with a byte-level BPE
    tokenizer, saved as an HF directory."""
    from minitron_jax.model import init_params

    cfg = dict(vocab_size=320, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=32, rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=False,
               rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 128),
               extra=(("bos_token_id", 0), ("eos_token_id", 0)))
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0), std=0.3))
    tok = tiny_tokenizer(300)
    save_hf(tmp_path / "hf", config, params, tokenizer=tok)
    return config, params, tok, tmp_path / "hf"


def test_untied_llama3_scaled_model_through_cli_and_llama_cpp(llama_cpp, tmp_path):
    """The CLI path (HF dir → .gguf): output.weight, the rope_freqs tensor and key_length all reach llama.cpp, whose
    logits-based perplexity equals ours; our reader recovers the llama3 rope_scaling from rope_freqs."""
    config, params, tok, hf = _tiny(tmp_path)
    out = tmp_path / "tiny.gguf"
    assert convert_main([str(hf), str(out), "--quant", "f32", "--quiet"]) == 0
    meta = _fields(out)
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and len(meta["tokenizer.ggml.tokens"]) == 320
    assert meta["tokenizer.ggml.token_type"][300:] == [5] * 20  # ids past the tokenizer: [PADi], unused
    back = load_model(out)
    assert back.config.rope_scaling == config.rope_scaling and not back.config.tie_word_embeddings
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(1)
    wins = rng.integers(0, 300, size=(2, 96)).astype(np.int32)
    ours = perplexity(config, params, wins, batch_size=2)
    with llama_cpp.load(out, n_ctx=96) as lm:
        assert abs(lm.perplexity(wins) - ours) / ours < 1e-3
        text = "the quick brown fox 123 — naïve"
        assert lm.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Refusals: the right exit code and nothing written


def _left_in(directory):
    return sorted(p.name for p in directory.iterdir() if p.name != "hf")


def test_quant_block_must_divide_rows(tmp_path, capsys):
    config, params, tok, hf = _tiny(tmp_path, intermediate_size=100, rope_scaling=None)
    with pytest.raises(BadInputError, match=r"blk\.0\.ffn_down\.weight has shape \[96, 100\]"):
        save_gguf(tmp_path / "x.gguf", config, params, tokenizer=tok, quant="q8_0")
    assert convert_main([str(hf), str(tmp_path / "y.gguf"), "--quant", "q4_0", "--quiet"]) == 2
    assert "ffn_down" in capsys.readouterr().err
    assert _left_in(tmp_path) == []
    # The same model at f16 has no blocks to fit.
    assert convert_main([str(hf), str(tmp_path / "z.gguf"), "--quant", "f16", "--quiet"]) == 0


def test_destination_and_option_refusals(tmp_path, capsys):
    config, params, tok, hf = _tiny(tmp_path, rope_scaling=None)
    out = tmp_path / "m.gguf"
    assert convert_main([str(hf), str(out), "--quiet"]) == 0  # default quant f16
    assert _fields(out)["general.file_type"] == 1
    before = out.read_bytes()
    assert convert_main([str(hf), str(out), "--quant", "q8_0", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert convert_main([str(hf), str(out), "--quant", "q8_0", "--overwrite", "--quiet"]) == 0
    assert _fields(out)["general.file_type"] == 7
    # --overwrite replaces a GGUF, never a file of another kind.
    other = tmp_path / "notes.gguf"
    other.write_text("mine")
    assert convert_main([str(hf), str(other), "--overwrite", "--quiet"]) == 2
    assert other.read_text() == "mine"
    # --quant is for GGUF output only; --dtype is not for GGUF output.
    assert convert_main([str(hf), str(tmp_path / "hf_out"), "--quant", "q8_0", "--quiet"]) == 2
    assert convert_main([str(hf), str(tmp_path / "x.gguf"), "--dtype", "bfloat16", "--quiet"]) == 2
    assert "--quant is for GGUF output only" in capsys.readouterr().err
    assert _left_in(tmp_path) == ["m.gguf", "notes.gguf"]


def test_nonfinite_params_and_failures_write_nothing(tmp_path, monkeypatch):
    config, params, tok, _ = _tiny(tmp_path, rope_scaling=None)
    bad = jax.tree.map(np.copy, params)
    bad["layers"]["up"][1, 3, 7] = np.nan
    with pytest.raises(NonFiniteError, match=r"layers\.up\[1\]") as e:
        save_gguf(tmp_path / "nan.gguf", config, bad, tokenizer=tok, quant="f32")
    assert classify(e.value)[0] == 3
    # A failure halfway through the tensors leaves neither a file nor a temporary one, and keeps an existing file.
    out = tmp_path / "keep.gguf"
    save_gguf(out, config, params, tokenizer=tok, quant="f32")
    before = out.read_bytes()
    import minitron_jax.convert.gguf_export as ge

    calls = []

    def explode(arr, ttype, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(arr, ttype, name)

    real = ge._quantized
    monkeypatch.setattr(ge, "_quantized", explode)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(out, config, params, tokenizer=tok, quant="q8_0", overwrite=True)
    assert out.read_bytes() == before
    assert _left_in(tmp_path) == ["keep.gguf"]
    # Fp16 overflow is refused by name rather than written as inf.
    monkeypatch.setattr(ge, "_quantized", real)
    big = jax.tree.map(np.copy, params)
    big["layers"]["gate"][0, 0, 0] = 1e6
    with pytest.raises(NonFiniteError, match="float16"):
        save_gguf(tmp_path / "big.gguf", config, big, tokenizer=tok, quant="f16")
    assert _left_in(tmp_path) == ["keep.gguf"]
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir()), os.listdir(tmp_path)


def test_linear_rope_scaling_and_new_directory(tmp_path):
    """Linear RoPE scaling travels as llama.rope.scaling.* metadata (our reader rebuilds the config from it); a
    destination in a directory that does not exist yet is created."""
    config, params, tok, _ = _tiny(tmp_path, rope_scaling=RopeScaling("linear", 2.0), tie_word_embeddings=True)
    out = tmp_path / "new" / "dir" / "lin.gguf"
    summary = save_gguf(out, config, params, tokenizer=tok, quant="bf16")
    assert summary["tensor_types"] == {"BF16": 15, "F32": 5}  # embedding + 7 per layer; norms stay F32
    back = load_model(out, with_tokenizer=False)
    assert back.config.rope_scaling == config.rope_scaling and back.config.tie_word_embeddings
    assert _fields(out, {"llama.rope.scaling.type"})["llama.rope.scaling.type"] == "linear"


def test_a_refused_write_of_the_gguf_is_one_line_naming_it(tmp_path):
    """gguf's writer writes tensors with numpy's ``tofile``, which reports a short write as "15360 requested and
    12304 written" with no errno: the pipeline's export stage on a full disk ended in that traceback, exit 1. Here a
    real refused write (the child's file-size limit): one line naming the GGUF, exit 6, nothing left."""
    import subprocess
    import sys
    import textwrap

    _, _, _, hf = _tiny(tmp_path, rope_scaling=None)
    out = tmp_path / "m.gguf"
    child = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from minitron_jax.cli.convert import main
        sys.exit(main([{str(hf)!r}, {str(out)!r}, "--quant", "f32", "--quiet"]))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: file size limit exceeded writing {out} (File too large)"]
    assert _left_in(tmp_path) == []
