"""Check a GGUF header against the file's size before anything trusts it.

gguf-py's ``GGUFReader`` believes every count it reads: a 133-byte file declaring a 2**50-element array makes it
build Python objects until the OOM killer ends the process. :func:`check_gguf_file` walks the header first — magic,
version, counts, every key/value (array elements and string lengths included), every tensor info — in pure Python
over a memory map, comparing each declared count, length and offset with the bytes that remain, and refuses the
first impossible field by name::

    model.gguf: metadata key #3 'tokenizer.ggml.tokens' declares 1125899906842624 array elements but only 97 bytes
    remain

A file that passes cannot send the reader past its end. Because the reader also spends ~1 KB of Python objects on
every array element, key and tensor (measured: 1.3 GB and 19 s for one million strings), a file consistent with its
size can still exhaust memory by declaring millions of tiny elements; the caps below bound that while staying far
above any real Llama GGUF (SmolLM2: 146k array elements, 31 keys, 272 tensors; Llama 3: ~540k elements).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that is missing, malformed, or describes something we cannot convert."""

# GGUF value types (gguf.constants.GGUFValueType), with the byte size of the fixed-size ones.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_VALUE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
                8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}

# The smallest records the format allows: a key/value is a key length (8) + a type (4) + a one-byte value; a tensor
# info is a name length (8) + n_dims (4) + a type (4) + an offset (8). They bound the counts before any loop runs.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # an array of arrays is legal GGUF (no real file uses it); deeper nesting is refused
INT64_MAX = 2**63 - 1
# Bounds on what GGUFReader turns into Python objects (see the module docstring).
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 21  # summed over every metadata array in the file
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest dimension first)
    type_name: str  # GGMLQuantizationType name
    offset: int  # from the start of the data section
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    version: int
    keys: tuple[str, ...]
    alignment: int
    data_start: int  # absolute offset of the (aligned) data section
    tensors: tuple[GGUFTensorInfo, ...]
    file_size: int


class _Cursor:
    """A read position in the header; every read first checks that the bytes exist."""

    def __init__(self, buf, label: str):
        self.buf, self.label, self.pos, self.size = buf, label, 0, len(buf)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.label}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.fail(f"truncated in {what}: needs {n} bytes at offset {self.pos}, only {self.remaining} remain")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> bytes:
        """A GGUF string (u64 length + bytes); the length is checked against the file before anything is read."""
        n = self.unpack("<Q", f"the length of {what}")
        if n > self.remaining:
            raise self.fail(f"{what} declares a {n}-byte string but only {self.remaining} bytes remain")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 ({raw[:32]!r})") from None


def _skip_value(cur: _Cursor, vtype: int, what: str, depth: int, budget: list[int]) -> int | None:
    """Step over one value of ``vtype``; returns a UINT32's value (alignment needs it), else None.

    ``budget`` holds how many more array elements the file may declare (a one-item list: shared across keys)."""
    if vtype in _FIXED_SIZES:
        size = _FIXED_SIZES[vtype]
        cur.need(size, what)
        value = struct.unpack_from("<I", cur.buf, cur.pos)[0] if vtype == _UINT32 else None
        cur.pos += size
        return value
    if vtype == _STRING:
        cur.text(what)  # GGUF strings are UTF-8; the reader's decoding would fail later without naming the key
        return None
    if vtype != _ARRAY:
        raise cur.fail(f"{what} has unknown value type {vtype} (known: 0-12)")
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    etype = cur.unpack("<I", f"the element type of {what}")
    count = cur.unpack("<Q", f"the element count of {what}")
    # Each element takes at least this many bytes; an impossible count is refused before any element is read.
    min_size = {_STRING: 8, _ARRAY: 12}.get(etype, _FIXED_SIZES.get(etype))
    if min_size is None:
        raise cur.fail(f"{what} is an array of unknown value type {etype} (known: 0-12)")
    if count * min_size > cur.remaining:
        raise cur.fail(f"{what} declares {count} array elements but only {cur.remaining} bytes remain")
    if count > budget[0]:
        raise cur.fail(f"{what} declares {count} array elements; with the file's other arrays that is more than "
                       f"the {MAX_ARRAY_ELEMENTS} we accept (gguf's reader spends ~1 KB of memory per element)")
    budget[0] -= count
    if etype in _FIXED_SIZES:
        cur.pos += count * min_size
    elif etype == _STRING:
        # A tight loop over lengths and UTF-8 (50k tokens take milliseconds); count*8 bytes are known to exist.
        buf, pos, size = cur.buf, cur.pos, cur.size
        for i in range(count):
            if pos + 8 > size:
                cur.pos = pos
                cur.need(8, f"the length of {what} element {i}")
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
            if n > size - pos:
                raise cur.fail(f"{what} element {i} declares a {n}-byte string but only {size - pos} bytes remain")
            try:
                str(buf[pos:pos + n], "utf-8")
            except UnicodeDecodeError:
                raise cur.fail(f"{what} element {i} is not UTF-8 ({bytes(buf[pos:pos + min(n, 32)])!r})") from None
            pos += n
        cur.pos = pos
    else:
        for i in range(count):
            _skip_value(cur, _ARRAY, f"{what} element {i}", depth + 1, budget)
    return None


