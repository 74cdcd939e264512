#!/usr/bin/env bash
# The single-GPU reference runs, as executed on the H200 machine (one GPU
# visible), in one call of at most 10 minutes: each step gets what is left of
# a 570 s budget, and is stopped with SIGINT so that its finished rows stay.
# Usage, from the repo root: bash results/reference/h200/run_single_gpu.sh OUT_DIR
set -u
OUT=${1:?usage: run_single_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
deadline=$((SECONDS + ${BUDGET_S:-570}))
budget() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log env; timeout -s INT "$(budget 60)" genbench env --calibrate 2>&1 | tee "$OUT/env.txt"

# Issue 2: the default sweep (seq 8k, every impl, fwd and fwd+bwd, causal and not), timed end to end.
log attention; start=$(date +%s%N)
timeout -s INT "$(budget 150)" genbench attention --seq 8k --out "$OUT/attention" 2>&1 | tee "$OUT/attention.txt"
echo "wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/attention.txt"

# The timer against triton.testing.do_bench on the same callables (SDPA at 8k).
log crosscheck
timeout -s INT "$(budget 60)" genbench attention --seq 8k --mode fwd --impl sdpa --impl sdpa-cudnn --impl sdpa-flash \
  --crosscheck --out "$OUT/crosscheck" 2>&1 | tee "$OUT/crosscheck.txt"

# Issue 4: gpt2-small, 16 x 1024 tokens, 300 steps, fp32 self-band over 100 steps.
log precision
timeout -s INT "$(budget 310)" genbench precision --device cuda --model gpt2-small --batch 16 --seq-len 1024 --steps 300 \
  --band-steps 100 --precision fp32 --precision bf16 --precision fp16 --precision bf16+compile --precision tf32 \
  --precision fp8 --matmul --out "$OUT/precision" 2>&1 | tee "$OUT/precision.txt"

# Issue 3: head dim 64 beside 128.
log hd64
timeout -s INT "$(budget 60)" genbench attention --seq 8k --head-dim 64 --impl tiled --impl sdpa-cudnn --impl sdpa-flash \
  --out "$OUT/attention-hd64" 2>&1 | tee "$OUT/attention-hd64.txt"

# GPU paths of the tests (skipped on CPU CI).
log gpu-tests
timeout -s INT "$(budget 200)" python3 -m pytest -q -rs -p no:cacheprovider tests/impls/test_flash_triton.py \
  tests/impls/test_attention.py tests/bench/test_timing.py tests/suites/test_precision.py tests/impls/test_fp8.py \
  2>&1 | tail -25 | tee "$OUT/pytest-gpu.txt"
log done
