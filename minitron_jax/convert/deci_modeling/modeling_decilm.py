# Written by minitron_jax for its heterogeneous (Nemotron-NAS / "DeciLM" layout) exports. Self-contained: imports
# only torch and transformers, so it runs wherever the directory is loaded with trust_remote_code=True.
"""A compact torch implementation of the Nemotron-NAS ("DeciLM") decoder: a Llama whose every layer has its own
block (``config.block_configs``).

Per layer ``i`` (tensor names under ``model.layers.{i}.``, as the Nemotron-NAS checkpoints and vLLM name them):

- attention, GQA: ``h + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))`` with
  ``n = input_layernorm(h)`` and this layer's KV heads (``num_attention_heads // n_heads_in_group``); query head
  ``j`` reads KV head ``j // n_heads_in_group``;
- attention, linear: ``h + self_attn.linear_attn(input_layernorm(h))`` (a [D, D] map, no bias);
- attention, no_op: nothing (no norm, no residual update);
- ffn, MLP: ``h + down_proj(silu(gate_proj(n)) * up_proj(n))`` with ``n = post_attention_layernorm(h)``;
- ffn, linear: ``h + mlp.linear_mlp(post_attention_layernorm(h))``;
- ffn, no_op: nothing.

RoPE is Llama's half-split rotation with the default, ``linear`` or ``llama3`` frequency scaling. Generation runs
without a KV cache (every step re-reads the whole sequence): simple and exact, slow for long outputs — for serving,
use vLLM, which loads this layout natively.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig, ffn_mult_to_intermediate_size


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in float32, cast back, then scaled: Llama's order, so low-precision runs round the same way.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * normed.to(x.dtype)


def _rope_settings(config: DeciLMConfig) -> tuple[float, dict]:
    """(theta, scaling dict) from either RoPE layout: newer transformers move ``rope_theta``/``rope_scaling``
    into ``rope_parameters``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))), params
    return float(getattr(config, "rope_theta", 10000.0)), (getattr(config, "rope_scaling", None) or {})


def rope_inv_freq(config: DeciLMConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32 (default, ``linear`` or ``llama3`` scaling)."""
    theta, scaling = _rope_settings(config)
    dim = config.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported by this modeling file")
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's number of KV heads."""

    def __init__(self, config: DeciLMConfig, n_heads_in_group: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        if n_heads_in_group <= 0 or self.num_heads % n_heads_in_group:
            raise ValueError(f"n_heads_in_group {n_heads_in_group} does not divide {self.num_heads} heads")
        self.group = n_heads_in_group
        self.num_kv_heads = self.num_heads // n_heads_in_group
        self.head_dim = config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Query head j reads KV head j // group: each KV head repeated for its group, in order.
        k = k.repeat_interleave(self.group, dim=1)
        v = v.repeat_interleave(self.group, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores.float().masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)


class DeciLMLinearAttention(nn.Module):
    """An attention sub-block replaced by one [D, D] linear map (``self_attn.linear_attn``)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *_: Any) -> torch.Tensor:
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported by this modeling file (silu only)")
        d, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """An FFN sub-block replaced by one [D, D] linear map (``mlp.linear_mlp``)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    def __init__(self, config: DeciLMConfig, layer_idx: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        att, ffn = block.attention, block.ffn
        for part, section in (("attention", att), ("ffn", ffn)):
            for key in ("sparsify", "window_length", "num_sink_tokens"):
                if getattr(section, key, None):
                    raise ValueError(f"block_configs[{layer_idx}].{part}.{key} is not supported by this modeling "
                                     "file")
        self.has_attention = not att.no_op
        self.has_ffn = not ffn.no_op
        # Sub-modules exist only for what the block has, so the module names are exactly the checkpoint's.
        if self.has_attention:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (DeciLMLinearAttention(config) if att.replace_with_linear
                              else DeciLMAttention(config, int(att.n_heads_in_group)))
        if self.has_ffn:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            if ffn.replace_with_linear:
                self.mlp = DeciLMLinearMLP(config)
            else:
                width = (int(ffn.intermediate_size) if getattr(ffn, "ffn_mult", None) is None
                         else ffn_mult_to_intermediate_size(float(ffn.ffn_mult), config.hidden_size))
                self.mlp = DeciLMMLP(config, width)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.has_attention:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        if self.has_ffn:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, DeciLMRMSNorm):
                module.weight.fill_(1.0)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        if position_ids is None:
            if attention_mask is not None:  # left padding: count positions over the real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(t, device=h.device)[None].expand(b, t)
        freqs = position_ids.float()[..., None] * rope_inv_freq(self.config, h.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None].expand(b, t, t)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h))


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        # A tied head is the embedding matrix itself (no lm_head module, none in the checkpoint).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # No KV cache: generate() must not build one, and each step gets the whole sequence (see below).
        return False

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       inputs_embeds=inputs_embeds).last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
