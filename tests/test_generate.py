"""KV-cached generation: greedy ≡ transformers, cached logits ≡ full forward, sampling, EOS, no per-token retrace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import LLAMA3_ROPE, tiny_hf_model, tiny_tokenizer

from minitron_jax import generate as G
from minitron_jax import model as M
from minitron_jax.convert import load_model

PROMPT_LENGTHS = (5, 12, 1, 17)  # different lengths → left padding to the 32-token bucket
CASES = {
    "gqa": {},
    # RoPE scaling, tied head, biases and an odd head_dim through the cache path; positions pass the llama3
    # original_max_position_embeddings (32).
    "llama3_tied_biases": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True,
                               attention_bias=True, mlp_bias=True, head_dim=24),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, LoadedModel) of one tiny random Llama, shared by the tests below."""
    path = tmp_path_factory.mktemp("tiny_gen")
    hf = tiny_hf_model()
    hf.save_pretrained(path)
    return hf, load_model(path)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(tiny):
    hf, m = tiny
    prompts = _prompts(m.config.vocab_size)
    ours = G.generate(m.config, m.params, prompts, max_new_tokens=12)
    # The reference runs each prompt alone (no padding at all): a padded batch row must compute the same thing.
    assert ours == [_hf_greedy(hf, p, 12) for p in prompts]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_logits_equal_full_forward(tmp_path, case):
    hf = tiny_hf_model(**CASES[case])
    hf.save_pretrained(tmp_path)
    m = load_model(tmp_path)
    prompts = _prompts(m.config.vocab_size, seed=1)
    n = 20
    new, logits = G.generate(m.config, m.params, prompts, max_new_tokens=n, return_logits=True)
    fwd = jax.jit(lambda p, t: M.forward(m.config, p, t))
    for p, toks, lg in zip(prompts, new, logits):
        assert len(toks) == n and lg.shape == (n, m.config.vocab_size)
        # One uncached forward over prompt + generated tokens; by causality position len(p)-1+i holds the logits
        # that chose new token i.
        full = np.asarray(fwd(m.params, np.asarray([p + toks])))[0, len(p) - 1:len(p) - 1 + n]
        np.testing.assert_allclose(lg, full, atol=1e-5, rtol=0)
        assert toks == np.argmax(full, -1).tolist()


def test_sampling_reproducible_and_top_k_one_is_greedy(tiny):
    _, m = tiny
    prompts = _prompts(m.config.vocab_size, seed=2)
    kw = dict(max_new_tokens=10, temperature=1.0)
    a = G.generate(m.config, m.params, prompts, seed=7, **kw)
    b = G.generate(m.config, m.params, prompts, seed=7, **kw)
    c = G.generate(m.config, m.params, prompts, seed=8, **kw)
    assert a == b
    assert a != c
    greedy = G.generate(m.config, m.params, prompts, max_new_tokens=10)
    assert a != greedy
    assert G.generate(m.config, m.params, prompts, seed=7, top_k=1, **kw) == greedy
    assert G.generate(m.config, m.params, prompts, seed=7, top_p=1e-6, **kw) == greedy


def test_sample_logits_support():
    """top-k / top-p keep exactly the intended tokens; temperature 0 is argmax."""
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
    logits = jnp.asarray(np.log(probs))[None]
    keys = jax.random.split(jax.random.key(0), 2000)

    def support(sampling):
        draws = jax.vmap(lambda k: G.sample_logits(logits, k, sampling)[0])(keys)
        return set(np.unique(np.asarray(draws)).tolist())

    assert support(G.Sampling(0.0)) == {1}
    assert support(G.Sampling(1.0)) == {0, 1, 2, 3}
    assert support(G.Sampling(1.0, top_k=2)) == {1, 3}
    assert support(G.Sampling(1.0, top_k=3)) == {1, 2, 3}
    assert support(G.Sampling(1.0, top_p=0.5)) == {1}       # 0.5 alone reaches p
    assert support(G.Sampling(1.0, top_p=0.7)) == {1, 3}     # 0.5 + 0.3
    assert support(G.Sampling(1.0, top_p=0.85)) == {1, 2, 3}
    assert support(G.Sampling(1.0, top_k=2, top_p=0.99)) == {1, 3}
    with pytest.raises(ValueError):
        G.Sampling(1.0, top_p=0.0)


def test_eos_stops_a_row(tiny):
    _, m = tiny
    prompts = _prompts(m.config.vocab_size, seed=3)
    free = G.generate(m.config, m.params, prompts, max_new_tokens=12)
    eos = free[0][2]
    stopped = G.generate(m.config, m.params, prompts, max_new_tokens=12, eos_token_id=eos)
    assert stopped[0] == free[0][:3]
    for f, s in zip(free, stopped):  # every row: its free run cut after its first EOS (inclusive), if any
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert s == f[:cut]
    assert any(len(s) == 12 for s in stopped), "pick a different seed: every row hit the EOS"
    # Several EOS ids; a row that emits EOS first keeps only that token.
    both = G.generate(m.config, m.params, prompts, max_new_tokens=12, eos_token_id=[free[1][0], eos])
    assert both[1] == [free[1][0]]


def test_no_retrace_per_token(tiny):
    _, m = tiny
    G.TRACE_COUNTS.clear()
    G.generate(m.config, m.params, _prompts(m.config.vocab_size, seed=4), max_new_tokens=24)
    assert dict(G.TRACE_COUNTS) == {"prefill": 1, "decode": 1, "decode_step": 1}
    # Other prompts in the same length bucket reuse both compiled programs.
    G.generate(m.config, m.params, _prompts(m.config.vocab_size, lengths=(3, 30, 9, 9), seed=5), max_new_tokens=24)
    assert dict(G.TRACE_COUNTS) == {"prefill": 1, "decode": 1, "decode_step": 1}


def test_bfloat16_cache_runs(tiny):
    _, m = tiny
    prompts = _prompts(m.config.vocab_size, seed=6)
    f32 = G.generate(m.config, m.params, prompts, max_new_tokens=6)
    bf16 = G.generate(m.config, m.params, prompts, max_new_tokens=6, cache_dtype=jnp.bfloat16)
    assert [len(r) for r in bf16] == [6] * len(prompts)
    agree = np.mean([a == b for x, y in zip(f32, bf16) for a, b in zip(x, y)])
    assert agree > 0.5  # a bf16 KV cache drifts a little, not wholesale


def test_generate_text(tmp_path):
    tok = tiny_tokenizer()
    hf = tiny_hf_model(vocab_size=len(tok))
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = load_model(tmp_path)
    prompts = ["The quick brown fox", "Pruning removes"]
    texts = G.generate_text(m, prompts, max_new_tokens=8, skip_special_tokens=False)
    ids = G.encode_prompts(tok, prompts)
    new = G.generate(m.config, m.params, ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    assert texts == [tok.decode(t) for t in new]
    chat = G.generate_text(m, ["Hello"], chat=True, max_new_tokens=4)
    chat_ids = G.encode_prompts(tok, ["Hello"], chat=True)
    assert tok.decode(chat_ids[0]).endswith("<assistant>")
    assert isinstance(chat[0], str)
