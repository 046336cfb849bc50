"""Attention of the Llama decoder: the mask, grouped-query attention, and its memory-efficient blockwise form.

``attend`` materializes the [B, K, T, G, S] float32 score matrix (fastest at short T). ``attend_blockwise`` is a
flash-attention-style online softmax over key blocks with a custom VJP that recomputes each block's probabilities
from the saved softmax statistics: the same contract and numerics as ``attend``, but O(T · block) temporaries per
head instead of the full score matrix (8.6 GB per layer for one 8192-token row of Llama-3.1-8B). ``attend_fused``
hands the same contract to ``jax.nn.dot_product_attention``: cuDNN's fused attention on a GPU in bf16/fp16 (2.2×
the einsum's distillation step on an H200 at 4096 tokens, docs/gpu.md), XLA's composition elsewhere. The model
picks one by name (``ATTENTION_IMPLS``; ``model.hidden_states(attention=...)``, ``train.attention``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None, k_seg: jax.Array | None,
                   k_valid: jax.Array | None = None) -> jax.Array:
    """Boolean [B, T, S]: causal by position, within one segment, over valid keys.

    Causality is by *position within the packed row*, not absolute index, which is what keeps packed documents
    apart together with the segment test (positions restart per document)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B,T,K,G,Hd], k/v [B,S,K,Hd], mask [B,T,S] → [B,T,K,G,Hd].

    Scores and softmax in float32; probabilities cast back to the value dtype for the second matmul.

    Layout: scores are [B, K, T, G, S] and the second matmul yields [B, K, T, G, Hd], i.e. each (b, k) is one plain
    [T·G, Hd] × [Hd, S] and [T·G, S] × [S, Hd] matmul, and only the small q/k/v/output arrays are transposed.
    (A [B, K, G, T, S] layout made XLA:CPU transpose the whole score matrix twice: ~40% slower at T=1024.)"""
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btkgh,bskh->bktgs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bktgs,bskh->bktgh", probs, v).transpose(0, 2, 1, 3, 4)


# ------------------------------------------------------------------------------------------------------------------
# Memory-efficient attention: online softmax over key blocks; chosen with ``hidden_states(attention="blockwise")``.
# ------------------------------------------------------------------------------------------------------------------
ATTENTION_BLOCK = 512


def _key_blocks(k, v, mask, block):
    """Pad S to a multiple of ``block``: k/v → [nb, B, block, K, Hd], mask → [nb, B, T, block], valid [nb, block]"""
    S = k.shape[1]
    block = min(block, S)  # one block covers short rows whole: padding them to ``block`` would only add work
    nb = -(-S // block)
    pad = nb * block - S
    if pad:
        k = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
        mask = jnp.pad(mask, [(0, 0), (0, 0), (0, pad)])
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)
    valid = (jnp.arange(nb * block) < S).reshape(nb, block)
    return split(k), split(v), jnp.moveaxis(mask.reshape(mask.shape[0], mask.shape[1], nb, block), 2, 0), valid


def _block_scores(q, kb, mb, valid, scale):
    """Masked fp32 scores [B, K, T, G, block]: masked keys get finfo.min (as `attend`), padding keys -inf."""
    s = jnp.einsum("btkgh,bskh->bktgs", q, kb, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mb[:, None, :, None, :], s, jnp.finfo(jnp.float32).min)
    return jnp.where(valid, s, -jnp.inf), mb[:, None, :, None, :] & valid


def _flash_forward(q, k, v, mask, block):
    B, T, K, G, Hd = q.shape
    scale = Hd ** -0.5
    kb, vb, mb, valid = _key_blocks(k, v, mask, block)

    def body(carry, xs):
        m, l, acc = carry
        s, _ = _block_scores(q, *xs[:2], xs[3], scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bktgs,bskh->bktgh", p.astype(v.dtype), xs[2], preferred_element_type=jnp.float32)
        return (m_new, l, acc * corr[..., None] + pv), None

    init = (jnp.full((B, K, T, G), -jnp.inf, jnp.float32), jnp.zeros((B, K, T, G), jnp.float32),
            jnp.zeros((B, K, T, G, Hd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, (kb, mb, vb, valid))
    out = (acc / l[..., None]).astype(v.dtype).transpose(0, 2, 1, 3, 4)
    # (m, l) rather than m + log(l): next to finfo.min (a fully masked row) the log would be absorbed.
    return out, (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = ATTENTION_BLOCK):
    """`attend` computed over key blocks of ``block`` with an online softmax; never holds more than one block's
    scores. Gradients are recomputed block by block from the saved row max and sum (FlashAttention-2's backward)."""
    return _flash_forward(q, k, v, mask, block)[0]


def _flash_fwd_rule(q, k, v, mask, block):
    out, (m, l) = _flash_forward(q, k, v, mask, block)
    return out, (q, k, v, mask, out, m, l)


def _flash_bwd_rule(block, res, d_out):
    q, k, v, mask, out, m, l = res
    S, Hd = k.shape[1], q.shape[-1]
    scale = Hd ** -0.5
    kb, vb, mb, valid = _key_blocks(k, v, mask, block)
    do = d_out.astype(jnp.float32).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, Hd]
    delta = jnp.sum(do * out.astype(jnp.float32).transpose(0, 2, 1, 3, 4), axis=-1)  # [B, K, T, G]

    def body(dq, xs):
        kj, mj, vj, valid_j = xs
        s, keep = _block_scores(q, kj, mj, valid_j, scale)
        p = jnp.exp(s - m[..., None]) / l[..., None]
        dv = jnp.einsum("bktgs,bktgh->bskh", p, do)
        dp = jnp.einsum("bktgh,bskh->bktgs", do, vj.astype(jnp.float32))
        ds = jnp.where(keep, p * (dp - delta[..., None]), 0.0) * scale  # masked scores are constants: no gradient
        dq = dq + jnp.einsum("bktgs,bskh->btkgh", ds, kj.astype(jnp.float32))
        dk = jnp.einsum("bktgs,btkgh->bskh", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), (kb, mb, vb, valid))
    unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :S]
    return dq.astype(q.dtype), unsplit(dk).astype(k.dtype), unsplit(dv).astype(v.dtype), None


