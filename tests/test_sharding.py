"""Sharded forward on 8 fake CPU devices equals one device; the rules give valid specs for any (pruned) shape."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from minitron_jax import model as M
from minitron_jax.config import LlamaConfig
from minitron_jax.sharding import batch_sharding, logical_spec, make_mesh, param_shardings, param_specs, shard_params

CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                     num_kv_heads=4, head_dim=8)


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest)")


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1)])
def test_sharded_forward_equals_single_device(shape):
    _need_8()
    mesh = make_mesh(*shape)
    params = M.init_params(CONFIG, jax.random.key(0), std=0.1)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 16))
    single = np.asarray(jax.jit(lambda p, t: M.forward(CONFIG, p, t))(params, tokens))

    shardings = param_shardings(CONFIG, mesh)
    sharded_params = shard_params(params, shardings)
    sharded_tokens = jax.device_put(tokens, batch_sharding(mesh))
    fwd = jax.jit(lambda p, t: M.forward(CONFIG, p, t), in_shardings=(shardings, batch_sharding(mesh)))
    out = fwd(sharded_params, sharded_tokens)
    # the params really are split: on an fsdp/tensor mesh no device holds a whole q matrix
    if shape[1] * shape[2] > 1:
        q = sharded_params["layers"]["q"]
        assert q.addressable_shards[0].data.size < q.size
    np.testing.assert_allclose(np.asarray(out), single, atol=2e-5)


def test_specs_follow_the_rules():
    _need_8()
    mesh = make_mesh(2, 2, 2)
    specs = param_specs(CONFIG, mesh)
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["layers"]["q"] == P(None, "fsdp", "tensor", None, None)
    assert specs["layers"]["down"] == P(None, "tensor", "fsdp")
    assert specs["final_norm"] == P("fsdp")


def test_indivisible_axes_stay_replicated():
    _need_8()
    mesh = make_mesh(1, 2, 4)
    # 3 KV heads cannot split over tensor=4; 30 FFN units neither; the embed axis still splits over fsdp.
    assert logical_spec(("layer", "embed", "kv_heads", "head_dim"), (2, 64, 3, 8), mesh) == P(None, "fsdp", None, None)
    assert logical_spec(("layer", "embed", "mlp"), (2, 64, 30), mesh) == P(None, "fsdp", None)
    odd = CONFIG.replace(num_heads=6, num_kv_heads=3, intermediate_size=90)
    shard_params(M.init_params(odd, jax.random.key(1)), param_shardings(odd, mesh))  # must not raise


def test_mesh_errors():
    _need_8()
    with pytest.raises(ValueError, match="= 12 devices, but 8 are available"):
        make_mesh(3, 2, 2)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        make_mesh(3, -1, 1)
    assert make_mesh(2, -1, 2).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        param_specs(CONFIG, make_mesh(1, 8, 1), {"embed": "model"})
