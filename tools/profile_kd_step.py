"""Where the KD train step's time goes: each piece of ``tools/bench_vs_torch.py``'s step, jitted and timed alone.

Same setup as ``bench_vs_torch.py`` (SmolLM2-135M teacher fp32, student L20 F1024 random init, 4 × 256 random
tokens, forward KL T=1, AdamW, 1×1×1 mesh). Each piece is its own ``jax.jit``, synchronised with
``block_until_ready``; ``--warmup`` untimed calls (the first compiles), then the median of ``--steps`` calls:

* ``teacher_hidden`` / ``student_hidden``: ``model.hidden_states`` (final norm output, no logits);
* ``loss_fwd`` / ``loss_vjp``: ``chunked_logit_loss`` alone from fixed hidden states and heads (tied: ``embed.T``),
  forward only and ``value_and_grad`` w.r.t. the student hidden states and embedding;
* ``grad_fn``: ``train.step.make_grad_fn`` (teacher fwd + student fwd/bwd + loss), jitted without the optimizer;
* ``opt_update``: ``optimizer.update`` + ``optax.apply_updates`` on the student params and fixed grads;
* ``train_step``: the real ``build_train_step`` step (state donated), plus its ``cost_analysis()``;
* variants of ``grad_fn``: ``loss.naive``, ``loss.chunk_size`` 256, ``train.remat`` policies;
* ``embed_gather_grad``: ``jax.grad`` of a tiny loss through ``embed[tokens]`` (the scatter-add backward);
* torch: teacher ``no_grad`` forward (hidden / logits), student fwd+KL+bwd from fixed teacher logits, AdamW step.

    python tools/profile_kd_step.py                 # all of it, one JSON line on stdout
    python tools/profile_kd_step.py --no-variants --no-torch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import at_least, require_torch  # noqa: E402
from bench_vs_torch import cpu_name, median_seconds, run_config, torch_models  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ours(args, teacher_cfg, teacher_params, student_cfg, tokens, res: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from minitron_jax import model as M
    from minitron_jax.sharding import make_mesh
    from minitron_jax.train import chunked_loss
    from minitron_jax.train.state import init_train_state, make_run_optimizer, place_teacher
    from minitron_jax.train.step import build_train_step, make_grad_fn

    def t(name, fn):
        res[name] = round(median_seconds(lambda: jax.block_until_ready(fn()), args.steps, args.warmup) * 1000, 1)
        log(f"  {name}: {res[name]} ms")

    rc = run_config(args)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    teacher = place_teacher(rc, mesh, teacher_cfg, teacher_params)
    student = jax.tree.map(np.asarray, M.init_params(student_cfg, jax.random.key(1)))
    shape = tokens.shape
    batch_np = {"tokens": tokens, "segment_ids": np.ones(shape), "loss_mask": np.ones(shape),
                "positions": np.broadcast_to(np.arange(shape[1]), shape)}
    ts = build_train_step(rc, mesh, student_cfg, teacher_cfg)
    batch = jax.device_put({k: np.asarray(v, np.int32) for k, v in batch_np.items()}, ts.batch_shardings)
    params = init_train_state(rc, mesh, student_cfg, teacher_cfg, student).params  # never donated

    def hid(cfg):
        return jax.jit(lambda p, b: M.hidden_states(cfg, p, b["tokens"], positions=b["positions"],
                                                    segment_ids=b["segment_ids"], dtype=jnp.float32)[0])

    t_hid_fn, s_hid_fn = hid(teacher_cfg), hid(student_cfg)
    t("teacher_hidden", lambda: t_hid_fn(teacher, batch))
    t("student_hidden", lambda: s_hid_fn(params["model"], batch))
    t_h, s_h = t_hid_fn(teacher, batch), s_hid_fn(params["model"], batch)

    targets = jnp.concatenate([batch["tokens"][:, 1:], jnp.zeros_like(batch["tokens"][:, :1])], axis=1)
    weights = batch["loss_mask"].astype(jnp.float32)

    def kd(s_hidden, s_embed, t_embed, chunk_size=rc.loss.chunk_size):
        return chunked_loss.chunked_logit_loss(s_hidden, s_embed.T, t_h, t_embed.T, targets, weights,
                                               kind="forward_kl", temperature=1.0, alpha=1.0,
                                               chunk_size=chunk_size, compute_dtype=jnp.float32)[0]

    s_embed, t_embed = params["model"]["embed"], teacher["embed"]
    loss_fwd = jax.jit(kd)
    loss_vjp = jax.jit(jax.value_and_grad(kd, argnums=(0, 1)))
    t("loss_fwd", lambda: loss_fwd(s_h, s_embed, t_embed))
    t("loss_vjp", lambda: loss_vjp(s_h, s_embed, t_embed))
    loss_vjp256 = jax.jit(jax.value_and_grad(lambda a, b, c: kd(a, b, c, 256), argnums=(0, 1)))
    t("loss_vjp_chunk256", lambda: loss_vjp256(s_h, s_embed, t_embed))

    # Head matmuls of the loss alone, as a roofline for it: 2 forward [N,D]x[D,V] + 2 backward (dh, dW).
    heads = jax.jit(lambda h, e, te: (h.reshape(-1, h.shape[-1]) @ e.T, t_h.reshape(-1, h.shape[-1]) @ te.T))
    t("head_matmuls_fwd_only", lambda: heads(s_h, s_embed, t_embed))

    grad_fn = jax.jit(make_grad_fn(rc, mesh, student_cfg, teacher_cfg))
    t("grad_fn", lambda: grad_fn(params, teacher, batch))
    grads = grad_fn(params, teacher, batch)[0]

    optimizer = make_run_optimizer(rc)
    opt_state = jax.jit(optimizer.init)(params)

    @jax.jit
    def opt_update(g, s, p):
        updates, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s

    t("opt_update", lambda: opt_update(grads, opt_state, params))

    # The tied embedding's gather backward: scatter-add of [B*T, D] rows into [V, D].
    r = jax.random.normal(jax.random.key(2), (*shape, s_embed.shape[1]))
    gather_grad = jax.jit(jax.grad(lambda e, tok: jnp.sum(e[tok] * r)))
    t("embed_gather_grad", lambda: gather_grad(s_embed, batch["tokens"]))
    onehot_grad = jax.jit(jax.grad(lambda e, tok: jnp.sum(
        jnp.einsum("btv,vd->btd", jax.nn.one_hot(tok, e.shape[0], dtype=e.dtype), e) * r)))
    t("embed_onehot_matmul_grad", lambda: onehot_grad(s_embed, batch["tokens"]))

    box = {"state": init_train_state(rc, mesh, student_cfg, teacher_cfg, student)}

    def step():
        box["state"], metrics = ts.step(box["state"], teacher, batch)
        return metrics

    t("train_step", step)
    try:
        cost = ts.step.lower(box["state"], teacher, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        res["train_step_cost"] = {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals")
                                  if k in cost}
        log(f"  cost_analysis: {res['train_step_cost']}")
    except Exception as e:  # noqa: BLE001 - a report, not a test
        res["train_step_cost"] = repr(e)

    if not args.no_variants:
        variants = {"grad_fn_naive": {"loss": {"naive": True}},
                    "grad_fn_chunk256": {"loss": {"chunk_size": 256}},
                    "grad_fn_remat_dots": {"train": {"remat": "dots"}},
                    "grad_fn_remat_full": {"train": {"remat": "full"}}}
        for name, change in variants.items():
            v_rc = rc
            for section, fields in change.items():
                v_rc = dataclasses.replace(v_rc, **{section: dataclasses.replace(getattr(v_rc, section), **fields)})
            fn = jax.jit(make_grad_fn(v_rc, mesh, student_cfg, teacher_cfg))
            t(name, lambda fn=fn: fn(params, teacher, batch))
            del fn


def theirs(args, teacher_cfg, teacher_params, student_cfg, tokens, res: dict) -> None:
    import torch
    import torch.nn.functional as F

    def t(name, fn):
        res[name] = round(median_seconds(fn, args.steps, args.warmup) * 1000, 1)
        log(f"  torch {name}: {res[name]} ms")

    teacher, student = torch_models(teacher_cfg, teacher_params, student_cfg)
    tt = torch.as_tensor(tokens, dtype=torch.long)
    res["threads"] = torch.get_num_threads()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    t("teacher_hidden", no_grad(lambda: teacher.model(tt).last_hidden_state))
    t("teacher_logits_logsoftmax", no_grad(lambda: F.log_softmax(teacher(tt).logits.float(), dim=-1)))
    t("student_hidden", no_grad(lambda: student.model(tt).last_hidden_state))
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(tt).logits.float(), dim=-1)

    def student_fwd_bwd():
        s_logp = F.log_softmax(student(tt).logits.float(), dim=-1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        loss.backward()
        student.zero_grad(set_to_none=False)

    t("student_fwd_kl_bwd", student_fwd_bwd)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    t("adamw_step", opt.step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=at_least(1), default=3, help="timed calls per piece (median)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed calls first (the first compiles)")
    p.add_argument("--batch", type=at_least(1), default=4)
    p.add_argument("--seq-len", type=at_least(2), default=256)
    p.add_argument("--no-variants", action="store_true", help="skip naive / chunk 256 / remat variants of grad_fn")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    if not args.no_torch:
        require_torch("profile_kd_step.py", " (or --no-torch: ours only)")

    import jax
    import numpy as np

    from minitron_jax.convert import load_model
    from minitron_jax.data.assets import smollm2_gguf

    loaded = load_model(smollm2_gguf(), with_tokenizer=False)
    teacher_cfg = loaded.config
    teacher_params = jax.tree.map(lambda a: np.asarray(a, np.float32), loaded.params)
    student_cfg = teacher_cfg.replace(num_layers=20, intermediate_size=1024)
    tokens = np.random.default_rng(0).integers(0, teacher_cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)

    report = {"setup": {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                        "cpu": cpu_name(), "jax": jax.__version__},
              "ours_ms": {}, "torch_ms": {}}
    log("ours (JAX)")
    ours(args, teacher_cfg, teacher_params, student_cfg, tokens, report["ours_ms"])
    if not args.no_torch:
        log("torch")
        theirs(args, teacher_cfg, teacher_params, student_cfg, tokens, report["torch_ms"])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
