"""A Llama-family decoder as pure functions over ``(config, params)``.

Params are a plain nested dict whose arrays carry named axes (``param_axes``); decoder layers are stacked on a
leading ``layer`` axis and run with ``jax.lax.scan``, so depth pruning is an index on axis 0 and width pruning an
index on a feature axis. Nothing in here knows about pruning: a pruned model is a smaller config plus sliced params.

Numerics follow transformers' ``LlamaForCausalLM``: RMSNorm and softmax in float32, RoPE in the half-split
("rotate_half") layout, query head ``h`` belonging to KV group ``h // G``. Attention (the mask, the einsum and the
blockwise kernels) lives in :mod:`minitron_jax.attention`; :mod:`minitron_jax.nnx_model` wraps all of this as a
Flax NNX module.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.attention import ATTENTION_IMPLS, attend, attention_mask
from minitron_jax.attention import attend_blockwise as attend_blockwise  # re-exported: model.attend_blockwise
from minitron_jax.config import LlamaConfig, llama3_inv_freq_scale

Params = dict[str, Any]

# ------------------------------------------------------------------------------------------------------------------
# The one table: logical axes of every parameter. Pruning, sharding, conversion and parameter counting all read it.
# ------------------------------------------------------------------------------------------------------------------
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("layer", "embed"),
    "q": ("layer", "embed", "kv_heads", "q_per_kv", "head_dim"),
    "k": ("layer", "embed", "kv_heads", "head_dim"),
    "v": ("layer", "embed", "kv_heads", "head_dim"),
    "o": ("layer", "kv_heads", "q_per_kv", "head_dim", "embed"),
    "mlp_norm": ("layer", "embed"),
    "gate": ("layer", "embed", "mlp"),
    "up": ("layer", "embed", "mlp"),
    "down": ("layer", "mlp", "embed"),
}
ATTN_BIAS_AXES = {
    "q_bias": ("layer", "kv_heads", "q_per_kv", "head_dim"),
    "k_bias": ("layer", "kv_heads", "head_dim"),
    "v_bias": ("layer", "kv_heads", "head_dim"),
    "o_bias": ("layer", "embed"),
}
MLP_BIAS_AXES = {
    "gate_bias": ("layer", "mlp"),
    "up_bias": ("layer", "mlp"),
    "down_bias": ("layer", "embed"),
}
TOP_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}


def param_axes(config: LlamaConfig) -> Params:
    """Logical axis names of every parameter, as a pytree shaped like the params."""
    layers = dict(LAYER_AXES)
    if config.attention_bias:
        layers.update(ATTN_BIAS_AXES)
    if config.mlp_bias:
        layers.update(MLP_BIAS_AXES)
    top = {k: v for k, v in TOP_AXES.items() if not (k == "lm_head" and config.tie_word_embeddings)}
    return {**top, "layers": layers}


def axis_sizes(config: LlamaConfig) -> dict[str, int]:
    return {
        "layer": config.num_layers,
        "embed": config.hidden_size,
        "kv_heads": config.num_kv_heads,
        "q_per_kv": config.q_per_kv,
        "head_dim": config.head_dim,
        "mlp": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def map_axes(fn: Callable[[tuple[str, ...]], Any], config: LlamaConfig) -> Params:
    """Apply ``fn`` to every parameter's axis tuple, keeping the params' tree structure."""
    return jax.tree.map(fn, param_axes(config), is_leaf=_is_axes)


def param_shapes(config: LlamaConfig) -> Params:
    sizes = axis_sizes(config)
    return map_axes(lambda axes: tuple(sizes[a] for a in axes), config)


def abstract_params(config: LlamaConfig, dtype=jnp.float32) -> Params:
    """``jax.ShapeDtypeStruct`` per parameter: the model's shape without allocating it."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))


