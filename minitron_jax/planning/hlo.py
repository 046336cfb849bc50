"""Reading a compiled XLA program's text: matmul FLOPs and collectives per step, loop trip counts included.

``compiled.cost_analysis()`` counts the body of a ``while`` loop once, but our layers run in a ``lax.scan`` (a while
loop executing L times), gradient accumulation is a scan over micro-batches and the chunked loss a scan over token
chunks, so its totals are low by about L × micro-batches. This module walks the HLO call graph instead: every
computation gets a multiplier (the product of the ``known_trip_count`` s of the loops around it, summed over its call
sites), and each ``dot`` and each collective is weighted by the multiplier of the computation it sits in.

Only the text of ``compiled.as_text()`` is read (post-optimization, post-SPMD-partitioning HLO, per device), so
everything here is *per device per step*.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Iterable

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "f32": 4,
    "f64": 8, "c64": 8, "c128": 16, "token": 0,
}
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALL_ATTRS = ("calls", "to_apply", "body", "condition", "branch_computations", "called_computations",
               "async_execution_thread")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> float:
        return _DTYPE_BYTES.get(self.dtype, 4) * math.prod(self.dims)


def parse_shapes(text: str) -> list[Array]:
    """Every array type in an HLO shape string (a tuple gives several)."""
    return [Array(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY_RE.findall(text)
            if d in _DTYPE_BYTES]


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # result type text (may be a tuple)
    opcode: str
    operands: list[str]
    attrs: str
    computation: str


def _split_type(rest: str) -> tuple[str, str]:
    """``"(f32[2], s32[]) all-reduce(...)"`` → (type text, remainder)."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail.lstrip()


