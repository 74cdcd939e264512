#!/usr/bin/env bash
# Prepared for the next GPU call (FLASH_NOTES.md "v11 plan", "v12 plan"): the
# Gluon dQ kernel (flash_triton.GLUON_DQ) and the dK/dV kernel with dQ fused
# (flash_triton.GLUON_FUSED_DQ), both off until measured, checked against
# float64 and timed next to Triton's kernels and cuDNN, with the dK/dV
# kernel's checks and timings again; the forward configs again with the persistent kernel
# (flash_gluon.EXPERIMENTAL_CONFIGS); then the Gluon GPU tests.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v11.sh OUT_DIR
set -u
OUT=${1:?usage: run_v11.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }
log gluon-bwd
timeout -s KILL 300 python3 -m impls.attention.tune_flash --gluon-bwd --rep-ms 100 --out "$OUT" 2>&1 | grep -v -i warn | tail -40
log gluon-fwd
timeout -s KILL 240 python3 -m impls.attention.tune_flash --gluon --rep-ms 100 --out "$OUT/fwd" 2>&1 | grep -v -i warn \
  | grep -v "^{'D'" | tail -40
log gpu-tests
timeout -s INT 150 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py -k "grads or dkdv or dq_config or fused or experimental" 2>&1 \
  | tail -6 | tee "$OUT/pytest-gpu.txt"
log done
