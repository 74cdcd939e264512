import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import metrics
from impls.attention import naive, tiled


def test_attention_flops_by_hand():
    # B=2, H=4, S=64, D=32: 4*2*4*64*64*32 = 4_194_304
    assert metrics.attention_flops(2, 4, 64, 64, 32, False, "fwd") == 4_194_304
    assert metrics.attention_flops(2, 4, 64, 64, 32, True, "fwd") == 2_097_152
    assert metrics.attention_flops(2, 4, 64, 64, 32, False, "bwd") == 2.5 * 4_194_304
    assert metrics.attention_flops(2, 4, 64, 64, 32, True, "fwd+bwd") == 3.5 * 2_097_152



def test_attention_flops_unequal_lengths_by_hand():
    # Sq=3 against Sk=10, causal bottom-right: the queries sit at positions 7, 8, 9 and see
    # 8, 9, 10 keys: 27 pairs (= 3*10 - 3*2/2); 4*B*H*pairs*D = 4*1*2*27*16 = 3456.
    assert metrics.attention_pairs(3, 10, True) == 27
    assert metrics.attention_flops(1, 2, 3, 10, 16, True, "fwd") == 3456
    assert metrics.attention_flops(1, 2, 3, 10, 16, False, "fwd") == 4 * 2 * 30 * 16
    # decode: one query sees every key
    assert metrics.attention_pairs(1, 4096, True) == 4096
    # square keeps the FlashAttention halving
    assert metrics.attention_pairs(64, 64, True) == 2048


@pytest.mark.parametrize("q_len, kv_len", [(1, 9), (3, 10), (7, 33), (32, 33)])
def test_causal_pairs_are_the_unmasked_entries(q_len, kv_len):
    assert metrics.attention_pairs(q_len, kv_len, True) == int(naive.causal_mask(q_len, kv_len).sum())


def test_attention_bytes_and_bandwidth_by_hand():
    # B=1, H=2, Hkv=1, Sq=3, Sk=10, D=4, fp32: Q and O 24 elements each, K and V 40 each.
    # Forward: (24 + 24 + 40 + 40) * 4 bytes = 512; backward adds dO, dQ (24 each), dK, dV (40 each): 1024.
    assert metrics.attention_bytes(1, 2, 1, 3, 10, 4, 4, "fwd") == 512
    assert metrics.attention_bytes(1, 2, 1, 3, 10, 4, 4, "bwd") == 1024
    assert metrics.attention_bytes(1, 2, 1, 3, 10, 4, 4, "fwd+bwd") == 1024
    # 512 bytes in 1 us: 0.512 GB/s
    assert metrics.GBps(512, 1e-3) == pytest.approx(0.512)
    # The decode shape: batch 8, 32 query heads over 8 kv heads, kv_len 32k, D 128, bf16:
    # K and V are 2 * 8*8*32768*128 * 2 bytes = 1 GiB, Q and O 2 * 8*32*128 * 2 = 128 KiB more;
    # in 355 us that is 3025 GB/s.
    nbytes = metrics.attention_bytes(8, 32, 8, 1, 32768, 128, 2, "fwd")
    assert nbytes == 2**30 + 2**17
    assert metrics.GBps(nbytes, 0.355) == pytest.approx(3025.0, rel=1e-4)


def test_roofline_bound_by_hand():
    # ridge point: 2 TFLOP/s over 10 GB/s = 200 FLOP per byte
    assert metrics.roofline_bound(2000, 10, 2.0, 10.0) == "compute"  # 200: at the ridge
    assert metrics.roofline_bound(2000, 11, 2.0, 10.0) == "memory"  # 181.8
    # the decode shape on an H100-like device (800 TFLOP/s, 3000 GB/s: ridge 267): about 4 FLOP/byte
    flops = metrics.attention_flops(8, 32, 1, 32768, 128, True, "fwd")
    nbytes = metrics.attention_bytes(8, 32, 8, 1, 32768, 128, 2, "fwd")
    assert metrics.roofline_bound(flops, nbytes, 800.0, 3000.0) == "memory"
    # square 8k causal, 16 heads, batch 2: 2*16*8192^2*128*2 FLOPs over ~134 MB, ~1000 FLOP/byte
    flops = metrics.attention_flops(2, 16, 8192, 8192, 128, True, "fwd")
    nbytes = metrics.attention_bytes(2, 16, 16, 8192, 8192, 128, 2, "fwd")
    assert metrics.roofline_bound(flops, nbytes, 800.0, 3000.0) == "compute"
    assert metrics.roofline_bound(flops, nbytes, None, 3000.0) is None
    assert metrics.roofline_bound(flops, nbytes, 800.0, None) is None

