#!/usr/bin/env bash
# The Medusa reference runs (issue 7), as executed on one H200 in one call of
# at most 10 minutes. Each step gets what is left of a 570 s budget and is stopped with
# SIGINT, so its finished rows stay.
# Usage, from the repo root: bash results/reference/h200/run_medusa.sh OUT_DIR
set -u
OUT=${1:?usage: run_medusa.sh OUT_DIR}
mkdir -p "$OUT/autotune"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} GENBENCH_CACHE=${GENBENCH_CACHE:-/tmp/genbench-cache}
deadline=$((SECONDS + ${BUDGET_S:-570}))
budget() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log() { echo "== $(date -u +%H:%M:%S) $*"; }
medusa=(python3 -m bench medusa --device cuda --model medium --heads 5 --tree greedy --prompts 16 --max-new-tokens 512)

# bf16, every method, CUDA graphs and the Triton step kernels; trains the base
# model, heads and draft model from an empty cache.
log medusa-bf16
timeout -s INT "$(budget 330)" "${medusa[@]}" --dtype bf16 --out "$OUT/medusa" 2>&1 | tee "$OUT/medusa.txt"

# The same models with the step's PyTorch ops instead of the Triton kernels.
log medusa-bf16-torch-ops
timeout -s INT "$(budget 60)" "${medusa[@]}" --dtype bf16 --step-kernels torch --method vanilla --method medusa \
  --out "$OUT/medusa-torch-ops" 2>&1 | tee "$OUT/medusa-torch-ops.txt"

# Greedy identity in fp32, every method.
log medusa-fp32
timeout -s INT "$(budget 90)" "${medusa[@]}" --dtype fp32 --out "$OUT/medusa-fp32" 2>&1 | tee "$OUT/medusa-fp32.txt"

# The step's costs with random weights: Triton step kernels against PyTorch ops, and larger shapes.
log step-costs
timeout -s INT "$(budget 100)" python3 results/reference/h200/medusa_dev/step_costs.py "$OUT/steps" --steps-only \
  --shapes 2048x16,2048x24,4096x8 2>&1 | grep -v -i warn | tee "$OUT/steps.txt"

# Issue 3: the flash kernel's autotuning kept on disk (Triton's cache_results): the
# second run of the same shapes should skip the tuning the first one did.
export TRITON_CACHE_DIR=/tmp/triton-cache-autotune
rm -rf "$TRITON_CACHE_DIR"
for run in 1 2; do
  log "attention-autotune-$run"
  s0=$SECONDS
  timeout -s INT "$(budget 45)" python3 -m bench attention --device cuda --seq 2k --mode fwd --impl tiled \
    --out "$OUT/autotune/run$run" > "$OUT/autotune/run$run.txt" 2>&1
  echo "attention run $run: rc $? wall $((SECONDS - s0)) s" | tee -a "$OUT/autotune/wall.txt"
done
log done
