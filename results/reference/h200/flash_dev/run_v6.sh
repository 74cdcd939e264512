#!/usr/bin/env bash
# Session 4, last GPU call: the flash kernel's v6 experiment (lazy rescaling),
# the attention suite at the shape with the lazy configs in the
# autotuner's list, and the GPU tests of the flash kernel and the decoders.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v6.sh OUT_DIR
set -u
OUT=${1:?usage: run_v6.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + ${BUDGET_S:-480}))
budget() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log flash-v6
for v in "128x64 w8 s3" "128x64 w8 s3 lazy" "128x64 w8 s2 r128 lazy" "128x64 w4 s2 lazy"; do
  timeout -s INT "$(budget 60)" python3 -m impls.attention.tune_flash --experiment --variant "$v" \
    --out "$OUT/v6/${v// /_}" 2>&1 | grep -v -i warn | tail -6
done

# The shape: bf16, 16 heads, batch x seq = 16k tokens, S = 8k; head dims 128 and 64.
for d in 128 64; do
  log "attention-d$d"
  timeout -s INT "$(budget 120)" python3 -m bench attention --device cuda --seq 8k --head-dim "$d" \
    --impl sdpa-cudnn --impl sdpa-flash --impl tiled --out "$OUT/attention-d$d" 2>&1 | tee "$OUT/attention-d$d.txt"
done

log gpu-tests
timeout -s INT "$(budget 150)" python3 -m pytest -q -rs -p no:cacheprovider tests/impls/test_flash_triton.py \
  tests/impls/test_decoding_triton.py tests/impls/test_decoding.py 2>&1 | tail -6 | tee "$OUT/pytest-gpu.txt"
log done