def parse_gguf_header(buf, label: str) -> GGUFHeader:
    """Validate the GGUF header in ``buf`` (bytes, mmap, memoryview: the whole file) and describe it.

    Raises :class:`GGUFError` naming ``label`` and the first impossible field. Reads only the header; tensor data is
    checked by extent, never touched."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(buf, label)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version & 0xFFFF == 0 and version:
        raise cur.fail("is a big-endian GGUF, which is not supported")
    if version not in (2, 3):
        raise cur.fail(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the metadata key count")
    for count, what, each, cap in ((n_kv, "metadata keys", _MIN_KV_BYTES, MAX_KV_COUNT),
                                   (n_tensors, "tensors", _MIN_TENSOR_INFO_BYTES, MAX_TENSOR_COUNT)):
        if count * each > cur.remaining:
            raise cur.fail(f"header declares {count} {what} but only {cur.remaining} bytes remain "
                           f"(each needs at least {each})")
        if count > cap:
            raise cur.fail(f"header declares {count} {what}, more than the {cap} we accept")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        raise cur.fail(f"header declares {n_kv} metadata keys and {n_tensors} tensors but only {cur.remaining} "
                       "bytes remain")

    keys: list[str] = []
    seen: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    budget = [MAX_ARRAY_ELEMENTS]
    for i in range(n_kv):
        key = cur.text(f"metadata key #{i}'s name")
        what = f"metadata key #{i} {key!r}"
        if key in seen:
            raise cur.fail(f"{what} appears twice")
        seen.add(key)
        vtype = cur.unpack("<I", f"the value type of {what}")
        value = _skip_value(cur, vtype, what, 0, budget)
        if key == "general.alignment":
            if vtype != _UINT32:
                raise cur.fail(f"{what} must be a UINT32, not {_VALUE_NAMES.get(vtype, vtype)}")
            if value == 0 or value & (value - 1):
                raise cur.fail(f"{what} is {value}, not a power of two")
            alignment = value
        keys.append(key)

    infos = []
    names: set[str] = set()
    for j in range(n_tensors):
        name = cur.text(f"tensor #{j}'s name")
        what = f"tensor #{j} {name!r}"
        if name in names:
            raise cur.fail(f"{what} appears twice")
        names.add(name)
        n_dims = cur.unpack("<I", f"the dimension count of {what}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{what} declares {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos) if cur.remaining >= 8 * n_dims else None
        if dims is None:
            cur.need(8 * n_dims, f"the dimensions of {what}")
        cur.pos += 8 * n_dims
        n_elements = 1
        for d in dims:
            n_elements *= d
        if any(d > INT64_MAX for d in dims) or n_elements > INT64_MAX:
            raise cur.fail(f"{what} has dimensions {list(dims)} whose product {n_elements} overflows int64")
        raw_type = cur.unpack("<I", f"the type of {what}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.fail(f"{what} has unknown ggml type {raw_type}") from None
        if dims and dims[0] % block:
            raise cur.fail(f"{what} has first dimension {dims[0]}, not a multiple of the {qtype.name} block size "
                           f"{block}")
        offset = cur.unpack("<Q", f"the data offset of {what}")
        if offset % alignment:
            raise cur.fail(f"{what} has data offset {offset}, not a multiple of the alignment {alignment}")
        infos.append(GGUFTensorInfo(name, tuple(dims), qtype.name, offset, n_elements // block * type_size))

    data_start = -(-cur.pos // alignment) * alignment
    for j, t in enumerate(infos):
        end = data_start + t.offset + t.n_bytes
        if end > cur.size:
            raise cur.fail(f"tensor #{j} {t.name!r} ({t.type_name} {list(t.shape)}, {t.n_bytes} bytes at data "
                           f"offset {t.offset}) needs bytes up to {end} but the file has only {cur.size} "
                           "(truncated?)")
    return GGUFHeader(version, tuple(keys), alignment, data_start, tuple(infos), cur.size)


def check_gguf_file(path: str | os.PathLike) -> GGUFHeader:
    """:func:`parse_gguf_header` on a file, read through a memory map (only the header's pages are touched)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER_BYTES:
            head = f.read(4)
            if head != GGUF_MAGIC:
                raise GGUFError(f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
            raise GGUFError(f"{path}: truncated: {size} bytes, a GGUF header needs at least {_HEADER_BYTES}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return parse_gguf_header(m, str(path))
