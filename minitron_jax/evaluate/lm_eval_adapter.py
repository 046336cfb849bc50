"""An lm-evaluation-harness model for minitron_jax checkpoints, on the pure scoring functions of
:mod:`minitron_jax.evaluate.loglikelihood` (rules and batching described there).

    python -m minitron_jax.lm_eval_adapter --model minitron_jax --model_args path=model.gguf --tasks hellaswag
    python -m minitron_jax.lm_eval_adapter run --model minitron_jax \\
        --model_args path=ckpt_dir,batch_size=8,max_length=2048,dtype=bfloat16 --tasks my_task --include_path tasks/

The command (:mod:`minitron_jax.cli.lm_eval`, also ``minitron-lm-eval``) is lm-eval's own CLI
(``lm_eval.__main__.cli_evaluate``, same arguments) run after this module has registered the model: lm-eval
discovers out-of-tree models only when the module defining them has been imported, so a bare
``lm_eval --model minitron_jax`` does not know the name. From Python, importing this module is enough::

    import lm_eval, minitron_jax.evaluate.lm_eval_adapter  # registers "minitron_jax"
    lm_eval.simple_evaluate(model="minitron_jax", model_args="path=model.gguf", tasks=[...])

``path`` is anything ``minitron_jax.convert.load_model`` reads (HF directory, ``.gguf``, Orbax checkpoint). Other
model args: ``batch_size`` (default 8; ``auto`` means 8), ``max_length`` (default: the config's
``max_position_embeddings``), ``dtype`` (float32|bfloat16), ``add_bos_token`` (default: the tokenizer's own
convention), ``prefix_token_id`` (default BOS, else EOS), ``max_gen_toks`` (default 256), ``seed``.

``lm-eval`` is an optional dependency (``pip install minitron_jax[lm-eval]``). Nothing here imports it at module
import time except its light registry, and only when it is installed: the model class ``MinitronLM`` is built on
first access (registered in lm-eval as the lazy target ``minitron_jax.evaluate.lm_eval_adapter:MinitronLM``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import jax
import jax.numpy as jnp

from minitron_jax.evaluate.loglikelihood import (
    DEFAULT_MAX_GEN_TOKS,
    encode_pair,
    generate_until,
    loglikelihood_tokens,
    prefix_token,
    require_tokenizer,
    rolling_windows,
    tok_encode,
)

MODEL_NAME = "minitron_jax"
_MODULE = "minitron_jax.evaluate.lm_eval_adapter"  # the lazy target lm-eval imports (whoever imported us)


# ------------------------------------------------------------------------------------------------------------------
# The lm-eval model class (built on first access; lm-eval imported only then)
# ------------------------------------------------------------------------------------------------------------------
def _build_class():
    from lm_eval.api.model import TemplateLM
    from tqdm import tqdm

    from minitron_jax.evaluate.perplexity import DTYPES

    class MinitronLM(TemplateLM):
        """lm-eval model over any checkpoint ``minitron_jax.convert.load_model`` reads (args in the module doc)."""

        def __init__(self, path: str | None = None, pretrained: str | None = None, batch_size: int | str = 8,
                     max_length: int | str | None = None, dtype: str = "float32", add_bos_token: bool | None = None,
                     prefix_token_id: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0,
                     model=None, **unused):
            super().__init__()
            from minitron_jax.convert import load_model

            if model is None:
                source = path or pretrained
                if source is None:
                    raise ValueError("minitron_jax needs model_args path=<HF dir | .gguf | checkpoint>")
                model = load_model(source)
            require_tokenizer(model)
            model.params = jax.tree.map(jnp.asarray, model.params)  # on device once, not per batch
            self.model = model
            self.tokenizer = model.tokenizer
            self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") \
                else int(batch_size)
            self._max_length = int(max_length) if max_length not in (None, "") else \
                model.config.max_position_embeddings
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            self.dtype = DTYPES[dtype]
            self.add_bos_token = _as_bool(add_bos_token)
            self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
            self._max_gen_toks = int(max_gen_toks)
            self.seed = int(seed)

        # --- properties lm-eval reads
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return prefix_token(self.tokenizer, self.custom_prefix_token_id)

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "") or self.model.source).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return tok_encode(self.tokenizer, string, self.add_bos_token if add_special_tokens is None
                              else add_special_tokens)

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

        # --- the three request types
        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [encode_pair(self.tokenizer, c, x, add_special_tokens=self.add_bos_token,
                                 prefix_token_id=self.custom_prefix_token_id) for c, x in (r.args for r in requests)]
            return self._score(pairs, "loglikelihood", [r.args for r in requests], disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            return self._score([(c, x) for _, c, x in requests], "loglikelihood", [r for r, _, _ in requests],
                               disable_tqdm)

        def _score(self, pairs, hook: str, keys, disable_tqdm: bool):
            bar = tqdm(total=len(pairs), disable=disable_tqdm or self.rank != 0, desc=f"minitron_jax {hook}")
            res = loglikelihood_tokens(self.model.config, self.model.params, pairs, max_length=self.max_length,
                                       batch_size=self.batch_size, dtype=self.dtype,
                                       progress=lambda d: bar.update(d - bar.n))
            bar.close()
            for key, r in zip(keys, res):
                if key is not None:
                    self.cache_hook.add_partial(hook, key, r)
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for n, req in enumerate(requests):
                (text,) = req.args
                w = rolling_windows(self.tok_encode(text), self.max_length, self.prefix_token_id)
                windows += w
                owner += [n] * len(w)
            scores = self._score(windows, "loglikelihood_rolling", [None] * len(windows), disable_tqdm)
            totals = [0.0] * len(requests)
            for n, (lp, _) in zip(owner, scores):
                totals[n] += lp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            args = [r.args for r in requests]
            res = generate_until(self.model, args, max_length=self.max_length, batch_size=self.batch_size,
                                 dtype=self.dtype, add_special_tokens=self.add_bos_token,
                                 default_max_gen_toks=self.max_gen_toks, seed=self.seed)
            for a, r in zip(args, res):
                self.cache_hook.add_partial("generate_until", a, r)
            return res

    MinitronLM.__module__ = _MODULE
    MinitronLM.__qualname__ = "MinitronLM"
    return MinitronLM


def _as_bool(v):
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


@functools.lru_cache(maxsize=1)
def _model_class():
    return _build_class()


def __getattr__(name: str) -> Any:
    if name == "MinitronLM":
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lm_eval_available() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):
        return False


def register() -> bool:
    """Register ``minitron_jax`` in lm-eval's model registry (lazily: the class is built when lm-eval asks for
    it). Returns False when lm-eval is not installed."""
    if not lm_eval_available():
        return False
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:  # older lm-eval: a plain dict and an eager decorator, no lazy targets
        from lm_eval.api.registry import MODEL_REGISTRY, register_model

        if MODEL_NAME not in MODEL_REGISTRY:
            register_model(MODEL_NAME)(_model_class())
        return True
    if MODEL_NAME not in model_registry:  # idempotent
        model_registry.register(MODEL_NAME, target=f"{_MODULE}:MinitronLM")
    return True


register()
