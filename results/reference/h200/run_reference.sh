#!/usr/bin/env bash
# The reference runs behind the README and the issues' figures, as executed in
# one call on the 4-GPU H200 machine (nvidia-h200-x4). Single-GPU suites see GPU
# 0 only. Each step gets at most what is left of a ${BUDGET_S:-560} s budget and
# is stopped with SIGINT, so its finished rows stay on disk.
# Usage, from the repo root: bash results/reference/h200/run_reference.sh OUT_DIR
set -u
OUT=${1:?usage: run_reference.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
genbench() { python3 -m bench "$@"; }
deadline=$((SECONDS + ${BUDGET_S:-560}))
budget() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log() { echo "== $(date -u +%H:%M:%S) $*"; }
one_gpu() { CUDA_VISIBLE_DEVICES=0 timeout -s INT "$@"; }

log env; env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)='
one_gpu "$(budget 60)" python3 -m bench env --calibrate 2>&1 | tee "$OUT/env.txt"

# Issue 2: the default sweep (seq 8k, every impl, fwd and fwd+bwd, causal and not), timed end to end.
log attention; start=$(date +%s%N)
one_gpu "$(budget 150)" python3 -m bench attention --seq 8k --out "$OUT/attention" 2>&1 | tee "$OUT/attention.txt"
echo "wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/attention.txt"

# The timer against triton.testing.do_bench on the same callables (SDPA at 8k).
log crosscheck
one_gpu "$(budget 60)" python3 -m bench attention --seq 8k --mode fwd --no-causal --impl sdpa-cudnn --impl sdpa-flash \
  --impl tiled --crosscheck --out "$OUT/crosscheck" 2>&1 | tee "$OUT/crosscheck.txt"

# Issue 5: weak scaling of gpt2-small in bf16, 16 x 1024 tokens per GPU, then the collectives.
log ddp
timeout -s INT "$(budget 150)" python3 -m bench ddp --gpus 4 --model gpt2-small --precision bf16 --batch 16 --seq 1024 \
  --steps 30 --warmup-steps 5 --timeout 90 --out "$OUT/ddp" 2>&1 | tee "$OUT/ddp.txt"
timeout -s INT "$(budget 60)" python3 -m bench ddp --gpus 4 --collectives --min-size 1K --max-size 1G --dtype fp32 \
  --steps 20 --warmup-steps 5 --line-rate-gbps 450 --out "$OUT/ddp" 2>&1 | tee -a "$OUT/ddp.txt"

# Issue 4: gpt2-small, 16 x 1024 tokens, 300 steps, fp32 self-band over 100 steps.
log precision
one_gpu "$(budget 330)" python3 -m bench precision --device cuda --model gpt2-small --batch 16 --seq-len 1024 --steps 300 \
  --band-steps 100 --precision fp32 --precision bf16 --precision fp16 --precision bf16+compile --precision tf32 \
  --precision fp8 --matmul --out "$OUT/precision" 2>&1 | tee "$OUT/precision.txt"
log done
