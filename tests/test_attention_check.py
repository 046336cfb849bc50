"""tools/attention_check.py, the gpu_check piece that tests cuDNN's attention on packed rows: on this CPU every
implementation keeps packed documents apart exactly and matches float32, and the leak check does catch an attention
that only knows "causal" (what a kernel given no segment information computes)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
from utils import load_tool

SMALL = dict(batch=2, seq_len=64, heads=4, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def A():
    return load_tool("attention_check")


def test_every_implementation_keeps_documents_apart_and_matches_float32(A):
    r = A.check(jnp.float32, **SMALL)
    assert set(r["impls"]) == {"einsum", "blockwise", "fused"} and min(r["documents_per_row"]) >= 3
    for name, c in r["impls"].items():
        assert c["leak"] == 0.0, name
        assert max(c["error"].values()) < 1e-5, (name, c["error"])


def test_a_causal_only_attention_is_caught_leaking(A, monkeypatch):
    from minitron_jax.attention import attend

    def causal_only(q, k, v, mask):  # ignores segments: each document also sees the ones packed before it
        T = q.shape[1]
        return attend(q, k, v, jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), mask.shape))

    monkeypatch.setattr(A, "ATTENTION_IMPLS", {"einsum": attend, "causal_only": causal_only})
    r = A.check(jnp.float32, **SMALL)
    assert r["impls"]["einsum"]["leak"] == 0.0
    assert r["impls"]["causal_only"]["leak"] > 0.1
    assert r["impls"]["causal_only"]["error"]["out"] > 0.1


def test_command_line_json(A, capsys):
    args = ["--dtype", "bfloat16", "--batch", "1", "--seq-len", "48", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "16", "--time-batch", "1", "--time-seq-len", "64", "--json"]
    assert A.main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fused_uses_cudnn"] is False  # this CPU
    assert all(c["leak"] == 0.0 and max(c["error"].values()) < 3e-2 for c in r["check"]["impls"].values())
    assert all(t["ms"] > 0 for t in r["time"]["impls"].values())
    with pytest.raises(SystemExit) as e:
        A.main(["--heads", "6", "--kv-heads", "4", "--no-time"])
    assert e.value.code == 2
