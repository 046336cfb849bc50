"""Meshes and logical-axis sharding rules.

A parameter's ``PartitionSpec`` is derived from its logical axes (``model.param_axes``) through one small rules
table: logical axis → mesh axis (or None). The same table serves params, optimizer state (optax states mirror the
params tree) and the teacher; batches shard their leading axis over (data, fsdp).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minitron_jax.config import LlamaConfig
from minitron_jax.model import Params, axis_sizes, map_axes

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over the residual stream, tensor parallelism over heads / FFN / vocab, layers never split (they are scanned).
DEFAULT_RULES: dict[str, str | None] = {
    "layer": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "kv_heads": "tensor",
    "q_per_kv": None,
    "head_dim": None,
}
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_sizes(data: int, fsdp: int, tensor: int, devices: int | None) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes of a mesh over ``devices`` devices: one size may be -1, the remaining devices.

    With ``devices`` None the sizes are only checked (a -1 then cannot be resolved: ValueError)."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive (or one -1), got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if devices is None:
            raise ValueError(f"a mesh axis of -1 takes the remaining devices: the number of devices is needed "
                             f"(data={data} fsdp={fsdp} tensor={tensor})")
        known = math.prod(s for s in sizes if s != -1)
        if devices % known:
            raise ValueError(f"{devices} devices cannot be split with data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = devices // known
    if devices is not None and math.prod(sizes) != devices:
        raise ValueError(f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = {math.prod(sizes)} "
                         f"devices, but {devices} are available")
    return sizes[0], sizes[1], sizes[2]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_sizes(data, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def check_rules(rules: Mapping[str, Any]) -> None:
    named: set[str] = set()
    for target in rules.values():
        if target is not None:
            named.update((target,) if isinstance(target, str) else target)
    unknown = named - set(MESH_AXES)
    if unknown:
        raise ValueError(f"sharding rules name unknown mesh axes {sorted(unknown)}; mesh axes are {MESH_AXES}")


def logical_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with logical ``axes``.

    A mesh axis is used at most once per array (the first logical axis that asks for it wins), and a dimension
    that the mesh axis does not divide stays replicated — e.g. 3 KV heads on a tensor axis of 2 — so every config,
    pruned ones included, gets a valid sharding."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = rules.get(name)
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used and mesh.shape.get(t, 1) > 1)
        if targets and size % math.prod(mesh.shape[t] for t in targets) == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return P(*spec)


def param_specs(config: LlamaConfig, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Params:
    check_rules(rules)
    sizes = axis_sizes(config)
    return map_axes(lambda axes: logical_spec(axes, [sizes[a] for a in axes], mesh, rules), config)


def param_shardings(config: LlamaConfig, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Params:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Params, shardings: Params) -> Params:
    """Place host or device params according to ``shardings`` (a tree of NamedSharding)."""
    return jax.device_put(params, shardings)


def batch_spec(mesh: Mesh, ndim: int = 2) -> P:
    """Leading (batch) axis over every data-parallel mesh axis; the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return P(lead, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