def count_params(config: LlamaConfig) -> int:
    """Parameter count (a tied lm_head counts once, as in HF's ``num_parameters``)."""
    shapes = jax.tree.leaves(param_shapes(config),
                             is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    return int(sum(int(np.prod(s)) for s in shapes))


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params: normal(std) for matrices, ones for norms, zeros for biases (HF's Llama init)."""
    return init_from_shapes(param_shapes(config), key, dtype, std)


def init_from_shapes(shapes: Any, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Any:
    """HF's Llama init for any tree of shape tuples whose leaves are named as ours (``*norm`` → ones, ``*bias`` →
    zeros, the rest normal(std)): the uniform model's params and the heterogeneous model's segments alike."""
    flat, treedef = jax.tree.flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


def check_params(config: LlamaConfig, params: Params) -> None:
    """Raise a ValueError naming every parameter whose presence or shape disagrees with ``config``."""
    problems = shape_problems(param_shapes(config), params)
    if problems:
        raise ValueError(f"params do not match config ({config.describe()}):\n  " + "\n  ".join(problems))


def shape_problems(expected: Any, params: Any) -> list[str]:
    """Every way ``params`` differs from ``expected`` (a tree of shape tuples: dicts, and lists of dicts for the
    heterogeneous model's segments): missing, unexpected and misshapen entries, by path."""
    problems: list[str] = []

    def walk(exp, got, prefix):
        if isinstance(exp, list):
            if not isinstance(got, (list, tuple)) or len(got) != len(exp):
                problems.append(f"{prefix}: expected a list of {len(exp)} segments, got "
                                f"{len(got) if isinstance(got, (list, tuple)) else type(got).__name__}")
                return
            for i, (e, g) in enumerate(zip(exp, got)):
                walk(e, g, f"{prefix}[{i}]")
            return
        if not isinstance(got, Mapping):
            problems.append(f"{prefix or 'params'}: expected a dict, got {type(got).__name__}")
            return
        for name in sorted(set(exp) | set(got)):
            path = f"{prefix}.{name}" if prefix else name
            if name not in got:
                problems.append(f"{path}: missing")
            elif name not in exp:
                problems.append(f"{path}: unexpected for this config")
            elif isinstance(exp[name], (dict, list)):
                walk(exp[name], got[name], path)
            elif tuple(got[name].shape) != tuple(exp[name]):
                problems.append(f"{path}: shape {tuple(got[name].shape)}, config expects {tuple(exp[name])}")

    walk(expected, params, "")
    return problems


def lm_head(config: LlamaConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the embedding transposed when tied)."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's LlamaRMSNorm: normalize in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, theta: float, scaling) -> np.ndarray:
    # Same float32 arithmetic as transformers, so positions in the thousands still agree to ~1e-6.
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling is not None:
        if scaling.rope_type == "llama3":
            inv = llama3_inv_freq_scale(inv, scaling).astype(np.float32)
        elif scaling.rope_type == "linear":
            inv = (inv / scaling.factor).astype(np.float32)
    return inv


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] (float32) for integer positions [B, T]."""
    inv = jnp.asarray(_inv_freq(config.head_dim, float(config.rope_theta), config.rope_scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, ..., Hd] in the half-split layout; cos/sin are [B, T, Hd]."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:]).astype(x.dtype)
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:]).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def dot_lhs_transposed(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """``aᵀ @ b`` for 2-D ``a`` [N, M] and ``b`` [N, K]: the contraction over rows of a weight gradient.

    XLA:CPU runs a dot whose left operand contracts its leading (row) axis on its generic Eigen kernel rather
    than XNNPACK, measured ~1.7x slower per FLOP on the MLP's weight gradients (x86 AVX2, jax 0.10.2). On CPU the
    transpose of ``a`` is therefore made a physical copy (``optimization_barrier`` keeps XLA from folding it back
    into the dot's dimension numbers), which costs one pass over ``a`` and turns the dot into a plain
    [M, N] × [N, K] GEMM. Other platforms get the plain dot: their GEMMs take transposed operands for free."""
    def cpu(a, b):
        return jnp.dot(jax.lax.optimization_barrier(a.T), b, preferred_element_type=preferred_element_type)

    def default(a, b):
        return jnp.dot(a.T, b, preferred_element_type=preferred_element_type)

    return jax.lax.platform_dependent(a, b, cpu=cpu, default=default)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec, x, w)`` for the layer matmuls: x [B, T, *in], w [*in, *out] → [B, T, *out].

    The forward is the plain einsum; the custom backward only changes how the weight gradient is computed (as one
    2-D ``dot_lhs_transposed`` over the B·T rows, see there). The input gradient is the einsum autodiff would
    write."""
    return jnp.einsum(spec, x, w)


def _dense_fwd(x, w, spec):
    return jnp.einsum(spec, x, w), (x, w)


def _dense_bwd(spec, res, g):
    x, w = res
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    dx = jnp.einsum(f"{out},{w_axes}->{x_axes}", g, w)
    rows = x.shape[0] * x.shape[1]
    dw = dot_lhs_transposed(x.reshape(rows, -1), g.reshape(rows, -1)).reshape(w.shape)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def _mm(x, w, spec, dtype):
    x_axes, w_axes = spec.split("->")[0].split(",")
    out = spec.split("->")[1]
    # _dense's backward flattens x and g to [B·T, features] and w to [in, out]: that is the layout of every spec here.
    assert x_axes[:2] == out[:2] == "bt" and w_axes == x_axes[2:] + out[2:], spec
    return _dense(x, w.astype(dtype), spec)


# ------------------------------------------------------------------------------------------------------------------
# One decoder layer
# ------------------------------------------------------------------------------------------------------------------
def dense(x: jax.Array, w: jax.Array, spec: str, dtype) -> jax.Array:
    """A layer matmul ``einsum(spec, x, w.astype(dtype))`` (x [B, T, *in], w [*in, *out]) whose weight gradient is
    one 2-D ``dot_lhs_transposed`` over the B·T rows (see ``_dense``): every sub-block's matmuls go through this, the
    heterogeneous model's linear replacements included."""
    return _mm(x, w, spec, dtype)


def attention_block(config: LlamaConfig, p: Params, h: jax.Array, cos, sin, mask, *, dtype,
                    cache: dict | None = None, cache_index=None, keep: jax.Array | None = None,
                    attention: str = "einsum"):
    """The attention half of a decoder layer: ``h + keep * attention(rms_norm(h))``.

    Only ``rms_norm_eps`` and ``attention_bias`` are read from ``config``; the head counts come from the params'
    shapes, so a heterogeneous model's GQA layers (each with its own KV heads) run this same code. Returns
    ``(h_mid, intermediates, new cache slice or None)``."""
    x = rms_norm(h, p["attn_norm"], config.rms_norm_eps)
    q = _mm(x, p["q"], "btd,dkgh->btkgh", dtype)
    k = _mm(x, p["k"], "btd,dkh->btkh", dtype)
    v = _mm(x, p["v"], "btd,dkh->btkh", dtype)
    if config.attention_bias:
        q = q + p["q_bias"].astype(dtype)
        k = k + p["k_bias"].astype(dtype)
        v = v + p["v_bias"].astype(dtype)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    new_cache = None
    if cache is not None:
        # Write this step's keys/values at cache_index, then attend over the whole (masked) cache.
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
        new_cache = {"k": ck, "v": cv}
        k, v = ck.astype(dtype), cv.astype(dtype)

    attn = ATTENTION_IMPLS[attention] if cache is None else attend
    heads = attn(q, k, v, mask)  # [B,T,K,G,Hd]: the per-head outputs that head importance measures
    attn_out = _mm(heads, p["o"], "btkgh,kghd->btd", dtype)
    if config.attention_bias:
        attn_out = attn_out + p["o_bias"].astype(dtype)
    if keep is not None:
        attn_out = attn_out * keep.astype(dtype)
    inter = {"attn_norm_out": x, "attn_heads": heads, "attn_out": attn_out}
    return h + attn_out, inter, new_cache


def mlp_block(config: LlamaConfig, p: Params, h: jax.Array, *, dtype, keep: jax.Array | None = None):
    """The FFN half of a decoder layer: ``h + keep * mlp(rms_norm(h))``. Reads only ``rms_norm_eps`` and
    ``mlp_bias`` from ``config`` (the width comes from the params). Returns ``(h_out, intermediates)``."""
    y = rms_norm(h, p["mlp_norm"], config.rms_norm_eps)
    gate = _mm(y, p["gate"], "btd,df->btf", dtype)
    up = _mm(y, p["up"], "btd,df->btf", dtype)
    if config.mlp_bias:
        gate = gate + p["gate_bias"].astype(dtype)
        up = up + p["up_bias"].astype(dtype)
    act = jax.nn.silu(gate) * up  # the FFN hidden units that neuron importance measures
    mlp_out = _mm(act, p["down"], "btf,fd->btd", dtype)
    if config.mlp_bias:
        mlp_out = mlp_out + p["down_bias"].astype(dtype)
    if keep is not None:
        mlp_out = mlp_out * keep.astype(dtype)
    return h + mlp_out, {"mlp_norm_out": y, "mlp_preact": gate, "mlp_act": act}


def decoder_layer(config: LlamaConfig, p: Params, h: jax.Array, cos, sin, mask, *, dtype,
                  cache: dict | None = None, cache_index=None, keep: jax.Array | None = None,
                  attention: str = "einsum"):
    """One pre-norm Llama block: :func:`attention_block` then :func:`mlp_block`. Returns (new hidden,
    intermediates dict, new cache slice or None).

    ``keep`` (a 0/1 scalar) multiplies the block's residual updates: 0 makes the block an exact identity,
    which is how layer-drop importance runs every "model minus one layer" without re-slicing params."""
    h_mid, attn_inter, new_cache = attention_block(config, p, h, cos, sin, mask, dtype=dtype, cache=cache,
                                                   cache_index=cache_index, keep=keep, attention=attention)
    h_out, mlp_inter = mlp_block(config, p, h_mid, dtype=dtype, keep=keep)
    intermediates = {"layer_in": h, **attn_inter, **mlp_inter, "layer_out": h_out}
    return h_out, intermediates, new_cache


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ------------------------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------------------------
def default_positions(tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """0..T-1 per row, or restarting at 0 at every segment change when ``segment_ids`` is given."""
    B, T = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        return idx
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def hidden_states(config: LlamaConfig, params: Params, tokens: jax.Array, *, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, dtype=jnp.float32, remat: str = "none",
                  collect: Callable[[dict], Any] | bool | None = None, layer_keep: jax.Array | None = None,
                  cache: dict | None = None, cache_index=None, cache_valid: jax.Array | None = None,
                  attention: str = "einsum", activation_sharding: Any = None):
    """Tokens [B, T] → final-normed hidden states [B, T, D] (before the lm_head).

    Args:
      positions: RoPE positions [B, T]; default 0..T-1, restarting per segment when ``segment_ids`` is given.
      segment_ids: packed-document ids [B, T]; tokens attend only within their own segment.
      dtype: compute dtype (params are cast at use, so fp32 master weights run in bf16).
      remat: rematerialization policy of each layer (a key of ``REMAT_POLICIES``).
      collect: per-layer intermediates to return. ``True`` returns all of them stacked over layers; a function
        maps each layer's intermediates dict to what should be stacked (e.g. reduced over the sequence right away,
        so importance statistics never hold [L, B, T, F] at once).
      layer_keep: [L] 0/1 multipliers of each layer's residual updates (layer-drop without re-slicing).
      cache, cache_index, cache_valid: KV cache {"k","v": [L,B,S,K,Hd]} for decoding (see ``generate.py``).
      attention: ``"einsum"`` (scores materialized, fastest at short T on CPU), ``"blockwise"`` (online softmax over
        key blocks: O(T·block) memory per head; see `attend_blockwise`) or ``"fused"`` (cuDNN's fused attention on
        a GPU in bf16/fp16; see `attend_fused`). Decoding with a cache always uses einsum.
      activation_sharding: a ``jax.sharding.Sharding`` for the [B, T, D] residual stream, applied at every layer
        boundary. Under FSDP this keeps activations batch-sharded, so XLA gathers each layer's weights instead of
        resharding activations over the hidden axis (which costs an all-reduce of [B, T, F] per matmul).

    Returns:
      ``(hidden, collected, new_cache)``; collected is None unless ``collect`` is given, new_cache None unless
      ``cache`` is given.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {', '.join(REMAT_POLICIES)}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention {attention!r}; choose from {', '.join(ATTENTION_IMPLS)}")
    constrain = ((lambda x: x) if activation_sharding is None
                 else (lambda x: jax.lax.with_sharding_constraint(x, activation_sharding)))
    if positions is None:
        positions = default_positions(tokens, segment_ids)
    collect_fn = (lambda d: d) if collect is True else collect

    h = constrain(jnp.take(params["embed"], tokens, axis=0).astype(dtype))
    cos, sin = rope_cos_sin(config, positions)
    if cache is None:
        mask = attention_mask(positions, positions, segment_ids, segment_ids)
    else:
        S = cache["k"].shape[2]
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (tokens.shape[0], S))
        # In the cache, key slot j holds absolute step j; queries sit at cache_index + t.
        q_slot = cache_index + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        mask = attention_mask(jnp.broadcast_to(q_slot, tokens.shape), k_pos, None, None, cache_valid)

    def body(carry, xs):
        layer_p, keep, layer_cache = xs
        out, inter, new_cache = decoder_layer(config, layer_p, constrain(carry), cos, sin, mask, dtype=dtype,
                                              cache=layer_cache, cache_index=cache_index, keep=keep,
                                              attention=attention)
        out = constrain(out)
        collected = collect_fn(inter) if collect_fn is not None else None
        return out, (collected, new_cache)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    h, (collected, new_cache) = jax.lax.scan(body, h, (params["layers"], layer_keep, cache))
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    return h, collected, new_cache


def logits_from_hidden(config: LlamaConfig, params: Params, h: jax.Array) -> jax.Array:
    """[..., D] → float32 logits [..., V]."""
    head = lm_head(config, params)
    return jnp.einsum("...d,dv->...v", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def forward(config: LlamaConfig, params: Params, tokens: jax.Array, **kwargs):
    """Tokens [B, T] → float32 logits [B, T, V]; with ``collect=...`` returns ``(logits, collected)``.

    Keyword arguments are those of :func:`hidden_states` (no cache: use ``generate.py`` for decoding)."""
    h, collected, _ = hidden_states(config, params, tokens, **kwargs)
    logits = logits_from_hidden(config, params, h)
    return (logits, collected) if kwargs.get("collect") is not None else logits
