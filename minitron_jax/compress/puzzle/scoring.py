"""Replace-one-block scores: the parent with only layer ``i`` replaced by a variant, against the parent itself.

For every (layer, variant): KL(parent ‖ replaced) of the next-token distributions, averaged over every position of
the held-out windows, and the replaced model's LM loss (cross-entropy of the next token). Puzzle's MIP maximises
minus the summed KL.

The parent's part of the computation is never redone: the evaluation :class:`~.blockwise.ActivationStore` holds
the parent's input to every layer and its log-probabilities, so a score runs the variant on ``h[i]``, then the
parent's layers ``i+1..L-1`` (one ``lax.scan`` over all L layers in which a ``lax.cond`` skips the layers up to
``i``: ``i`` is an argument, so the function compiles once per variant shape, not per layer), the final norm and
the head.

Two ways to fill the ``[L, V]`` matrix:

- ``joint``: every variant run as a whole block — A × F evaluations per layer.
- ``additive``: each half scored alone inside the parent layer (attention option with the parent's FFN, parent's
  attention with the FFN option) and a variant's score the sum of its halves' — A + F − 2 evaluations per layer. It
  ignores how the two replaced halves interact within one layer, as the MIP already ignores how layers interact.

The parent variant is 0 by definition (it is the parent) and is not evaluated. Each finished (layer, variant)
score is kept in ``scores/layer_NNN.json`` (rewritten atomically), so an interrupted scoring resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import hetero, model
from minitron_jax.blocks import BlockSpec
from minitron_jax.config import LlamaConfig
from minitron_jax.fsutil import write_json_atomic

from .blockwise import ActivationStore, BlockwiseResult, parent_spec, rope_and_mask, run_base

Params = dict[str, Any]
SCORING_MODES = ("additive", "joint")


class Scorer:
    """Replace-one-block KL and LM loss over an evaluation store; one jitted function per block spec."""

    def __init__(self, config: LlamaConfig, params: Params, store: ActivationStore, *, batch: int = 2):
        self.config, self.params, self.store = config, params, store
        self.base = run_base(config)
        self.batch = max(1, min(batch, store.num_windows))
        self._fns: dict[BlockSpec, Callable] = {}
        self.layers = jax.tree.map(jnp.asarray, params["layers"])
        self.rest = {k: jnp.asarray(v) for k, v in params.items() if k in ("final_norm", "lm_head", "embed")}

    def _fn(self, spec: BlockSpec):
        if spec not in self._fns:
            config, base = self.config, self.base
            L = config.num_layers

            @jax.jit
            def score(block_p, layers, rest, i, h, logp_parent, tokens):
                B, T = tokens.shape
                cos, sin, mask = rope_and_mask(config, B, T)
                h = hetero.apply_block(base, spec, block_p, h, cos, sin, mask, dtype=jnp.float32)

                def body(carry, xs):
                    lp, j = xs
                    out = jax.lax.cond(j > i, lambda c: model.decoder_layer(config, lp, c, cos, sin, mask,
                                                                             dtype=jnp.float32)[0],
                                       lambda c: c, carry)
                    return out, None

                h, _ = jax.lax.scan(body, h, (layers, jnp.arange(L)))
                h = model.rms_norm(h, rest["final_norm"], config.rms_norm_eps)
                logq = jax.nn.log_softmax(model.logits_from_hidden(config, rest, h), axis=-1)
                kl = jnp.sum(jnp.exp(logp_parent) * (logp_parent - logq))
                nll = -jnp.take_along_axis(logq[:, :-1], tokens[:, 1:, None], axis=-1)
                return kl, jnp.sum(nll)

            self._fns[spec] = score
        return self._fns[spec]

    @property
    def compiled(self) -> int:
        return len(self._fns)

    def score(self, layer: int, spec: BlockSpec, block_params: Params) -> tuple[float, float]:
        """(mean KL(parent ‖ replaced) per position, mean next-token LM loss) with layer ``layer`` replaced."""
        fn = self._fn(spec)
        p = jax.tree.map(jnp.asarray, block_params)
        N = self.store.num_windows
        h_all, logp_all, tok_all = self.store.h(layer), self.store.logp, self.store.tokens
        kl = nll = 0.0
        positions = targets = 0
        for s in range(0, N, self.batch):
            sl = slice(s, min(s + self.batch, N))
            k, c = fn(p, self.layers, self.rest, jnp.int32(layer), jnp.asarray(h_all[sl]),
                      jnp.asarray(logp_all[sl]), jnp.asarray(tok_all[sl]))
            kl, nll = kl + float(k), nll + float(c)
            n, T = tok_all[sl].shape
            positions += n * T
            targets += n * (T - 1)
        return kl / positions, nll / max(targets, 1)

    def parent_lm_loss(self) -> float:
        """The parent's own LM loss on the same windows (from the stored log-probabilities)."""
        logp, tok = self.store.logp, self.store.tokens
        total, count = 0.0, 0
        for s in range(0, self.store.num_windows, self.batch):
            lp, t = np.asarray(logp[s:s + self.batch]), np.asarray(tok[s:s + self.batch])
            total -= float(np.take_along_axis(lp[:, :-1], t[:, 1:, None].astype(np.int64), axis=-1).sum())
            count += t.shape[0] * (t.shape[1] - 1)
        return total / max(count, 1)


