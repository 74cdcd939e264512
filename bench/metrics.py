"""Derived metrics: every formula genbench reports, each in one place with its source.

Suites call these with a measured time; nothing here measures anything.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Backward-to-forward FLOP ratio of attention. The forward does two matmuls
# (QK^T and PV); the backward does five (recomputed QK^T, dV, dP, dQ, dK):
# 5/2 = 2.5, as in the FlashAttention-2 paper's benchmark accounting
# (Dao 2023, section 4.1) and its benchmark scripts.
ATTENTION_BWD_RATIO = 2.5


def attention_pairs(seq_q: int, seq_k: int, causal: bool, window: int | None = None) -> float:
    """(query, key) pairs whose score counts toward attention's FLOPs.

    Non-causal: Sq·Sk. Causal, square (Sq = Sk = S): S²/2, the convention of
    the FlashAttention papers' and benchmarks' accounting (the diagonal's S/2
    pairs, a 1/S share, left out), kept so square rows compare with theirs
    and with older genbench runs. Causal with Sq < Sk, aligned bottom-right
    (query i at position Sk − Sq + i sees keys 0 .. Sk − Sq + i, i.e.
    Sk − Sq + i + 1 of them): the exact count of unmasked pairs,
    Σ_{i<Sq} (Sk − Sq + i + 1) = Sq·(Sk − Sq) + Sq(Sq+1)/2 = Sq·Sk − Sq(Sq−1)/2.
    At Sq = 1 (decode) every key counts: Sk.

    Sliding window of N keys (with causal): the query at position p sees keys
    p − N < j <= p, min(N, p + 1) of them, for p = Sk − Sq .. Sk − 1. With
    m = p + 1 running over a = Sk − Sq + 1 .. Sk, the exact count is
    Σ_{m=a}^{Sk} min(N, m): the terms below N, m = a .. c with c = min(Sk, N − 1),
    sum to (a + c)(c − a + 1)/2, and each of the Sk − max(a, N) + 1 others
    to N. A window of Sk or more masks nothing: the causal count above."""
    if window is not None and window < seq_k:
        assert causal, "a sliding window is defined with causal attention only"
        assert seq_q <= seq_k, f"causal attention aligned bottom-right needs seq_q <= seq_k, got {seq_q} > {seq_k}"
        a, c = seq_k - seq_q + 1, min(seq_k, window - 1)
        below = (a + c) * (c - a + 1) / 2 if c >= a else 0.0
        return below + window * max(0, seq_k - max(a, window) + 1)
    if not causal:
        return float(seq_q * seq_k)
    if seq_q == seq_k:
        return seq_q * seq_k / 2
    assert seq_q < seq_k, f"causal attention aligned bottom-right needs seq_q <= seq_k, got {seq_q} > {seq_k}"
    return seq_q * seq_k - seq_q * (seq_q - 1) / 2


def attention_flops(
    batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool, mode: str,
    window: int | None = None,
) -> float:
    """FLOPs of one attention call: 4·B·H·D per scored (query, key) pair
    forward (two matmuls, QK^T and PV, at 2 FLOPs per multiply-add), so
    4·B·H·Sq·Sk·D; causal and a sliding window count only the unmasked pairs
    (`attention_pairs`: half when square); ×2.5 for the backward alone, ×3.5
    for forward plus backward. Soft-capping and ALiBi add elementwise work
    per pair, O(1) against the matmuls' O(D), and count nothing."""
    fwd = 4.0 * batch * heads * attention_pairs(seq_q, seq_k, causal, window) * head_dim
    factor = {"fwd": 1.0, "bwd": ATTENTION_BWD_RATIO, "fwd+bwd": 1.0 + ATTENTION_BWD_RATIO}
    assert mode in factor, f"unknown mode {mode!r}"
    return fwd * factor[mode]


