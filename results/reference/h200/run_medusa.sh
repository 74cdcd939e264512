#!/usr/bin/env bash
# The Medusa reference runs (issue 7) and the Triton warp-specialization
# experiment (issue 3), as executed on one H200 in one call of at most 10
# minutes. Each step gets what is left of a 570 s budget and is stopped with
# SIGINT, so its finished rows stay.
# Usage, from the repo root: bash results/reference/h200/run_medusa.sh OUT_DIR
set -u
OUT=${1:?usage: run_medusa.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} GENBENCH_CACHE=${GENBENCH_CACHE:-/tmp/genbench-cache}
deadline=$((SECONDS + ${BUDGET_S:-570}))
budget() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log() { echo "== $(date -u +%H:%M:%S) $*"; }
medusa=(python3 -m bench medusa --device cuda --model medium --heads 5 --tree greedy --prompts 16 --max-new-tokens 512)

# bf16, every method, CUDA graphs; trains the base model, heads and draft model from an empty cache.
log medusa-bf16
timeout -s INT "$(budget 280)" "${medusa[@]}" --dtype bf16 --out "$OUT/medusa" 2>&1 | tee "$OUT/medusa.txt"

# Greedy identity in fp32, every method.
log medusa-fp32
timeout -s INT "$(budget 80)" "${medusa[@]}" --dtype fp32 --out "$OUT/medusa-fp32" 2>&1 | tee "$OUT/medusa-fp32.txt"

# torch.compile (inductor) before capture, vanilla and Medusa.
log medusa-inductor
timeout -s INT "$(budget 100)" "${medusa[@]}" --dtype bf16 --compile inductor --method vanilla --method medusa \
  --out "$OUT/medusa-inductor" 2>&1 | tee "$OUT/medusa-inductor.txt"

# Where a step's time goes (random weights): forward by tokens, cache length and SDPA backend; step pieces.
log step-costs
timeout -s INT "$(budget 70)" python3 results/reference/h200/medusa_dev/step_costs.py "$OUT/steps" 2>&1 \
  | tee "$OUT/steps.txt"

# Issue 3: Triton's automatic warp specialization of the forward's key loop, one process per variant
# (a compiler crash ends only its own process).
for variant in "128x64 w8 s3" "128x64 w8 s2 ws" "128x64 w8 s3 ws" "128x64 w4 s2 ws" "128x128 w8 s2 ws"; do
  log "flash $variant"
  timeout -s INT "$(budget 40)" python3 -m impls.attention.tune_flash --experiment --variant "$variant" \
    --out "$OUT/flash-ws/${variant// /_}" 2>&1 | grep -v "^torch\|^ceilings" | tee -a "$OUT/flash-ws.txt"
done
log done
