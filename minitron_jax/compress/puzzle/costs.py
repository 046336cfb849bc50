"""What each block variant costs: parameters, weight bytes, KV-cache bytes, FLOPs per token, and measured time.

Costs are additive over layers, which is what lets the solver price a whole model as a constant (embedding,
lm_head, final norm: :func:`model_overhead`) plus one term per layer (:func:`block_cost`). For a uniform model
:func:`model_cost` equals :func:`minitron_jax.model.count_params` exactly, and its FLOPs equal the PaLM-convention
``forward_flops_per_token`` that ``planning.capacity`` reports MFU with.

Conventions (each stated once, here):

- **Parameters** follow the model's named-axis table per block kind. ``gqa``: attention norm, q, k, v, o (and
  their biases when the base config has ``attention_bias``); query heads are kept, only KV heads change. ``mlp``:
  MLP norm, gate, up, down (and biases under ``mlp_bias``). ``linear`` (either sub-block): its norm plus one
  [D, D] matrix without bias, as DeciLM's ``replace_with_linear`` (``nn.Linear(D, D, bias=False)``). ``none``:
  nothing at all (DeciLM's ``no_op`` drops the norm too).
- **FLOPs per token** are forward FLOPs: 2 × the block's parameters (norms and biases counted as if they were
  matmul weights, as ``planning.capacity.matmul_params`` does; they are < 0.1%) plus, for ``gqa``, the QKᵀ and PV
  matmuls ``4 × num_heads × head_dim × context`` **at the full stated context**: what one decoded token costs at the
  last position of a full cache, and what the causal einsum computes per token in prefill (it does not skip the
  masked half). The KV-head count does not change these attention FLOPs: every query head still attends.
- **KV cache** is ``2 (k and v) × kv_heads × head_dim × context × batch × kv_bytes_per_value`` per ``gqa`` block;
  ``linear`` and ``none`` keep no cache.
- **Memory** is weight bytes + KV-cache bytes (activations and the runtime's workspace are not modelled).
- **Overhead**: the embedding, an untied lm_head and the final norm. The lm_head matmul costs ``2·V·D`` FLOPs per
  token whether or not it is tied (the embedding lookup is a gather: no FLOPs).

A block's parameters, their shapes, their init and its forward all come from :mod:`minitron_jax.hetero` (one
layer of a one-block model), so what is priced and timed here is the block the heterogeneous model runs.
Timing (:func:`time_block_variants`) runs that one block on random weights, so it measures exactly one block of each
variant and nothing else.
:func:`compiled_cost` asks XLA for the same forward's compiled FLOPs and bytes accessed on the local backend, and
:func:`roofline_seconds` turns those into a time on a described accelerator (peak FLOP/s, memory bandwidth).
:func:`decode_step_seconds` prices one decode step on such an accelerator from the costs above alone (no
compile, the same on every machine): what ``--accelerator`` turns the latency and throughput targets into.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import hetero
from minitron_jax.attention import attention_mask
from minitron_jax.blocks import BlockSpec, check_blocks
from minitron_jax.config import LlamaConfig
from minitron_jax.model import init_from_shapes, rms_norm, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """Additive costs of one block (or a sum of them: ``a + b``)."""

    params: int = 0
    weight_bytes: float = 0.0
    kv_cache_bytes: float = 0.0
    flops_per_token: float = 0.0

    @property
    def memory_bytes(self) -> float:
        """Weights + KV cache: what ``--target-memory`` bounds."""
        return self.weight_bytes + self.kv_cache_bytes

    def __add__(self, other: BlockCost) -> BlockCost:
        return BlockCost(self.params + other.params, self.weight_bytes + other.weight_bytes,
                         self.kv_cache_bytes + other.kv_cache_bytes, self.flops_per_token + other.flops_per_token)


def _block_params(config: LlamaConfig, spec: BlockSpec) -> int:
    return int(sum(np.prod(shape) for shape in block_param_shapes(config, spec).values()))


def block_cost(base_config: LlamaConfig, spec: BlockSpec, *, weight_bytes_per_param: float, context: int,
               batch: int, kv_bytes_per_value: float) -> BlockCost:
    """The costs of one block of ``spec`` in a model built on ``base_config`` (see the module docstring)."""
    check_blocks(base_config, [spec])
    params = _block_params(base_config, spec)
    flops = 2.0 * params
    kv = 0.0
    if spec.attention.kind == "gqa":
        flops += 4.0 * base_config.num_heads * base_config.head_dim * context
        kv = 2.0 * spec.attention.kv_heads * base_config.head_dim * context * batch * kv_bytes_per_value
    return BlockCost(params, params * weight_bytes_per_param, kv, flops)


def model_overhead(base_config: LlamaConfig, *, weight_bytes_per_param: float, **_unused: Any) -> BlockCost:
    """The costs outside the blocks: embedding, lm_head when untied, final norm. (Takes and ignores the other
    cost settings so that the same keyword set can be passed to both this and :func:`block_cost`.)"""
    V, D = base_config.vocab_size, base_config.hidden_size
    params = V * D + D + (0 if base_config.tie_word_embeddings else V * D)
    return BlockCost(params, params * weight_bytes_per_param, 0.0, 2.0 * (V * D + D))


def model_cost(base_config: LlamaConfig, blocks: Sequence[BlockSpec], **settings: Any) -> BlockCost:
    """Overhead + the sum of every block's cost. ``settings`` are :func:`block_cost`'s keyword arguments."""
    total = model_overhead(base_config, **settings)
    for b in blocks:
        total = total + block_cost(base_config, b, **settings)
    return total


COST_FIELDS = ("params", "weight_bytes", "kv_cache_bytes", "memory_bytes", "flops_per_token")


def cost_matrices(base_config: LlamaConfig, variants: Sequence[BlockSpec], num_layers: int,
                  **settings: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every cost of every variant at every layer as ``{field: [num_layers, len(variants)]}`` plus the overhead of
    each field: the solver's inputs. (Analytic costs do not depend on the layer; the matrices are per layer so
    that per-layer measurements can replace them.)"""
    per_variant = [block_cost(base_config, v, **settings) for v in variants]
    overhead = model_overhead(base_config, **settings)
    mats = {f: np.tile(np.array([float(getattr(c, f)) for c in per_variant]), (num_layers, 1)) for f in COST_FIELDS}
    return mats, {f: float(getattr(overhead, f)) for f in COST_FIELDS}


