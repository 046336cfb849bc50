"""Per-layer block specs (``minitron_jax.blocks``): segments, text form, and the DeciLM ``block_configs`` layout."""

from __future__ import annotations

import pytest

from minitron_jax.blocks import (
    AttentionSpec,
    BlockSpec,
    FFNSpec,
    check_blocks,
    deci_intermediate_size,
    ffn_mult_for,
    from_decilm,
    segments,
    to_decilm,
    uniform_blocks,
)
from minitron_jax.config import LlamaConfig

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64)


def test_uniform_model_is_one_segment():
    blocks = uniform_blocks(SMOL)
    assert len(blocks) == 30 and segments(blocks) == [(0, 30, BlockSpec.parse("gqa3/mlp1536"))]


def test_segments_are_runs_of_equal_blocks():
    b = [BlockSpec.parse(t) for t in ("gqa3/mlp1536", "gqa3/mlp1536", "gqa1/mlp1024", "none/linear",
                                      "gqa3/mlp1536")]
    assert [(s, e, spec.describe()) for s, e, spec in segments(b)] == [
        (0, 2, "gqa3/mlp1536"), (2, 3, "gqa1/mlp1024"), (3, 4, "none/linear"), (4, 5, "gqa3/mlp1536")]


@pytest.mark.parametrize("text", ["gqa3/mlp1536", "gqa1/none", "linear/mlp256", "none/linear", "none/none"])
def test_text_form_round_trips(text):
    assert BlockSpec.parse(text).describe() == text


@pytest.mark.parametrize("bad", [lambda: AttentionSpec("gqa"), lambda: AttentionSpec("none", 2),
                                 lambda: FFNSpec("mlp"), lambda: FFNSpec("conv", 3), lambda: BlockSpec.parse("gqa3")])
def test_malformed_specs_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_kv_heads_must_divide_query_heads():
    with pytest.raises(ValueError, match="layer 1: 2 KV heads do not divide 9"):
        check_blocks(SMOL, [BlockSpec.parse("gqa3/mlp1536"), BlockSpec.parse("gqa2/mlp1536")])


def test_decilm_block_configs_round_trip():
    blocks = tuple(BlockSpec.parse(t) for t in ("gqa3/mlp1536", "gqa1/mlp768", "linear/mlp256", "none/linear",
                                                "gqa9/none"))
    deci = to_decilm(SMOL, blocks)
    assert deci[1]["attention"] == {"n_heads_in_group": 9, "no_op": False, "replace_with_linear": False}
    assert deci[3]["attention"]["no_op"] and deci[3]["ffn"]["replace_with_linear"]
    assert from_decilm(SMOL, deci) == blocks


def test_ffn_mult_recovers_every_expressible_width():
    # DeciLM derives the width from ffn_mult as find_multiple(int(2 * m * hidden / 3), 256).
    for hidden in (480, 576, 3072, 4096, 8192):
        for width in range(256, 16384 + 1, 256):
            assert deci_intermediate_size(ffn_mult_for(width, hidden), hidden) == width
    assert deci_intermediate_size(5.25, 4096) == 14336  # Llama-3.1-8B's FFN in Nemotron-51B's own notation
    with pytest.raises(ValueError, match="1000 cannot be expressed"):
        ffn_mult_for(1000, 576)
