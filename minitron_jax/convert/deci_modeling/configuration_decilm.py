# Written by minitron_jax for its heterogeneous (Nemotron-NAS / "DeciLM" layout) exports. Self-contained: imports
# only transformers, so it runs wherever the directory is loaded with trust_remote_code=True.
"""The configuration of a Nemotron-NAS ("DeciLM") model: a Llama whose every layer has its own block.

``block_configs`` holds one entry per layer, ``{"attention": {...}, "ffn": {...}}``:

- attention: ``no_op`` (the sub-block is skipped), ``replace_with_linear`` (one [D, D] linear map on the normed
  input), or GQA with ``n_heads_in_group`` query heads per KV head;
- ffn: ``no_op``, ``replace_with_linear``, or a SiLU-gated MLP whose width is derived from ``ffn_mult`` (see
  :func:`ffn_mult_to_intermediate_size`).

The entries are kept as small attribute objects (``block_config.attention.no_op``), the form vLLM's
``nemotron_nas`` model reads, and written back to ``config.json`` as plain dicts with the keys they came with
(plus ``no_op``/``replace_with_linear`` as False where absent). ``num_key_value_heads`` and
``intermediate_size`` are None: every layer has its own.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width of a layer: ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256 (DeciLM's
    rule; vLLM computes the same)."""
    return _find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


class _Section:
    """One half of a block config (attention or ffn) as attributes. Only the keys the JSON has (and the two flags)
    become attributes, so ``hasattr`` answers as the readers of this layout expect: vLLM asks
    ``hasattr(ffn, "ffn_mult")`` and ``hasattr(ffn, "hidden_act")``, and a None there would break it."""

    def __init__(self, **entries: Any):
        self.__dict__.update(entries)
        self.no_op = bool(entries.get("no_op", False))
        self.replace_with_linear = bool(entries.get("replace_with_linear", False))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__!r})"


class BlockConfig:
    """One layer's block: ``attention`` and ``ffn`` sections."""

    def __init__(self, attention: dict | None = None, ffn: dict | None = None, **extra: Any):
        self.attention = attention if isinstance(attention, _Section) else _Section(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, _Section) else _Section(**(ffn or {}))
        self.extra = dict(extra)

    def to_dict(self) -> dict[str, Any]:
        return {**copy.deepcopy(self.extra), "attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()!r})"


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, block_configs: list | None = None, vocab_size: int = 32000, hidden_size: int = 4096,
                 num_hidden_layers: int | None = None, num_attention_heads: int = 32, head_dim: int | None = None,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                 max_position_embeddings: int = 2048, attention_bias: bool = False, mlp_bias: bool = False,
                 hidden_act: str = "silu", initializer_range: float = 0.02, use_cache: bool = True,
                 tie_word_embeddings: bool = False, **kwargs: Any):
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]
        if num_hidden_layers is None:
            num_hidden_layers = len(blocks)
        if blocks and len(blocks) != num_hidden_layers:
            raise ValueError(f"num_hidden_layers is {num_hidden_layers} but block_configs has {len(blocks)} "
                             "entries")
        # Attributes first: newer transformers standardize RoPE inside PretrainedConfig.__init__ and read
        # max_position_embeddings and rope_theta there.
        self.block_configs = blocks
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Per-layer in block_configs; None here so nothing mistakes them for one value shared by every layer.
        kwargs.pop("num_key_value_heads", None)
        kwargs.pop("intermediate_size", None)
        self.num_key_value_heads = None
        self.intermediate_size = None
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
