"""Blockwise local distillation (Puzzle's BLD): every block variant of every layer trained, alone, to reproduce its
parent layer from the parent's own activations.

**Activations.** The parent runs once over the calibration windows; :class:`ActivationStore` keeps, per layer ``i``,
``h[i]`` (the layer's input; ``h[L]`` is the last layer's output, before the final norm) and ``mid[i]`` (the residual
stream after the attention half) as ``.npy`` files read through ``np.memmap``: 2L+1 arrays of ``[windows, T, D]``
float32 (SmolLM2-135M, 16k tokens: 61 × 38 MB = 2.3 GB on disk, one layer's worth in memory at a time). A layer's
output is the next layer's input, so nothing is stored twice. The store is written as one directory that appears
whole (``fsutil.atomic_directory``) with a ``meta.json`` naming what it was computed from; a store that does not
match is rebuilt.

**Decoupled halves.** A variant is an attention choice × an FFN choice. The attention half is trained on
``h[i] → mid[i]`` and the FFN half on ``mid[i] → h[i+1]``, each from the parent's activations, and a variant is the
pair (Puzzle's *decoupled* BLD). That trains A + F sub-blocks per layer instead of A × F whole blocks (SmolLM2's
default space: 7 instead of 20), and the two halves of a variant never see each other's error while training; the
scoring (:mod:`.scoring`) runs the assembled pair. The parent's own halves need no training; ``none`` has nothing
to train.

**Loss.** The normalized MSE ``Σ‖f(x) − y‖² / Σ‖y − x‖²``: the error relative to the sub-block's own residual
update ``y − x``. Removing the sub-block (``f(x) = x``, and the zero-initialised ``linear``) scores exactly 1 and
the parent exactly 0, in every layer, so losses compare across layers whose residual streams differ in scale by
orders of magnitude (SmolLM2's massive activations), and Adam's step size means the same thing everywhere.

**Init.** ``hetero.init_block`` from the parent layer: KV heads merged by the mean, FFN channels kept by index —
the most important ones when an importance score ``[L, F]`` is given (else the parent's first ones), linear as the
zero matrix (the identity). Adam (warmup then cosine decay) trains it; if the trained sub-block ends worse than its
init on the fixed evaluation batches (a step size too large for that layer), the init is kept and the result says so.

**Resume.** Each (layer, half, option) result — the trained params and the losses — is one ``.npz`` written
atomically (``fsutil.atomic_file``) under ``blocks/``; a rerun loads the finished ones and recomputes any that is
missing or unreadable. One train step is jitted per distinct sub-block shape and reused across layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitron_jax import hetero, model
from minitron_jax.attention import attention_mask
from minitron_jax.blocks import AttentionSpec, BlockSpec, FFNSpec
from minitron_jax.config import LlamaConfig
from minitron_jax.fsutil import atomic_directory, atomic_file, check_free_space, save_npy

Params = dict[str, Any]
Progress = Callable[[str, int, int], None]

HALVES = ("attention", "ffn")
_NONE_ATT, _NONE_FFN = AttentionSpec("none"), FFNSpec("none")


LINEAR_INITS = ("lstsq", "zero")


@dataclasses.dataclass(frozen=True)
class BlockwiseSettings:
    """How each sub-block is trained. ``batch_windows`` windows of the calibration set per Adam step;
    ``eval_batches`` fixed batches (the first ones) measure the loss before and after training."""

    steps: int = 50
    batch_windows: int = 4
    lr: float = 1e-3
    warmup_steps: int = 5
    eval_batches: int = 2
    seed: int = 0
    # How a linear sub-block starts: "lstsq", the least-squares map from its normed input to the parent half's
    # residual update on the calibration windows (the best linear replacement there for the parent's norm, so Adam
    # starts at it), or "zero", the identity (= removal), which 50 Adam steps move little (1 → 0.93 on SmolLM2).
    linear_init: str = "lstsq"

    def check(self) -> None:
        for name in ("steps", "batch_windows", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"blockwise {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"blockwise lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"blockwise warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.linear_init not in LINEAR_INITS:
            raise ValueError(f"blockwise linear_init must be one of {', '.join(LINEAR_INITS)}, got "
                             f"{self.linear_init!r}")


# ------------------------------------------------------------------------------------------------------------------
# Small helpers shared with scoring
# ------------------------------------------------------------------------------------------------------------------
def run_base(config: LlamaConfig) -> LlamaConfig:
    """The base config the heterogeneous layers run with (the parent's, per-layer fields as placeholders)."""
    return hetero.HeteroConfig(config, (parent_spec(config),)).base


def parent_spec(config: LlamaConfig) -> BlockSpec:
    return BlockSpec(AttentionSpec("gqa", config.num_kv_heads), FFNSpec("mlp", config.intermediate_size))


def half_spec(half: str, option) -> BlockSpec:
    """The one-half block of an attention or FFN option (the other half ``none``)."""
    return BlockSpec(option, _NONE_FFN) if half == "attention" else BlockSpec(_NONE_ATT, option)


def rope_and_mask(config: LlamaConfig, batch: int, seq_len: int):
    """cos, sin and the causal mask of ``batch`` windows at positions 0..T-1 (the calibration windows' layout)."""
    pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None], (batch, seq_len))
    cos, sin = model.rope_cos_sin(config, pos)
    return cos, sin, attention_mask(pos, pos, None, None)


