#!/usr/bin/env bash
# v12 (FLASH_NOTES.md): the dK/dV kernel's lse/delta loads, the causal launch
# order, dQ on a second stream, the persistent forward, timed at the issue's
# shape (tune_flash --schedule), then the Gluon GPU tests of what changed.
# The Triton cache goes back as one archive, so that the next call (the suite)
# compiles nothing; the Gluon tuner's choices are left out of it.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v12.sh OUT_DIR
set -u
OUT=${1:?usage: run_v12.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
log() { echo "== $(date -u +%H:%M:%S) $*"; }
log schedule
timeout -s KILL 300 python3 -m impls.attention.tune_flash --schedule --rep-ms 100 --out "$OUT" 2>&1 \
  | grep -v -i warn | tail -60
log gpu-tests
timeout -s INT 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/impls/test_flash_gluon.py \
  -k "grads or dkdv or dq or stream or orders or experimental" 2>&1 | tail -8 | tee "$OUT/pytest-gpu.txt"
log cache
rm -f "$TRITON_CACHE_DIR"/genbench-gluon-tuning.json
tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT/triton-cache.tgz"
log done
