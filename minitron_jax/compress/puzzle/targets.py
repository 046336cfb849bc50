"""``--target-*`` values → solver constraints over the block variants' costs.

Any combination of targets may be given; each becomes one :class:`~.solver.Constraint` whose achieved value the
solver reports:

=====================  ====================================================================================
``params``             total parameter count (a tied lm_head once)
``memory_gb``          weights + KV cache in GB (1e9 bytes) at ``settings``' context, batch and dtypes
``flops_per_token``    forward FLOPs per token at ``settings``' context (see :mod:`.costs` for the convention)
``latency_s``          seconds per forward of the timed shape (``batch × seq_len`` tokens), summed over the blocks'
                       measured times plus the non-block overhead's
``throughput``         tokens per second of that same forward: ``timed_tokens / seconds ≥ throughput``, which is
                       the linear constraint ``seconds ≤ timed_tokens / throughput``
=====================  ====================================================================================

The latency targets need times per variant: measured on the host by :func:`.costs.time_block_variants` (one
prefill forward of ``batch × seq_len`` tokens), or priced for a described accelerator (``CostSettings.accelerator``)
as one decode step (:func:`.costs.decode_step_seconds`: ``batch`` tokens at a full ``context`` cache) or as the
prefill of ``batch × context`` prompt tokens (XLA's compiled cost of each block, :func:`.costs.roofline_seconds`);
``device`` names where they come from in every message and report line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from minitron_jax.blocks import BlockSpec
from minitron_jax.config import LlamaConfig
from minitron_jax.dtypes import itemsize

from .costs import cost_matrices
from .solver import Constraint

GB = 1e9
LATENCY_PHASES = ("decode", "prefill")


@dataclasses.dataclass(frozen=True)
class CostSettings:
    """The serving point the memory and FLOPs targets are stated at."""

    context: int = 4096
    batch: int = 1
    weight_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    # A described accelerator (e.g. planning.capacity.ACCELERATORS["h100"]): the latency and throughput targets
    # are then one decode step's roofline there (costs.decode_step_seconds), not a timing on this host.
    accelerator: str | None = None
    peak_flops: float = 0.0  # FLOP/s
    memory_bandwidth: float = 0.0  # bytes/s
    # What a latency target on the accelerator bounds: one "decode" step (batch new tokens at a full context
    # cache; costs.decode_step_seconds) or the "prefill" of batch × context prompt tokens up to the first token's
    # logits (XLA's compiled FLOPs and bytes of each block's forward, costs.compiled_cost + roofline_seconds).
    latency_phase: str = "decode"

    def __post_init__(self):
        if self.accelerator is not None and not (self.peak_flops > 0 and self.memory_bandwidth > 0):
            raise ValueError(f"accelerator {self.accelerator!r} needs a positive peak_flops and memory_bandwidth")
        if self.latency_phase not in LATENCY_PHASES:
            raise ValueError(f"latency phase must be one of {', '.join(LATENCY_PHASES)}, got {self.latency_phase!r}")

    def block_kwargs(self) -> dict[str, float]:
        return {"weight_bytes_per_param": itemsize(self.weight_dtype), "context": self.context, "batch": self.batch,
                "kv_bytes_per_value": itemsize(self.kv_dtype)}

    def priced_on(self, accelerator, latency_phase: str = "decode") -> CostSettings:
        """These settings with the latency targets priced on ``accelerator`` (anything with ``name``,
        ``peak_flops`` and ``hbm_bandwidth``, e.g. ``planning.capacity.accelerator("h100")``)."""
        return dataclasses.replace(self, accelerator=accelerator.name, peak_flops=accelerator.peak_flops,
                                   memory_bandwidth=accelerator.hbm_bandwidth, latency_phase=latency_phase)

    def roofline_kwargs(self) -> dict[str, float]:
        return {**self.block_kwargs(), "peak_flops": self.peak_flops, "memory_bandwidth": self.memory_bandwidth}

    def describe(self) -> str:
        where = "" if self.accelerator is None else \
            f", latency as a {self.latency_phase} roofline on {self.accelerator}"
        return (f"context {self.context}, batch {self.batch}, weights {self.weight_dtype}, "
                f"KV cache {self.kv_dtype}{where}")


@dataclasses.dataclass(frozen=True)
class Targets:
    params: float | None = None
    memory_gb: float | None = None
    flops_per_token: float | None = None
    latency_s: float | None = None
    throughput: float | None = None  # tokens per second

    def given(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def build_constraints(base_config: LlamaConfig, variants: Sequence[BlockSpec], num_layers: int, targets: Targets,
                      settings: CostSettings = CostSettings(), *, timings: Mapping[BlockSpec, float] | None = None,
                      overhead_seconds: float = 0.0, timed_tokens: int | None = None,
                      device: str = "host") -> list[Constraint]:
    """One constraint per target given, over ``num_layers`` layers × ``variants``. ``timings`` (seconds per
    variant, e.g. :func:`.costs.time_block_variants`'s result) and ``timed_tokens`` (the tokens of one timed
    forward) are needed only by the latency and throughput targets."""
    if not targets.given():
        raise ValueError("no target given: set at least one of params, memory_gb, flops_per_token, latency_s, "
                         "throughput")
    mats, over = cost_matrices(base_config, variants, num_layers, **settings.block_kwargs())
    out = []
    if targets.params is not None:
        out.append(Constraint("target-params", mats["params"], float(targets.params), over["params"],
                              unit="M", unit_scale=1e6))
    if targets.memory_gb is not None:
        out.append(Constraint("target-memory", mats["memory_bytes"], targets.memory_gb * GB, over["memory_bytes"],
                              unit="GB", unit_scale=GB))
    if targets.flops_per_token is not None:
        out.append(Constraint("target-flops", mats["flops_per_token"], float(targets.flops_per_token),
                              over["flops_per_token"], unit="GFLOP/token", unit_scale=1e9))
    if targets.latency_s is not None or targets.throughput is not None:
        if timings is None:
            raise ValueError("the latency and throughput targets need timings of every variant "
                             "(costs.time_block_variants or costs.compiled_cost + roofline_seconds)")
        missing = [v.describe() for v in variants if v not in timings]
        if missing:
            raise ValueError(f"no timing for variant(s) {', '.join(missing)}")
        seconds = np.tile(np.array([float(timings[v]) for v in variants]), (num_layers, 1))
        if targets.latency_s is not None:
            out.append(Constraint("target-latency", seconds, float(targets.latency_s), float(overhead_seconds),
                                  unit=f"ms ({device})", unit_scale=1e-3))
        if targets.throughput is not None:
            if not timed_tokens or targets.throughput <= 0:
                raise ValueError("the throughput target needs a positive rate and timed_tokens (batch × seq_len "
                                 "of the timed forward)")
            out.append(Constraint("target-throughput", seconds, timed_tokens / float(targets.throughput),
                                  float(overhead_seconds), unit=f"tok/s ({device})", inverse=float(timed_tokens)))
    return out