@dataclasses.dataclass
class ScoreResult:
    kl: np.ndarray  # [L, V]; NaN where the variant is not allowed
    lm_loss: np.ndarray  # [L, V]
    parent_lm_loss: float
    mode: str
    seconds: float
    evaluations: int  # scores computed in this call (the rest were loaded)
    compiled: int
    eval_seconds: float = 0.0  # the time every score took when it was computed, this call or an earlier one


def _score_file(run_dir: Path, layer: int) -> Path:
    return Path(run_dir) / "scores" / f"layer_{layer:03d}.json"


def _load_scores(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("kl"), (int, float))}
    except (OSError, ValueError):
        return {}


def score_variants(config: LlamaConfig, params: Params, store: ActivationStore, blockwise: BlockwiseResult,
                   variants: Sequence[BlockSpec], run_dir: str | Path, *, mode: str = "additive",
                   allowed: np.ndarray | None = None, batch: int = 2,
                   progress: Callable[[str, int, int], None] | None = None) -> ScoreResult:
    """The ``[L, V]`` replace-one-block KL and LM-loss matrices (see the module docstring for ``mode``).
    ``allowed`` [L, V] bool marks the variants a layer may take (default all); the others are NaN."""
    if mode not in SCORING_MODES:
        raise ValueError(f"scoring mode must be one of {SCORING_MODES}, got {mode!r}")
    t0 = time.perf_counter()
    L, V = config.num_layers, len(variants)
    allowed = np.ones((L, V), bool) if allowed is None else np.asarray(allowed, bool)
    if allowed.shape != (L, V):
        raise ValueError(f"allowed has shape {allowed.shape}, expected {(L, V)}")
    parent = parent_spec(config)
    scorer = Scorer(config, params, store, batch=batch)

    # What to evaluate at each layer: the variants themselves (joint) or each half inside the parent layer.
    def needed(v: BlockSpec) -> list[BlockSpec]:
        if mode == "joint":
            return [v]
        return [BlockSpec(v.attention, parent.ffn), BlockSpec(parent.attention, v.ffn)]

    plan = [(i, s) for i in range(L) for s in dict.fromkeys(s for v, ok in zip(variants, allowed[i]) if ok
                                                           for s in needed(v)) if s != parent]
    cached = {i: _load_scores(_score_file(run_dir, i)) for i in range(L)}
    evaluations = 0
    for n, (i, s) in enumerate(plan):
        name = s.describe()
        if name not in cached[i]:
            t1 = time.perf_counter()
            kl, lm = scorer.score(i, s, blockwise.layer_params(i, s))
            cached[i][name] = {"kl": kl, "lm_loss": lm, "seconds": time.perf_counter() - t1}
            write_json_atomic(_score_file(run_dir, i), cached[i])
            evaluations += 1
        if progress:
            progress("replace-one-block scores", n + 1, len(plan))
    parent_lm = scorer.parent_lm_loss()

    def lookup(i: int, s: BlockSpec) -> tuple[float, float]:
        return (0.0, parent_lm) if s == parent else (cached[i][s.describe()]["kl"], cached[i][s.describe()]["lm_loss"])

    kl = np.full((L, V), np.nan)
    lm = np.full((L, V), np.nan)
    for i in range(L):
        for j, v in enumerate(variants):
            if not allowed[i, j]:
                continue
            parts = [lookup(i, s) for s in needed(v)]
            kl[i, j] = sum(p[0] for p in parts)
            # additive: the LM loss moves by the sum of the halves' moves away from the parent's
            lm[i, j] = parts[0][1] if mode == "joint" else parent_lm + sum(p[1] - parent_lm for p in parts)
    spent = sum(float(cached[i][s.describe()].get("seconds", 0.0)) for i, s in plan)
    return ScoreResult(kl, lm, parent_lm, mode, time.perf_counter() - t0, evaluations, scorer.compiled, spent)


def whole_model_scores(hcfg: hetero.HeteroConfig, params: Params, store: ActivationStore, *, batch: int = 2
                       ) -> tuple[float, float]:
    """(mean KL(parent ‖ model), mean next-token LM loss) of a whole heterogeneous model on the evaluation store's
    windows: what the replace-one-block scores approximate, measured on the assembled model."""
    fn = jax.jit(lambda p, t: jax.nn.log_softmax(hetero.forward(hcfg, p, t), axis=-1))
    p = jax.tree.map(jnp.asarray, params)
    tok_all, logp_all = store.tokens, store.logp
    kl = nll = 0.0
    for s in range(0, store.num_windows, batch):
        t = jnp.asarray(tok_all[s:s + batch])
        lq, lp = fn(p, t), jnp.asarray(logp_all[s:s + batch])
        kl += float(jnp.sum(jnp.exp(lp) * (lp - lq)))
        nll -= float(jnp.sum(jnp.take_along_axis(lq[:, :-1], t[:, 1:, None], axis=-1)))
    n, T = tok_all.shape
    return kl / (n * T), nll / max(n * (T - 1), 1)

