"""The lm-eval adapter's pure scoring ≡ evaluate.perplexity; lm-eval's rolling windows and tokenization rules;
is_greedy; batching; generate_until; and, when lm-eval is installed, the registered class on real Instances and
through simple_evaluate on a tiny local task."""

from __future__ import annotations

import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import _CORPUS, save_tiny_hf, tiny_tokenizer

from minitron_jax import generate as G
from minitron_jax.convert import load_model
from minitron_jax.data import token_windows
from minitron_jax.evaluate import lm_eval_adapter as A
from minitron_jax.evaluate import loglikelihood as L
from minitron_jax.evaluate import perplexity as E
from minitron_jax.model import hidden_states

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed")

TEXT = " ".join(_CORPUS * 3)
PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Pruning removes the least important ", "heads"),  # trailing space moves to the continuation
    ("", "Perplexity is the exponential"),  # empty context → prefix token
    ("JAX compiles pure functions", " with XLA and shards them over a mesh. " * 3),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval_tiny")
    tok = tiny_tokenizer()
    # vocab = the tokenizer's, so every generated id decodes to text
    save_tiny_hf(path, tokenizer=tok, max_position_embeddings=512, vocab_size=len(tok))
    return path, load_model(path)


REF_LEN = 256


@functools.partial(jax.jit, static_argnames="config")
def _ref_nll(config, params, ids):
    h, _, _ = hidden_states(config, params, ids[None])
    return E.token_nll(config, params, h[0, :-1], ids[1:])


def _token_nll(m, ids) -> np.ndarray:
    """NLL of ids[1:] given the prefix: one plain forward + eval.token_nll. The ids are right-padded to a fixed
    length so this compiles once (causal attention: the padding cannot change the real positions)."""
    ids = np.asarray(ids, np.int32)
    assert len(ids) <= REF_LEN
    padded = np.zeros(REF_LEN, np.int32)
    padded[: len(ids)] = ids
    return np.asarray(_ref_nll(m.config, jax.tree.map(jnp.asarray, m.params), jnp.asarray(padded)))[: len(ids) - 1]


def test_rolling_eval_rule_equals_eval_nll_sum(tiny):
    _, m = tiny
    for seq_len in (16, 37):
        windows = token_windows(m.tokenizer, TEXT, seq_len)
        total, count = E.nll_sum(m.config, m.params, windows, batch_size=4)
        ll = L.rolling_loglikelihood(m, TEXT, seq_len, batch_size=4)
        assert count == len(windows) * (seq_len - 1)
        np.testing.assert_allclose(-ll, total, rtol=2e-6)


def test_loglikelihood_equals_token_nll_of_the_concatenation(tiny):
    _, m = tiny
    got = L.loglikelihoods(m, PAIRS, batch_size=4)
    for (context, continuation), (lp, _) in zip(PAIRS, got):
        ctx, cont = L.encode_pair(m.tokenizer, context, continuation)
        assert len(cont) > 0 and ctx
        assert m.tokenizer.decode(ctx + cont) == (context + continuation if context else
                                                  m.tokenizer.decode(ctx) + continuation)
        nll = _token_nll(m, ctx + cont)
        np.testing.assert_allclose(lp, -nll[-len(cont):].sum(), rtol=1e-5, atol=1e-4)


def test_encode_pair_rules(tiny):
    _, m = tiny
    tok = m.tokenizer
    ctx, cont = L.encode_pair(tok, "Pruning removes ", "heads")
    assert ctx == L.tok_encode(tok, "Pruning removes") and tok.decode(cont) == " heads"
    ctx, cont = L.encode_pair(tok, "", "heads")
    assert ctx == [tok.bos_token_id] and cont == L.tok_encode(tok, "heads", add_special_tokens=False)
    assert L.encode_pair(tok, "", "heads", prefix_token_id=7)[0] == [7]


