#!/usr/bin/env bash
# Prepared for the next GPU calls (FLASH_NOTES.md "v11 plan", "v12 plan"), in
# two parts that each fit one call:
#   bwd: the Gluon dQ kernel (flash_triton.GLUON_DQ) and the dK/dV kernel with
#        dQ fused (flash_triton.GLUON_FUSED_DQ), both off until measured:
#        fwd+bwd and each kernel alone at the shape next to Triton's
#        kernels and cuDNN, then gradients of every config against float64;
#        CSVs written row by row, so a time limit keeps what ran.
#   fwd: the persistent forward (flash_gluon.EXPERIMENTAL_CONFIGS) next to
#        the measured ws config, then the Gluon GPU tests.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v11.sh OUT_DIR bwd|fwd
set -u
OUT=${1:?usage: run_v11.sh OUT_DIR bwd|fwd}
PART=${2:?usage: run_v11.sh OUT_DIR bwd|fwd}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }
if [ "$PART" = bwd ]; then
  log gluon-bwd
  timeout -s KILL 420 python3 -m impls.attention.tune_flash --gluon-bwd --rep-ms 100 --out "$OUT/bwd" 2>&1 \
    | grep -v -i warn | tail -60
else
  log gluon-fwd
  timeout -s KILL 200 python3 -m impls.attention.tune_flash --gluon --kinds ws,persistent --rep-ms 100 \
    --out "$OUT/fwd" 2>&1 | grep -v -i warn | grep -v "^{'D'" | tail -40
  log gpu-tests
  timeout -s INT 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py \
    -k "grads or dkdv or dq_config or fused or experimental" 2>&1 | tail -6 | tee "$OUT/pytest-gpu.txt"
fi
log done
