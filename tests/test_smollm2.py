"""The real SmolLM2-135M weights (embedded GGUF): our forward equals transformers' on real text, and the
perplexity CLI agrees with a direct transformers computation under the same windowing rules."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from minitron_jax import model as M
from minitron_jax.convert import load_model
from minitron_jax.convert.hf import save_hf
from minitron_jax.data import read_text, token_windows


@pytest.fixture(scope="module")
def smollm2(smollm2_assets, tmp_path_factory):
    m = load_model(smollm2_assets["smollm2_gguf"])
    hf_dir = save_hf(tmp_path_factory.mktemp("smollm2") / "hf", m.config, m.params, tokenizer=m.tokenizer)
    return m, hf_dir


def test_real_weights_logits_match_transformers(smollm2, smollm2_assets):
    import torch
    from transformers import AutoModelForCausalLM

    m, hf_dir = smollm2
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = read_text(smollm2_assets["wikipedia"])[:4000]
    tokens = token_windows(m.tokenizer, text, 128, 256)  # two real-text windows
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(M.forward(m.config, m.params, tokens))
    # Logits of a real model span ~±30; fp32 matmul order differs between XLA and torch.
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_eval_cli_matches_transformers_perplexity(smollm2, smollm2_assets):
    import torch
    from transformers import AutoModelForCausalLM

    m, hf_dir = smollm2
    r = subprocess.run([sys.executable, "-m", "minitron_jax.eval", "--model", str(hf_dir), "--text",
                        str(smollm2_assets["wikipedia"]), "--seq-len", "128", "--max-tokens", "600", "--json"],
                       capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["windows"] == 4 and out["tokens"] == 512  # 600 tokens → 4 windows of 128, remainder dropped

    windows = token_windows(m.tokenizer, read_text(smollm2_assets["wikipedia"]), 128, 600)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.as_tensor(windows, dtype=torch.long)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                torch.as_tensor(windows[:, 1:], dtype=torch.long).reshape(-1))
    assert out["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert 3 < out["perplexity"] < 60  # a real model on real text, not noise (noise is ~49152)
