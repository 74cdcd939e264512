#!/usr/bin/env bash
# Session 4, first GPU call: the Triton step kernels (impls/decoding_triton.py)
# timed piece by piece and as whole steps against the PyTorch ops, larger model
# shapes, the GPU decoding tests, and the flash kernel's v5 experiment.
# Usage, from the repo root: bash results/reference/h200/medusa_dev/v3.sh OUT_DIR
set -u
OUT=${1:?usage: v3.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log gpu-tests
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/impls/test_decoding_triton.py tests/impls/test_decoding.py \
  2>&1 | tail -5 | tee "$OUT/pytest-gpu.txt"

log step-costs
timeout 200 python3 results/reference/h200/medusa_dev/step_costs.py "$OUT/steps" --steps-only --shapes 2048x16,2048x24,4096x8 \
  2>&1 | grep -v Warning | tee "$OUT/steps.txt"

log flash-v5
for v in "128x64 w8 s3" "128x64 w8 s3 pipe" "128x64 w8 s2 r128 pipe"; do
  timeout 100 python3 -m impls.attention.tune_flash --experiment --variant "$v" --out "$OUT/v5/${v// /_}" 2>&1 | tail -12
done
log done
