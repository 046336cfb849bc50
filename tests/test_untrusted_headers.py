"""Hostile GGUF and safetensors headers, crafted byte by byte: every impossible count, length or offset is refused by
name before anything allocates from it (a 133-byte GGUF once drove gguf-py's reader to 20 GB)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from utils import finish_one_layer_llama_gguf

from minitron_jax.convert.gguf import GGUFError, read_gguf
from minitron_jax.convert.gguf_header import (
    MAX_ARRAY_ELEMENTS,
    MAX_TENSOR_COUNT,
    check_gguf_file,
    parse_gguf_header,
)
from minitron_jax.convert.hf import ConversionError, SafetensorsFile

# ---------------------------------------------------------------------------------------------------------------
# GGUF, byte by byte

U8, U32, F32, STRING, ARRAY = 0, 4, 6, 8, 9
GGML_F32, GGML_Q4_0 = 0, 2


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def tinfo(name: str, dims: list[int], ggml_type: int = GGML_F32, offset: int = 0) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def gguf(kvs: list[bytes] = (), tensors: list[bytes] = (), *, n_kv: int | None = None, n_tensors: int | None = None,
         version: int = 3, data: bytes = b"") -> bytes:
    """A GGUF: header, key/values, tensor infos, padding to 32, then ``data``."""
    out = b"GGUF" + u32(version) + u64(len(tensors) if n_tensors is None else n_tensors)
    out += u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return out + b"\0" * (-len(out) % 32) + data


ARCH = kv("general.architecture", STRING, gstr("llama"))


def hostile_2_50() -> bytes:
    """The 133-byte file: metadata key #1 declares a 2**50-element UINT8 array; 19 bytes of it follow."""
    data = b"GGUF" + u32(3) + u64(0) + u64(2) + ARCH + kv("tokenizer.ggml.tokens", ARRAY, u32(U8) + u64(2**50))
    return data + b"\x01" * 19


def refused(tmp_path, data: bytes, match: str, name: str = "model.gguf"):
    """Write ``data`` and check that both the validator and read_gguf refuse it, naming the file, within a second."""
    p = tmp_path / name
    p.write_bytes(data)
    t = time.perf_counter()
    with pytest.raises(GGUFError, match=match) as info:
        check_gguf_file(p)
    assert time.perf_counter() - t < 1.0
    assert str(p) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(GGUFError, match=match):
        read_gguf(p)
    return str(info.value)


def test_the_133_byte_file_is_refused_fast(tmp_path):
    data = hostile_2_50()
    assert len(data) == 133
    msg = refused(tmp_path, data, r"metadata key #1 'tokenizer\.ggml\.tokens' declares 1125899906842624 array "
                                  r"elements but only 19 bytes remain")
    assert msg.startswith(str(tmp_path / "model.gguf") + ": ")


