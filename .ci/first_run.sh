#!/usr/bin/env bash
# The README's main command, run the way a newcomer runs it: a fresh venv, `pip install -e .` only (no test extra,
# so no torch), an empty asset cache, the demo config at a small budget through key=value overrides. Fails if any
# step fails, so "the first command works" cannot go stale (it once crashed without torch and nobody noticed,
# because every test machine had torch from the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d "${TMPDIR:-/tmp}/minitron_first_run.XXXXXX")"
trap 'rm -rf "$work"' EXIT

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$work/venv/bin/python" -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/python" -c "import minitron_jax" || { echo "first run: pip install -e . failed"; exit 1; }
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "first run: torch is importable in the fresh venv, so this check would prove nothing"; exit 1
fi

export MINITRON_JAX_CACHE="$work/cache"   # fetch the assets as a new user does
start=$(date +%s)
"$work/venv/bin/python" -m minitron_jax.pipeline --config configs/smollm2_135m_demo.yaml \
  run_dir="$work/run" distill.steps=3 distill.warmup_steps=1 distill.eval_every=3 distill.checkpoint_every=3 distill.val_batches=1 \
  importance.calib_samples=4 importance.depth_samples=1 eval.max_tokens=512 eval.mmlu_limit=4 \
  sft.steps=2 sft.warmup_steps=1 sft.checkpoint_every=2 sft.eval_records=4 sft.max_new_tokens=4
test -s "$work/run/results.json" || { echo "first run: no results.json"; exit 1; }
test -f "$work/run/students/width/hf/config.json" -o -n "$(find "$work/run" -name config.json -path '*hf*' | head -1)" \
  || { echo "first run: no exported student"; exit 1; }
test -f "$work/run/sft/width/hf/config.json" || { echo "first run: no chat-fine-tuned student (sft stage)"; exit 1; }
# A finished trainer stage removes its checkpoints (about 1 GB each for the demo's students; keep_checkpoints): a
# full /tmp on the sft stage's checkpoint once failed this very check.
left="$(find "$work/run" -type d -name checkpoints | head -3)"
test -z "$left" || { echo "first run: finished trainer stages left checkpoints behind: $left"; exit 1; }
echo "first run: the README's main command worked in a fresh venv without torch ($(( $(date +%s) - start )) s;" \
  "run directory $(du -sh "$work/run" | cut -f1), venv $(du -sh "$work/venv" | cut -f1))"
