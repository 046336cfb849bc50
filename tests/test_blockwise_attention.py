"""Blockwise (flash-style) and fused (``jax.nn.dot_product_attention``) attention ≡ the einsum attention: outputs
and gradients, packed segments, padding, ragged key blocks, fully masked rows; and through the whole model
(``hidden_states(attention="blockwise" | "fused")``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import model as M
from minitron_jax.config import LlamaConfig


def _inputs(B=2, T=37, K=2, G=3, Hd=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, K, G, Hd)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, Hd)) * 2, dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, Hd)), dtype)
    seg = np.ones((B, T), np.int32)
    seg[0, T // 3:] = 2  # two packed documents in row 0
    pos = np.asarray(M.default_positions(jnp.zeros((B, T), jnp.int32), jnp.asarray(seg)))
    valid = np.ones((B, T), bool)
    valid[1, -5:] = False  # padding keys in row 1
    mask = M.attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg),
                            jnp.asarray(valid))
    return q, k, v, mask


# 8: a ragged last block (37 = 4·8 + 5); 64: one block larger than T; "fused": `attend_fused`, i.e.
# jax.nn.dot_product_attention (XLA's composition on this CPU; cuDNN's kernel was checked on an H200, docs/gpu.md).
@pytest.mark.parametrize("impl", [8, 64, "fused"])  # an int: attend_blockwise with that block
def test_blockwise_and_fused_equal_einsum_forward_and_gradients(impl):
    from minitron_jax.attention import attend_fused

    q, k, v, mask = _inputs()
    mask = mask.at[1, 3].set(False)  # a fully masked query row: uniform attention in both
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    other = attend_fused if impl == "fused" else (lambda *a: M.attend_blockwise(*a, impl))

    @jax.jit
    def both(q, k, v):
        out = {}
        for name, f in (("einsum", M.attend), ("other", other)):
            loss = lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v, mask)) * w)
            out[name] = (f(q, k, v, mask), jax.grad(loss, (0, 1, 2))(q, k, v))
        return out

    out = both(q, k, v)
    np.testing.assert_allclose(out["other"][0], out["einsum"][0], atol=2e-6, rtol=1e-5)
    for a, b in zip(out["other"][1], out["einsum"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend, version, dtype, expected", [
    ("gpu", "cuda 12080", jnp.bfloat16, "cudnn"),
    ("gpu", "cuda 12080", jnp.float16, "cudnn"),
    ("gpu", "cuda 12080", jnp.float32, None),  # cuDNN's fused attention takes half precision only
    ("gpu", "rocm 60300", jnp.bfloat16, None),  # jax calls a ROCm GPU "gpu" too; it has no cuDNN
    ("cpu", "cpu", jnp.bfloat16, None),
    ("tpu", "PJRT C API", jnp.bfloat16, None),
])
def test_fused_asks_for_cudnn_only_on_an_nvidia_gpu_in_half_precision(monkeypatch, backend, version, dtype,
                                                                       expected):
    from minitron_jax import attention as A

    asked = []

    def fake_dpa(q, k, v, mask=None, implementation=None):
        asked.append(implementation)
        return q

    monkeypatch.setattr(A.jax.nn, "dot_product_attention", fake_dpa)
    monkeypatch.setattr(A.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(A, "_platform_version", lambda: version)
    q, k, v, mask = (x.astype(dtype) if x.dtype == jnp.float32 else x for x in _inputs())
    A.attend_fused(q, k, v, mask)
    assert asked == [expected]


def test_a_row_shorter_than_the_block_is_one_unpadded_block():
    """Keys that fit in one block are not padded up to it (padding T=37 to 512 would do 14× the work)."""
    q, k, v, mask = _inputs()
    has_pad = lambda f: " pad[" in str(jax.make_jaxpr(f)(q))  # noqa: E731 - nested jaxprs print inline
    assert not has_pad(jax.value_and_grad(lambda q: jnp.sum(M.attend_blockwise(q, k, v, mask, 512))))
    assert has_pad(lambda q: M.attend_blockwise(q, k, v, mask, 16))  # 37 = 2·16 + 5: the last block is padded


def test_blockwise_bf16_close_to_einsum():
    q, k, v, mask = _inputs(dtype=jnp.bfloat16)
    ref, out = jax.jit(lambda q, k, v: (M.attend(q, k, v, mask), M.attend_blockwise(q, k, v, mask, 16)))(q, k, v)
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    np.testing.assert_allclose(out, ref, atol=3e-2)


def test_model_with_blockwise_attention_matches_and_trains_the_same():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
    params = M.init_params(cfg, jax.random.key(0), std=0.2)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 24))
    seg = np.ones((2, 24), np.int32)
    seg[1, 10:] = 2

    def loss(p, attention):
        h, _, _ = M.hidden_states(cfg, p, tokens, segment_ids=seg, attention=attention, remat="full")
        return jnp.mean(M.logits_from_hidden(cfg, p, h) ** 2)

    (l0, g0), *others = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, a)
                         for a in ("einsum", "blockwise", "fused"))
    for l1, g1 in others:
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g1, g0)
    with pytest.raises(ValueError, match="unknown attention"):
        M.hidden_states(cfg, params, tokens, attention="flash3")