def test_the_133_byte_file_is_refused_with_bounded_memory(tmp_path):
    """In a child limited to 2 GB of address space: unbounded allocation would end in MemoryError or a kill."""
    p = tmp_path / "model.gguf"
    p.write_bytes(hostile_2_50())
    code = textwrap.dedent(f"""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from minitron_jax.convert.gguf import GGUFError, read_gguf
        t = time.perf_counter()
        try:
            read_gguf({str(p)!r})
        except GGUFError as e:
            print("refused", round(time.perf_counter() - t, 3), e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("refused") and "1125899906842624 array elements" in r.stdout, r.stdout
    assert float(r.stdout.split()[1]) < 1.0


@pytest.mark.parametrize("case, match", [
    ("huge string value", r"metadata key #1 'general\.name' declares a 1152921504606846976-byte string but only"),
    ("huge key name", r"metadata key #1's name declares a 1152921504606846976-byte string"),
    ("huge string in array", r"'tokenizer\.ggml\.tokens' element 1 declares a 4294967296-byte string"),
    ("string array count", r"'tokenizer\.ggml\.tokens' declares 1000000 array elements but only \d+ bytes"),
    ("huge kv count", r"header declares 1099511627776 metadata keys but only \d+ bytes remain"),
    ("huge tensor count", r"header declares 1099511627776 tensors but only \d+ bytes remain"),
    ("huge tensor name", r"tensor #0's name declares a 1152921504606846976-byte string"),
    ("unknown value type", r"metadata key #1 'x' has unknown value type 13"),
    ("unknown array type", r"metadata key #1 'x' is an array of unknown value type 77"),
    ("nested arrays", r"'x' element 0 element 0 nests arrays more than 2 deep"),
    ("duplicate key", r"metadata key #1 'general\.architecture' appears twice"),
    ("key not utf-8", r"metadata key #1's name is not UTF-8"),
    ("value not utf-8", r"metadata key #1 'general\.name' is not UTF-8"),
    ("token not utf-8", r"'tokenizer\.ggml\.tokens' element 1 is not UTF-8"),
])
def test_impossible_metadata(tmp_path, case, match):
    kvs = {
        "huge string value": [ARCH, gstr("general.name") + u32(STRING) + u64(2**60) + b"abc"],
        "huge key name": [ARCH, u64(2**60) + b"general.name"],
        "huge string in array": [ARCH, kv("tokenizer.ggml.tokens", ARRAY, u32(STRING) + u64(3) + gstr("a")
                                          + u64(2**32) + gstr("c"))],
        "string array count": [ARCH, kv("tokenizer.ggml.tokens", ARRAY, u32(STRING) + u64(1_000_000) + gstr("a"))],
        "unknown value type": [ARCH, kv("x", 13, u32(0))],
        "unknown array type": [ARCH, kv("x", ARRAY, u32(77) + u64(1) + u32(0))],
        "nested arrays": [ARCH, kv("x", ARRAY, u32(ARRAY) + u64(1) + u32(ARRAY) + u64(1) + u32(U8) + u64(1) + b"\0")],
        "duplicate key": [ARCH, ARCH],
        "key not utf-8": [ARCH, kv("x", U8, b"\0").replace(b"x", b"\xff")],
        "value not utf-8": [ARCH, kv("general.name", STRING, gstr(b"ok\xc3("))],
        "token not utf-8": [ARCH, kv("tokenizer.ggml.tokens", ARRAY, u32(STRING) + u64(2) + gstr("a") + gstr(b"\xfe"))],
    }.get(case, [ARCH])
    counts = {"huge kv count": {"n_kv": 2**40}, "huge tensor count": {"n_tensors": 2**40}}.get(case, {})
    tensors = [u64(2**60) + b"t"] if case == "huge tensor name" else []
    refused(tmp_path, gguf(kvs, tensors, **counts) + b"\0" * 64, match)


@pytest.mark.parametrize("case, match", [
    ("offset beyond EOF", r"tensor #0 'w' \(F32 \[4, 4\], 64 bytes at data offset 1024\) needs bytes up to \d+ "
                          r"but the file has only \d+"),
    ("data cut short", r"tensor #1 'v' .* needs bytes up to \d+ but the file has only"),
    ("dims overflow int64", r"tensor #0 'w' has dimensions \[4294967296, 4294967296\] whose product "
                            r"18446744073709551616 overflows int64"),
    ("dim over int64", r"tensor #0 'w' has dimensions \[9223372036854775808\] whose product"),
    ("five dims", r"tensor #0 'w' declares 5 dimensions \(GGUF allows 1 to 4\)"),
    ("zero dims", r"tensor #0 'w' declares 0 dimensions"),
    ("unknown ggml type", r"tensor #0 'w' has unknown ggml type 31"),
    ("partial block", r"tensor #0 'w' has first dimension 48, not a multiple of the Q4_0 block size 32"),
    ("misaligned offset", r"tensor #0 'w' has data offset 4, not a multiple of the alignment 32"),
    ("duplicate tensor", r"tensor #1 'w' appears twice"),
])
def test_impossible_tensor_infos(tmp_path, case, match):
    data = b"\0" * 128
    tensors = {
        "offset beyond EOF": [tinfo("w", [4, 4], offset=1024)],
        "data cut short": [tinfo("w", [4, 4]), tinfo("v", [64], offset=64)],
        "dims overflow int64": [tinfo("w", [2**32, 2**32])],  # numpy's uint64 product wraps to 0 bytes
        "dim over int64": [tinfo("w", [2**63])],
        "five dims": [tinfo("w", [1, 1, 1, 1, 1])],
        "zero dims": [tinfo("w", [])],
        "unknown ggml type": [tinfo("w", [4], ggml_type=31)],  # a type number llama.cpp retired
        "partial block": [tinfo("w", [48], ggml_type=GGML_Q4_0)],
        "misaligned offset": [tinfo("w", [4], offset=4)],
        "duplicate tensor": [tinfo("w", [4]), tinfo("w", [4], offset=32)],
    }[case]
    refused(tmp_path, gguf([ARCH], tensors, data=data), match)


@pytest.mark.parametrize("value, match", [
    (kv("general.alignment", U32, u32(3)), r"'general\.alignment' is 3, not a power of two"),
    (kv("general.alignment", U32, u32(0)), r"'general\.alignment' is 0, not a power of two"),
    (kv("general.alignment", F32, struct.pack("<f", 32.0)), r"'general\.alignment' must be a UINT32, not FLOAT32"),
])
def test_bad_alignment(tmp_path, value, match):
    refused(tmp_path, gguf([ARCH, value], [tinfo("w", [4])], data=b"\0" * 64), match)


@pytest.mark.parametrize("version, match", [(1, "GGUF version 1 is not supported"),
                                            (4, "GGUF version 4 is not supported"),
                                            (3 << 24, "big-endian")])
def test_versions(tmp_path, version, match):
    refused(tmp_path, gguf([ARCH], version=version), match)


def test_array_elements_are_capped_even_when_the_file_is_big_enough(tmp_path):
    """gguf's reader spends ~1 KB per element: a file of MAX_ARRAY_ELEMENTS + 1 bytes must not cost gigabytes."""
    n = MAX_ARRAY_ELEMENTS + 1
    data = gguf([ARCH, kv("x", ARRAY, u32(U8) + u64(n) + b"\0" * n)])
    refused(tmp_path, data, rf"'x' declares {n} array elements; with the file's other arrays that is more than")
    assert MAX_TENSOR_COUNT < 2**20


def _writer_file(path, rng=None) -> bytes:
    """A small valid GGUF from gguf-py's own writer: strings, arrays, a quantized and a float tensor."""
    import gguf as gg

    w = gg.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list(["<s>", "a", "bb", "ccc", "é東"])
    w.add_token_types([3, 1, 1, 1, 1])
    w.add_array("x.floats", [0.5, 1.5])
    w.add_array("x.nested", [[1, 2], [3]])  # legal GGUF, and the reader handles it
    w.add_tensor("token_embd.weight", np.zeros((5, 32), np.float32))
    w.add_tensor("q.weight", np.zeros((2, 18), np.uint8), raw_dtype=gg.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_writer_files_pass_and_match_the_reader(tmp_path):
    import gguf as gg

    p = tmp_path / "ok.gguf"
    _writer_file(p)
    header = check_gguf_file(p)
    reader = gg.GGUFReader(p)
    assert header.data_start == reader.data_offset
    assert list(header.keys) == [k for k in reader.fields if not k.startswith("GGUF.")]
    assert [(t.name, t.type_name, t.n_bytes, header.data_start + t.offset) for t in header.tensors] == \
        [(t.name, t.tensor_type.name, t.n_bytes, t.data_offset) for t in reader.tensors]


def test_every_cut_of_a_valid_header_is_refused_by_name(tmp_path):
    """Truncated anywhere — mid-magic, mid-KV, mid-string, mid-tensor-info, mid-data — names the file, never
    crashes or hangs."""
    p = tmp_path / "ok.gguf"
    data = _writer_file(p)
    header = check_gguf_file(p)
    last = header.tensors[-1]
    cuts = list(range(0, header.data_start + 1)) + [header.data_start + last.offset + last.n_bytes - 1]
    for cut in cuts:
        with pytest.raises(GGUFError, match="cut.gguf"):
            parse_gguf_header(data[:cut], "cut.gguf")
    # And through the file path (the mmap) at a point in the middle of the key/values.
    mid_kv = data.index(b"tokenizer.ggml.tokens") + 30
    refused(tmp_path, data[:mid_kv], r"truncated in|declares", name="cut.gguf")


TINY_META = {"llama.block_count": 1, "llama.context_length": 256, "llama.embedding_length": 16,
             "llama.feed_forward_length": 32, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
             "llama.rope.dimension_count": 8, "llama.rope.freq_base": 10000.0, "tokenizer.ggml.bos_token_id": 1}


def tiny_llama_gguf(path, **meta):
    """A complete one-layer Llama GGUF (hidden 16, 2 heads, 1 KV head, vocab 32) with ``meta`` over TINY_META; a
    str value is written as a STRING, a list as an ARRAY, an int as UINT32 (UINT64 if it needs it), a float as
    FLOAT32."""
    import gguf as gg

    w = gg.GGUFWriter(str(path), "llama")
    for key, value in {**TINY_META, **meta}.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            (w.add_uint64 if value >= 2**32 else w.add_uint32)(key, value)
    finish_one_layer_llama_gguf(w, vocab=32, hidden=16, kv_dim=8, ffn=32)
    return path


def test_tiny_llama_reads(tmp_path):
    assert read_gguf(tiny_llama_gguf(tmp_path / "tiny.gguf")).hf_config["num_hidden_layers"] == 1


def test_random_byte_flips_never_crash_the_reader(tmp_path):
    """Flip header bytes of a real-looking model at random: read_gguf either works or raises GGUFError (exit 2),
    never another exception (exit 1), never a long stall."""
    good = tiny_llama_gguf(tmp_path / "good.gguf")
    data = bytearray(good.read_bytes())
    end = check_gguf_file(good).data_start
    rng = np.random.default_rng(1)
    bad = tmp_path / "flipped.gguf"
    for _ in range(150):
        flipped = bytearray(data)
        for pos in rng.integers(4, end, size=rng.integers(1, 4)):
            flipped[pos] = rng.integers(0, 256)
        bad.write_bytes(bytes(flipped))
        t = time.perf_counter()
        try:
            read_gguf(bad)
        except GGUFError as e:
            assert "flipped.gguf" in str(e)
        assert time.perf_counter() - t < 5.0


@pytest.mark.parametrize("key, value, match", [
    ("llama.block_count", "2", r"'llama\.block_count' must be an integer, got str '2'"),
    ("llama.block_count", ["1", "1"], r"'llama\.block_count' must be an integer or an array of integers"),
    ("llama.block_count", 1.0, r"'llama\.block_count' must be an integer, got float 1\.0"),
    ("llama.block_count", 2**40, r"llama\.block_count is 1099511627776 but the file has only 11 tensors"),
    ("llama.attention.head_count", 0, r"'llama\.attention\.head_count' is 0, must be at least 1"),
    ("llama.rope.freq_base", "1e4", r"'llama\.rope\.freq_base' must be a positive number, got str '1e4'"),
    ("llama.rope.freq_base", -1.0, r"'llama\.rope\.freq_base' must be a positive number, got float -1\.0"),
    ("tokenizer.ggml.bos_token_id", 10**6, r"tokenizer\.ggml\.bos_token_id is 1000000, outside the vocabulary"),
])
def test_metadata_values_must_have_the_expected_type(tmp_path, key, value, match):
    """A key of the wrong type or an impossible value is refused by name (int("2") would have accepted a string, a
    head count of 0 divided by zero, a block count of 2**40 looped for ever)."""
    p = tiny_llama_gguf(tmp_path / "meta.gguf", **{key: value})
    with pytest.raises(GGUFError, match=match) as info:
        read_gguf(p)
    assert str(p) in str(info.value)


def test_real_smollm2_gguf_passes_fast(smollm2_assets):
    path = smollm2_assets["smollm2_gguf"]
    check_gguf_file(path)  # warm the page cache
    t = time.perf_counter()
    header = check_gguf_file(path)
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, elapsed
    assert header.version == 3 and len(header.tensors) == 272
    assert header.tensors[-1].offset + header.tensors[-1].n_bytes + header.data_start <= header.file_size


# ---------------------------------------------------------------------------------------------------------------
# The CLI: one error line, exit 2, no output


def _run_convert(src, dst):
    return subprocess.run([sys.executable, "-m", "minitron_jax.convert", str(src), str(dst), "--quiet"],
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_hostile_gguf(tmp_path):
    src, out = tmp_path / "hostile.gguf", tmp_path / "out"
    src.write_bytes(hostile_2_50())
    r = _run_convert(src, out)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hostile.gguf" in lines[0], r.stderr
    assert "1125899906842624 array elements" in lines[0]
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_refuses_hostile_safetensors(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}))
    (src / "model.safetensors").write_bytes(safetensors_bytes(
        {"model.embed_tokens.weight": {"dtype": "F32", "shape": [32, 16], "data_offsets": [0, 2048]}}, 16))
    r = _run_convert(src, out)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "model.safetensors" in lines[0] and "'model.embed_tokens.weight'" in lines[0], lines[0]
    assert "Traceback" not in r.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# safetensors


def safetensors_bytes(header, data_len: int, raw_header: bytes | None = None, declared: int | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return u64(len(h) if declared is None else declared) + h + b"\0" * data_len


def _st_refused(tmp_path, data: bytes, match: str):
    p = tmp_path / "model.safetensors"
    p.write_bytes(data)
    with pytest.raises(ConversionError, match=match) as info:
        SafetensorsFile(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


W = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize("header, data_len, match", [
    ({"w": {**W, "data_offsets": [0, 2**40]}}, 24, r"tensor 'w' has data_offsets \[0, 1099511627776\], past the end"),
    ({"w": {**W, "data_offsets": [8, 32]}}, 24, r"tensor 'w' has data_offsets \[8, 32\], past the end of the 24"),
    ({"w": {**W, "shape": [2, 4]}}, 32, r"tensor 'w': shape \[2, 4\] of F32 needs 32 bytes but data_offsets \[0, 24\]"),
    ({"w": {**W, "shape": [-2, -3]}}, 24, r"tensor 'w' has shape \[-2, -3\]; a shape is a list of non-negative"),
    ({"w": {**W, "shape": [2, True]}}, 24, r"tensor 'w' has shape \[2, True\]"),
    ({"w": {**W, "shape": "2x3"}}, 24, r"tensor 'w' has shape '2x3'"),
    ({"w": {**W, "shape": [2**62] * 40}}, 24, r"tensor 'w': shape .* needs \d+ bytes"),
    ({"w": {**W, "data_offsets": [24, 0]}}, 24, r"tensor 'w' has data_offsets \[24, 0\]; expected \[begin, end\]"),
    ({"w": {**W, "data_offsets": [0]}}, 24, r"tensor 'w' has data_offsets \[0\]"),
    ({"w": {**W, "data_offsets": [-8, 16]}}, 24, r"tensor 'w' has data_offsets \[-8, 16\]"),
    ({"w": {**W, "dtype": "F128"}}, 24, r"tensor 'w' has unknown dtype 'F128'"),
    ({"w": {**W, "dtype": ["F32"]}}, 24, r"tensor 'w' has unknown dtype \['F32'\]"),
    ({"w": [1, 2]}, 24, r"tensor 'w': header entry is \[1, 2\], not an object"),
    ({"w": W, "__metadata__": [1]}, 24, r"__metadata__ is \[1\], not an object"),
])
def test_safetensors_impossible_entries(tmp_path, header, data_len, match):
    _st_refused(tmp_path, safetensors_bytes(header, data_len), match)


@pytest.mark.parametrize("raw, declared, match", [
    (b'{"w": 1}', 2**50, r"declares 1125899906842624 header bytes but only \d+ follow"),
    (b"not json", None, r"corrupt safetensors header: JSONDecodeError"),
    (b"\xff\xfe{}", None, r"corrupt safetensors header"),
    (b"[1, 2]", None, r"corrupt safetensors header: JSON list, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, None, r"corrupt safetensors header: RecursionError"),
    (b'{"w": ' + b"9" * 5000 + b"}", None, r"corrupt safetensors header"),  # int() digit limit: a ValueError
])
def test_safetensors_bad_header(tmp_path, raw, declared, match):
    _st_refused(tmp_path, safetensors_bytes(None, 0, raw_header=raw, declared=declared), match)


def test_safetensors_header_size_cap(tmp_path):
    p = tmp_path / "model.safetensors"
    with open(p, "wb") as f:  # sparse: 100 MB + 1 of header that is never read
        f.write(u64(100_000_001))
        f.truncate(8 + 100_000_001)
    with pytest.raises(ConversionError, match=r"header of 100000001 bytes is over the 100000000-byte limit"):
        SafetensorsFile(p)


def test_safetensors_short_file(tmp_path):
    _st_refused(tmp_path, b"\x08\0\0", r"not a safetensors file \(only 3 bytes\)")


def test_safetensors_valid_file_still_loads(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    p = tmp_path / "ok.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), np.float16),
               "c": np.ones((3,), ml_dtypes.bfloat16), "d": np.array(7, np.int64)}
    save_file(tensors, str(p), metadata={"format": "pt"})
    sf = SafetensorsFile(p)
    assert sf.metadata == {"format": "pt"}
    for name, arr in tensors.items():
        np.testing.assert_array_equal(sf.get(name), arr)
        assert sf.get(name).shape == arr.shape
