"""A heterogeneous (Puzzle-style) Llama: every layer its own :class:`~minitron_jax.blocks.BlockSpec`.

The model is :mod:`minitron_jax.model` with the one stack of identical layers replaced by *segments* — runs of equal
blocks (:func:`minitron_jax.blocks.segments`) — each stacked on a leading ``layer`` axis and run with one
``jax.lax.scan``. A segment's params use the names and axis layout of ``model.py``'s ``layers`` dict (by kind), so
a uniform model's ``params["layers"]`` *is* its single segment (:func:`from_uniform` / :func:`to_uniform`), and a
GQA + MLP segment runs through ``model.decoder_layer`` itself (other kinds through its halves,
``model.attention_block`` / ``model.mlp_block``): a heterogeneous model whose blocks equal a uniform
model's computes exactly the same numbers.

Per kind, a segment holds (``n`` = the segment's layers, K = its KV heads, G = num_heads // K, F = its width):

=============  =====================================================================================================
gqa            attn_norm [n,D], q [n,D,K,G,Hd], k/v [n,D,K,Hd], o [n,K,G,Hd,D] (+ model.py's biases if the base has
               them)
linear attn    attn_norm [n,D], attn_linear [n,D,D]: ``h + rms_norm(h) @ W`` (DeciLM's ``replace_with_linear`` keeps
               the input layernorm; its linear has no bias)
mlp            mlp_norm [n,D], gate/up [n,D,F], down [n,F,D] (+ biases)
linear ffn     mlp_norm [n,D], ffn_linear [n,D,D]
none           no keys: the sub-block is removed (no norm, no residual update, no compute)
=============  =====================================================================================================

The ``[D, D]`` linear matrices are named ``("layer", "embed", "embed")``: both sides are the residual stream, so
pruning the hidden size slices both, and ``sharding.logical_spec`` gives a mesh axis to the first of the two only.

Variants are initialised from a parent (uniform) layer by :func:`init_block` and assembled with
:func:`stack_layers`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minitron_jax import model, sharding
from minitron_jax.blocks import BlockSpec, check_blocks, from_decilm, segments, to_decilm, uniform_blocks
from minitron_jax.config import ConfigError, LlamaConfig, read_config_json

Params = dict[str, Any]

LINEAR_AXES = ("layer", "embed", "embed")
_GQA_KEYS = ("attn_norm", "q", "k", "v", "o")
_MLP_KEYS = ("mlp_norm", "gate", "up", "down")

DECI_ARCHITECTURE = "DeciLMForCausalLM"
DECI_MODEL_TYPE = "nemotron-nas"
# Keys of a DeciLM config.json that a Llama config does not have (auto_map names the shipped modeling files).
_DECI_ONLY_KEYS = {"block_configs", "auto_map", "architectures", "model_type"}


@dataclasses.dataclass(frozen=True)
class HeteroConfig:
    """A base :class:`LlamaConfig` plus one :class:`BlockSpec` per layer.

    The base supplies everything shared by all layers (vocabulary, hidden size, query heads, head dim, RoPE, norm
    eps, tied head, biases). Its ``num_layers``, ``num_kv_heads`` and ``intermediate_size`` are **ignored** (and
    replaced by placeholders: ``len(blocks)``, ``num_heads``, 1): the depth is ``len(blocks)`` and every layer's KV
    heads and FFN width come from its own block. Frozen and hashable,
    so it can be a static argument to ``jax.jit``."""

    base: LlamaConfig
    blocks: tuple[BlockSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise ValueError("a heterogeneous model needs at least one block")
        if isinstance(self.base, LlamaConfig):
            # The base's per-layer keys mean nothing here; fixing them to canonical placeholders makes two configs
            # of the same model equal (and one jit cache entry) however they were built: from a uniform model, a
            # DeciLM config.json or a GGUF.
            object.__setattr__(self, "base", self.base.replace(
                num_layers=len(self.blocks), num_kv_heads=self.base.num_heads, intermediate_size=1))
        for i, b in enumerate(self.blocks):
            if not isinstance(b, BlockSpec):
                raise ValueError(f"blocks[{i}] is a {type(b).__name__}, not a BlockSpec")
        check_blocks(self.base, self.blocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    # The settings every layer shares read straight through to the base, so code that runs either kind of model
    # (evaluation windows, vocab checks, decoding) needs no case of its own. The per-layer ones (num_kv_heads,
    # intermediate_size, q_per_kv) deliberately do not: using them on a heterogeneous model is a bug to surface.
    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    @property
    def num_heads(self) -> int:
        return self.base.num_heads

    @property
    def head_dim(self) -> int:
        return self.base.head_dim

    @property
    def max_position_embeddings(self) -> int:
        return self.base.max_position_embeddings

    @property
    def tie_word_embeddings(self) -> bool:
        return self.base.tie_word_embeddings

    @property
    def extra_dict(self) -> dict:
        return self.base.extra_dict

    def segments(self) -> list[tuple[int, int, BlockSpec]]:
        return segments(self.blocks)

    # --------------------------------------------------------------------------------------------------------
    # config.json: the Nemotron-NAS ("DeciLM") layout that vLLM and transformers (with its modeling file) read
    # --------------------------------------------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """An HF config dict in the DeciLM layout: the base's Llama keys, ``block_configs`` per layer, and
        ``num_key_value_heads`` / ``intermediate_size`` set to None (every layer has its own). No ``auto_map``:
        that names modeling files, which only an HF export writes beside it (``convert.deci_hf``)."""
        out = self.base.to_hf()
        out.update(architectures=[DECI_ARCHITECTURE], model_type=DECI_MODEL_TYPE,
                   num_hidden_layers=self.num_layers, num_key_value_heads=None, intermediate_size=None,
                   block_configs=to_decilm(self.base, self.blocks))
        return out

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "HeteroConfig":
        """The inverse of :meth:`to_hf`; refuses what it cannot run with a ``ConfigError`` naming the key."""
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a config dict, got {type(hf).__name__}")
        bcs = hf.get("block_configs")
        if not isinstance(bcs, list) or not bcs:
            raise ConfigError("a DeciLM config needs a non-empty 'block_configs' list")
        n = hf.get("num_hidden_layers", len(bcs))
        if n != len(bcs):
            raise ConfigError(f"num_hidden_layers is {n} but block_configs has {len(bcs)} entries")
        for i, bc in enumerate(bcs):
            for part in ("attention", "ffn"):
                sub = bc.get(part) if isinstance(bc, dict) else None
                if not isinstance(sub, dict):
                    raise ConfigError(f"block_configs[{i}] has no {part!r} dict")
                for key in ("sparsify", "window_length", "num_sink_tokens"):
                    if sub.get(key):
                        raise ConfigError(f"block_configs[{i}].{part}.{key} = {sub[key]!r} is not supported")
        heads = hf.get("num_attention_heads")
        # The base is a Llama config whose per-layer keys are placeholders (ignored: each block has its own).
        llama = {k: v for k, v in hf.items() if k not in _DECI_ONLY_KEYS}
        llama.update(architectures=["LlamaForCausalLM"], model_type="llama", intermediate_size=1,
                     num_key_value_heads=heads, num_hidden_layers=len(bcs))
        base = LlamaConfig.from_hf(llama)
        try:
            blocks = from_decilm(base, bcs)
            return cls(base, blocks)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_json_file(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")

    def describe(self) -> str:
        b = self.base
        runs = ", ".join(spec.describe() + (f" x{stop - start}" if stop - start > 1 else "")
                         for start, stop, spec in self.segments())
        return (f"L={self.num_layers} D={b.hidden_size} H={b.num_heads} Hd={b.head_dim} V={b.vocab_size}"
                f"{' tied' if b.tie_word_embeddings else ''} ({runs})")  # not [...]: rich would read it as markup


def block_config(base: LlamaConfig, spec: BlockSpec, num_layers: int = 1) -> LlamaConfig:
    """The uniform :class:`LlamaConfig` of ``num_layers`` GQA + MLP layers of ``spec`` (ValueError for other
    kinds): what a gqa/mlp segment is, as a plain model."""
    if spec.attention.kind != "gqa" or spec.ffn.kind != "mlp":
        raise ValueError(f"block {spec.describe()} is not a plain Llama layer (gqa/mlp)")
    return base.replace(num_layers=num_layers, num_kv_heads=spec.attention.kv_heads,
                        intermediate_size=spec.ffn.width)


# ------------------------------------------------------------------------------------------------------------------
# Named axes, shapes, counts, init
# ------------------------------------------------------------------------------------------------------------------
def block_axes(spec: BlockSpec, *, attention_bias: bool = False, mlp_bias: bool = False
               ) -> dict[str, tuple[str, ...]]:
    """Logical axes of one block's params (with the leading ``layer`` axis of a segment); the bias flags are the
    base config's."""
    axes: dict[str, tuple[str, ...]] = {}
    a, f = spec.attention.kind, spec.ffn.kind
    if a == "gqa":
        axes.update({k: model.LAYER_AXES[k] for k in _GQA_KEYS})
        if attention_bias:
            axes.update(model.ATTN_BIAS_AXES)
    elif a == "linear":
        axes.update(attn_norm=model.LAYER_AXES["attn_norm"], attn_linear=LINEAR_AXES)
    if f == "mlp":
        axes.update({k: model.LAYER_AXES[k] for k in _MLP_KEYS})
        if mlp_bias:
            axes.update(model.MLP_BIAS_AXES)
    elif f == "linear":
        axes.update(mlp_norm=model.LAYER_AXES["mlp_norm"], ffn_linear=LINEAR_AXES)
    return axes


