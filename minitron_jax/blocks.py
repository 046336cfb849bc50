"""Per-layer block specs: what each layer of a heterogeneous (Puzzle-style) model is.

Uniform Minitron pruning gives every layer the same shape. Puzzle lets each layer be different, within the layout
that runtimes already run (Nemotron-NAS / ``DeciLMForCausalLM`` ``block_configs`` in vLLM and transformers,
llama.cpp's ``deci`` architecture):

============  ===========================================================================================
attention     ``gqa`` with its own number of KV heads (query heads kept: each KV head serves more of them) |
              ``linear`` (one [D, D] matrix on the normed input, DeciLM's ``replace_with_linear``) |
              ``none`` (the sub-block is removed: no norm, no residual update; DeciLM's ``no_op``)
ffn           ``mlp`` with its own width | ``linear`` ([D, D]) | ``none``
============  ===========================================================================================

A model is a tuple of :class:`BlockSpec`, one per layer. Runs of equal specs are *segments*
(:func:`segments`), each run with one ``lax.scan``, so a uniform model is a single segment and costs nothing extra.

DeciLM writes the FFN width as ``ffn_mult`` and derives ``intermediate_size = find_multiple(int(2 * ffn_mult *
hidden / 3), 256)``; :func:`to_decilm` picks the ``ffn_mult`` that gives back our width exactly and refuses a width
that layout cannot express (not a multiple of 256). KV heads are ``n_heads_in_group = num_heads / kv_heads``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

ATTENTION_KINDS = ("gqa", "linear", "none")
FFN_KINDS = ("mlp", "linear", "none")
DECI_FFN_MULTIPLE = 256  # DeciLM rounds its intermediate size up to this multiple


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    kind: str = "gqa"
    kv_heads: int | None = None  # gqa only

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        if (self.kind == "gqa") != (self.kv_heads is not None):
            raise ValueError(f"attention {self.kind}: kv_heads is given exactly for gqa, got {self.kv_heads!r}")
        if self.kv_heads is not None and self.kv_heads < 1:
            raise ValueError(f"kv_heads must be >= 1, got {self.kv_heads}")

    def describe(self) -> str:
        return f"gqa{self.kv_heads}" if self.kind == "gqa" else self.kind


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    kind: str = "mlp"
    width: int | None = None  # mlp only

    def __post_init__(self):
        if self.kind not in FFN_KINDS:
            raise ValueError(f"ffn kind must be one of {FFN_KINDS}, got {self.kind!r}")
        if (self.kind == "mlp") != (self.width is not None):
            raise ValueError(f"ffn {self.kind}: width is given exactly for mlp, got {self.width!r}")
        if self.width is not None and self.width < 1:
            raise ValueError(f"ffn width must be >= 1, got {self.width}")

    def describe(self) -> str:
        return f"mlp{self.width}" if self.kind == "mlp" else self.kind


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    attention: AttentionSpec
    ffn: FFNSpec

    def describe(self) -> str:
        return f"{self.attention.describe()}/{self.ffn.describe()}"

    @property
    def is_identity(self) -> bool:
        """A removed layer (``none/none``): no parameters, the identity."""
        return self.attention.kind == "none" and self.ffn.kind == "none"

    @staticmethod
    def parse(text: str) -> BlockSpec:
        """``"gqa3/mlp1024"``, ``"linear/none"``, ... (the inverse of :meth:`describe`)."""
        try:
            att, ffn = text.split("/")
        except ValueError:
            raise ValueError(f"a block is written ATTENTION/FFN (e.g. gqa3/mlp1024, none/linear), got {text!r}") \
                from None
        a = AttentionSpec("gqa", int(att[3:])) if att.startswith("gqa") else AttentionSpec(att)
        f = FFNSpec("mlp", int(ffn[3:])) if ffn.startswith("mlp") else FFNSpec(ffn)
        return BlockSpec(a, f)


def uniform_blocks(config) -> tuple[BlockSpec, ...]:
    """The blocks of a uniform :class:`~minitron_jax.config.LlamaConfig`: every layer GQA with its KV heads and an
    MLP of its width."""
    spec = BlockSpec(AttentionSpec("gqa", config.num_kv_heads), FFNSpec("mlp", config.intermediate_size))
    return (spec,) * config.num_layers


def check_blocks(config, blocks: Sequence[BlockSpec]) -> None:
    """Refuse blocks the base ``config`` cannot run: a KV-head count that does not divide the query heads."""
    for i, b in enumerate(blocks):
        if b.attention.kind == "gqa" and config.num_heads % b.attention.kv_heads:
            raise ValueError(f"layer {i}: {b.attention.kv_heads} KV heads do not divide {config.num_heads} query "
                             "heads")


def segments(blocks: Sequence[BlockSpec]) -> list[tuple[int, int, BlockSpec]]:
    """Runs of equal consecutive blocks as ``(start, stop, spec)``: each is one scanned segment of the model."""
    out: list[tuple[int, int, BlockSpec]] = []
    for i, b in enumerate(blocks):
        if out and out[-1][2] == b:
            out[-1] = (out[-1][0], i + 1, b)
        else:
            out.append((i, i + 1, b))
    return out


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def deci_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's (transformers ``modeling_decilm`` / vLLM ``nemotron_nas``) FFN width from ``ffn_mult``."""
    return _find_multiple(int(2 * ffn_mult * hidden / 3), DECI_FFN_MULTIPLE)


