#!/usr/bin/env bash
# Every accelerator benchmark (issues 7 and 8) in one command on one GPU, inside a time budget:
#
#     OUT=gpu_results BUDGET=540 bash benchmarks/run_gpu_all.sh
#
# Installs nothing (the GPU machines have jax, flax, optax, numpy, torch and transformers; the benchmarks import
# nothing else). Each benchmark runs under its own time limit (at most what is left of BUDGET seconds), writes its
# markdown report and full log under $OUT, and the tail of each log is printed as it ends, so a benchmark cut off by
# its limit still leaves the rows it printed. STEPS picks and orders them (default: soft_embed decode train;
# train_scale: fixed-row against token-budget micro-batches on RL-like lengths; rollout_scale: the chunked
# rollout schedule against the static one on RL-like lengths;
# decode_flags reruns batch-1 decode under DECODE_XLA_FLAGS; e2e runs benchmarks/gpu_e2e.sh).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
start=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  $PY -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1
} | tee "$OUT/machine.txt"

bench() {  # name limit_s script args...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - start)))
  local t=$(( limit < left ? limit : left ))
  if [ "$t" -lt 30 ]; then echo "== $name skipped: ${left}s of the budget left"; return; fi
  echo "== $name (limit ${t}s)"
  local t0=$(date +%s)
  timeout -k 10 "$t" $PY "$@" --out "$OUT/$name.md" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t0 ))s"
  grep -v "^#   " "$OUT/$name.log" | tail -n 40
}

for step in ${STEPS:-soft_embed decode train}; do
  case $step in
    soft_embed) bench soft_embed "${SOFT_EMBED_S:-150}" benchmarks/bench_soft_embed.py --sweep-budget-s "${SWEEP_S:-60}" ;;
    decode) bench decode "${DECODE_S:-240}" benchmarks/bench_gpu_decode.py --reps "${DECODE_REPS:-2}" ;;
    train) bench train "${TRAIN_S:-600}" benchmarks/bench_gpu_train.py --steps "${TRAIN_STEPS:-3}" ;;
    train_scale) bench train_scale "${TRAIN_SCALE_S:-480}" benchmarks/bench_train_scale.py --gpu ;;
    rollout_scale) bench rollout_scale "${ROLLOUT_SCALE_S:-480}" benchmarks/bench_rollout_scale.py --gpu ;;
    e2e)  # `softgrpo train` end to end on a random SmolLM2-shaped model (needs benchmarks/gpu_e2e_prep.py's .gpu/)
      left=$((BUDGET - ($(date +%s) - start))); t=$(( ${E2E_S:-240} < left ? ${E2E_S:-240} : left ))
      echo "== e2e (limit ${t}s)"; t0=$(date +%s)
      timeout -k 10 "$t" bash benchmarks/gpu_e2e.sh > "$OUT/e2e.log" 2>&1
      echo "== e2e rc=$? in $(( $(date +%s) - t0 ))s"; grep -E "^(==|step|[0-9]+ \|)|rror" "$OUT/e2e.log" | tail -n 20 ;;
    decode_flags)  # batch-1 discrete decode again under extra XLA flags (e.g. command buffers for loops)
      XLA_FLAGS="${DECODE_XLA_FLAGS:-}" bench decode_flags "${DECODE_FLAGS_S:-120}" benchmarks/bench_gpu_decode.py \
        --reps 2 --batches 1 --modes discrete --no-torch ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "== total $(( $(date +%s) - start ))s"
