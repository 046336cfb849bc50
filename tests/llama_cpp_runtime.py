"""llama.cpp as the real runtime our GGUF exports are checked against (tests and tools import this).

The llama.cpp build comes from the ``llama-cpp-cffi`` wheel (installed with ``--no-deps``). Its package
``__init__`` imports heavy optional packages, so the CPU extension module ``llama/_llama_cpp_cpu*.so`` is loaded
directly by file path; as a cffi module it carries the declared llama.h API (``module.lib``) and types
(``module.ffi``). The wheel was built against a newer libstdc++ than GCC 12's, which lacks
``__cxa_call_terminate``: a tiny C++ shim defining it is compiled once with g++ into a cache directory and loaded
with ``RTLD_GLOBAL`` first.

:func:`load_runtime` returns None (with the reason in :data:`UNAVAILABLE`) when the wheel or g++ is missing, so
tests can ``pytest.skip``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

UNAVAILABLE: str | None = None
_RUNTIME = None
_SHIM_SOURCE = """#include <exception>
// libstdc++ >= 13 has it; the wheel's code calls it when an exception escapes a noexcept function.
extern "C" void __cxa_call_terminate(void*) noexcept { std::terminate(); }
"""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "minitron_jax" / "llama_cpp"


def _shim() -> Path | None:
    """The shim library, compiled on first use (atomically: concurrent test workers may race)."""
    out = _cache_dir() / "cxa_call_terminate_shim.so"
    if out.is_file():
        return out
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "shim.cpp"
        src.write_text(_SHIM_SOURCE)
        built = Path(tmp) / "shim.so"
        subprocess.run([gxx, "-shared", "-fPIC", "-O2", "-o", str(built), str(src)], check=True,
                       capture_output=True)
        os.replace(built, out)
    return out


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("llama")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("_llama_cpp_cpu*.so"))
        if found:
            return found[0]
    return None


def load_runtime():
    """The ``LlamaCpp`` runtime, or None when it cannot be loaded (reason in ``UNAVAILABLE``)."""
    global _RUNTIME, UNAVAILABLE
    if _RUNTIME is not None or UNAVAILABLE is not None:
        return _RUNTIME
    so = _extension_path()
    if so is None:
        UNAVAILABLE = "llama-cpp-cffi is not installed (pip install --no-deps llama-cpp-cffi==0.4.42)"
        return None
    try:
        shim = _shim()
    except (OSError, subprocess.CalledProcessError) as e:
        UNAVAILABLE = f"could not build the __cxa_call_terminate shim: {e}"
        return None
    if shim is None:
        UNAVAILABLE = "g++ is not installed (needed to build the __cxa_call_terminate shim for llama-cpp-cffi)"
        return None
    try:
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
        # The init function is PyInit__llama_cpp_cpu, so that is the name; top-level, not "llama._llama_cpp_cpu",
        # so the package's own __init__ never runs.
        name = "_llama_cpp_cpu"
        spec = importlib.util.spec_from_file_location(name, so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    except (OSError, ImportError) as e:
        UNAVAILABLE = f"could not load {so.name}: {e}"
        return None
    _RUNTIME = LlamaCpp(module)
    return _RUNTIME


class LlamaCpp:
    """The few llama.h calls the checks need: load a model, tokenize, score tokens."""

    def __init__(self, module):
        self.ffi, self.lib = module.ffi, module.lib
        self._quiet()
        self.lib.llama_backend_init()

    def _quiet(self) -> None:
        # llama.cpp logs every tensor at load: silence it unless asked (MINITRON_LLAMA_CPP_LOG=1).
        if os.environ.get("MINITRON_LLAMA_CPP_LOG"):
            return

        @self.ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
        def _drop(level, text, user_data):  # noqa: ARG001 - the C signature
            return None

        self.lib.llama_log_set(self.lib.llama_cpp_cffi_ggml_log_callback, self.ffi.NULL)

    def load(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None) -> LlamaModel:
        return LlamaModel(self, Path(path), n_ctx, n_threads or min(2, os.cpu_count() or 1))


class LlamaModel:
    """One GGUF loaded in llama.cpp (CPU) with a context of ``n_ctx`` tokens."""

    def __init__(self, rt: LlamaCpp, path: Path, n_ctx: int, n_threads: int):
        self.rt, self.path, self.n_ctx = rt, path, n_ctx
        lib, ffi = rt.lib, rt.ffi
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.logits_all = True  # perplexity needs the logits of every position, from one batch
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.ctx is not None:
            self.rt.lib.llama_free(self.ctx)
            self.rt.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (``add_special``: BOS/EOS as the file's flags say)."""
        lib, ffi = self.rt.lib, self.rt.ffi
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = ffi.new("int32_t[]", cap)
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # the buffer was too small: -n is the size needed
            cap = -n
            buf = ffi.new("int32_t[]", cap)
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[0:n])

    def logits(self, tokens) -> np.ndarray:
        """Logits [T, V] (float32) for one window of tokens, decoded as one batch from an empty cache."""
        lib, ffi = self.rt.lib, self.rt.ffi
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"window of {n} tokens; the context holds {self.n_ctx}")
        lib.llama_kv_self_clear(self.ctx)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for {self.path}")
            ptr = lib.llama_get_logits(self.ctx)
            out = np.frombuffer(ffi.buffer(ptr, n * self.n_vocab * 4), dtype=np.float32)
            return out.reshape(n, self.n_vocab).copy()
        finally:
            lib.llama_batch_free(batch)

    def nll_sum(self, windows) -> tuple[float, int]:
        """(total NLL, predictions) over windows [N, T]: every next-token prediction in every window, in float64
        from llama.cpp's float32 logits — the same contract as ``minitron_jax.evaluate.perplexity``."""
        total, count = 0.0, 0
        for window in np.asarray(windows):
            logits = self.logits(window).astype(np.float64)
            logits = logits[:-1]
            top = logits.max(axis=1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            total += float((logz - logits[np.arange(len(logits)), window[1:]]).sum())
            count += len(logits)
        return total, count

    def perplexity(self, windows) -> float:
        total, count = self.nll_sum(windows)
        return math.exp(total / count)
