#!/usr/bin/env bash
# The Gluon dK/dV kernel's experiment (FLASH_NOTES.md "v10"): gradients of each
# config against float64, fwd+bwd and the dK/dV kernel alone against Triton and
# cuDNN at the shape; then the attention suite at D=128 with it as
# `tiled`'s dK/dV, then the backward GPU tests, each under its own time limit.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v10.sh OUT_DIR
set -u
OUT=${1:?usage: run_v10.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }
log gluon-bwd
timeout -s KILL 150 python3 -m impls.attention.tune_flash --gluon-bwd --rep-ms 100 --out "$OUT" 2>&1 | grep -v -i warn | tail -30
log attention-d128
timeout -s INT 100 python3 -m bench attention --device cuda --seq 8k --head-dim 128 \
  --impl sdpa-cudnn --impl sdpa-flash --impl tiled --out "$OUT/attention-d128" > "$OUT/attention-d128.txt" 2>&1
grep -E "tiled|sdpa|mode=" "$OUT/attention-d128.txt" | grep -v "^│  " | cut -c1-100
log gpu-tests
timeout -s INT 70 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py -k "grads or dkdv" 2>&1 \
  | tail -6 | tee "$OUT/pytest-gpu.txt"
log done
