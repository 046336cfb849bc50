"""The train state and where each of its arrays lives on the mesh.

``TrainState`` is a plain pytree (a NamedTuple), saved whole by Orbax:

- ``step``       int32 scalar, optimizer updates done so far;
- ``params``     the trainable tree ``{"model": student params, "hidden_proj": [P, Ds, Dt]}``; ``hidden_proj`` only
                 exists with an intermediate-state loss between models of different widths, and is dropped at
                 export;
- ``opt_state``  optax state (mirrors ``params``);
- ``rng``        raw ``uint32[2]`` key data (raw so that it serializes like any other array); carried and
                 checkpointed for stochastic extensions (dropout, sampled losses), unused by today's losses.

Shardings derive from the logical-axis table in ``model.py`` through ``sharding.py``'s rules: params by their
axes, optimizer state by the params it mirrors (``optax.tree_map_params``), scalars replicated. Everything here
also works on ``jax.ShapeDtypeStruct`` s, so the jitted step can be lowered without a single real array.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from minitron_jax import sharding as shd
from minitron_jax.arch import AnyConfig, abstract_params, param_shardings
from minitron_jax.model import Params
from minitron_jax.train.config import RunConfig, optim_config
from minitron_jax.train.optim import make_optimizer

# The projection of the hidden-state loss: one [Ds, Dt] map per matched layer pair.
PROJ_AXES = ("hidden_pair", "embed", "teacher_embed")


class TrainState(NamedTuple):
    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


def dtype_of(name: str):
    return jnp.dtype(name)


def mesh_rules(rc: RunConfig) -> dict[str, Any]:
    return {**shd.DEFAULT_RULES, **rc.mesh.rules}


def make_run_optimizer(rc: RunConfig) -> optax.GradientTransformation:
    return make_optimizer(optim_config(rc))


def needs_projection(rc: RunConfig, student: AnyConfig, teacher: AnyConfig | None) -> bool:
    """A learned projection is needed when layer outputs are matched across different hidden sizes."""
    return (teacher is not None and rc.loss.hidden.weight > 0 and student.hidden_size != teacher.hidden_size)


def _projection_shape(rc: RunConfig, student: AnyConfig, teacher: AnyConfig) -> tuple[int, int, int]:
    return (len(rc.loss.hidden.pairs), student.hidden_size, teacher.hidden_size)


# ----------------------------------------------------------------------------------------------------------------
# Shardings
# ----------------------------------------------------------------------------------------------------------------
def model_shardings(config: AnyConfig, mesh: Mesh, rc: RunConfig) -> Params:
    return param_shardings(config, mesh, mesh_rules(rc))


def trainable_shardings(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None) -> Params:
    out = {"model": model_shardings(student, mesh, rc)}
    if needs_projection(rc, student, teacher):
        spec = shd.logical_spec(PROJ_AXES, _projection_shape(rc, student, teacher), mesh, mesh_rules(rc))
        out["hidden_proj"] = NamedSharding(mesh, spec)
    return out


def abstract_trainable(rc: RunConfig, student: AnyConfig, teacher: AnyConfig | None) -> Params:
    dtype = dtype_of(rc.train.param_dtype)
    out = {"model": abstract_params(student, dtype)}
    if needs_projection(rc, student, teacher):
        out["hidden_proj"] = jax.ShapeDtypeStruct(_projection_shape(rc, student, teacher), dtype)
    return out


def state_shardings(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None,
                    optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """A TrainState of NamedShardings. Optimizer moments take the sharding of the param they mirror; counters and
    other non-param leaves are replicated."""
    optimizer = optimizer or make_run_optimizer(rc)
    params_sh = trainable_shardings(rc, mesh, student, teacher)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable(rc, student, teacher))
    repl = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=params_sh, opt_state=opt_sh, rng=repl)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_train_state(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None,
                         optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """The train state as sharded ``jax.ShapeDtypeStruct`` s: a restore target, or a dry-run input to lower
    the step with (``step.lower(abstract_train_state(...), abstract_teacher(...), abstract_batch(...))``)."""
    optimizer = optimizer or make_run_optimizer(rc)
    trainable = abstract_trainable(rc, student, teacher)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                       opt_state=jax.eval_shape(optimizer.init, trainable),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return _with_shardings(state, state_shardings(rc, mesh, student, teacher, optimizer))


def teacher_shardings(rc: RunConfig, mesh: Mesh, teacher: AnyConfig | None) -> Params:
    return {} if teacher is None else model_shardings(teacher, mesh, rc)


def abstract_teacher(rc: RunConfig, mesh: Mesh, teacher: AnyConfig | None) -> Params:
    if teacher is None:
        return {}
    return _with_shardings(abstract_params(teacher, dtype_of(rc.teacher.dtype)), teacher_shardings(rc, mesh, teacher))


# ----------------------------------------------------------------------------------------------------------------
# Real arrays
# ----------------------------------------------------------------------------------------------------------------
def init_train_state(rc: RunConfig, mesh: Mesh, student: AnyConfig, teacher: AnyConfig | None,
                     model_params: Params, optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """A fresh, sharded train state around ``model_params`` (host numpy or device arrays)."""
    optimizer = optimizer or make_run_optimizer(rc)
    shardings = state_shardings(rc, mesh, student, teacher, optimizer)
    dtype = dtype_of(rc.train.param_dtype)
    key = jax.random.key(rc.train.seed)
    trainable = {"model": jax.tree.map(lambda x: np.asarray(x, dtype), model_params)}
    if needs_projection(rc, student, teacher):
        # Scaled so a projected unit-RMS hidden state keeps roughly unit RMS.
        key, sub = jax.random.split(key)
        shape = _projection_shape(rc, student, teacher)
        trainable["hidden_proj"] = np.asarray(jax.random.normal(sub, shape, jnp.float32) * shape[1] ** -0.5, dtype)
    params = jax.device_put(trainable, shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state, rng=jax.device_put(jax.random.key_data(key), shardings.rng))


def place_teacher(rc: RunConfig, mesh: Mesh, teacher: AnyConfig, params: Params) -> Params:
    """Teacher params cast to ``teacher.dtype`` on the host, then placed shard by shard."""
    dtype = dtype_of(rc.teacher.dtype)
    return jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), params), teacher_shardings(rc, mesh, teacher))


def student_params_to_host(state: TrainState) -> Params:
    """The student's params as host numpy arrays (what export and model checkpoints take)."""
    return jax.tree.map(np.asarray, jax.device_get(state.params["model"]))


__all__ = ["TrainState", "PROJ_AXES", "abstract_train_state", "abstract_teacher", "state_shardings",
           "teacher_shardings", "init_train_state", "place_teacher", "make_run_optimizer", "needs_projection",
           "student_params_to_host"]
