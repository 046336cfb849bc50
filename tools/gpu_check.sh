#!/usr/bin/env bash
# Everything in this repo that needs an accelerator, as one script for a lent GPU (one H100/H200), in <= 8 minutes.
#
#   bash tools/gpu_check.sh [OUT_DIR]          # OUT_DIR default: $OUT (the device tool's folder) or /tmp/gpu_check
#   (exit 2 at once where jax sees no GPU/TPU; GPU_CHECK_SMOKE=1 runs the same plumbing at toy sizes on a CPU)
#
# From a session with the device tool (it copies the working tree there; nothing is fetched on that machine, so
# everything below uses random weights of named shapes, no asset):
#
#   run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash tools/gpu_check.sh",
#       carry=[".whl"], timeout_s=570)
#   where .whl (git-ignored) holds the py3 wheels of the two dependencies the device image lacks, downloaded here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0 tensorboardX==2.6.5
#   then: cp <files_at>/gpu_check.md docs/gpu_results.md  (and the JSON files beside it if wanted), commit.
#
# What it measures, each piece under its own timeout so one slow piece cannot eat the others' time:
#   1. forward, bf16, ours (jit) vs transformers + torch on the same GPU, Llama-3.2-1B shape      (bench_forward.py)
#      then each attention implementation on packed rows: no leak between documents, error against float32, and
#      forward + backward time at 4 x 4096                                                      (attention_check.py)
#   2. the distillation train step, bf16, 1B-class teacher -> width-pruned student, FSDP over the local devices:
#      tokens/s, TFLOP/s and MFU, online teacher; and the same student trained from a cached top-k teacher
#      (no teacher forward), when the build has one; then the online step again with remat none and remat dots
#                                                                                                 (bench_distill.py)
#   3. the Llama-3.1-8B -> 4B width recipe's train step on 1 device compiled by the real GPU compiler beside the
#      same step compiled for a fake CPU device (the dry-run planner's basis): per-device bytes, compile time
#                                                                                    (distill --dry-run --on-device)
# Results, three files (the device tool brings back at most 8): OUT_DIR/gpu_check.json (every piece's JSON and exit
# code), OUT_DIR/gpu_check.md (the tables, made by tools/gpu_report.py), OUT_DIR/gpu_check.log (all stderr).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PIECES=$(mktemp -d)
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX must not grab 75% of the GPU up front: torch runs in the same process in piece 1.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
START=$(date +%s)

piece() {  # piece NAME SECONDS CMD...: run CMD with a timeout, its stdout into NAME.json, stderr into the log
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s, at $(( $(date +%s) - START ))s)" | tee -a "$LOG"
    timeout --kill-after=10 "$seconds" "$@" >"$PIECES/$name.json" 2>>"$LOG"
    local rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - START ))s" | tee -a "$LOG"
    echo $rc >"$PIECES/$name.rc"  # a dry run that does not fit exits 4 with its plan on stdout: keep both
    # Each piece's JSON also goes into the log under OUT_DIR at once: if the whole command is cut off before the
    # report, the finished pieces still come back.
    { echo "== $name json:"; cat "$PIECES/$name.json"; } >>"$LOG"
}

{
    date -u
    nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    $PY -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, \
torch.cuda.is_available())" 2>&1
} | tee -a "$LOG"

# Without an accelerator the full-size pieces only time out or fail (about 5 minutes for nothing): say so and stop.
if [ "${GPU_CHECK_SMOKE:-0}" != 1 ]; then
    BACKEND=$($PY -c "import jax; print(jax.default_backend())" 2>>"$LOG")
    if [ "$BACKEND" != gpu ] && [ "$BACKEND" != tpu ]; then
        echo "error: tools/gpu_check.sh: jax sees no accelerator (default backend: ${BACKEND:-none, see $LOG}); run it \
on the lent GPU machine, or GPU_CHECK_SMOKE=1 for the same plumbing at toy sizes on this CPU" | tee -a "$LOG" >&2
        exit 2
    fi
fi

# GPU_CHECK_SMOKE=1: the same plumbing at toy sizes on a CPU (what the lead checks before spending device time).
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    FWD=(--random-config tests/data/tiny_llama_config.json --dtype float32 --batch 2 --seq-len 64 --repeats 2)
    DIST=(--batch 1 --seq-len 64 --steps 1 --no-memory --json)
    ATT=(--dtype float32 --batch 2 --seq-len 64 --heads 4 --kv-heads 2 --head-dim 16 --time-batch 1 --time-seq-len 256)
    PLAN_SEQ=256
else
    FWD=(--random-config configs/models/Llama-3.2-1B.json --dtype bfloat16 --attention fused --batch 8 --seq-len 2048 --repeats 5)
    DIST=(--gpu --batch 4 --seq-len 4096 --attention fused --steps 3 --no-memory --json)
    ATT=(--dtype bfloat16)  # packed rows 2 x 512 checked; forward + backward timed at 4 x 4096, 1B heads (32/8/64)
    PLAN_SEQ=4096
fi
piece forward_bf16 80 $PY tools/bench_forward.py "${FWD[@]}" --json
# cuDNN's kernel on rows that pack several documents (the distill piece feeds it single-document rows): no document
# may see another, and each implementation's error against float32; then attention alone, forward + backward.
piece attention 40 $PY tools/attention_check.py "${ATT[@]}" --json
# --profile: one more online step under the jax profiler, summed by kernel (tools/trace_summary.py): where the
# step's time goes, the question after the MFU number.
piece distill 175 $PY tools/bench_distill.py "${DIST[@]}" --cached-teacher 64 --profile
# With fused attention no layer keeps [T, T] scores, so lighter remat may fit at 4 x 4096 (einsum with remat none
# needed 123 GiB at 2 x 4096): remat full recomputes each layer's forward (8·N instead of 6·N FLOPs for the student),
# the first thing between the measured 34% MFU and the goal.
piece distill_remat_none 60 $PY tools/bench_distill.py "${DIST[@]}" --remat none
piece distill_remat_dots 60 $PY tools/bench_distill.py "${DIST[@]}" --remat dots
# The 8B width recipe on ONE device: 8 rows of 4096 tokens per step in 8 micro-batches (the recipe's 8192-token rows
# do not fit one H200 with the student's fp32 master weights and Adam moments: 137 GB by the CPU-compiled plan).
PLAN_ARGS=(--config configs/distill_llama31_8b_to_4b_width.yaml --dry-run --devices 1 --accelerator h200 --no-verify
           mesh.data=1 mesh.fsdp=1 mesh.tensor=1 data.seq_len=$PLAN_SEQ data.batch_size=8 train.grad_accum=8)
piece plan8b_gpu 45 $PY -m minitron_jax.distill "${PLAN_ARGS[@]}" --on-device --json
piece plan8b_cpu 20 env JAX_PLATFORMS=cpu $PY -m minitron_jax.distill "${PLAN_ARGS[@]}" --json  # 6 s on 2 cores

$PY tools/gpu_report.py "$PIECES" --json "$OUT_DIR/gpu_check.json" >"$OUT_DIR/gpu_check.md" 2>>"$LOG" \
    || echo "gpu_report failed" | tee -a "$LOG"
cat "$OUT_DIR/gpu_check.md"
echo "total $(( $(date +%s) - START ))s" | tee -a "$LOG"
