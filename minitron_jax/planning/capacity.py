"""Capacity planning, analytically: bytes per device, FLOPs, step time and whether a run fits an accelerator.

The dry run (:mod:`minitron_jax.planning.dryrun`) compiles the real train step and reads the compiler's numbers;
this module holds everything that does not need a compiler, so that the two can be printed side by side and so
that candidate settings can be re-planned in microseconds when a plan does not fit:

- :data:`ACCELERATORS`: peak dense bf16 FLOP/s, memory and interconnect of the devices we plan for;
- :func:`param_bytes` (exact, from the sharding rules) and the naive ``params × bytes ÷ shards``;
- :func:`activation_bytes`: a model of the step's temporary memory on a GPU (bf16 compute), by component;
- :func:`step_flops`: model FLOPs (``6·N·tokens + 2·N_teacher·tokens`` + attention, PaLM convention) and the
  FLOPs a device actually executes (rematerialization included);
- :func:`suggest`: the nearest settings (fsdp, tensor parallelism, remat policy, micro-batch) that fit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax

from minitron_jax import arch
from minitron_jax.arch import AnyConfig
from minitron_jax.model import axis_sizes, param_axes

GB = 1e9
GiB = 2**30


# ------------------------------------------------------------------------------------------------------------------
# Accelerators
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One device's peak numbers. Bandwidths are per device, one direction, as achieved by ring collectives."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory: float  # bytes of device memory
    hbm_bandwidth: float  # bytes/s
    intra_node_bandwidth: float  # bytes/s to devices of the same node (NVLink / ICI)
    inter_node_bandwidth: float  # bytes/s to other nodes (InfiniBand / DCN)
    devices_per_node: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ACCELERATORS: dict[str, Accelerator] = {
    # NVLink 4: 900 GB/s bidirectional per GPU; one 400 Gb/s InfiniBand NIC per GPU.
    "h100": Accelerator("NVIDIA H100 SXM 80GB", 989e12, 80 * GB, 3.35e12, 450e9, 50e9, 8),
    "h200": Accelerator("NVIDIA H200 SXM 141GB", 989e12, 141 * GB, 4.8e12, 450e9, 50e9, 8),
    # NVLink 3: 600 GB/s bidirectional; 200 Gb/s HDR per GPU.
    "a100": Accelerator("NVIDIA A100 SXM 80GB", 312e12, 80 * GB, 2.04e12, 300e9, 25e9, 8),
    # ICI: 4800 Gb/s per chip over 6 links (the slice is one "node" for ICI); DCN between slices.
    "tpu-v5p": Accelerator("TPU v5p", 459e12, 95 * GB, 2.76e12, 300e9, 25e9, 4),
}
DEFAULT_MFU = 0.45
DEFAULT_MEMORY_FRACTION = 0.92  # of device memory usable by the program (runtime, CUDA context, fragmentation)


def accelerator(name: str) -> Accelerator:
    key = name.lower().replace("_", "-")
    aliases = {"h100-sxm": "h100", "h100-80gb": "h100", "h200-sxm": "h200", "a100-80gb": "a100", "v5p": "tpu-v5p",
               "tpuv5p": "tpu-v5p"}
    key = aliases.get(key, key)
    if key not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]


# ------------------------------------------------------------------------------------------------------------------
# Parameter bytes
# ------------------------------------------------------------------------------------------------------------------
def _shards(spec_entry, mesh_shape: Mapping[str, int]) -> int:
    if spec_entry is None:
        return 1
    names = (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
    return math.prod(mesh_shape.get(n, 1) for n in names)


class _ShapeOnlyMesh:
    """What ``sharding.logical_spec`` reads of a mesh: its axis sizes."""

    def __init__(self, shape: Mapping[str, int]):
        self.shape = dict(shape)


def param_bytes(config: AnyConfig, mesh_shape: Mapping[str, int], rules: Mapping[str, Any], itemsize: float) -> float:
    """Bytes of ``config``'s params on one device under the sharding rules (replicated dims counted in full)."""
    from minitron_jax.sharding import logical_spec

    mesh = _ShapeOnlyMesh(mesh_shape)
    total = 0.0
    if arch.is_hetero(config):
        # Each segment has its own sizes (KV heads, FFN width): walk axes and shapes together.
        axes_leaves = jax.tree.leaves(arch.param_axes(config), is_leaf=_is_axes)
        shape_leaves = jax.tree.leaves(arch.param_shapes(config), is_leaf=_is_shape)
        for axes, shape in zip(axes_leaves, shape_leaves):
            spec = logical_spec(axes, shape, mesh, rules)
            total += math.prod(shape) / math.prod(_shards(s, mesh_shape) for s in spec) * itemsize
        return total
    sizes = axis_sizes(config)
    for axes in _leaves(param_axes(config)):
        shape = [sizes[a] for a in axes]
        spec = logical_spec(axes, shape, mesh, rules)
        total += math.prod(shape) / math.prod(_shards(s, mesh_shape) for s in spec) * itemsize
    return total


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def naive_param_bytes(config: AnyConfig, shards: int, itemsize: float) -> float:
    """``params × bytes ÷ shards``: the number to compare the compiler's with."""
    return arch.count_params(config) * itemsize / max(shards, 1)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


