"""How good a linear sub-block's least-squares start is, on a search's stored parent activations.

    python tools/linear_init_probe.py --acts RUN/acts/calib [--parent asset:smollm2_gguf] [--fit 48]

Per layer and half (attention: h[i] → mid[i]; FFN: mid[i] → h[i+1]) it fits ``blockwise.lstsq_linear`` on the
first ``--fit`` calibration windows and prints the normalized MSE (Σ‖f(x) − y‖² / Σ‖y − x‖², so removal = 1) on
the remaining windows, then the median and range over layers as one JSON line. Numbers: docs/puzzle.md.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", required=True, help="a search's acts/calib directory (compress.puzzle ActivationStore)")
    ap.add_argument("--parent", default="asset:smollm2_gguf", help="the parent the activations came from")
    ap.add_argument("--fit", type=int, default=48, help="calibration windows to fit on (the rest are held out)")
    args = ap.parse_args(argv)

    from minitron_jax.compress.puzzle.blockwise import ActivationStore, lstsq_linear, run_base
    from minitron_jax.convert import load_model
    from minitron_jax.model import rms_norm
    from minitron_jax.train.config import resolve_path

    m = load_model(resolve_path(args.parent), with_tokenizer=False)
    cfg, params = m.config, m.params
    store = ActivationStore(args.acts)
    base = run_base(cfg)
    res: dict[str, list[float]] = {"attention": [], "ffn": []}
    for i in range(cfg.num_layers):
        for half in res:
            x, y = (store.h(i), store.mid(i)) if half == "attention" else (store.mid(i), store.h(i + 1))
            if not 0 < args.fit < x.shape[0]:
                raise SystemExit(f"--fit must be between 1 and {x.shape[0] - 1} (the store has {x.shape[0]} windows)")
            norm = np.asarray(params["layers"]["attn_norm" if half == "attention" else "mlp_norm"][i])
            w = lstsq_linear(base, norm, x[:args.fit], y[:args.fit])
            xe, ye = np.asarray(x[args.fit:], np.float32), np.asarray(y[args.fit:], np.float32)
            a = np.asarray(rms_norm(jnp.asarray(xe), jnp.asarray(norm), cfg.rms_norm_eps), np.float64)
            res[half].append(float(np.sum((xe + a @ w - ye) ** 2) / np.sum((ye - xe) ** 2)))
    print(json.dumps({h: {"median": float(np.median(v)), "min": min(v), "max": max(v),
                          "per_layer": [round(t, 4) for t in v]} for h, v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