# ------------------------------------------------------------------------------------------------------------------
# One block's forward, for timing and the compiler's cost analysis
# ------------------------------------------------------------------------------------------------------------------
def block_param_shapes(base_config: LlamaConfig, spec: BlockSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's params (biases included when the base config has them; no leading ``layer`` axis):
    the one layer of a one-block :class:`~minitron_jax.hetero.HeteroConfig`."""
    segment = hetero.param_shapes(hetero.HeteroConfig(base_config, (spec,)))["segments"][0]
    return {name: tuple(shape[1:]) for name, shape in segment.items()}


def random_block_params(base_config: LlamaConfig, spec: BlockSpec, key: jax.Array, dtype=jnp.float32,
                        std: float = 0.02) -> dict[str, jax.Array]:
    return init_from_shapes(block_param_shapes(base_config, spec), key, dtype, std)


def block_forward(base_config: LlamaConfig, spec: BlockSpec, p: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """One block of ``spec`` on hidden states [B, T, D] (causal, positions 0..T-1), computed in ``h``'s dtype:
    :func:`minitron_jax.hetero.apply_block`, the layer the heterogeneous model runs."""
    B, T = h.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    cos, sin = rope_cos_sin(base_config, pos)
    return hetero.apply_block(base_config, spec, p, h, cos, sin, attention_mask(pos, pos, None, None), dtype=h.dtype)


def _distinct(specs: Iterable[BlockSpec]) -> list[BlockSpec]:
    return list(dict.fromkeys(specs))


def time_block_variants(base_config: LlamaConfig, specs: Iterable[BlockSpec], *, batch: int, seq_len: int,
                        dtype=jnp.bfloat16, repeats: int = 5, warmup: int = 1, seed: int = 0
                        ) -> dict[BlockSpec, float]:
    """Seconds per forward of one block of each distinct variant on [batch, seq_len] tokens, on the default JAX
    backend: the median of ``repeats`` timed calls after ``warmup`` untimed ones (the first compiles). A prefill
    measurement: per-token latency is the result ÷ (batch × seq_len)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    specs = _distinct(specs)
    check_blocks(base_config, specs)
    key = jax.random.PRNGKey(seed)
    h = (jax.random.normal(key, (batch, seq_len, base_config.hidden_size), jnp.float32)).astype(dtype)
    out: dict[BlockSpec, float] = {}
    for i, spec in enumerate(specs):
        p = random_block_params(base_config, spec, jax.random.fold_in(key, i + 1), dtype)
        fn = jax.jit(lambda p, h, spec=spec: block_forward(base_config, spec, p, h))
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(fn(p, h))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(p, h))
            times.append(time.perf_counter() - t0)
        out[spec] = statistics.median(times)
    return out