def ffn_mult_for(width: int, hidden: int) -> float:
    """An ``ffn_mult`` from which DeciLM derives exactly ``width``; ValueError if no value can."""
    if width % DECI_FFN_MULTIPLE:
        raise ValueError(f"FFN width {width} cannot be expressed in the DeciLM layout (a multiple of "
                         f"{DECI_FFN_MULTIPLE} is needed)")
    # int(2 * m * hidden / 3) must land in (width - 256, width]: aim at width itself, then check in floating point.
    mult = width * 3 / (2 * hidden)
    for candidate in (mult, round(mult, 6), round(mult, 4)):
        if deci_intermediate_size(candidate, hidden) == width:
            return candidate
    raise ValueError(f"no ffn_mult gives FFN width {width} at hidden {hidden}")  # pragma: no cover - by arithmetic


def to_decilm(config, blocks: Sequence[BlockSpec]) -> list[dict[str, Any]]:
    """The ``block_configs`` list of a DeciLM ``config.json`` for these blocks."""
    out = []
    for b in blocks:
        a, f = b.attention, b.ffn
        out.append({
            "attention": {"n_heads_in_group": config.num_heads // a.kv_heads if a.kind == "gqa" else None,
                          "no_op": a.kind == "none", "replace_with_linear": a.kind == "linear"},
            "ffn": {"ffn_mult": ffn_mult_for(f.width, config.hidden_size) if f.kind == "mlp" else None,
                    "no_op": f.kind == "none", "replace_with_linear": f.kind == "linear"},
        })
    return out


def from_decilm(config, block_configs: Sequence[dict[str, Any]]) -> tuple[BlockSpec, ...]:
    """Blocks from a DeciLM ``block_configs`` list (the inverse of :func:`to_decilm`)."""
    blocks = []
    for i, bc in enumerate(block_configs):
        try:
            att, ffn = bc["attention"], bc["ffn"]
            if att.get("no_op"):
                a = AttentionSpec("none")
            elif att.get("replace_with_linear"):
                a = AttentionSpec("linear")
            else:
                group = int(att["n_heads_in_group"])
                if group <= 0 or config.num_heads % group:
                    raise ValueError(f"n_heads_in_group {group} does not divide the {config.num_heads} query heads")
                a = AttentionSpec("gqa", config.num_heads // group)
            if ffn.get("no_op"):
                f = FFNSpec("none")
            elif ffn.get("replace_with_linear"):
                f = FFNSpec("linear")
            else:
                f = FFNSpec("mlp", deci_intermediate_size(float(ffn["ffn_mult"]), config.hidden_size))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"block_configs[{i}]: not a DeciLM block config ({type(e).__name__}: {e})") from None
        blocks.append(BlockSpec(a, f))
    return tuple(blocks)
