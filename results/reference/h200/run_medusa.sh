#!/usr/bin/env bash
# The Medusa reference runs (issue 7), as executed on one H200 in one call of
# at most 10 minutes. Each step gets what is left of a 570 s budget and is stopped with
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

# The GPU paths of the decoding tests (CUDA graphs and torch.compile against eager).
log gpu-tests
timeout -s INT "$(budget 120)" python3 -m pytest -q -rs -p no:cacheprovider tests/impls/test_decoding.py 2>&1 \
  | tail -5 | tee "$OUT/pytest-gpu.txt"

# Issue 6 on the GPU: --profile on the medusa suite (the traces and the top-10 tables).
log medusa-profile
timeout -s INT "$(budget 90)" "${medusa[@]}" --dtype bf16 --prompts 2 --max-new-tokens 128 --method vanilla \
  --method medusa --profile --out "$OUT/medusa-profile" 2>&1 | tee "$OUT/medusa-profile.txt"

# torch.compile (inductor) before capture, vanilla and Medusa.
log medusa-inductor
timeout -s INT "$(budget 100)" "${medusa[@]}" --dtype bf16 --compile inductor --method vanilla --method medusa \
  --out "$OUT/medusa-inductor" 2>&1 | tee "$OUT/medusa-inductor.txt"
log done
