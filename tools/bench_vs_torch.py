"""Our KD train step and forward vs the same in plain transformers + torch: tokens/s, one run, one machine.

The setup of the issue "Distillation cost", fp32 on CPU by default:

* teacher: SmolLM2-135M (the embedded GGUF, dequantized to float32). Torch gets the same weights, exported once
  with ``save_hf`` into a temporary directory and loaded with ``LlamaForCausalLM.from_pretrained``;
* student: the same architecture with 20 layers and FFN 1024, random init (different on each side, same shapes);
* batch: ``--batch`` × ``--seq-len`` random tokens (default 4 × 256, seed 0), the same ids on both sides;
* loss: forward KL(teacher ‖ student) at T=1 on the logits, mean over tokens (KD only, no CE);
* optimizer: AdamW, lr 1e-4 constant, weight decay 0.1 on matrices only (our default mask; the torch side uses
  the same two parameter groups), b1 0.9, b2 0.95, eps 1e-8, no gradient clipping.

Ours is the real trainer step (``train.step.build_train_step`` with a 1×1×1 mesh, chunked loss, grad_accum 1);
torch is teacher forward under ``no_grad`` + student forward + KL + backward + ``AdamW.step`` + ``zero_grad``.
The forward comparison is our jitted ``model.forward`` of the teacher vs ``model(tokens).logits`` under
``no_grad``. Each side gets two untimed warm-up calls (ours compiles in the first), then ``--steps`` timed
calls; the medians give tokens/s = tokens / median seconds. The last stdout line is one JSON object.

    python tools/bench_vs_torch.py
    python tools/bench_vs_torch.py --steps 10 --threads 2 --skip-forward
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import at_least, cpu_name, require_torch  # noqa: E402  (shared by the benchmarks)

WARMUP = 2



def median_seconds(fn, steps: int, warmup: int = WARMUP) -> float:
    """Median wall seconds of ``fn()`` over ``steps`` calls after ``warmup`` untimed ones (compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_config(args):
    from minitron_jax.train.config import from_dict

    return from_dict({
        "run_dir": "/tmp/bench_vs_torch", "teacher": {"path": "unused", "dtype": "float32"},
        "student": {"path": "unused"}, "data": {"sources": ["unused"], "seq_len": args.seq_len,
                                                "batch_size": args.batch},
        "train": {"steps": 1000, "grad_accum": 1, "compute_dtype": "float32", "param_dtype": "float32"},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0},
        "optim": {"peak_lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.1, "b1": 0.9, "b2": 0.95,
                  "eps": 1e-8, "grad_clip": None},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    })


def ours(args, teacher_cfg, teacher_params, student_cfg, tokens) -> dict:
    import jax
    import numpy as np

    from minitron_jax import model as M
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train.state import init_train_state, place_teacher
    from minitron_jax.train.step import build_train_step

    rc = run_config(args)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    out = {}
    teacher = place_teacher(rc, mesh, teacher_cfg, teacher_params)
    if not args.skip_forward:
        fwd = jax.jit(lambda p, t: M.forward(teacher_cfg, p, t))
        jt = jax.device_put(tokens)
        out["forward_s"] = median_seconds(lambda: fwd(teacher, jt).block_until_ready(), args.steps)

    ts = build_train_step(rc, mesh, student_cfg, teacher_cfg)
    student = jax.tree.map(np.asarray, M.init_params(student_cfg, jax.random.key(1)))
    box = {"state": init_train_state(rc, mesh, student_cfg, teacher_cfg, student)}
    shape = tokens.shape
    batch = {"tokens": tokens, "segment_ids": np.ones(shape), "positions": np.broadcast_to(np.arange(shape[1]), shape),
             "loss_mask": np.ones(shape)}
    batch = jax.device_put({k: np.asarray(v, np.int32) for k, v in batch.items()}, ts.batch_shardings)

    def step():
        box["state"], metrics = ts.step(box["state"], teacher, batch)
        box["loss"] = float(jax.block_until_ready(metrics)["loss"])

    out["kd_step_s"] = median_seconds(step, args.steps)
    out["kd_loss_last"] = box["loss"]
    if args.cached_teacher:
        out.update(cached_step(args, rc, mesh, teacher_cfg, teacher, student_cfg, student, batch))
    return out