def test_is_greedy_on_a_constructed_case(tiny):
    _, m = tiny
    ctx = L.tok_encode(m.tokenizer, "The quick brown fox")
    greedy = G.generate(m.config, m.params, [ctx], max_new_tokens=4)[0]
    other = (greedy[-1] + 1) % m.config.vocab_size
    res = L.loglikelihood_tokens(m.config, m.params, [(ctx, greedy), (ctx, greedy[:-1] + [other]), (ctx, greedy[:1])],
                                 batch_size=4)
    assert [g for _, g in res] == [True, False, True]
    assert res[0][0] > res[1][0]
    np.testing.assert_allclose(res[0][0], -_token_nll(m, ctx + greedy)[-4:].sum(), rtol=1e-5)


def test_batching_truncation_and_empty_continuations(tiny):
    _, m = tiny
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(0, 250, n).tolist(), rng.integers(0, 250, c).tolist())
            for n, c in [(5, 1), (40, 3), (1, 20), (90, 2), (12, 0), (7, 7)]]
    one = L.loglikelihood_tokens(m.config, m.params, reqs, batch_size=1)
    many = L.loglikelihood_tokens(m.config, m.params, reqs, batch_size=4)
    np.testing.assert_allclose([x for x, _ in one], [x for x, _ in many], rtol=1e-5, atol=1e-4)
    assert [g for _, g in one] == [g for _, g in many]
    assert one[4] == (0.0, True)
    # Contexts longer than max_length keep their last tokens (lm-eval's left truncation).
    ctx, cont = reqs[3]
    short = L.loglikelihood_tokens(m.config, m.params, [(ctx, cont)], max_length=30)
    ref = L.loglikelihood_tokens(m.config, m.params, [((ctx + cont)[-31:-len(cont)], cont)])
    np.testing.assert_allclose(short[0][0], ref[0][0], rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        L.loglikelihood_tokens(m.config, m.params, [(ctx, cont * 20)], max_length=30)


def _lm_eval_windows(ids, seq_len, prefix):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, seq_len, 1)]


def test_rolling_windows_follow_lm_eval():
    # The example of lm-eval's LM.loglikelihood_rolling docstring.
    assert L.rolling_windows(list(range(10)), 4, -1) == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]),
                                                          ([5, 6, 7], [8, 9])]
    assert L.rolling_windows([], 4, -1) == []
    for n in (1, 3, 4, 5, 8, 9, 17):
        windows = L.rolling_windows(list(range(n)), 4, -1)
        assert [t for _, c in windows for t in c] == list(range(n))  # every token predicted exactly once
        assert all(len(c) + len(x) - 1 <= 4 for c, x in windows)
        if HAS_LM_EVAL:
            assert windows == _lm_eval_windows(list(range(n)), 4, -1)