def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_formula_matches_flop_counter():
    q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
    assert _counted(lambda: naive.attention(q, k, v, causal=False)) == metrics.attention_flops(2, 4, 64, 64, 32, False, "fwd")


def test_backward_ratio_matches_flop_counter_on_recomputing_backward():
    # The tiled backward recomputes QK^T, then does dV, dP, dQ, dK: five matmuls
    # against the forward's two, the 2.5 the formula uses.
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))

    def fwd_bwd():
        out = tiled.attention(q, k, v, causal=False, block=16)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    assert _counted(fwd_bwd) == metrics.attention_flops(2, 4, 64, 64, 32, False, "fwd+bwd")


def test_causal_halving_matches_blocks_actually_computed():
    # With causal masking the tiled forward skips the rows above each block's
    # first key; what it computes tends to half the full count as blocks shrink.
    q, k, v = (torch.randn(1, 1, 256, 32) for _ in range(3))
    counted = _counted(lambda: tiled.attention(q, k, v, causal=True, block=8))
    assert counted == pytest.approx(metrics.attention_flops(1, 1, 256, 256, 32, True, "fwd"), rel=8 / 256 + 1e-9)


def test_rates_and_shares():
    assert metrics.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert metrics.pct_of_peak(395.0, 790.0) == pytest.approx(50.0)
    assert metrics.pct_of_peak(1.0, None) is None
    assert metrics.per_second(16 * 1024, 50.0) == pytest.approx(327_680)


def test_collective_bandwidths_follow_nccl_tests():
    # 1 GB in 10 ms is 100 GB/s algbw; all_reduce on 4 ranks moves 2*3/4 of it per link.
    assert metrics.algbw_GBps(1e9, 10.0) == pytest.approx(100.0)
    assert metrics.busbw_GBps("all_reduce", 1e9, 10.0, 4) == pytest.approx(150.0)
    assert metrics.busbw_GBps("all_gather", 1e9, 10.0, 4) == pytest.approx(75.0)
    assert metrics.scaling_efficiency(380.0, 100.0, 4) == pytest.approx(0.95)


def test_mfu_by_hand():
    # 124M params, 12 layers, d=768, T=1024: 6N + 12*L*d*T per token
    per_token = metrics.transformer_train_flops_per_token(124_000_000, 12, 768, 1024)
    assert per_token == 6 * 124e6 + 12 * 12 * 768 * 1024
    assert metrics.mfu(100_000, per_token, 790.0) == pytest.approx(100 * 100_000 * per_token / 790e12)


def test_mean_accept_length_by_hand():
    # 2 steps kept 1 token, 1 kept 2, 3 kept 4: (2*1 + 1*2 + 3*4) / 6 = 16/6
    assert metrics.mean_accept_length([2, 1, 0, 3]) == pytest.approx(16 / 6)
    assert metrics.mean_accept_length([7]) == 1.0  # plain decoding
    assert metrics.mean_accept_length([0, 0]) is None
    assert metrics.speedup(30.0, 10.0) == pytest.approx(3.0)


def test_gap_in_ulps():
    # bf16 (eps 2^-7): at 20.0 (binade [16, 32)) the spacing is 2^-7 * 16 = 0.125
    assert metrics.gap_in_ulps(0.25, 20.0, 2.0**-7) == pytest.approx(2.0)
    assert metrics.gap_in_ulps(-0.125, -17.0, 2.0**-7) == pytest.approx(1.0)
    # fp32 (eps 2^-23) at 1.5: spacing 2^-23
    assert metrics.gap_in_ulps(3 * 2.0**-23, 1.5, 2.0**-23) == pytest.approx(3.0)
    assert metrics.gap_in_ulps(0.0, 0.0, 2.0**-23) == 0.0