def parent_layer(params: Params, i: int) -> Params:
    return jax.tree.map(lambda x: x[i], params["layers"])


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def params_fingerprint(params: Params) -> str:
    """A hash of every parameter array (name, shape, bytes): what identifies a parent beyond its config."""
    h = hashlib.sha1()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda t: jax.tree_util.keystr(t[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------------
# Parent activations on disk
# ------------------------------------------------------------------------------------------------------------------
class ActivationStore:
    """``h(i)`` [N, T, D] for i in 0..L, ``mid(i)`` for i in 0..L-1, ``tokens`` [N, T], and for an evaluation store
    ``logp`` [N, T, V] (the parent's next-token log-probabilities), all memory-mapped read-only."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())

    @property
    def num_windows(self) -> int:
        return int(self.meta["windows"])

    def _open(self, name: str) -> np.ndarray:
        return np.load(self.dir / f"{name}.npy", mmap_mode="r")

    def h(self, i: int) -> np.ndarray:
        return self._open(f"h_{i:03d}")

    def mid(self, i: int) -> np.ndarray:
        return self._open(f"mid_{i:03d}")

    @property
    def tokens(self) -> np.ndarray:
        return self._open("tokens")

    @property
    def logp(self) -> np.ndarray:
        return self._open("logp")

    @classmethod
    def open_or_build(cls, directory: str | Path, config: LlamaConfig, params: Params, windows: np.ndarray, *,
                      key: str, batch: int = 4, with_logp: bool = False,
                      progress: Progress | None = None) -> "ActivationStore":
        """The store at ``directory`` if its ``meta.json`` says it was built for ``key`` (a fingerprint of the
        parent and the windows) and these windows, else a new one (replacing it whole)."""
        directory = Path(directory)
        meta_file = directory / "meta.json"
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                if meta.get("key") == key and meta.get("logp") == with_logp:
                    return cls(directory)
            except (OSError, ValueError):
                pass  # unreadable: rebuilt below
        build_activations(directory, config, params, windows, key=key, batch=batch, with_logp=with_logp,
                          progress=progress)
        return cls(directory)


def _collect(d: dict) -> tuple:
    return d["layer_in"], d["attn_out"], d["layer_out"]


def build_activations(directory: Path, config: LlamaConfig, params: Params, windows: np.ndarray, *, key: str,
                      batch: int = 4, with_logp: bool = False, progress: Progress | None = None) -> None:
    windows = np.asarray(windows, np.int32)
    N, T = windows.shape
    L, D, V = config.num_layers, config.hidden_size, config.vocab_size

    @jax.jit
    def run(params, tokens):
        _, (h_in, attn_out, h_out), _ = model.hidden_states(config, params, tokens, collect=_collect)
        last = h_out[-1]
        # mid = layer_in + attn_out is exactly the sum decoder_layer forms (keep is None there).
        out = (h_in, h_in + attn_out, last)
        if with_logp:
            logits = model.logits_from_hidden(config, params, model.rms_norm(last, params["final_norm"],
                                                                               config.rms_norm_eps))
            out = out + (jax.nn.log_softmax(logits, axis=-1),)
        return out

    check_free_space(directory, 4 * N * T * (D * (2 * L + 1) + (V if with_logp else 0)),
                     "the parent's activations", "lower --calib-tokens / --eval-windows")
    with atomic_directory(directory, overwrite=True) as tmp:
        def create(name, shape):
            return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)

        hs = [create(f"h_{i:03d}", (N, T, D)) for i in range(L + 1)]
        mids = [create(f"mid_{i:03d}", (N, T, D)) for i in range(L)]
        logp = create("logp", (N, T, V)) if with_logp else None
        save_npy(tmp / "tokens.npy", windows)
        done = 0
        for s in range(0, N, batch):
            got = jax.device_get(run(params, jnp.asarray(windows[s:s + batch])))
            n = got[0].shape[1]
            for i in range(L):
                hs[i][s:s + n] = got[0][i]
                mids[i][s:s + n] = got[1][i]
            hs[L][s:s + n] = got[2]
            if logp is not None:
                logp[s:s + n] = got[3]
            done += n
            if progress:
                progress("parent activations", done, N)
        for m in hs + mids + ([logp] if logp is not None else []):
            m.flush()
        del hs, mids, logp
        (tmp / "meta.json").write_text(json.dumps({"key": key, "windows": N, "seq_len": T, "layers": L,
                                                   "logp": with_logp}) + "\n")


# ------------------------------------------------------------------------------------------------------------------
# Training one sub-block
# ------------------------------------------------------------------------------------------------------------------
def normalized_mse(base: LlamaConfig, spec: BlockSpec, p: Params, x, y, cos, sin, mask):
    """``(Σ‖f(x) − y‖², Σ‖y − x‖²)`` of one batch (the ratio is the normalized MSE)."""
    out = hetero.apply_block(base, spec, p, x, cos, sin, mask, dtype=jnp.float32)
    return jnp.sum(jnp.square(out - y)), jnp.sum(jnp.square(y - x))


class StepCache:
    """One jitted train step and one jitted loss per distinct sub-block spec: every layer's sub-blocks of the same
    shape reuse them (the spec, not the layer, fixes the shapes)."""

    def __init__(self, base: LlamaConfig, settings: BlockwiseSettings):
        self.base, self.settings = base, settings
        sched = optax.warmup_cosine_decay_schedule(0.0, settings.lr, min(settings.warmup_steps, settings.steps - 1)
                                                   if settings.steps > 1 else 0,
                                                   settings.steps, end_value=settings.lr * 0.1)
        self.opt = optax.adam(sched)
        self._fns: dict[BlockSpec, tuple[Callable, Callable]] = {}
        self.builds = 0

    def get(self, spec: BlockSpec):
        if spec not in self._fns:
            base, opt = self.base, self.opt

            def loss(p, x, y, cos, sin, mask):
                num, den = normalized_mse(base, spec, p, x, y, cos, sin, mask)
                return num / jnp.maximum(den, 1e-30)

            @jax.jit
            def step(p, opt_state, x, y, cos, sin, mask):
                value, grads = jax.value_and_grad(loss)(p, x, y, cos, sin, mask)
                updates, opt_state = opt.update(grads, opt_state, p)
                return optax.apply_updates(p, updates), opt_state, value

            self._fns[spec] = (step, jax.jit(lambda p, x, y, c, s, m: normalized_mse(base, spec, p, x, y, c, s, m)))
            self.builds += 1
        return self._fns[spec]


def _batches(n_windows: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """Window indices of each step: a fresh permutation per epoch, full batches only."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(n_windows)
        out.extend(perm[s:s + batch] for s in range(0, n_windows - batch + 1, batch))
    return [np.sort(b) for b in out[:steps]]


def _eval_loss(loss_fn, p, x_all, y_all, batch, n_batches, rope) -> float:
    num = den = 0.0
    for b in range(n_batches):
        sl = slice(b * batch, (b + 1) * batch)
        a, c = loss_fn(p, jnp.asarray(x_all[sl]), jnp.asarray(y_all[sl]), *rope)
        num, den = num + float(a), den + float(c)
    return num / max(den, 1e-30)


def train_subblock(cache: StepCache, spec: BlockSpec, p0: Params, x_all: np.ndarray, y_all: np.ndarray, *,
                   seed: int) -> tuple[Params, dict[str, Any]]:
    """Train one sub-block (``spec``: a one-half block) from ``p0`` to map ``x_all`` to ``y_all`` ([N, T, D]
    memmaps). Returns the params kept and ``{loss_init, loss_final, loss_trained, kept, curve, seconds}``."""
    s = cache.settings
    N, T, _ = x_all.shape
    batch = min(s.batch_windows, N)
    n_eval = max(1, min(s.eval_batches, N // batch))
    rope = rope_and_mask(cache.base, batch, T)
    step, loss_fn = cache.get(spec)
    t0 = time.perf_counter()
    loss_init = _eval_loss(loss_fn, p0, x_all, y_all, batch, n_eval, rope)
    p = jax.tree.map(jnp.asarray, p0)
    curve: list[float] = []
    if jax.tree_util.tree_leaves(p):  # "none" has no params: nothing to train
        opt_state = cache.opt.init(p)
        for idx in _batches(N, batch, s.steps, seed):
            p, opt_state, value = step(p, opt_state, jnp.asarray(x_all[idx]), jnp.asarray(y_all[idx]), *rope)
            curve.append(float(value))
    loss_trained = _eval_loss(loss_fn, p, x_all, y_all, batch, n_eval, rope) if curve else loss_init
    kept = "trained"
    if not np.isfinite(loss_trained) or loss_trained > loss_init:
        p, kept = p0, "init"  # training made it worse (or blew up): the init is the better block
    info = {"loss_init": loss_init, "loss_trained": loss_trained, "loss_final": min(loss_init, loss_trained)
            if np.isfinite(loss_trained) else loss_init, "kept": kept, "curve": curve[:: max(1, len(curve) // 20)]
            + curve[-1:], "steps": len(curve), "seconds": time.perf_counter() - t0}
    return jax.device_get(p), info


# ------------------------------------------------------------------------------------------------------------------
# Every layer × every option, resumable
# ------------------------------------------------------------------------------------------------------------------
def _options(variants: Sequence[BlockSpec]) -> dict[str, list]:
    return {"attention": list(dict.fromkeys(v.attention for v in variants)),
            "ffn": list(dict.fromkeys(v.ffn for v in variants))}


def result_path(run_dir: Path, layer: int, half: str, option) -> Path:
    return Path(run_dir) / "blocks" / f"layer_{layer:03d}" / f"{half}_{option.describe()}.npz"


def save_result(path: Path, params: Params, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"p/{k}": np.asarray(v) for k, v in params.items()}
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, **arrays, info=np.frombuffer(json.dumps(info).encode(), np.uint8))


def load_result(path: Path, expected: Params) -> tuple[Params, dict] | None:
    """The saved (params, info), or None when absent, unreadable or not shaped like ``expected``."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            params = {k[2:]: z[k] for k in z.files if k.startswith("p/")}
            info = json.loads(bytes(z["info"]).decode())
    except Exception:  # noqa: BLE001 - any damage (truncation, bad zip, bad JSON) means: recompute
        return None
    if set(params) != set(expected) or any(params[k].shape != np.shape(expected[k]) for k in params):
        return None
    return params, info


@dataclasses.dataclass
class BlockwiseResult:
    """The trained sub-blocks: ``halves[(layer, half, option)] = (params, info)`` (the parent's own halves are
    in it too, with loss 0 and no training)."""

    config: LlamaConfig
    halves: dict[tuple[int, str, Any], tuple[Params, dict]]
    seconds: float
    computed: int  # results trained in this call (the rest were loaded)
    step_builds: int

    def layer_params(self, layer: int, spec: BlockSpec) -> Params:
        """A whole layer of ``spec``: its attention half's params and its FFN half's."""
        out: Params = {}
        out.update(self.halves[(layer, "attention", spec.attention)][0])
        out.update(self.halves[(layer, "ffn", spec.ffn)][0])
        return out

    def info(self, layer: int, half: str, option) -> dict:
        return self.halves[(layer, half, option)][1]


def lstsq_linear(base: LlamaConfig, norm: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, *,
                 ridge: float = 1e-6, batch: int = 8) -> np.ndarray:
    """The [D, D] matrix W minimising Σ‖rms_norm(x; norm) W − (y − x)‖² over every token of ``x_all`` → ``y_all``
    ([N, T, D]): a linear sub-block's best start for the parent's norm weights. Normal equations accumulated in
    float64 window batch by window batch (one [B, T, D] batch in memory), with a ridge of ``ridge × mean diagonal``
    so a rank-deficient input (e.g. a dead channel) still gives a finite answer."""
    D = x_all.shape[-1]
    gram = np.zeros((D, D), np.float64)
    cross = np.zeros((D, D), np.float64)
    normed = jax.jit(lambda x: model.rms_norm(x, jnp.asarray(norm, jnp.float32), base.rms_norm_eps))
    for s in range(0, x_all.shape[0], batch):
        x = np.asarray(x_all[s:s + batch], np.float32)
        a = np.asarray(normed(jnp.asarray(x)), np.float64).reshape(-1, D)
        r = (np.asarray(y_all[s:s + batch], np.float64) - x).reshape(-1, D)
        gram += a.T @ a
        cross += a.T @ r
    gram[np.diag_indices(D)] += ridge * max(float(np.trace(gram)) / D, 1e-30)
    return np.linalg.solve(gram, cross)


def ffn_keep_from_scores(scores: np.ndarray | None, layer: int, width: int) -> np.ndarray | None:
    """The ``width`` most important channels of a layer (ascending indices), or None for the parent's order."""
    if scores is None:
        return None
    order = np.argsort(-np.asarray(scores[layer]), kind="stable")
    return np.sort(order[:width])


def blockwise_distill(config: LlamaConfig, params: Params, store: ActivationStore, variants: Sequence[BlockSpec],
                      run_dir: str | Path, settings: BlockwiseSettings = BlockwiseSettings(), *,
                      neuron_scores: np.ndarray | None = None, progress: Progress | None = None,
                      log: Callable[[str], None] | None = None) -> BlockwiseResult:
    """Train every attention and FFN option of ``variants`` at every layer (see the module docstring).

    ``neuron_scores`` [L, F] (e.g. ``Importance.width()["neurons"]``) orders the FFN channels a narrower MLP keeps.
    """
    settings.check()
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    base = run_base(config)
    parent = parent_spec(config)
    opts = _options(variants)
    # The parent's own halves are always there (no training: they are the parent's): additive scoring runs every
    # option inside the parent layer, even when a runtime rules the parent's own block out of the space.
    opts = {"attention": list(dict.fromkeys([parent.attention, *opts["attention"]])),
            "ffn": list(dict.fromkeys([parent.ffn, *opts["ffn"]]))}
    cache = StepCache(base, settings)
    L = config.num_layers
    todo = [(i, half, o) for i in range(L) for half in HALVES for o in opts[half]]
    halves: dict = {}
    computed = 0
    for n, (i, half, option) in enumerate(todo):
        parent_option = parent.attention if half == "attention" else parent.ffn
        pl = jax.device_get(parent_layer(params, i))
        spec = half_spec(half, option)
        if option == parent_option:
            own = hetero.init_block(base, pl, spec)  # the parent's own half, unchanged
            halves[(i, half, option)] = ({k: np.asarray(v) for k, v in own.items()},
                                         {"loss_init": 0.0, "loss_final": 0.0, "kept": "parent", "steps": 0,
                                          "seconds": 0.0})
            continue
        keep = ffn_keep_from_scores(neuron_scores, i, option.width) if half == "ffn" and option.kind == "mlp" \
            else None
        p0 = hetero.init_block(base, pl, spec, ffn_keep=keep)
        path = result_path(run_dir, i, half, option)
        loaded = load_result(path, p0)
        if loaded is None:
            x_all, y_all = (store.h(i), store.mid(i)) if half == "attention" else (store.mid(i), store.h(i + 1))
            if option.kind == "linear" and settings.linear_init == "lstsq":
                norm_key, w_key = ("attn_norm", "attn_linear") if half == "attention" else ("mlp_norm", "ffn_linear")
                w = lstsq_linear(base, np.asarray(p0[norm_key]), x_all, y_all)
                p0 = {**p0, w_key: jnp.asarray(w, jnp.asarray(p0[w_key]).dtype)}
            p, info = train_subblock(cache, spec, p0, x_all, y_all, seed=settings.seed * 1_000_003 + i)
            info.update(layer=i, half=half, option=option.describe())
            save_result(path, p, info)
            loaded = (p, info)
            computed += 1
            if log:
                log(f"layer {i} {half} {option.describe()}: normalized MSE {info['loss_init']:.4g} → "
                    f"{info['loss_final']:.4g} ({info['seconds']:.1f}s)")
        halves[(i, half, option)] = ({k: np.asarray(v) for k, v in loaded[0].items()}, loaded[1])
        if progress:
            progress("blockwise distillation", n + 1, len(todo))
    if progress:
        progress("blockwise distillation", len(todo), len(todo))
    return BlockwiseResult(config, halves, time.perf_counter() - t0, computed, cache.builds)
