"""The model config: one frozen dataclass, read from and written to Hugging Face ``config.json``.

Only what the forward pass needs lives here. Everything else in an HF config (token ids, ``torch_dtype``, …) is kept
in :attr:`LlamaConfig.extra` so that an exported model carries it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# Architectures whose weights are exactly Llama's (same names, same math). Mistral differs only by a sliding
# window, which we refuse when it is actually active (see `from_hf`).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)

# HF keys that we interpret; every other key round-trips through `extra`.
_CONSUMED_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "sliding_window", "pretraining_tp", "use_sliding_window",
}


class ConfigError(ValueError):
    """A model config that minitron_jax cannot run, or a size that cannot be built."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` is Llama-3.1's; ``linear`` divides every frequency by ``factor``."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Unknown HF keys (token ids, torch_dtype, …) kept verbatim for export. A tuple of pairs keeps the dataclass
    # hashable, so a config can be a static argument to `jax.jit`.
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        """Query heads served by each KV head (G in DESIGN.md)."""
        return self.num_heads // self.num_kv_heads

    @property
    def extra_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.extra}

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        positive = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) for GQA"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        rs = self.rope_scaling
        if rs is not None:
            if rs.rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"rope scaling type {rs.rope_type!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            if not rs.factor > 0:
                raise ConfigError(f"rope scaling factor must be positive, got {rs.factor}")
            if rs.rope_type == "llama3" and not rs.high_freq_factor > rs.low_freq_factor:
                raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Build from an HF ``config.json`` dict; refuse anything we would otherwise mis-load."""
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a config dict, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"unsupported architecture {archs}: minitron_jax runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: minitron_jax runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if not archs and model_type is None:
            raise ConfigError("config has neither 'architectures' nor 'model_type': cannot tell what model it is")
        act = hf.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {act!r} (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp > 1 is not supported")
        window = hf.get("sliding_window")
        max_pos = int(hf.get("max_position_embeddings", 2048))
        if window is not None and hf.get("use_sliding_window", True) and window < max_pos:
            raise ConfigError(
                f"sliding-window attention (window {window} < max positions {max_pos}) is not supported"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"config is missing required keys: {', '.join(missing)}")

        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden % num_heads:
                raise ConfigError(f"hidden_size {hidden} not divisible by num_attention_heads {num_heads} "
                                  "and no explicit head_dim")
            head_dim = hidden // num_heads
        theta, scaling = _rope_from_hf(hf)
        extra = {k: v for k, v in hf.items() if k not in _CONSUMED_KEYS}
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            extra=tuple(sorted((k, _freeze(v)) for k, v in extra.items())),
        )

    @property
    def hf_architecture(self) -> str:
        """The transformers class that loads this config.

        ``LlamaForCausalLM`` whenever it can: transformers ≥ 5 refuses a Llama config whose hidden size is not a
        multiple of the head count, even with an explicit ``head_dim`` — a shape head pruning easily produces.
        ``MistralForCausalLM`` without a sliding window is the same network with the same weight names and no such
        check, so those configs are written as Mistral (biases are Llama-only, hence refused there)."""
        if self.hidden_size % self.num_heads == 0:
            return "LlamaForCausalLM"
        if self.attention_bias or self.mlp_bias:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}: transformers "
                "cannot load such a Llama with biases (choose a hidden size divisible by the head count)"
            )
        return "MistralForCausalLM"

    def to_hf(self) -> dict[str, Any]:
        """An HF config dict (``LlamaForCausalLM``, or Mistral when Llama's config check would refuse it; see
        :attr:`hf_architecture`). RoPE is written in the classic ``rope_theta``/``rope_scaling`` layout, which
        every transformers release reads (newer ones convert it to ``rope_parameters``)."""
        arch = self.hf_architecture
        out = dict(self.extra_dict)
        if arch == "MistralForCausalLM":
            out.update(sliding_window=None)
        out.update(
            architectures=[arch],
            model_type="llama" if arch == "LlamaForCausalLM" else "mistral",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling.to_hf() if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            hidden_act="silu",
        )
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        return cls.from_hf(read_config_json(path))

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")

    def describe(self) -> str:
        return (f"L={self.num_layers} D={self.hidden_size} F={self.intermediate_size} H={self.num_heads} "
                f"K={self.num_kv_heads} Hd={self.head_dim} V={self.vocab_size}"
                f"{' tied' if self.tie_word_embeddings else ''}")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict of a ``config.json``: FileNotFoundError / ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE from either layout: classic (``rope_theta`` + ``rope_scaling``) or the newer ``rope_parameters``
    (which holds ``rope_theta`` and the scaling keys in one dict)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):
            raise ConfigError("per-layer-type rope_parameters are not supported")
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling_src = params
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling_src = hf.get("rope_scaling")
    if not scaling_src:
        return theta, None
    rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if "factor" not in scaling_src:
        raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(scaling_src["factor"]))
    try:
        return theta, RopeScaling(
            rope_type="llama3",
            factor=float(scaling_src["factor"]),
            low_freq_factor=float(scaling_src["low_freq_factor"]),
            high_freq_factor=float(scaling_src["high_freq_factor"]),
            original_max_position_embeddings=int(scaling_src["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"llama3 rope scaling is missing {e.args[0]!r}") from None


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return ("__dict__", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
    if isinstance(v, list):
        return ("__list__", tuple(_freeze(x) for x in v))
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__dict__":
        return {k: _thaw(x) for k, x in v[1]}
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__list__":
        return [_thaw(x) for x in v[1]]
    return v


def llama3_inv_freq_scale(inv_freq, scaling: RopeScaling):
    """Llama-3.1's frequency rescaling (numpy in, numpy out): long wavelengths divided by ``factor``, short ones
    kept, a smooth blend between. Matches transformers' ``_compute_llama3_parameters``."""
    import numpy as np

    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
