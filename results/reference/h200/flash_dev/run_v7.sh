#!/usr/bin/env bash
# Recorded command only: ATOMIC_DQ and tune_flash --bwd-experiment were removed after this
# ran at 33c4016 (they lived in a97971b..33c4016). Results: FLASH_NOTES.md "v7", v7/.
# The flash kernel's v7 experiment (FLASH_NOTES.md "v7 plan"): forward+backward
# with the two-kernel backward against the one-kernel backward whose dQ is
# summed by atomics, then the kernel's GPU-only tests (-m gpu: the others are
# the interpreter's small shapes, slow to autotune one by one on a GPU).
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v7.sh OUT_DIR
set -u
OUT=${1:?usage: run_v7.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log flash-v7
timeout -s INT 240 python3 -m impls.attention.tune_flash --bwd-experiment --out "$OUT/v7" 2>&1 | grep -v -i warn | tail -8

log gpu-tests
timeout -s INT 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_triton.py 2>&1 \
  | tail -6 | tee "$OUT/pytest-gpu.txt"
log done