# ------------------------------------------------------------------------------------------------------------------
# FLOPs (PaLM convention, as `train.observe` reports MFU with)
# ------------------------------------------------------------------------------------------------------------------
def matmul_params(config: AnyConfig) -> int:
    embed = config.vocab_size * config.hidden_size
    return arch.count_params(config) - (0 if config.tie_word_embeddings else embed)


def attention_flops_per_token(config: AnyConfig, seq_len: int) -> float:
    """Forward QKᵀ and PV matmuls per token, causal attention counted in full (as the einsum computes it)."""
    return 4.0 * arch.attention_layers(config) * config.num_heads * config.head_dim * seq_len


def forward_flops_per_token(config: AnyConfig, seq_len: int) -> float:
    return 2.0 * matmul_params(config) + attention_flops_per_token(config, seq_len)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    model: float  # 6·N_s·tok + 2·N_t·tok + attention: the MFU numerator
    executed: float  # what the devices run: + rematerialized forwards and the loss's recomputed head matmuls

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def step_flops(student: AnyConfig, teacher: AnyConfig | None, tokens: float, seq_len: int,
               remat: str = "none") -> StepFlops:
    """FLOPs of one optimizer step over ``tokens`` tokens (all devices together)."""
    s_fwd = forward_flops_per_token(student, seq_len)
    t_fwd = forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0
    model = (3.0 * s_fwd + t_fwd) * tokens
    extra = 0.0
    if remat == "full":
        extra += s_fwd
    elif remat == "dots_no_batch":  # the attention einsums (batched dots) are recomputed
        extra += attention_flops_per_token(student, seq_len)
    # The chunked loss recomputes both heads' logits in the backward pass.
    extra += 2.0 * student.hidden_size * student.vocab_size
    if teacher is not None:
        extra += 2.0 * teacher.hidden_size * teacher.vocab_size
    return StepFlops(model=model, executed=model + extra * tokens)


# ------------------------------------------------------------------------------------------------------------------
# Temporary memory on a GPU (bf16 compute): a component model
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """The settings a plan varies: mesh, micro-batch and remat."""

    data: int
    fsdp: int
    tensor: int
    grad_accum: int
    remat: str
    attention: str = "einsum"  # einsum | blockwise | fused (attention.ATTENTION_IMPLS)

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def describe(self) -> str:
        return (f"mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor}, grad_accum={self.grad_accum}, "
                f"remat={self.remat}" + ("" if self.attention == "einsum" else f", attention={self.attention}"))


def _div(n: int, k: int) -> float:
    return n / k if n % k == 0 else float(n)  # a dimension the mesh axis does not divide stays replicated


class LayerView(NamedTuple):
    """What the activation model reads of one layer: its attention's heads (0 when it has no GQA attention), its
    FFN width (0 when it has no MLP) and how many linear ([D, D]) sub-blocks it has."""

    num_kv_heads: int
    q_per_kv: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    linear: int = 0


def layer_views(config: AnyConfig) -> list[tuple[int, LayerView]]:
    """``(layers, LayerView)`` per run of equal layers: one entry for a uniform model, one per segment of a
    heterogeneous one."""
    if not arch.is_hetero(config):
        return [(config.num_layers, LayerView(config.num_kv_heads, config.q_per_kv, config.num_heads,
                                              config.head_dim, config.intermediate_size))]
    base = config.base
    out = []
    for start, stop, spec in config.segments():
        gqa = spec.attention.kind == "gqa"
        kv = spec.attention.kv_heads if gqa else 0
        out.append((stop - start, LayerView(
            kv, base.num_heads // kv if gqa else 0, base.num_heads if gqa else 0, base.head_dim,
            spec.ffn.width if spec.ffn.kind == "mlp" else 0,
            int(spec.attention.kind == "linear") + int(spec.ffn.kind == "linear"))))
    return out


