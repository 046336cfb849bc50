"""Which blocks the runtimes a searched model is meant for can run, as a mask over (layer, variant).

A heterogeneous model is only useful if the runtime it is deployed with runs every one of its layers. The rules
are not ours: they live with the exporters that know each runtime (``convert.deci_hf.vllm_problems`` for vLLM's
``nemotron_nas``, ``convert.gguf_export.deci_problems`` for llama.cpp's ``deci`` graph), and this module only asks
them, layer by layer, so a search never chooses an architecture that the export would then refuse:

- vLLM: no linear sub-blocks (attention or FFN);
- llama.cpp: no linear FFN, no FFN removed under a kept attention (a removed layer, none/none, is left out of
  the file, so it is allowed anywhere).

``any`` means no runtime but ours (and transformers, through the shipped modeling file): every block allowed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from minitron_jax.blocks import BlockSpec
from minitron_jax.config import LlamaConfig

RUNTIMES = ("vllm", "llama.cpp")
DEFAULT_RUNTIMES = RUNTIMES
_LAYER = re.compile(r"^layer (\d+) ")


def parse_runtimes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"vllm,llama.cpp"`` / ``["vllm"]`` / ``"any"`` → a sorted tuple of runtime names (``()`` for any)."""
    if text is None:
        return DEFAULT_RUNTIMES
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if items == ["any"]:
        return ()
    unknown = sorted(set(items) - set(RUNTIMES))
    if unknown or not items:
        raise ValueError(f"runtime {', '.join(unknown) or repr(text)} is not one of {', '.join(RUNTIMES)} "
                         "(comma-separated) or any")
    return tuple(r for r in RUNTIMES if r in items)


def _problems(runtime: str):
    if runtime == "vllm":
        from minitron_jax.convert.deci_hf import vllm_problems

        return vllm_problems
    from minitron_jax.convert.gguf_export import deci_problems

    return deci_problems


def allowed(config: LlamaConfig, variants: Sequence[BlockSpec], runtimes: Sequence[str]
            ) -> tuple[np.ndarray, dict[tuple[int, int], str]]:
    """``(mask [L, V] of allowed (layer, variant), {(layer, variant): why not})`` for a parent of
    ``config.num_layers`` layers. Each variant is asked as a model made of it alone, which is enough: a rule may
    depend on a layer's block and its position (the last layer), never on its neighbours."""
    from minitron_jax.hetero import HeteroConfig

    L = config.num_layers
    mask = np.ones((L, len(variants)), bool)
    why: dict[tuple[int, int], str] = {}
    for runtime in runtimes:
        check = _problems(runtime)
        for v, spec in enumerate(variants):
            try:
                model = HeteroConfig(config, (spec,) * L)
            except ValueError as e:  # not a block of this parent at all: SearchSpace.check says why, in its words
                mask[:, v] = False
                why.setdefault((0, v), str(e))
                continue
            for line in check(model):
                m = _LAYER.match(line)
                if m:
                    i = int(m.group(1))
                    mask[i, v] = False
                    why.setdefault((i, v), f"{runtime}: {line}")
    return mask, why