def test_rolling_lm_eval_rule_scores_every_token(tiny):
    _, m = tiny
    ids = L.tok_encode(m.tokenizer, TEXT)
    prefix = m.tokenizer.bos_token_id
    seq_len = 50
    ll = L.rolling_loglikelihood(m, TEXT, seq_len, rule="lm_eval", batch_size=4)
    expected = 0.0
    for ctx, cont in L.rolling_windows(ids, seq_len, prefix):
        expected -= _token_nll(m, ctx + cont)[-len(cont):].sum()
    np.testing.assert_allclose(ll, expected, rtol=1e-5)
    # A text shorter than seq_len is one plain forward over [prefix] + ids, every token scored.
    short = L.tok_encode(m.tokenizer, _CORPUS[0])
    assert len(short) < seq_len
    np.testing.assert_allclose(L.rolling_loglikelihood(m, _CORPUS[0], seq_len, rule="lm_eval"),
                               -_token_nll(m, [prefix] + short).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown rule"):
        L.rolling_loglikelihood(m, TEXT, seq_len, rule="hf")


def test_generate_until(tiny):
    _, m = tiny
    contexts = ["The quick brown fox", "Distillation teaches"]
    eos = G.default_eos(m) or None
    new = G.generate(m.config, m.params, [L.tok_encode(m.tokenizer, c) for c in contexts], max_new_tokens=12,
                     eos_token_id=eos)
    full = [m.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    out = L.generate_until(m, [(c, {"until": [], "max_gen_toks": 12}) for c in contexts])
    assert out == full
    # A stop string taken from inside the generation cuts the text there.
    stop = next(m.tokenizer.decode(new[0][k:k + 1]) for k in range(1, len(new[0]))
                if m.tokenizer.decode(new[0][k:k + 1]).strip())
    cut = L.generate_until(m, [(contexts[0], {"until": [stop], "max_gen_toks": 12, "do_sample": False})])
    assert cut == [full[0].split(stop)[0]] and len(cut[0]) < len(full[0])
    sampled = L.generate_until(m, [(contexts[0], {"until": [], "max_gen_toks": 6, "temperature": 1.0})], seed=1)
    assert isinstance(sampled[0], str)


def test_without_a_tokenizer_is_a_clear_error(tiny):
    _, m = tiny
    import dataclasses

    bare = dataclasses.replace(m, tokenizer=None)
    with pytest.raises(ValueError, match="no tokenizer"):
        L.loglikelihoods(bare, PAIRS[:1])


# ------------------------------------------------------------------------------------------------------------------
# With lm-eval installed
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tiny):
    from lm_eval.api.registry import get_model

    path, _ = tiny
    cls = get_model("minitron_jax")
    assert cls is A.MinitronLM
    return cls.create_from_arg_string(f"path={path},max_length=128", {"batch_size": 4, "max_batch_size": None,
                                                                    "device": None})


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@needs_lm_eval
def test_registered_class_on_lm_eval_instances(tiny, lm):
    from lm_eval.api.model import LM, TemplateLM

    _, m = tiny
    assert isinstance(lm, LM) and lm.max_length == 128 and lm.batch_size == 4
    res = lm.loglikelihood(_instances("loglikelihood", PAIRS))
    assert res == L.loglikelihoods(m, PAIRS, max_length=128)
    # lm-eval's own TemplateLM tokenization (_encode_pair → _loglikelihood_tokens) gives the same numbers.
    assert TemplateLM.loglikelihood(lm, _instances("loglikelihood", PAIRS), disable_tqdm=True) == res

    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(TEXT,), (_CORPUS[0],)]))
    np.testing.assert_allclose(rolling,
                               [L.rolling_loglikelihood(m, t, 128, rule="lm_eval") for t in (TEXT, _CORPUS[0])],
                               rtol=1e-6)
    gen = lm.generate_until(_instances("generate_until",
                                       [("The quick brown fox", {"until": ["."], "max_gen_toks": 5})]))
    assert gen == L.generate_until(m, [("The quick brown fox", {"until": ["."], "max_gen_toks": 5})], max_length=128)


@needs_lm_eval
def test_simple_evaluate_on_a_tiny_local_task(tiny, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    path, m = tiny
    rows = [{"q": "The quick brown fox", "choices": [" jumps", " sleeps"], "label": 0,
             "text": "Pruning removes the least important heads."},
            {"q": "Perplexity is the", "choices": [" exponential", " logarithm"], "label": 1,
             "text": "JAX compiles pure functions with XLA."}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    tasks = [
        {"task": "tiny_mc", **common, "output_type": "multiple_choice", "doc_to_text": "{{q}}",
         "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
        {"task": "tiny_ppl", **common, "output_type": "loglikelihood_rolling", "doc_to_text": "",
         "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
    ]
    res = lm_eval.simple_evaluate(model="minitron_jax", model_args=f"path={path}", tasks=tasks, batch_size=4,
                                  task_manager=TaskManager(include_defaults=False), bootstrap_iters=0,
                                  log_samples=False)["results"]
    # acc from our loglikelihoods: lm-eval joins context and choice with its default target delimiter " ".
    hits = []
    for r in rows:
        lls = [lp for lp, _ in L.loglikelihoods(m, [(r["q"], " " + c) for c in r["choices"]])]
        hits.append(int(np.argmax(lls)) == r["label"])
    assert res["tiny_mc"]["acc,none"] == pytest.approx(np.mean(hits))
    ll = sum(L.rolling_loglikelihood(m, r["text"], m.config.max_position_embeddings, rule="lm_eval") for r in rows)
    words = sum(len(r["text"].split()) for r in rows)
    assert res["tiny_ppl"]["word_perplexity,none"] == pytest.approx(np.exp(-ll / words), rel=1e-4)