def activation_bytes(student: AnyConfig, teacher: AnyConfig | None, layout: Layout, *, global_rows: int,
                     seq_len: int, chunk_size: int, param_bytes_per_device: float, compute_bytes: int = 2,
                     attention_block: int = 512) -> dict[str, float]:
    """Temporary bytes per device of one train step, by component (a GPU-like estimate: bf16 activations, fp32
    attention scores, logits and gradients). ``total`` is what lives at the peak:
    saved activations + the largest transient working set + gradients (+ accumulator) + the update.

    A heterogeneous model is modelled layer kind by layer kind (:func:`layer_views`): saved activations summed over
    its layers, the transient working set of its largest layer; a linear sub-block counts its [B, T, D] input and
    output."""
    dp = layout.data * layout.fsdp
    b = global_rows / layout.grad_accum / dp  # rows per device per micro-batch
    T, c = seq_len, compute_bytes
    tp = layout.tensor

    def heads(v):
        return _div(v.num_kv_heads, tp) * v.q_per_kv if v.num_kv_heads % tp == 0 else float(v.num_heads)

    def score_bytes(v, per_element):
        if layout.attention == "blockwise":
            return b * heads(v) * T * min(attention_block, T) * per_element
        if layout.attention == "fused" and c == 2:
            # cuDNN's flash attention (bf16/fp16 on an NVIDIA GPU) keeps each [T, S] tile on chip; what reaches
            # memory is fp32 statistics per query row (the softmax's log-sum-exp, and in the backward the row sums
            # of dO·O). In fp32, or off an NVIDIA GPU, "fused" is XLA's composition and writes the scores like einsum.
            return b * heads(v) * T * 2 * 4
        return b * heads(v) * T * T * per_element

    def ffn(v):
        return _div(v.intermediate_size, tp)

    def qkv(v):
        return heads(v) * v.head_dim + 2 * _div(v.num_kv_heads, tp) * v.head_dim

    s = student
    D = s.hidden_size

    def per_layer(v):
        lin = b * T * v.linear * D * c  # a linear sub-block keeps its normed input (0 for gqa/mlp layers)
        return {
            "full": b * T * D * c,
            "dots_no_batch": b * T * (2 * D + qkv(v) + D + 2 * ffn(v)) * c + lin,
            "dots": b * T * (2 * D + qkv(v) + heads(v) * v.head_dim + D + 2 * ffn(v)) * c + score_bytes(v, 4) + lin,
            "none": (b * T * (5 * D + qkv(v) + 2 * heads(v) * v.head_dim + 4 * ffn(v)) * c
                     + score_bytes(v, 4 + c + 1) + lin),
        }[layout.remat]

    def layer_backward(v):
        # Backward of one layer: its recomputed forward plus the gradients flowing through it.
        return (score_bytes(v, 4 + c + 4 + 4) + b * T * (6 * ffn(v) + 4 * D + 2 * qkv(v)) * c
                + 2 * b * T * v.linear * D * c)

    views = layer_views(s)
    saved = sum(n * per_layer(v) for n, v in views)
    layer_bwd = max(layer_backward(v) for _, v in views)
    teacher_fwd = 0.0
    if teacher is not None:
        teacher_fwd = max(score_bytes(v, 4 + c) + b * T * (3 * ffn(v) + 3 * teacher.hidden_size) * c
                          + b * T * v.linear * teacher.hidden_size * c for _, v in layer_views(teacher))
    hidden = b * T * (D + (teacher.hidden_size if teacher is not None else 0)) * 4
    rows_per_chunk = min(chunk_size, global_rows / layout.grad_accum * T) / dp
    V = _div(s.vocab_size, tp)
    heads_gathered = (D + (teacher.hidden_size if teacher is not None else 0)) * V * c + D * V * 4
    loss = rows_per_chunk * V * 4 * (6 if teacher is not None else 3) + heads_gathered
    grads = param_bytes_per_device * (2 if layout.grad_accum > 1 else 1)
    update = param_bytes_per_device
    transient = max(layer_bwd, teacher_fwd, loss)
    out = {"saved_activations": saved, "layer_backward": layer_bwd, "teacher_forward": teacher_fwd,
           "loss_chunk": loss, "final_hidden": hidden, "gradients": grads, "optimizer_update": update}
    out["total"] = saved + transient + hidden + grads + update
    return out


