"""An exported HF directory in transformers vs our forward: the largest logit difference on one sentence.

    python tools/hf_vs_ours.py DIR [DIR ...] [--text "..."]

For each directory (a Llama or a DeciLM export; DeciLM loads through its shipped modeling file,
``trust_remote_code=True``) it prints one JSON line: tokens, the largest absolute logit difference between
transformers (torch, float32) and ``arch.forward`` (JAX, float32), the largest logit, and the share of positions
whose argmax agrees. Numbers: docs/puzzle.md.
"""

from __future__ import annotations

import argparse
import json

TEXT = ("The history of the Roman Empire spans many centuries, from the founding of the city to the fall of "
        "Constantinople in 1453.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--text", default=TEXT)
    args = ap.parse_args(argv)
    from bench_forward import require_torch  # tools/ is the script's directory, first on sys.path

    require_torch("hf_vs_ours.py")

    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from minitron_jax import arch
    from minitron_jax.convert import load_model

    for path in args.paths:
        m = load_model(path)
        ids = np.asarray([m.tokenizer(args.text)["input_ids"]], np.int32)
        ours = np.asarray(arch.forward(m.config, m.params, jnp.asarray(ids)), np.float32)
        tm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.float32)
        with torch.no_grad():
            theirs = tm(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
        print(json.dumps({"path": path, "tokens": int(ids.shape[1]),
                          "max_abs_diff": float(np.abs(ours - theirs).max()),
                          "max_abs_logit": float(np.abs(ours).max()),
                          "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