def attention_bytes(batch: int, heads: int, kv_heads: int, seq_q: int, seq_k: int, head_dim: int,
                    element_size: int, mode: str) -> float:
    """Bytes one attention call must move to and from memory at the least:
    each tensor it reads or writes, once. Forward: Q and O (B·H·Sq·D each)
    and K and V (B·Hkv·Sk·D each: grouped-query heads share them, so GQA
    reads less). With the backward (bwd, fwd+bwd): also dO read and dQ, dK,
    dV written, each the size of its tensor: 4 Q-sized and 4 K-sized tensors.
    A lower bound, as FlashAttention's IO analysis (Dao et al. 2022, section
    3.2) makes it: a kernel re-reading K and V per query block, the backward
    re-reading O, and the per-row log-sum-exp (B·H·Sq floats, 1/D of O) move
    more. Decode (Sq = 1) is dominated by K and V: the KV cache read once."""
    assert mode in ("fwd", "bwd", "fwd+bwd"), f"unknown mode {mode!r}"
    q_sized = batch * heads * seq_q * head_dim
    kv_sized = batch * kv_heads * seq_k * head_dim
    tensors = 2 if mode == "fwd" else 4  # Q, O (+ dO, dQ); K, V (+ dK, dV)
    return float(tensors * (q_sized + kv_sized) * element_size)