def test_ddp_formulas_by_hand():
    # Pairs (61, 59.5), (70, 60), (58, 57.5): differences 1.5, 10, 0.5: median 1.5 ms left exposed.
    assert metrics.exposed_comm_ms([61.0, 70.0, 58.0], [59.5, 60.0, 57.5]) == pytest.approx(1.5)
    # The median of the differences, not the difference of the medians (22 - 11 = 11):
    # differences 2, -8, 21, median 2.
    assert metrics.exposed_comm_ms([12.0, 22.0, 32.0], [10.0, 30.0, 11.0]) == pytest.approx(2.0)
    assert metrics.exposed_comm_ms([59.0, 60.0], [59.5, 60.5]) == pytest.approx(-0.5)  # signed: noise is the caller's test
    # 2 GiB in 10 ms on 8 ranks: algbw 214.7 GB/s; reduce_scatter moves 7/8 of it per link.
    assert metrics.busbw_GBps("reduce_scatter", 2 * 2**30, 10.0, 8) == pytest.approx(2**31 / 1e7 * 7 / 8)
    # One rank sends nothing: busbw is 0 whatever the time.
    assert metrics.busbw_GBps("all_reduce", 1e9, 5.0, 1) == 0.0
    # 2 ranks at 1.9x one rank's throughput: 95%.
    assert metrics.scaling_efficiency(190.0, 100.0, 2) == pytest.approx(0.95)


def test_relative_difference_by_hand():
    # a loss of 4.04 against the reference's 4.00 is 1% higher; 3.96 is 1% lower
    assert metrics.relative_difference(4.04, 4.00) == pytest.approx(0.01)
    assert metrics.relative_difference(3.96, 4.00) == pytest.approx(-0.01)
    # elementwise on curves, against the reference's magnitude
    import numpy as np

    got = metrics.relative_difference(np.array([10.0, 6.0, -2.2]), np.array([8.0, 6.0, -2.0]))
    assert got.tolist() == pytest.approx([0.25, 0.0, -0.1])


def test_energy_formulas_by_hand():
    # 45 J over 9 steps: 5 J a step; 2048 tokens a step at 5 J: 409.6 tokens per J
    assert metrics.joules_per_step(45.0, 9) == 5.0
    assert metrics.tokens_per_joule(2048, 5.0) == pytest.approx(409.6)
    # no energy measured (a CPU, a short window): nothing derived from it
    assert metrics.joules_per_step(None, 9) is None and metrics.tokens_per_joule(2048, None) is None
    assert metrics.joules_per_step(45.0, 0) is None


def test_window_pairs_by_hand():
    # Square 4 with a window of 2: the queries at positions 0..3 see 1, 2, 2, 2 keys: 7 pairs.
    assert metrics.attention_pairs(4, 4, True, window=2) == 7
    # 3 queries over 10 keys, window 4: positions 7, 8, 9 each see 4 keys: 12.
    assert metrics.attention_pairs(3, 10, True, window=4) == 12
    # 7 over 9, window 3: positions 2..8, each sees 3 keys: 21. Window 1: each sees itself.
    assert metrics.attention_pairs(7, 9, True, window=3) == 21
    assert metrics.attention_pairs(5, 5, True, window=1) == 5
    # A window as long as the keys masks nothing: the causal count (square: S^2/2).
    assert metrics.attention_pairs(5, 5, True, window=5) == metrics.attention_pairs(5, 5, True) == 12.5
    # fwd FLOPs: 4·B·H·pairs·D
    assert metrics.attention_flops(2, 3, 4, 4, 8, True, "fwd", window=2) == 4 * 2 * 3 * 7 * 8


@pytest.mark.parametrize("q_len, kv_len, window", [(1, 9, 4), (5, 17, 3), (17, 17, 6), (6, 40, 9)])
def test_window_pairs_are_the_unmasked_entries(q_len, kv_len, window):
    visible = naive.bias(q_len, kv_len, True, naive.Masks(window=window), None, torch.float64)
    assert metrics.attention_pairs(q_len, kv_len, True, window) == int(torch.isfinite(visible).sum())