def time_overhead(base_config: LlamaConfig, *, batch: int, seq_len: int, dtype=jnp.bfloat16, repeats: int = 5,
                  warmup: int = 1, seed: int = 0) -> float:
    """Seconds per call of the non-block work (embedding gather, final norm, lm_head matmul), timed like
    :func:`time_block_variants`: the latency constraint's constant."""
    key = jax.random.PRNGKey(seed)
    V, D = base_config.vocab_size, base_config.hidden_size
    embed = (0.02 * jax.random.normal(key, (V, D), jnp.float32)).astype(dtype)
    head = embed.T if base_config.tie_word_embeddings else (
        0.02 * jax.random.normal(jax.random.fold_in(key, 1), (D, V), jnp.float32)).astype(dtype)
    tokens = jax.random.randint(jax.random.fold_in(key, 2), (batch, seq_len), 0, V)
    norm = jnp.ones((D,), dtype)
    fn = jax.jit(lambda e, w, n, t: rms_norm(jnp.take(e, t, axis=0), n, base_config.rms_norm_eps) @ w)
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(embed, head, norm, tokens))
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(embed, head, norm, tokens))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_step_seconds(base_config: LlamaConfig, specs: Iterable[BlockSpec], *, peak_flops: float,
                        memory_bandwidth: float, batch: int, context: int, weight_bytes_per_param: float,
                        kv_bytes_per_value: float) -> dict[BlockSpec, float]:
    """Seconds one block of each variant takes in one decode step on an accelerator described by its peak FLOP/s
    and memory bandwidth: ``batch`` new tokens, each at the last position of a full ``context``-token cache. The
    block reads every weight and its whole KV cache once and computes ``batch × flops_per_token``
    (:func:`block_cost`); the roofline takes whichever is longer. Layers run one after another, so a model's step
    is the sum over its blocks (plus :func:`decode_overhead_seconds`): additive, as the solver needs. A lower bound
    (perfect overlap, peak numbers); at batch 1 it is the weight + cache bytes over the bandwidth."""
    if peak_flops <= 0 or memory_bandwidth <= 0:
        raise ValueError("peak_flops and memory_bandwidth must be positive")
    out = {}
    for spec in _distinct(specs):
        c = block_cost(base_config, spec, weight_bytes_per_param=weight_bytes_per_param, context=context,
                       batch=batch, kv_bytes_per_value=kv_bytes_per_value)
        out[spec] = max(batch * c.flops_per_token / peak_flops, (c.weight_bytes + c.kv_cache_bytes) / memory_bandwidth)
    return out


def decode_overhead_seconds(base_config: LlamaConfig, *, peak_flops: float, memory_bandwidth: float, batch: int,
                            weight_bytes_per_param: float, **_unused: Any) -> float:
    """The decode step's work outside the blocks, priced like :func:`decode_step_seconds`: the lm_head matrix read
    once (tied or not: the embedding lookup reads only ``batch`` rows) and its ``2·V·D`` FLOPs per token."""
    V, D = base_config.vocab_size, base_config.hidden_size
    return max(batch * 2.0 * V * D / peak_flops, (V * D + D) * weight_bytes_per_param / memory_bandwidth)


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    flops: float  # XLA's count for the whole call (all tokens)
    bytes_accessed: float


def compiled_cost(base_config: LlamaConfig, spec: BlockSpec, *, batch: int, seq_len: int,
                  dtype=jnp.bfloat16) -> CompiledCost:
    """XLA's cost analysis of one block's forward on [batch, seq_len] tokens, compiled for the local backend from
    abstract shapes (nothing is allocated or run). The numbers are the backend's: XLA:CPU and XLA:GPU fuse
    differently, so ``bytes_accessed`` moves with the backend; FLOPs barely do."""
    check_blocks(base_config, [spec])
    shapes = block_param_shapes(base_config, spec)
    p = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
    h = jax.ShapeDtypeStruct((batch, seq_len, base_config.hidden_size), dtype)
    compiled = jax.jit(lambda p, h: block_forward(base_config, spec, p, h)).lower(p, h).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per computation
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return CompiledCost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)))


def roofline_seconds(cost: CompiledCost, *, peak_flops: float, memory_bandwidth: float) -> float:
    """A lower bound on the call's time on an accelerator described by its peak FLOP/s and memory bandwidth (e.g.
    ``planning.capacity.ACCELERATORS["h100"]``'s ``peak_flops`` and ``hbm_bandwidth``): compute and memory traffic
    overlapped perfectly, whichever is longer."""
    if peak_flops <= 0 or memory_bandwidth <= 0:
        raise ValueError("peak_flops and memory_bandwidth must be positive")
    return max(cost.flops / peak_flops, cost.bytes_accessed / memory_bandwidth)
