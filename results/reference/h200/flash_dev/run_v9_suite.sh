#!/usr/bin/env bash
# After v9 (FLASH_NOTES.md): the attention suite at the shape with the
# warp-specialized Gluon forward as `tiled`'s forward at D=128, then the Gluon
# GPU tests. Usage, from the repo root: bash results/reference/h200/flash_dev/run_v9_suite.sh OUT_DIR
set -u
OUT=${1:?usage: run_v9_suite.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }
for d in 128 64; do
  log "attention-d$d"
  timeout -s INT 150 python3 -m bench attention --device cuda --seq 8k --head-dim "$d" \
    --impl sdpa-cudnn --impl sdpa-flash --impl tiled --out "$OUT/attention-d$d" > "$OUT/attention-d$d.txt" 2>&1
  grep -E "tiled|sdpa|mode=" "$OUT/attention-d$d.txt" | grep -v "^│  " | cut -c1-100
done
log gpu-tests
timeout -s INT 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py 2>&1 \
  | tail -8 | tee "$OUT/pytest-gpu.txt"
log done
