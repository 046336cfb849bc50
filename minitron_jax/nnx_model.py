"""A thin Flax NNX face of the model: ``LlamaNNX``, an ``nnx.Module`` whose state is exactly the params tree.

For Flax code (a Tunix trainer, an ``nnx.Optimizer`` loop) that wants an ``nnx.Module``. Nothing is re-implemented:

- The module's ``nnx.Param`` leaves are the params tree of :mod:`minitron_jax.model` — same nested keys
  (``embed``, ``final_norm``, ``lm_head`` unless tied, ``layers.{q,k,v,o,...}``), shapes, dtypes and arrays; each
  ``Param`` carries its logical axes (``model.param_axes``) as ``axes`` metadata. So
  ``nnx.to_pure_dict(nnx.state(module, nnx.Param))`` *is* the params, and gradients/optimizer states over
  ``nnx.Param`` have the params' structure.
- ``__call__`` is ``model.forward`` on those arrays: the same function, so the same logits to the bit.

A pruned student is a smaller config plus sliced params (:mod:`minitron_jax.compress.prune`); build its module from
both with ``LlamaNNX.from_params(pruned_config, pruned_params)`` (never merge sliced params into a module of the
old config), and take the plain tree back with ``to_params()`` for export or further pruning.

The module name avoids ``nnx``: a ``minitron_jax/nnx.py`` would be easy to confuse with ``flax.nnx``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minitron_jax import model
from minitron_jax.config import LlamaConfig
from minitron_jax.model import Params

_STATIC = ("config", "dtype", "attention", "remat", "_param_names")


class LlamaNNX(nnx.Module):
    """A Llama decoder as an ``nnx.Module`` over our params tree.

    Args:
      config: the model's ``LlamaConfig`` (a pruned one for a pruned student).
      rngs: random init (``model.init_params`` with a key from the ``params`` stream), when ``params`` is None.
      params: the params tree to hold (checked against ``config``; the arrays are held as given, not copied/cast).
      param_dtype: dtype of randomly initialized params.
      dtype, attention, remat: the compute dtype, attention kernel and remat policy of ``model.hidden_states``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, attention: str = "einsum", remat: str = "none"):
        if attention not in model.ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {attention!r}; choose from {', '.join(model.ATTENTION_IMPLS)}")
        if remat not in model.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose from {', '.join(model.REMAT_POLICIES)}")
        if params is None:
            if rngs is None:
                raise ValueError("LlamaNNX needs rngs (random init) or params")
            params = model.init_params(config, rngs.params(), param_dtype)
        else:
            model.check_params(config, params)
        self.config, self.dtype, self.attention, self.remat = config, dtype, attention, remat
        axes = model.param_axes(config)
        self._param_names = tuple(sorted(params))
        for name in self._param_names:
            if name in _STATIC or hasattr(type(self), name):
                raise ValueError(f"parameter name {name!r} clashes with an attribute of LlamaNNX")
            if isinstance(params[name], dict):
                value = nnx.data({k: nnx.Param(v, axes=axes[name][k]) for k, v in params[name].items()})
            else:
                value = nnx.Param(params[name], axes=axes[name])
            setattr(self, name, value)

    @classmethod
    def from_params(cls, config: LlamaConfig, params: Params, **kwargs) -> LlamaNNX:
        """The module holding ``params`` (of ``config``); keyword arguments as for the constructor."""
        return cls(config, params=params, **kwargs)

    def to_params(self) -> Params:
        """The plain params tree (the arrays held, not copies): for ``model.*``, pruning and export."""

        def unwrap(value):
            if isinstance(value, nnx.Variable):
                return value[...]
            return {k: unwrap(v) for k, v in value.items()}

        return {name: unwrap(getattr(self, name)) for name in self._param_names}

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Tokens [B, T] → float32 logits [B, T, V]: ``model.forward`` (see ``model.hidden_states`` for
        ``positions`` and ``segment_ids``)."""
        return model.forward(self.config, self.to_params(), tokens, positions=positions, segment_ids=segment_ids,
                             dtype=self.dtype, attention=self.attention, remat=self.remat)
