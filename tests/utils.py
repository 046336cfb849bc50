"""Builders shared by the tests: tiny random transformers Llamas saved as HF directories, and a tiny tokenizer."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def tiny_hf_model(seed: int = 0, std: float = 0.1, **overrides):
    """A random transformers LlamaForCausalLM (fp32, eval mode). Larger-than-default init (std) so that every
    layer matters to the logits and mistakes cannot hide under tiny activations."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def save_tiny_hf(path: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    model = tiny_hf_model(seed, **overrides)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Path(path)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes the least important heads, neurons and channels.",
    "Distillation teaches the student to match the teacher's distribution.",
    "Perplexity is the exponential of the mean negative log-likelihood.",
    "JAX compiles pure functions with XLA and shards them over a mesh.",
]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on a few sentences, as a transformers fast tokenizer with EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


@contextlib.contextmanager
def persistent_compile_cache(path: Path):
    """Point JAX's persistent XLA cache at ``path`` (caching every compile) and restore the settings afterwards:
    tests that build the same step again then compile it once."""
    import jax

    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        yield path
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def poison_hf(path: Path, name: str = "model.norm.weight", value: float = float("nan")) -> Path:
    """Set the first element of tensor ``name`` of the (single-file) HF model at ``path`` to ``value`` in place:
    ``save_hf`` refuses to write a non-finite model, so a broken one is made by editing a good one."""
    from safetensors.numpy import load_file, save_file

    file = Path(path) / "model.safetensors"
    tensors = load_file(str(file))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return Path(path)


def finish_one_layer_llama_gguf(writer, *, vocab: int, hidden: int, kv_dim: int, ffn: int, seed: int = 0) -> None:
    """Add random F32 tensors of a one-layer llama.cpp Llama (names as llama.cpp writes them, GGUF [out, in] data)
    to a ``gguf.GGUFWriter`` whose metadata is already added, and write and close the file."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv_dim, hidden),
              "blk.0.attn_v.weight": (kv_dim, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_distill_files(root: Path, teacher: dict, student: dict, *, teacher_seeds: dict | None = None) -> dict:
    """A tiny tokenizer, teacher and student HF dirs (``root/teacher``, ``root/student``, plus ``{name: seed}``
    extra teachers) and ``root/corpus.jsonl`` (60 short documents): what the trainer's tests distill with."""
    import jax

    from minitron_jax.config import LlamaConfig
    from minitron_jax.convert.hf import save_hf
    from minitron_jax.model import init_params

    tok = tiny_tokenizer(300)
    vocab = len(tok)
    teacher_cfg = LlamaConfig(vocab_size=vocab, **teacher)
    student_cfg = LlamaConfig(vocab_size=vocab, **student)
    writable = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731
    for name, seed in {"teacher": 0, **(teacher_seeds or {})}.items():
        save_hf(root / name, teacher_cfg, writable(init_params(teacher_cfg, jax.random.key(seed), std=0.3)),
                tokenizer=tok)
    save_hf(root / "student", student_cfg, writable(init_params(student_cfg, jax.random.key(1))), tokenizer=tok)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(_CORPUS[j % 5] for j in range(i, i + 3))}) + "\n")
    return {"root": root, "tokenizer": tok, "teacher_cfg": teacher_cfg, "student_cfg": student_cfg, "vocab": vocab}


def load_tool(name: str):
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