def cached_step(args, rc, mesh, teacher_cfg, teacher, student_cfg, student, batch) -> dict:
    """Our step when the teacher's top-K log-probs come from a cache (``teacher.logits_cache``): the same student
    update without a teacher forward. The cached values are the real teacher's top-K on these tokens (computed here
    once with the cache writer's own function, untimed, as the one-time cache pass would)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from minitron_jax.train import teacher_cache
    from minitron_jax.train.state import init_train_state
    from minitron_jax.train.step import build_train_step

    k = args.cached_teacher
    ids_dtype = teacher_cache.ids_dtype(teacher_cfg.vocab_size)
    top = teacher_cache.top_k_fn(teacher_cfg, top_k=k, dtype=jnp.float32, chunk_size=1024, ids=ids_dtype,
                                 logprobs=np.dtype(np.float16))
    ids, logprobs, rest = jax.device_get(top(teacher, batch["tokens"], batch["segment_ids"], batch["positions"]))
    rc = rc.replace(teacher=dataclasses.replace(rc.teacher, logits_cache="/nonexistent/synthetic"))
    ts = build_train_step(rc, mesh, student_cfg, None)  # the path is never opened: no abstract batch is built
    cached = dict(batch, teacher_ids=ids, teacher_logprobs=logprobs, teacher_rest=rest)
    cached = jax.device_put(cached, ts.batch_shardings)
    box = {"state": init_train_state(rc, mesh, student_cfg, None, student)}

    def step():
        box["state"], metrics = ts.step(box["state"], {}, cached)
        box["loss"] = float(jax.block_until_ready(metrics)["loss"])

    return {"kd_step_cached_s": median_seconds(step, args.steps), "kd_loss_cached_last": box["loss"]}


def torch_models(teacher_cfg, teacher_params, student_cfg):
    """(teacher in eval mode with our weights, randomly initialized student in train mode) as transformers
    models in fp32; seeded, so every tool that times torch gets the same student."""
    import torch
    import transformers

    from minitron_jax.convert.hf import save_hf

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(Path(tmp) / "teacher", teacher_cfg, teacher_params)
        teacher = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "teacher", dtype=torch.float32).eval()
    hf_cfg = teacher.config.to_dict()
    hf_cfg.update(num_hidden_layers=student_cfg.num_layers, intermediate_size=student_cfg.intermediate_size)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).to(torch.float32).train()
    return teacher, student


def theirs(args, teacher_cfg, teacher_params, student_cfg, tokens) -> dict:
    import torch
    import torch.nn.functional as F


    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student = torch_models(teacher_cfg, teacher_params, student_cfg)
    tt = torch.as_tensor(tokens, dtype=torch.long)
    out = {"threads": torch.get_num_threads(), "attn": getattr(teacher.config, "_attn_implementation", None)}

    if not args.skip_forward:
        def forward():
            with torch.no_grad():
                return teacher(tt).logits

        out["forward_s"] = median_seconds(forward, args.steps)

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    box = {}

    def step():
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(tt).logits.float(), dim=-1)
        s_logp = F.log_softmax(student(tt).logits.float(), dim=-1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        box["loss"] = loss.item()

    out["kd_step_s"] = median_seconds(step, args.steps)
    out["kd_loss_last"] = box["loss"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=at_least(1), default=5, help="timed calls per side (median), after 2 warm-up calls")
    p.add_argument("--batch", type=at_least(1), default=4)
    p.add_argument("--seq-len", type=at_least(2), default=256)
    p.add_argument("--skip-forward", action="store_true", help="time the KD step only")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--cached-teacher", type=at_least(1), default=None, metavar="K",
                   help="also time our step from a top-K teacher cache (no teacher forward) against torch's step")
    args = p.parse_args(argv)
    require_torch("bench_vs_torch.py")

    import jax
    import numpy as np

    from minitron_jax.convert import load_model
    from minitron_jax.data.assets import smollm2_gguf

    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    loaded = load_model(smollm2_gguf(), with_tokenizer=False)
    teacher_cfg = loaded.config
    teacher_params = jax.tree.map(lambda a: np.asarray(a, np.float32), loaded.params)
    student_cfg = teacher_cfg.replace(num_layers=20, intermediate_size=1024)
    tokens = np.random.default_rng(0).integers(0, teacher_cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    n_tokens = args.batch * args.seq_len

    log("timing ours (JAX)")
    o = ours(args, teacher_cfg, teacher_params, student_cfg, tokens)
    log(f"  {o}")
    log("timing torch")
    t = theirs(args, teacher_cfg, teacher_params, student_cfg, tokens)
    log(f"  {t}")

    def compare(key, torch_key=None):
        ours_tok_s, torch_tok_s = n_tokens / o[key], n_tokens / t[torch_key or key]
        return {"ours_tok_s": round(ours_tok_s, 1), "torch_tok_s": round(torch_tok_s, 1),
                "ratio": round(ours_tok_s / torch_tok_s, 3)}

    import torch
    import transformers

    report = {
        "setup": {"dtype": "float32", "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                  "warmup": WARMUP, "teacher": teacher_cfg.describe(), "student": student_cfg.describe(),
                  "loss": "forward_kl T=1 alpha=1", "optim": "adamw lr 1e-4 wd 0.1 b2 0.95",
                  "cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__,
                  "jax_device": str(jax.devices()[0]), "torch": torch.__version__,
                  "transformers": transformers.__version__, "torch_threads": t["threads"], "torch_attn": t["attn"],
                  "kd_loss_last": {"ours": round(o["kd_loss_last"], 4), "torch": round(t["kd_loss_last"], 4)}},
        "forward": None if args.skip_forward else compare("forward_s"),
        "kd_step": compare("kd_step_s"),
    }
    if args.cached_teacher:
        # Not the same work: torch runs its teacher every step, ours read its top-K from the one-time cache pass.
        report["kd_step_cached_vs_torch_online"] = {**compare("kd_step_cached_s", "kd_step_s"),
                                                    "top_k": args.cached_teacher,
                                                    "kd_loss_last": round(o["kd_loss_cached_last"], 4)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
