#!/usr/bin/env bash
# Issue 7 development call on one H200 (and issue 6's commands on the GPU):
# where a decoding step's time goes, then the medusa suite at tree sizes 64,
# 128 and 256 on one trained checkpoint, and the fp32 identity run.
# Usage, from the repo root with PYTHONPATH=.: bash results/reference/h200/medusa_dev/explore.sh OUT_DIR
set -u
OUT=${1:?usage: explore.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GENBENCH_CACHE=${GENBENCH_CACHE:-/tmp/genbench-cache}
deadline=$((SECONDS + ${BUDGET_S:-560}))
budget() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log() { echo "== $(date -u +%H:%M:%S) $*"; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
medusa=(python3 -m bench medusa --device cuda --model medium --heads 5 --tree greedy --prompts 16 --max-new-tokens 512)

log step-costs
timeout -s INT "$(budget 90)" python3 results/reference/h200/medusa_dev/step_costs.py "$OUT/steps" 2>&1 | tee "$OUT/steps.txt"

log medusa-64   # trains the base model, the heads and the draft model into the cache
timeout -s INT "$(budget 300)" "${medusa[@]}" --dtype bf16 --out "$OUT/m64" 2>&1 | tee "$OUT/m64.txt"
for size in 256 128; do
  log "medusa-$size"
  timeout -s INT "$(budget 60)" "${medusa[@]}" --dtype bf16 --tree-size $size --method vanilla --method medusa \
    --out "$OUT/m$size" 2>&1 | tee "$OUT/m$size.txt"
done

log fp32   # greedy identity in fp32, every method
timeout -s INT "$(budget 90)" "${medusa[@]}" --dtype fp32 --tree-size 128 --out "$OUT/fp32" 2>&1 | tee "$OUT/fp32.txt"

log issue-6   # compare, plot, --profile and env on the GPU
{
  python3 -m bench compare "$OUT"/m64/*.csv "$OUT"/m256/*.csv --format md; echo "exit $?"
  python3 -m bench plot "$OUT"/m64/*.csv -o "$OUT/m64.png"; echo "exit $?"
  timeout -s INT "$(budget 60)" python3 -m bench attention --seq 2k --mode fwd --impl sdpa --impl tiled \
    --profile --out "$OUT/attn-profile"; echo "exit $?"
  timeout -s INT "$(budget 40)" python3 -m bench medusa --device cuda --model medium --heads 5 --tree greedy \
    --prompts 2 --max-new-tokens 128 --method vanilla --method medusa --profile --out "$OUT/medusa-profile"; echo "exit $?"
  python3 -m bench env; echo "exit $?"
} 2>&1 | tee "$OUT/issue6.txt"
log done