def GBps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (10^9 bytes per second): `nbytes` moved in `ms`."""
    return nbytes / (ms * 1e-3) / 1e9


def roofline_bound(flops: float, nbytes: float, peak_tflops: float | None, peak_GBps: float | None) -> str | None:
    """"memory" or "compute": which ceiling bounds a kernel doing `flops` over
    `nbytes`, by the roofline model (Williams, Waterman & Patterson 2009):
    memory-bound when its arithmetic intensity, flops / nbytes (FLOP per
    byte), is below the device's ridge point, peak FLOP/s over peak bytes/s,
    both from the calibrated peaks (bench/calibrate.py: the matmul peak of
    its dtype and the copy bandwidth); compute-bound at or above it. Its %
    of peak is then taken against that ceiling. None when either peak is
    unknown."""
    if not peak_tflops or not peak_GBps:
        return None
    ridge = peak_tflops * 1e12 / (peak_GBps * 1e9)
    return "memory" if flops / nbytes < ridge else "compute"


def tflops(flops: float, ms: float) -> float:
    """Achieved rate in TFLOP/s (10^12 FLOP per second) for `flops` done in `ms`."""
    return flops / (ms * 1e-3) / 1e12


def pct_of_peak(achieved: float, peak: float | None) -> float | None:
    """Share of a measured ceiling (see bench/calibrate.py), in percent."""
    if not peak:
        return None
    return 100.0 * achieved / peak


def per_second(count: float, ms: float) -> float:
    """Tokens/s, samples/s: `count` items processed in `ms`."""
    return count / (ms * 1e-3)


def joules_per_step(energy_J: float | None, steps: int) -> float | None:
    """Energy of one step: the energy a timed window drew (the difference of
    NVML's total-energy counter across it, bench/telemetry.py) over the steps
    it held. Whole-GPU energy: idle and other processes' draw included."""
    if energy_J is None or steps <= 0:
        return None
    return energy_J / steps


def tokens_per_joule(tokens: float, energy_J: float | None) -> float | None:
    """Tokens per joule: tokens processed over the energy drawn for them, the
    reciprocal of the energy per token the ML.ENERGY benchmark reports (Chung
    et al. 2025, "The ML.ENERGY Benchmark"); equal to tokens/s per watt."""
    if not energy_J:
        return None
    return tokens / energy_J


def transformer_train_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the weight matmuls (2 forward, 4
    backward, per parameter) plus 12·L·d·T for attention's QK^T and PV
    (forward 2·2·L·T·d, ×3 with the backward). Kaplan et al. 2020 (Scaling
    Laws, table 1) and PaLM (Chowdhery et al. 2022, appendix B), whose MFU
    definition this follows: non-embedding N, no activation recompute.

    N counts the output matrix over the tokenizer's real vocabulary: rows a
    model adds to round it up for tensor-core tiling (impls/gpt.py pads
    GPT-2's 50257 to 50304) are multiplied but are never a token nor a
    score, so, like recomputation, they are work of the implementation, not
    of the model, and MFU does not count them."""
    return 6.0 * n_params + 12.0 * n_layer * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization in percent: the model's FLOPs at the achieved
    token rate over the device's measured peak (PaLM, appendix B)."""
    if not peak_tflops:
        return None
    return 100.0 * tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def algbw_GBps(nbytes: float, ms: float) -> float:
    """Algorithm bandwidth of a collective: the message size over the time
    (nccl-tests, doc/PERFORMANCE.md)."""
    return nbytes / (ms * 1e-3) / 1e9


# Bus-bandwidth factors from nccl-tests (doc/PERFORMANCE.md): the share of the
# message each rank must send over its link, so that busbw is comparable with
# the hardware's line rate whatever the world size n.
BUSBW_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


def busbw_GBps(collective: str, nbytes: float, ms: float, world_size: int) -> float:
    return algbw_GBps(nbytes, ms) * BUSBW_FACTORS[collective](world_size)


def scaling_efficiency(throughput_n: float, throughput_1: float, n: int) -> float:
    """Weak-scaling efficiency: throughput on n devices over n × the one-device throughput."""
    return throughput_n / (n * throughput_1)


def mean_accept_length(histogram) -> float | None:
    """Tokens kept per decoding step, from histogram[i] = steps that kept i + 1
    tokens: sum((i + 1) * h_i) / sum(h_i). Medusa's "acceleration rate" (Cai
    et al. 2024, section 3); 1.0 for plain decoding."""
    steps = sum(histogram)
    if steps == 0:
        return None
    return sum((i + 1) * h for i, h in enumerate(histogram)) / steps


def speedup(baseline_ms: float, ms: float) -> float:
    """How many times faster than the baseline, from two times measured in one run."""
    return baseline_ms / ms


def gap_in_ulps(gap: float, magnitude: float, eps: float) -> float:
    """A difference between two floats in units in the last place at `magnitude`:
    gap / (eps · 2^floor(log2 |magnitude|)), eps being the format's machine
    epsilon (the spacing at 1.0), e.g. 2^-7 for bf16, 2^-23 for fp32
    (Goldberg 1991, "What every computer scientist should know about
    floating-point arithmetic", section 1.2)."""
    magnitude = abs(magnitude)
    spacing = eps * 2.0 ** math.floor(math.log2(magnitude)) if magnitude > 0 else eps
    return abs(gap) / spacing


def exposed_comm_ms(step_ms: Sequence[float], no_sync_step_ms: Sequence[float]) -> float:
    """Communication a data-parallel step leaves exposed: a step's time minus
    the same step under DDP's no_sync(), which skips the gradient all-reduce:
    what the overlap with backward did not hide (Li et al. 2020, "PyTorch
    Distributed", VLDB, section 3.2: bucketing, overlap, and no_sync for
    gradient accumulation). The median of the differences of paired samples,
    step_ms[i] - no_sync_step_ms[i], each pair timed back to back: a
    difference of two medians would set apart two runs made at different
    times, and measure the change of the machine's load between them.
    Signed; whether it stands out from the noise is the caller's test."""
    assert len(step_ms) == len(no_sync_step_ms) > 0, "exposed_comm_ms needs paired samples"
    return float(np.median(np.subtract(step_ms, no_sync_step_ms)))


def relative_difference(value, reference):
    """(value - reference) / |reference|, signed, elementwise on arrays: how far
    a run's loss lies from the reference run's (same step, or the validation
    loss), as a share of the reference; positive = higher loss. The precision
    suite's parity columns take its absolute value per step."""
    return (value - reference) / abs(reference)
