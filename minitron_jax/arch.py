"""One face over the two kinds of model: a uniform Llama (:class:`LlamaConfig`, ``params["layers"]``) and a
heterogeneous one (:class:`~minitron_jax.hetero.HeteroConfig`, ``params["segments"]``).

Code that only runs a model — training, evaluation, conversion, planning — calls these functions instead of
``model.*`` or ``hetero.*`` directly, so it accepts either kind without an ``isinstance`` of its own. Each function
dispatches on the config's type and is otherwise exactly the function it forwards to (same arguments, same
results), so uniform models keep their numbers bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from minitron_jax import hetero, model, sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.hetero import HeteroConfig, config_from_hf, config_from_json_file  # noqa: F401 (re-exported)

AnyConfig = Union[LlamaConfig, HeteroConfig]
Params = dict[str, Any]


def is_hetero(config: AnyConfig) -> bool:
    return isinstance(config, HeteroConfig)


def base_config(config: AnyConfig) -> LlamaConfig:
    """The shared Llama settings (vocabulary, hidden size, heads, RoPE, tied head): the config itself for a uniform
    model, ``config.base`` for a heterogeneous one (whose per-layer keys in ``base`` are placeholders)."""
    return config.base if is_hetero(config) else config


def num_layers(config: AnyConfig) -> int:
    return config.num_layers


def _impl(config: AnyConfig):
    if isinstance(config, HeteroConfig):
        return hetero
    if isinstance(config, LlamaConfig):
        return model
    raise TypeError(f"not a model config: {type(config).__name__}")


def param_axes(config: AnyConfig) -> Params:
    return _impl(config).param_axes(config)


def param_shapes(config: AnyConfig) -> Params:
    return _impl(config).param_shapes(config)


def abstract_params(config: AnyConfig, dtype=jnp.float32) -> Params:
    return _impl(config).abstract_params(config, dtype)


def count_params(config: AnyConfig) -> int:
    return _impl(config).count_params(config)


def init_params(config: AnyConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    return _impl(config).init_params(config, key, dtype, std)


def check_params(config: AnyConfig, params: Params) -> None:
    _impl(config).check_params(config, params)


def param_specs(config: AnyConfig, mesh: Mesh, rules: Mapping[str, Any] = sharding.DEFAULT_RULES) -> Params:
    if is_hetero(config):
        return hetero.param_specs(config, mesh, rules)
    return sharding.param_specs(config, mesh, rules)


def param_shardings(config: AnyConfig, mesh: Mesh, rules: Mapping[str, Any] = sharding.DEFAULT_RULES) -> Params:
    if is_hetero(config):
        return hetero.param_shardings(config, mesh, rules)
    return sharding.param_shardings(config, mesh, rules)


def hidden_states(config: AnyConfig, params: Params, tokens: jax.Array, **kwargs):
    """``model.hidden_states`` / ``hetero.hidden_states``: ``(hidden, collected, new_cache)``."""
    return _impl(config).hidden_states(config, params, tokens, **kwargs)


def lm_head(config: AnyConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the embedding transposed when tied)."""
    return model.lm_head(base_config(config), params)


def init_cache(config: AnyConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for ``hidden_states(cache=...)``: ``{"k","v": [L, B, length, K, Hd]}`` for a uniform
    model, ``hetero.init_cache``'s per-segment dict for a heterogeneous one. In both, every array's slot axis is
    axis 2 (so ``jax.tree.map`` pads or slices any of them alike)."""
    if is_hetero(config):
        return hetero.init_cache(config, batch, length, dtype)
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def stacked_collected(config: AnyConfig, collected):
    """``hidden_states(collect=...)``'s result as one stack over all layers ([L, ...] leaves): unchanged for a
    uniform model; a heterogeneous model's per-segment list concatenated along the layer axis, which needs every
    segment to have collected the same tree (e.g. only ``layer_out``, which every kind of layer has)."""
    if not is_hetero(config):
        return collected
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *collected)


def logits_from_hidden(config: AnyConfig, params: Params, h: jax.Array) -> jax.Array:
    return model.logits_from_hidden(base_config(config), params, h)


def forward(config: AnyConfig, params: Params, tokens: jax.Array, **kwargs):
    return _impl(config).forward(config, params, tokens, **kwargs)


def attention_layers(config: AnyConfig) -> int:
    """How many layers attend over the sequence (GQA): all of a uniform model's, a heterogeneous model's gqa
    blocks. What the per-token attention FLOPs (``4·L_attn·H·Hd·T``) and the KV cache scale with."""
    if is_hetero(config):
        return sum(b.attention.kind == "gqa" for b in config.blocks)
    return config.num_layers


def describe(config: AnyConfig) -> str:
    return config.describe()