def _matching_paren(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        depth += s[i] == "("
        depth -= s[i] == ")"
        if depth == 0:
            return i
    return len(s)


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """{computation name: instructions}, and the ENTRY computation's name."""
    comps: dict[str, list[Instruction]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER_RE.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR_RE.match(line)
        if not m:
            continue
        name, rest = m.groups()
        shape, rest = _split_type(rest)
        op = re.match(r"([a-z][a-z0-9\-_.]*)\(", rest)
        if not op:
            continue
        close = _matching_paren(rest, op.end() - 1)
        operands = [o.strip().split(" ")[-1].lstrip("%") for o in _split_top(rest[op.end(): close]) if o.strip()]
        comps[current].append(Instruction(name, shape, op.group(1), operands, rest[close + 1:], current))
    return comps, entry


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _callees(instr: Instruction) -> list[tuple[str, float]]:
    """(called computation, executions per execution of ``instr``)."""
    out = []
    trip = 1.0
    if instr.opcode == "while":
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
        trip = float(m.group(1)) if m else 1.0  # an unknown trip count is counted once (reported as such)
    for attr in _CALL_ATTRS:
        for m in re.finditer(rf"\b{attr}=(\{{[^}}]*\}}|%?[^\s,]+)", instr.attrs):
            names = [n.strip().lstrip("%") for n in m.group(1).strip("{}").split(",") if n.strip()]
            for n in names:
                out.append((n, trip if instr.opcode == "while" and attr in ("body", "condition") else 1.0))
    return out


def multipliers(comps: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, float], list[str]]:
    """Executions of every computation per execution of ``entry``; also the while loops of unknown trip count."""
    edges: dict[str, list[tuple[str, float]]] = defaultdict(list)
    indegree: dict[str, int] = defaultdict(int)
    unknown = []
    for comp, instrs in comps.items():
        for ins in instrs:
            if ins.opcode == "while" and "known_trip_count" not in ins.attrs:
                unknown.append(ins.name)
            for callee, factor in _callees(ins):
                if callee in comps:
                    edges[comp].append((callee, factor))
                    indegree[callee] += 1
    mult = defaultdict(float)
    mult[entry] = 1.0
    order = [c for c in comps if indegree[c] == 0]
    seen = 0
    while order:
        c = order.pop()
        seen += 1
        for callee, factor in edges[c]:
            mult[callee] += mult[c] * factor
            indegree[callee] -= 1
            if indegree[callee] == 0:
                order.append(callee)
    return dict(mult), unknown


# ------------------------------------------------------------------------------------------------------------------
# Replica groups → group size and whether a group spans hosts
# ------------------------------------------------------------------------------------------------------------------
def replica_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """The device groups of a collective, from any of XLA's three spellings; None when absent or unreadable."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        dims = [(a.strip().strip("'"), int(s)) for a, s in
                (p.split("=") for p in m.group(1).split(",") if "=" in p)]
        names = [n for n, _ in dims]
        grouped = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        ids = np.arange(math.prod(s for _, s in dims)).reshape([s for _, s in dims])
        axes = [names.index(g) for g in grouped if g in names]
        rest = [i for i in range(len(dims)) if i not in axes]
        groups = np.transpose(ids, rest + axes).reshape(-1, math.prod(dims[i][1] for i in axes) if axes else 1)
        return groups.tolist()
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        base = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(base)).reshape(base)
        if m.group(3):
            ids = np.transpose(ids, [int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
        return [g for g in groups if g] or [list(range(num_devices))]
    m = re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*)\}", attrs)
    if m:
        pairs = re.findall(r"\{(\d+),(\d+)\}", attrs)
        return [[int(a), int(b)] for a, b in pairs] or None
    return None


# ------------------------------------------------------------------------------------------------------------------
# The statistics
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CollectiveStats:
    kind: str
    count: float = 0.0  # executions per step (trip counts included)
    ops: int = 0  # instructions in the program
    bytes: float = 0.0  # buffer bytes per step: all-gather output, reduce-scatter input, all-reduce operand, …
    wire_bytes: float = 0.0  # bytes each device sends per step with ring algorithms (see `wire_factor`)
    cross_host_bytes: float = 0.0  # part of wire_bytes in collectives whose groups span hosts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def wire_factor(kind: str, n: int) -> float:
    """Bytes sent per device per buffer byte, for ring implementations over a group of n."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        return (n - 1) / n
    return 1.0  # collective-permute: each device sends its buffer once


@dataclasses.dataclass
class HloStats:
    dot_flops: float  # 2·M·N·K of every dot, trip counts included (what the devices execute: remat included)
    collectives: dict[str, CollectiveStats]
    loops: list[dict]  # every while loop: its trip count and how often it runs
    unknown_trip_counts: list[str]
    param_upcast_bytes: float = 0.0  # f32 copies of whole bf16/f16 parameters made in ENTRY (see `param_upcasts`)

    @property
    def collective_bytes(self) -> float:
        return sum(c.bytes for c in self.collectives.values())

    @property
    def wire_bytes(self) -> float:
        return sum(c.wire_bytes for c in self.collectives.values())

    @property
    def cross_host_bytes(self) -> float:
        return sum(c.cross_host_bytes for c in self.collectives.values())

    def to_dict(self) -> dict:
        return {"dot_flops": self.dot_flops, "collectives": {k: v.to_dict() for k, v in self.collectives.items()},
                "collective_bytes": self.collective_bytes, "wire_bytes": self.wire_bytes,
                "cross_host_bytes": self.cross_host_bytes, "loops": self.loops,
                "unknown_trip_counts": self.unknown_trip_counts, "param_upcast_bytes": self.param_upcast_bytes}


def _dot_flops(ins: Instruction, shapes: dict[str, list[Array]]) -> float:
    out = parse_shapes(ins.shape)
    if not out or not ins.operands:
        return 0.0
    lhs = shapes.get(ins.operands[0])
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    if not lhs or not m:
        return 0.0
    contract = math.prod(lhs[0].dims[int(i)] for i in m.group(1).split(",") if i)
    return 2.0 * math.prod(out[0].dims) * contract


def param_upcasts(comps: dict[str, list[Instruction]], entry: str) -> float:
    """Bytes of ENTRY-level f32 copies of whole bf16/f16 parameters.

    XLA:CPU has no bf16 matmul: it converts bf16 weights to f32, and when the weights are a stacked ``[L, ...]``
    scan input it hoists that convert out of the loop, materializing an f32 copy of every bf16 weight for the
    whole program. A GPU multiplies bf16 directly, so these bytes are a CPU-only part of the temporaries."""
    instrs = {ins.name: ins for ins in comps[entry]}
    total = 0.0
    for ins in comps[entry]:
        if ins.opcode not in ("convert", "fusion") or len(ins.operands) != 1:
            continue
        src = instrs.get(ins.operands[0])
        if src is None or src.opcode != "parameter":
            continue
        a, b = parse_shapes(src.shape), parse_shapes(ins.shape)
        if (len(a) == len(b) == 1 and a[0].dtype in ("bf16", "f16") and b[0].dtype == "f32"
                and a[0].dims == b[0].dims):
            total += b[0].bytes
    return total


def analyze(text: str, num_devices: int, devices_per_host: int | None = None) -> HloStats:
    """Per-device FLOPs of the matmuls and the collectives of one execution of the program in ``text``."""
    comps, entry = parse_module(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    mult, unknown = multipliers(comps, entry)
    shapes: dict[str, list[Array]] = {}
    for instrs in comps.values():
        for ins in instrs:
            shapes[ins.name] = parse_shapes(ins.shape)

    flops = 0.0
    stats = {k: CollectiveStats(k) for k in COLLECTIVES}
    loops = []
    for comp, instrs in comps.items():
        m_c = mult.get(comp, 0.0)
        for ins in instrs:
            if ins.opcode == "dot":
                flops += m_c * _dot_flops(ins, shapes)
            elif ins.opcode == "while":
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
                loops.append({"name": ins.name, "trip_count": int(t.group(1)) if t else None, "runs": m_c,
                              "op": (re.search(r'op_name="([^"]*)"', ins.attrs) or [None, ""])[1]})
            kind = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if kind not in stats:
                continue
            result = parse_shapes(ins.shape)
            if ins.opcode.endswith("-start") and len(result) > 1:
                # async starts return (operands..., outputs...[, context]): take the second half's arrays
                result = result[len(result) // 2:]
            if kind == "reduce-scatter":
                size = sum(a.bytes for o in ins.operands for a in shapes.get(o, []))
            else:
                size = sum(a.bytes for a in result)
            groups = replica_groups(ins.attrs, num_devices)
            n = len(groups[0]) if groups else num_devices
            if kind == "collective-permute":
                n = 2
            wire = size * wire_factor(kind, n)
            cross = False
            if devices_per_host and groups:
                cross = any(len({d // devices_per_host for d in g}) > 1 for g in groups)
            s = stats[kind]
            s.count += m_c
            s.ops += 1
            s.bytes += m_c * size
            s.wire_bytes += m_c * wire
            s.cross_host_bytes += m_c * wire if cross else 0.0
    return HloStats(flops, stats, loops, unknown, param_upcasts(comps, entry))


def top_collectives(text: str, num_devices: int, k: int = 10) -> list[dict]:
    """The k collectives moving the most bytes per step (for finding what makes a step communication-bound)."""
    comps, entry = parse_module(text)
    mult, _ = multipliers(comps, entry)
    shapes = {ins.name: parse_shapes(ins.shape) for instrs in comps.values() for ins in instrs}
    rows = []
    for comp, instrs in comps.items():
        for ins in instrs:
            kind = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if kind not in COLLECTIVES:
                continue
            size = (sum(a.bytes for o in ins.operands for a in shapes.get(o, [])) if kind == "reduce-scatter"
                    else sum(a.bytes for a in parse_shapes(ins.shape)))
            op = re.search(r'op_name="([^"]*)"', ins.attrs)
            rows.append({"kind": kind, "shape": ins.shape, "runs": mult.get(comp, 0.0),
                         "bytes_per_step": mult.get(comp, 0.0) * size, "op_name": op.group(1) if op else ""})
    return sorted(rows, key=lambda r: -r["bytes_per_step"])[:k]


def summarize(stats: Iterable[CollectiveStats]) -> str:
    parts = [f"{c.kind} ×{c.count:g} {c.bytes / 1e9:.2f} GB" for c in stats if c.count]
    return ", ".join(parts) or "none"