attend_blockwise.defvjp(_flash_fwd_rule, _flash_bwd_rule)

def attend_fused(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` through ``jax.nn.dot_product_attention``: on a GPU that is cuDNN's fused (flash) attention where
    cuDNN takes the shapes, which never writes the [T, S] scores to memory; elsewhere XLA's own composition.

    Query head ``k·G + g`` uses KV head ``k``, as in `attend`. The boolean mask (causal, segments, padding) is passed
    whole, so packed documents stay apart."""
    B, T, K, G, Hd = q.shape
    # jax picks XLA's composition unless told otherwise.
    out = jax.nn.dot_product_attention(q.reshape(B, T, K * G, Hd), k, v, mask=mask[:, None, :, :],
                                       implementation="cudnn" if cudnn_fused_attention(q.dtype) else None)
    return out.reshape(B, T, K, G, Hd)


def cudnn_fused_attention(dtype) -> bool:
    """Whether `attend_fused` runs cuDNN's fused attention for inputs of ``dtype`` here: half precision on an NVIDIA
    GPU (cuDNN takes no float32)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and is_cuda_platform(jax.default_backend(), _platform_version()))


def _platform_version() -> str:
    from jax.extend.backend import get_backend

    return get_backend().platform_version


def is_cuda_platform(backend: str, platform_version: str) -> bool:
    """Whether jax's default backend is an NVIDIA GPU, where cuDNN exists. jax names ROCm GPUs "gpu" as well; the
    backend's platform version tells them apart ("cuda 12080" vs "rocm 60300", as jax's own tests read it)."""
    return backend == "gpu" and "cuda" in platform_version.lower()


ATTENTION_IMPLS = {"einsum": attend, "blockwise": attend_blockwise, "fused": attend_fused}
