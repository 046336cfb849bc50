"""What a teacher-logits cache keeps and what its storage dtype costs (docs/distillation.md, "The offline teacher").

Usage (after writing caches with ``python -m minitron_jax.teacher_logits`` over the same run config)::

    python tools/measure_teacher_cache.py --config RUN.yaml [overrides ...] --caches DIR [DIR ...] [--rows 16]
        [--noise 1.0] [--json OUT.json]

For each cache: bytes per token on disk, and the mean top-K mass ``Σ_topk p_t`` over the loss tokens of all its
training rows. On the first ``--rows`` training rows it also runs the teacher (fp32), takes a stand-in student
(the teacher's logits plus Gaussian noise of std ``--noise``, fixed seed) and reports the mean sparse forward KL
from each cache next to the dense forward KL, and the largest log-prob error of each cache against the float32
one of the same K (when one is given): the effect of K and of the stored dtype on the loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.model import forward
from minitron_jax.train import losses
from minitron_jax.train.config import load_config
from minitron_jax.train.inputs import build_datasets
from minitron_jax.train.models import load_teacher
from minitron_jax.train.teacher_cache import TeacherCache, files_digest, rows_digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--caches", nargs="+", required=True)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    rc = load_config(args.config, args.overrides)
    teacher = load_teacher(rc)
    train, _ = build_datasets(rc, teacher.tokenizer)
    t0 = time.perf_counter()
    rows_digest(train)
    t1 = time.perf_counter()
    files_digest(teacher.source)
    t2 = time.perf_counter()
    out = {"train_rows": len(train), "seq_len": rc.data.seq_len, "rows_digest_seconds": round(t1 - t0, 3),
           "weights_digest_seconds": round(t2 - t1, 3), "caches": {}}

    rows = train.rows(np.arange(min(args.rows, len(train))))
    mask = rows["loss_mask"].astype(bool)
    logits = forward(teacher.config, jax.tree.map(jnp.asarray, teacher.params), jnp.asarray(rows["tokens"]),
                     positions=jnp.asarray(rows["positions"]), segment_ids=jnp.asarray(rows["segment_ids"]))
    student = logits + args.noise * jax.random.normal(jax.random.key(0), logits.shape)
    dense = float(np.asarray(losses.forward_kl(student, logits))[mask].mean())
    out["dense_forward_kl"] = dense
    caches = [TeacherCache(p) for p in args.caches]
    # The float32 cache of the largest K is the reference: its first k columns are the top-k (sorted), and the rest
    # of the top-k is its rest plus the mass of the columns after k (in float64).
    ref = max((c for c in caches if c.logprobs_dtype == np.float32), key=lambda c: c.top_k, default=None)
    ref_rows = ref.split("train").rows(np.arange(len(rows["tokens"]))) if ref is not None else None

    def reference(k):
        lp = ref_rows["teacher_logprobs"].astype(np.float64)
        rest = np.logaddexp(ref_rows["teacher_rest"].astype(np.float64),
                            np.log(np.exp(lp[..., k:]).sum(-1)) if k < ref.top_k else -np.inf)
        return ref_rows["teacher_ids"][..., :k], lp[..., :k], rest
    for c in caches:
        split = c.split("train")
        all_rows = split.rows(np.arange(len(split)))
        full_mask = train.rows(np.arange(len(split)))["loss_mask"].astype(bool)
        kept = np.exp(all_rows["teacher_logprobs"].astype(np.float64)).sum(-1)[full_mask]
        shards = [sh for s in c.index["splits"].values() for sh in s["shards"]]
        files = [f for sh in shards for f in (c.path / sh["name"]).glob("*.npy")]
        tokens = sum((sh["stop"] - sh["start"]) * c.seq_len for sh in shards)
        sub = split.rows(np.arange(len(rows["tokens"])))
        kl = losses.sparse_forward_kl(student, *(jnp.asarray(sub[k]) for k in ("teacher_ids", "teacher_logprobs",
                                                                                 "teacher_rest")))
        entry = {"top_k": c.top_k, "dtype": c.index["logprobs_dtype"],
                 "bytes_per_token_on_disk": sum(f.stat().st_size for f in files) / tokens,
                 "mean_top_k_mass": float(kept.mean()), "min_top_k_mass": float(kept.min()),
                 "sparse_kl": float(np.asarray(kl)[mask].mean())}
        entry["sparse_kl_vs_dense"] = entry["sparse_kl"] / dense - 1
        if ref is not None and c.top_k <= ref.top_k:
            ids, lp, rest = reference(c.top_k)
            entry["ids_equal_float32_reference"] = bool((ids[mask] == sub["teacher_ids"][mask]).all())
            err = np.abs(sub["teacher_logprobs"].astype(np.float64) - lp)
            entry["max_logprob_error_vs_float32"] = float(err[mask].max())
            kl32 = losses.sparse_forward_kl(student, jnp.asarray(ids), jnp.asarray(lp, jnp.float32),
                                            jnp.asarray(rest, jnp.float32))
            entry["sparse_kl_float32_same_k"] = float(np.asarray(kl32)[mask].mean())
            entry["sparse_kl_dtype_effect"] = entry["sparse_kl"] / entry["sparse_kl_float32_same_k"] - 1
        out["caches"][str(c.path)] = entry
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
