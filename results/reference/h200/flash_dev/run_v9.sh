#!/usr/bin/env bash
# The Gluon forward's v9 experiment (FLASH_NOTES.md "v9"): a short smoke run of
# the warp-specialized kernel (a hang ends it, not the call), then every config
# of flash_gluon.CONFIGS checked against float64 and timed at the issue's shapes
# next to the Triton forward and SDPA's cuDNN and flash backends.
# Usage, from the repo root: bash results/reference/h200/flash_dev/run_v9.sh OUT_DIR
set -u
OUT=${1:?usage: run_v9.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log smoke
timeout -s KILL 90 python3 - <<'PY' 2>&1 | grep -v -i warn | tee "$OUT/smoke.txt"
import math, torch
from impls.attention import flash_gluon as fg, naive
for kind in ("ws", "pingpong"):
    for causal in (False, True):
        q, k, v = (torch.randn(1, h, 333, 128, device="cuda", dtype=torch.bfloat16) for h in (4, 2, 2))
        o, lse = fg.forward(q, k, v, causal, 1 / math.sqrt(128), (128, 128, 2, kind))
        torch.cuda.synchronize()
        ref = naive.attention(q.double(), k.double(), v.double(), causal, 1 / math.sqrt(128))
        print(kind, causal, ((o.double() - ref).norm() / ref.norm()).item(), flush=True)
PY
log gluon-experiment
timeout -s KILL 420 python3 -m impls.attention.tune_flash --gluon --rep-ms 100 --out "$OUT" 2>&1 | grep -v -i warn \
  | grep -v "^{'D'" | tail -60
log done
