#!/usr/bin/env bash
# v12, second call (FLASH_NOTES.md): the dK/dV kernel with lse/delta loaded one
# value a thread (this checkout) against the one before (OLD_TREE, commit
# 44083a8), in alternating processes; then `tune_flash --schedule`; then the
# attention suite at the shape; then the Gluon GPU tests.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v12b.sh OUT_DIR OLD_TREE
set -u
OUT=${1:?usage: run_v12b.sh OUT_DIR OLD_TREE}
OLD=${2:?usage: run_v12b.sh OUT_DIR OLD_TREE}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date -u +%H:%M:%S) $*"; }
TIMER=$PWD/results/reference/h200/flash_dev/time_bwd_kernels.py
for tree in new old new; do
  log "kernels $tree"
  dir=$PWD; [ "$tree" = old ] && dir=$OLD
  (cd "$dir" && PYTHONPATH=$dir timeout -s KILL 100 python3 "$TIMER" "$tree" "$OUT/bwd_kernels_ab.csv" 2>&1 | grep -v -i warn)
done
export PYTHONPATH=$PWD
log schedule
timeout -s KILL 150 python3 -m impls.attention.tune_flash --schedule --rep-ms 100 --out "$OUT" 2>&1 \
  | grep -v -i warn | grep -E "'round': 1|error" | cut -c1-220
log attention-d128
timeout -s INT 150 python3 -m bench attention --device cuda --seq 8k --head-dim 128 \
  --impl sdpa-cudnn --impl sdpa-flash --impl tiled --out "$OUT/attention-d128" > "$OUT/attention-d128.txt" 2>&1
grep -E "tiled|sdpa|mode=" "$OUT/attention-d128.txt" | grep -v "^│  " | cut -c1-100
log gpu-tests
timeout -s INT 120 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py \
  -k "persistent or beside or dkdv_config" 2>&1 | tail -6 | tee "$OUT/pytest-gpu.txt"
log done