def batch_bytes(global_rows: int, seq_len: int, dp: int, arrays: int = 4) -> float:
    return arrays * global_rows * seq_len * 4 / dp


# ------------------------------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------------------------------
def estimate_time(model_flops_per_step: float, devices: int, acc: Accelerator, mfu: float, *, tokens_per_step: float,
                  total_tokens: float, wire_bytes: float = 0.0, cross_host_bytes: float = 0.0) -> dict[str, float]:
    """Step time at ``mfu`` (model FLOPs over peak), and the collectives' time if nothing overlapped them."""
    step = model_flops_per_step / (devices * acc.peak_flops * mfu)
    comm = (wire_bytes - cross_host_bytes) / acc.intra_node_bandwidth + cross_host_bytes / acc.inter_node_bandwidth
    steps = total_tokens / tokens_per_step
    return {"step_seconds": step, "tokens_per_second": tokens_per_step / step,
            "tokens_per_second_per_device": tokens_per_step / step / devices,
            "collective_seconds_if_serialized": comm, "communication_bound": comm > step,
            "total_tokens": total_tokens, "steps": steps, "total_seconds": steps * step,
            "total_days": steps * step / 86400.0, "device_hours": steps * step * devices / 3600.0}


# ------------------------------------------------------------------------------------------------------------------
# Suggestions
# ------------------------------------------------------------------------------------------------------------------
REMAT_ORDER = ("none", "dots_no_batch", "dots", "full")


def candidates(layout: Layout, global_rows: int, *, allow_blockwise: bool = False) -> list[Layout]:
    """Layouts near ``layout``: more fsdp (from data), tensor parallelism, heavier remat, smaller micro-batches
    (more accumulation), and combinations of two of these moves."""
    def moves(lo: Layout) -> list[Layout]:
        out = []
        if lo.data > 1 and lo.data % 2 == 0:
            out.append(dataclasses.replace(lo, data=lo.data // 2, fsdp=lo.fsdp * 2))
        if lo.fsdp > 1 and lo.fsdp % 2 == 0 and lo.tensor < 8:
            out.append(dataclasses.replace(lo, fsdp=lo.fsdp // 2, tensor=lo.tensor * 2))
        i = REMAT_ORDER.index(lo.remat) if lo.remat in REMAT_ORDER else len(REMAT_ORDER) - 1
        for r in REMAT_ORDER[i + 1:]:
            out.append(dataclasses.replace(lo, remat=r))
        k = lo.grad_accum * 2
        if global_rows % k == 0 and (global_rows // k) % (lo.data * lo.fsdp) == 0:
            out.append(dataclasses.replace(lo, grad_accum=k))
        if allow_blockwise and lo.attention != "blockwise":
            out.append(dataclasses.replace(lo, attention="blockwise"))
        return out

    seen = {layout}
    frontier = [layout]
    result = []
    for _ in range(6):  # up to six moves away
        nxt = []
        for lo in frontier:
            for m in moves(lo):
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
                    result.append(m)
        frontier = nxt
    return result


def layout_cost(layout: Layout, base: Layout) -> float:
    """A rough relative step time, to rank layouts that fit: remat recomputes, tensor parallelism and tiny
    micro-batches lose efficiency; every change from the recipe costs a little (prefer the nearest)."""
    remat_cost = {"none": 1.0, "dots_no_batch": 1.05, "dots": 1.1, "full": 1.3}.get(layout.remat, 1.3)
    remat_cost *= 1.1 if layout.attention == "blockwise" and base.attention != "blockwise" else 1.0
    tp_cost = 1.0 + 0.08 * math.log2(layout.tensor)
    accum_cost = 1.0 + 0.03 * math.log2(max(layout.grad_accum / base.grad_accum, 1.0))
    changes = sum(getattr(layout, f) != getattr(base, f) for f in ("data", "fsdp", "tensor", "grad_accum", "remat",
                                                                     "attention"))
    return remat_cost * tp_cost * accum_cost * (1.0 + 0.01 * changes)


def fits(total_bytes: float, acc: Accelerator, memory_fraction: float) -> bool:
    return total_bytes <= acc.memory * memory_fraction


def fmt_flops(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("EF", 1e18), ("PF", 1e15), ("TF", 1e12), ("GF", 1e9)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.3g} F"


def fmt_seconds(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"
