#!/usr/bin/env bash
# v12, third call (FLASH_NOTES.md): the dK/dV kernel that loads the next
# block's lse/delta during each block (this checkout, "pre") against the one
# that loads its own (CUR_TREE, commit e8ed93b) and the spread loads before
# both (OLD_TREE, commit 44083a8), in alternating processes; then the attention
# suite at the shape, D=128 and D=64; then the Gluon GPU tests of dK/dV.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v12c.sh OUT_DIR CUR_TREE OLD_TREE
set -u
OUT=${1:?usage: run_v12c.sh OUT_DIR CUR_TREE OLD_TREE}
CUR=${2:?usage: run_v12c.sh OUT_DIR CUR_TREE OLD_TREE}
OLD=${3:?usage: run_v12c.sh OUT_DIR CUR_TREE OLD_TREE}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date -u +%H:%M:%S) $*"; }
TIMER=$PWD/results/reference/h200/flash_dev/time_bwd_kernels.py
for tree in pre cur old pre cur old; do
  log "kernels $tree"
  case $tree in pre) dir=$PWD ;; cur) dir=$CUR ;; old) dir=$OLD ;; esac
  (cd "$dir" && PYTHONPATH=$dir timeout -s KILL 60 python3 "$TIMER" "$tree" "$OUT/bwd_kernels_ab.csv" 2>&1 | grep -v -i warn)
done
export PYTHONPATH=$PWD
for d in 128 64; do
  log "attention-d$d"
  timeout -s INT 130 python3 -m bench attention --device cuda --seq 8k --head-dim "$d" \
    --impl sdpa-cudnn --impl sdpa-flash --impl tiled --out "$OUT/attention-d$d" > "$OUT/attention-d$d.txt" 2>&1
  grep -E "tiled|sdpa|mode=" "$OUT/attention-d$d.txt" | grep -v "^│  " | cut -c1-100
done
log gpu-tests
timeout -s INT 100 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py \
  -k "dkdv_config or gluon_grads or bshd_fp16" 2>&1 | tail -6 | tee "$OUT/pytest-gpu.txt"
log done