def _base_block_axes(base: LlamaConfig, spec: BlockSpec) -> dict[str, tuple[str, ...]]:
    return block_axes(spec, attention_bias=base.attention_bias, mlp_bias=base.mlp_bias)


def param_axes(hcfg: HeteroConfig) -> Params:
    """Logical axis names of every parameter, shaped like the params (``segments`` is a list, one dict each)."""
    top = {k: v for k, v in model.TOP_AXES.items() if not (k == "lm_head" and hcfg.base.tie_word_embeddings)}
    return {**top, "segments": [_base_block_axes(hcfg.base, spec) for _, _, spec in hcfg.segments()]}


def segment_axis_sizes(base: LlamaConfig, spec: BlockSpec, length: int) -> dict[str, int]:
    """Size of every logical axis inside one segment of ``length`` layers of ``spec``. Axes a block does not
    have (``kv_heads`` of a linear attention, ``mlp`` of a removed FFN) are simply absent."""
    sizes = {"layer": length, "embed": base.hidden_size, "head_dim": base.head_dim, "vocab": base.vocab_size}
    if spec.attention.kind == "gqa":
        sizes.update(kv_heads=spec.attention.kv_heads, q_per_kv=base.num_heads // spec.attention.kv_heads)
    if spec.ffn.kind == "mlp":
        sizes["mlp"] = spec.ffn.width
    return sizes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_shapes(hcfg: HeteroConfig) -> Params:
    b = hcfg.base
    top = model.param_shapes(b)
    del top["layers"]
    segs = []
    for start, stop, spec in hcfg.segments():
        sizes = segment_axis_sizes(b, spec, stop - start)
        segs.append({k: tuple(sizes[a] for a in axes) for k, axes in _base_block_axes(b, spec).items()})
    return {**top, "segments": segs}


def abstract_params(hcfg: HeteroConfig, dtype=jnp.float32) -> Params:
    """``jax.ShapeDtypeStruct`` per parameter."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(hcfg), is_leaf=_is_shape)


def count_params(hcfg: HeteroConfig) -> int:
    """Parameter count (a tied lm_head counts once, as in ``model.count_params``)."""
    return int(sum(int(np.prod(s)) for s in jax.tree.leaves(param_shapes(hcfg), is_leaf=_is_shape)))


def init_params(hcfg: HeteroConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params as ``model.init_params`` makes them: normal(std) for matrices (the linear replacements
    included), ones for norms, zeros for biases. (To start variants from a trained parent use :func:`init_block`.)"""
    return model.init_from_shapes(param_shapes(hcfg), key, dtype, std)


def check_params(hcfg: HeteroConfig, params: Params) -> None:
    """ValueError naming every parameter whose presence or shape disagrees with ``hcfg``."""
    problems = model.shape_problems(param_shapes(hcfg), params)
    if problems:
        raise ValueError(f"params do not match config ({hcfg.describe()}):\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------------------------
def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def specs_from_axes(axes: Params, shapes: Params, mesh: Mesh,
                    rules: Mapping[str, Any] = sharding.DEFAULT_RULES) -> Params:
    """A ``PartitionSpec`` per parameter from trees of logical axes and shapes (same structure, lists included)
    through ``sharding.logical_spec`` — what ``sharding.param_specs`` does for a ``LlamaConfig``, for any axes
    tree."""
    sharding.check_rules(rules)
    return jax.tree.map(lambda a, s: sharding.logical_spec(a, s, mesh, rules), axes, shapes, is_leaf=_is_axes)


def param_specs(hcfg: HeteroConfig, mesh: Mesh, rules: Mapping[str, Any] = sharding.DEFAULT_RULES) -> Params:
    """``PartitionSpec`` per parameter, shaped like the params: the uniform model's rules
    (``sharding.DEFAULT_RULES`` unless given) applied to :func:`param_axes` with each segment's own sizes, so a
    segment whose KV heads or FFN width the tensor axis does not divide keeps that dimension replicated."""
    return specs_from_axes(param_axes(hcfg), param_shapes(hcfg), mesh, rules)


def param_shardings(hcfg: HeteroConfig, mesh: Mesh, rules: Mapping[str, Any] = sharding.DEFAULT_RULES) -> Params:
    """``NamedSharding`` per parameter (for ``sharding.shard_params`` / ``jax.jit(in_shardings=...)``)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(hcfg, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


# ------------------------------------------------------------------------------------------------------------------
# Uniform <-> heterogeneous
# ------------------------------------------------------------------------------------------------------------------
def from_uniform(config: LlamaConfig, params: Params) -> tuple[HeteroConfig, Params]:
    """A uniform model as a heterogeneous one: one segment, which is ``params["layers"]`` itself (not copied)."""
    hcfg = HeteroConfig(config, uniform_blocks(config))
    out = {k: v for k, v in params.items() if k != "layers"}
    out["segments"] = [params["layers"]]
    return hcfg, out


def to_uniform(hcfg: HeteroConfig, params: Params) -> tuple[LlamaConfig, Params]:
    """The inverse of :func:`from_uniform`; ValueError unless every block is the same gqa/mlp block."""
    kinds = {b.describe() for b in hcfg.blocks}
    if len(kinds) != 1:
        raise ValueError(f"not a uniform model: its layers are {sorted(kinds)}")
    config = block_config(hcfg.base, hcfg.blocks[0], hcfg.num_layers)
    out = {k: v for k, v in params.items() if k != "segments"}
    out["layers"] = params["segments"][0]
    return config, out


# ------------------------------------------------------------------------------------------------------------------
# Variants from a parent layer
# ------------------------------------------------------------------------------------------------------------------
def merge_kv_heads(parent: Params, kv_heads: int) -> Params:
    """A parent GQA layer's attention params (no leading layer axis) with its K KV heads merged into ``kv_heads``.

    Consecutive groups of r = K / kv_heads KV heads become one, whose k and v projections (and biases) are the
    mean of theirs; RoPE is linear and the same for every head, so the merged keys are the mean of the parent's
    keys. Every query head is kept: query head ``g`` of parent group ``k`` becomes head ``(k % r) * G + g`` of merged
    group ``k // r`` — a reshape, so the flat order of query heads (and of ``o``'s rows) is unchanged."""
    D, K, Hd = parent["k"].shape
    if kv_heads > K or K % kv_heads:
        raise ValueError(f"{K} KV heads cannot be merged into {kv_heads} (a divisor of {K} is needed)")
    r, G = K // kv_heads, parent["q"].shape[2]
    out = {"attn_norm": parent["attn_norm"],
           "q": parent["q"].reshape(D, kv_heads, r * G, Hd),
           "k": parent["k"].reshape(D, kv_heads, r, Hd).mean(axis=2),
           "v": parent["v"].reshape(D, kv_heads, r, Hd).mean(axis=2),
           "o": parent["o"].reshape(kv_heads, r * G, Hd, parent["o"].shape[-1])}
    if "q_bias" in parent:
        out.update(q_bias=parent["q_bias"].reshape(kv_heads, r * G, Hd),
                   k_bias=parent["k_bias"].reshape(kv_heads, r, Hd).mean(axis=1),
                   v_bias=parent["v_bias"].reshape(kv_heads, r, Hd).mean(axis=1),
                   o_bias=parent["o_bias"])
    return out


def init_block(base_config: LlamaConfig, parent_layer_params: Params, spec: BlockSpec, *,
               ffn_keep: Sequence[int] | np.ndarray | None = None) -> Params:
    """One layer's params (no leading axis) of block ``spec``, initialised from a parent uniform layer.

    - gqa with K' KV heads: :func:`merge_kv_heads` (K' must divide the parent's K); K' = K is the parent itself.
    - mlp of width F' ≤ F: the parent's FFN channels ``ffn_keep`` (F' distinct indices; default the first F', which
      is the most important ones once the channels are sorted by importance).
    - linear (attention or FFN): the parent's norm and a **zero** [D, D] matrix, i.e. exactly the identity — the
      same function as removing the sub-block. This is the least that needs no data; blockwise distillation, which
      has the calibration activations, replaces the matrix by a least-squares fit to the parent half
      (``compress.puzzle.blockwise.lstsq_linear``) before training it.
    - none: no params.
    """
    dtype = parent_layer_params["attn_norm"].dtype
    D = base_config.hidden_size
    out: Params = {}
    att = spec.attention
    if att.kind == "gqa":
        out.update(merge_kv_heads(parent_layer_params, att.kv_heads))
    elif att.kind == "linear":
        out.update(attn_norm=parent_layer_params["attn_norm"], attn_linear=jnp.zeros((D, D), dtype))
    ffn = spec.ffn
    if ffn.kind == "mlp":
        F = parent_layer_params["gate"].shape[1]
        keep = np.arange(ffn.width) if ffn_keep is None else np.asarray(ffn_keep, dtype=np.int64)
        if keep.shape != (ffn.width,) or len(np.unique(keep)) != ffn.width or keep.min() < 0 or keep.max() >= F:
            raise ValueError(f"ffn_keep must be {ffn.width} distinct indices in [0, {F}), got shape {keep.shape}")
        if ffn_keep is None and ffn.width == F:
            out.update({k: parent_layer_params[k] for k in _MLP_KEYS})
        else:
            out.update(mlp_norm=parent_layer_params["mlp_norm"], gate=parent_layer_params["gate"][:, keep],
                       up=parent_layer_params["up"][:, keep], down=parent_layer_params["down"][keep, :])
        if base_config.mlp_bias:
            out.update(gate_bias=parent_layer_params["gate_bias"][keep],
                       up_bias=parent_layer_params["up_bias"][keep], down_bias=parent_layer_params["down_bias"])
    elif ffn.kind == "linear":
        out.update(mlp_norm=parent_layer_params["mlp_norm"], ffn_linear=jnp.zeros((D, D), dtype))
    return out


def stack_layers(layers: Sequence[Params], blocks: Sequence[BlockSpec]) -> list[Params]:
    """Per-layer params (one dict per layer, no leading axis) → ``params["segments"]`` for ``blocks``."""
    if len(layers) != len(blocks):
        raise ValueError(f"{len(layers)} layers of params for {len(blocks)} blocks")
    out = []
    for start, stop, spec in segments(blocks):
        keys = set(block_axes(spec))  # biases, if the base has them, come along with the rest
        for i in range(start, stop):
            missing = keys - set(layers[i])
            if missing:
                raise ValueError(f"layer {i} ({spec.describe()}) lacks {sorted(missing)}")
        out.append(jax.tree.map(lambda *xs: jnp.stack(xs), *layers[start:stop]))
    return out


def keep_layers(hcfg: HeteroConfig, params: Params | None, kept: Sequence[int]
                ) -> tuple[HeteroConfig, Params | None]:
    """The model with only layers ``kept`` (ascending indices), its segments rebuilt (runs that the removed layers
    separated become one). Host arrays stay host arrays and device arrays stay on the device; ``params`` None
    gives the config alone."""
    new = HeteroConfig(hcfg.base, tuple(hcfg.blocks[i] for i in kept))
    if params is None:
        return new, None
    layers = unstack_layers(hcfg, params)

    def stack(*xs):
        return jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack([np.asarray(x) for x in xs])

    segs = [jax.tree.map(stack, *[layers[kept[j]] for j in range(start, stop)])
            for start, stop, _ in new.segments()]
    return new, {**{k: v for k, v in params.items() if k != "segments"}, "segments": segs}


def without_identity_layers(hcfg: HeteroConfig, params: Params | None = None
                            ) -> tuple[HeteroConfig, Params | None]:
    """The same function without its ``none/none`` layers (each is the identity): what a runtime that cannot hold
    an empty layer (llama.cpp builds before its Nemotron-Ultra support) is given. Unchanged when there are none;
    ValueError when every layer is one (nothing would be left)."""
    kept = [i for i, b in enumerate(hcfg.blocks) if not b.is_identity]
    if len(kept) == len(hcfg.blocks):
        return hcfg, params
    if not kept:
        raise ValueError("every layer is removed (none/none): no layer is left to run")
    return keep_layers(hcfg, params, kept)


def unstack_layers(hcfg: HeteroConfig, params: Params) -> list[Params]:
    """The inverse of :func:`stack_layers`: one dict of params per layer, without the leading axis."""
    out = []
    for (start, stop, _), seg in zip(hcfg.segments(), params["segments"]):
        out.extend(jax.tree.map(lambda x, i=i: x[i], seg) for i in range(stop - start))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------
def linear_block(base: LlamaConfig, norm: jax.Array, w: jax.Array, h, *, dtype, keep: jax.Array | None = None):
    """``h + keep * (rms_norm(h) @ W)``: DeciLM's ``replace_with_linear`` sub-block (attention or FFN). Returns
    ``(h_out, normed input, update)``; the matmul is ``model.dense`` so its weight gradient takes the same 2-D
    path as every other layer matmul."""
    x = model.rms_norm(h, norm, base.rms_norm_eps)
    out = model.dense(x, w, "btd,de->bte", dtype)
    if keep is not None:
        out = out * keep.astype(dtype)
    return h + out, x, out


def layer(base: LlamaConfig, spec: BlockSpec, p: Params, h, cos, sin, mask, *, dtype, cache: dict | None = None,
          cache_index=None, keep: jax.Array | None = None, attention: str = "einsum"):
    """One layer of kind ``spec`` (params without the leading axis), as ``model.decoder_layer`` returns it:
    ``(h_out, intermediates, new cache slice or None)``.

    The halves are model.py's own (``attention_block`` / ``mlp_block``), so a gqa/mlp layer is
    ``model.decoder_layer`` itself and the other kinds share its numerics. The intermediates hold ``layer_in`` and
    ``layer_out`` always, and the keys of the sub-blocks the layer has: gqa → ``attn_norm_out, attn_heads,
    attn_out``; linear attention → ``attn_norm_out, attn_out``; mlp → ``mlp_norm_out, mlp_preact, mlp_act``;
    linear FFN → ``mlp_norm_out, mlp_out``. Only a gqa layer has (and returns) a KV-cache slice."""
    if spec.attention.kind == "gqa" and spec.ffn.kind == "mlp":
        # The plain Llama layer runs through model.py's own code, so uniform models agree bit for bit.
        return model.decoder_layer(base, p, h, cos, sin, mask, dtype=dtype, cache=cache, cache_index=cache_index,
                                   keep=keep, attention=attention)
    inter: dict[str, jax.Array] = {"layer_in": h}
    new_cache = None
    if spec.attention.kind == "gqa":
        h, attn_inter, new_cache = model.attention_block(base, p, h, cos, sin, mask, dtype=dtype, cache=cache,
                                                         cache_index=cache_index, keep=keep, attention=attention)
        inter.update(attn_inter)
    elif spec.attention.kind == "linear":
        h, x, out = linear_block(base, p["attn_norm"], p["attn_linear"], h, dtype=dtype, keep=keep)
        inter.update(attn_norm_out=x, attn_out=out)
    if spec.ffn.kind == "mlp":
        h, mlp_inter = model.mlp_block(base, p, h, dtype=dtype, keep=keep)
        inter.update(mlp_inter)
    elif spec.ffn.kind == "linear":
        h, y, out = linear_block(base, p["mlp_norm"], p["ffn_linear"], h, dtype=dtype, keep=keep)
        inter.update(mlp_norm_out=y, mlp_out=out)
    inter["layer_out"] = h
    return h, inter, new_cache


def apply_block(base: LlamaConfig, spec: BlockSpec, p: Params, h, cos, sin, mask, *, dtype,
                attention: str = "einsum"):
    """One layer of kind ``spec`` (params without the leading axis): [B, T, D] → [B, T, D]."""
    return layer(base, spec, p, h, cos, sin, mask, dtype=dtype, attention=attention)[0]


def has_cache(spec: BlockSpec) -> bool:
    """Whether a layer of ``spec`` keeps keys/values while decoding (only GQA attention does)."""
    return spec.attention.kind == "gqa"


def init_cache(hcfg: HeteroConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache ``{"segments": [{"k", "v": [n, B, length, K, Hd]} or None]}``: one entry per segment,
    None for segments without GQA attention (a linear or removed attention has nothing to remember). The slot
    axis is axis 2 of every array, as in the uniform model's ``[L, B, S, K, Hd]`` cache."""
    segs = []
    for start, stop, spec in hcfg.segments():
        if has_cache(spec):
            shape = (stop - start, batch, length, spec.attention.kv_heads, hcfg.base.head_dim)
            segs.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
        else:
            segs.append(None)
    return {"segments": segs}


def hidden_states(hcfg: HeteroConfig, params: Params, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None, dtype=jnp.float32, remat: str = "none",
                  collect: Callable[[dict], Any] | bool | None = None, layer_keep: jax.Array | None = None,
                  cache: dict | None = None, cache_index=None, cache_valid: jax.Array | None = None,
                  attention: str = "einsum", activation_sharding: Any = None):
    """Tokens [B, T] → ``(final-normed hidden states [B, T, D], collected, new_cache)``: the arguments and results
    of ``model.hidden_states``, segment by segment (each segment one ``lax.scan``), except:

    - ``collected`` is a **list with one entry per segment**, each what ``model.hidden_states`` returns for a stack
      of that segment's layers (``collect`` applied per layer, stacked over the segment's layers). The dict a
      ``collect`` function sees has the keys of :func:`layer` for the segment's kind (a ``none/none`` layer:
      ``layer_in`` and ``layer_out`` only), so a function that reads GQA/MLP keys works on gqa/mlp segments only.
    - ``layer_keep`` is [L] over all layers; each segment takes its slice.
    - ``cache`` is :func:`init_cache`'s ``{"segments": [...]}`` (None where a segment has no GQA attention) and
      ``new_cache`` has the same layout.

    A segment of ``none/none`` blocks is the identity and runs nothing (with ``collect``, only a scan that records
    ``layer_in == layer_out`` per layer, so every layer has an entry)."""
    if remat not in model.REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {', '.join(model.REMAT_POLICIES)}")
    if attention not in model.ATTENTION_IMPLS:
        raise ValueError(f"unknown attention {attention!r}; choose from {', '.join(model.ATTENTION_IMPLS)}")
    segs = hcfg.segments()
    if len(params["segments"]) != len(segs):
        raise ValueError(f"params have {len(params['segments'])} segments, the config {len(segs)}")
    if layer_keep is not None and tuple(layer_keep.shape) != (hcfg.num_layers,):
        raise ValueError(f"layer_keep has shape {tuple(layer_keep.shape)}, expected ({hcfg.num_layers},)")
    seg_caches: list = [None] * len(segs)
    if cache is not None:
        seg_caches = list(cache["segments"])
        if len(seg_caches) != len(segs):
            raise ValueError(f"cache has {len(seg_caches)} segments, the config {len(segs)}")
        for i, ((_, _, spec), c) in enumerate(zip(segs, seg_caches)):
            if has_cache(spec) != (c is not None):
                raise ValueError(f"cache segment {i} ({spec.describe()}) should be "
                                 f"{'a k/v dict' if has_cache(spec) else 'None'}")
    base = hcfg.base
    constrain: Callable = ((lambda x: x) if activation_sharding is None
                           else (lambda x: jax.lax.with_sharding_constraint(x, activation_sharding)))
    if positions is None:
        positions = model.default_positions(tokens, segment_ids)
    collect_fn = (lambda d: d) if collect is True else collect

    h = constrain(jnp.take(params["embed"], tokens, axis=0).astype(dtype))
    cos, sin = model.rope_cos_sin(base, positions)
    if cache is None:
        mask = model.attention_mask(positions, positions, segment_ids, segment_ids)
    else:
        # The same slot mask as model.hidden_states; a model without any GQA layer has no cache and needs none.
        first = next((c for c in seg_caches if c is not None), None)
        mask = None
        if first is not None:
            S = first["k"].shape[2]
            k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (tokens.shape[0], S))
            q_slot = cache_index + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
            mask = model.attention_mask(jnp.broadcast_to(q_slot, tokens.shape), k_pos, None, None, cache_valid)

    collected: list = []
    new_caches: list = []
    for (start, stop, spec), seg, seg_cache in zip(segs, params["segments"], seg_caches):
        if spec.is_identity:
            new_caches.append(None)
            if collect_fn is not None:
                _, c = jax.lax.scan(lambda carry, _: (carry, collect_fn({"layer_in": carry, "layer_out": carry})),
                                    h, None, length=stop - start)
                collected.append(c)
            continue
        keep = None if layer_keep is None else layer_keep[start:stop]

        def body(carry, xs, spec=spec):
            layer_p, k, c = xs
            out, inter, nc = layer(base, spec, layer_p, constrain(carry), cos, sin, mask, dtype=dtype, cache=c,
                                   cache_index=cache_index, keep=k, attention=attention)
            return constrain(out), (collect_fn(inter) if collect_fn is not None else None, nc)

        if remat != "none":
            body = jax.checkpoint(body, policy=model.REMAT_POLICIES[remat], prevent_cse=False)
        h, (c, nc) = jax.lax.scan(body, h, (seg, keep, seg_cache))
        collected.append(c)
        new_caches.append(nc)
    h = model.rms_norm(h, params["final_norm"], base.rms_norm_eps)
    return (h, collected if collect_fn is not None else None,
            {"segments": new_caches} if cache is not None else None)


def forward(hcfg: HeteroConfig, params: Params, tokens: jax.Array, **kwargs):
    """Tokens [B, T] → float32 logits [B, T, V]; with ``collect=...`` returns ``(logits, collected)`` (a list per
    segment). Keyword arguments are those of :func:`hidden_states` (no cache: decoding is ``generate.py``'s)."""
    h, collected, _ = hidden_states(hcfg, params, tokens, **kwargs)
    logits = model.logits_from_hidden(hcfg.base, params, h)
    return (logits, collected) if kwargs.get("collect") is not None else logits


# ------------------------------------------------------------------------------------------------------------------
# Either kind of config from config.json
# ------------------------------------------------------------------------------------------------------------------
def is_deci_config(hf: dict[str, Any]) -> bool:
    """True for a Nemotron-NAS / DeciLM config dict (per-layer ``block_configs``)."""
    return (isinstance(hf, dict) and ("block_configs" in hf or hf.get("model_type") == DECI_MODEL_TYPE
                                      or DECI_ARCHITECTURE in (hf.get("architectures") or [])))


def config_from_hf(hf: dict[str, Any]) -> "LlamaConfig | HeteroConfig":
    """A :class:`LlamaConfig` for a Llama/Mistral config dict, a :class:`HeteroConfig` for a DeciLM one."""
    return HeteroConfig.from_hf(hf) if is_deci_config(hf) else LlamaConfig.from_hf(hf)


def config_from_json_file(path) -> "LlamaConfig | HeteroConfig":
    """:func:`config_from_hf` of a ``config.json``; FileNotFoundError / ConfigError naming the file."""
    data = read_config_json(path)
    try:
        return config_from_hf(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
