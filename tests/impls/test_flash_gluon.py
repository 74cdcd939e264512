"""Tests for impls/attention/flash_gluon.py, the Gluon forward for Hopper, and
for how flash.attention() picks between it and the Triton forward.

No interpreter runs Gluon, so the kernel itself is tested on a Hopper GPU only
(tests marked `gpu`, skipped elsewhere with the reason). The CPU tests check
that off Hopper everything stays on the Triton kernel, and, with a stand-in
for flash_gluon, the choice of forward, the backward on its output and the
kernels recorded on flash.Kernels. On the GPU machine, only the Gluon GPU tests:

    python3 -m pytest -q tests/impls/test_flash_gluon.py -m gpu
"""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import slow_after_first

if not torch.cuda.is_available():
    # Must happen before triton is imported; the suite's conftest does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from impls.attention import flash  # noqa: E402
from impls.attention import flash_gluon as fg  # noqa: E402
from impls.attention import flash_triton as ft  # noqa: E402
from tests.impls.test_flash_triton import TOL, make, reference, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_kernel = pytest.mark.skipif(ft.TRITON_ERROR is not None, reason=str(ft.TRITON_ERROR))


def _hopper_reason() -> str | None:
    if fg.GLUON_ERROR is not None:
        return fg.GLUON_ERROR
    if not torch.cuda.is_available():
        return "needs a CUDA device (the Gluon kernel has no interpreter)"
    if ft.INTERPRET:
        return "TRITON_INTERPRET is set: Gluon does not run under the interpreter"
    cap = torch.cuda.get_device_capability()
    if cap[0] != 9:
        return f"the Gluon kernel needs a Hopper (sm_90) GPU, this is sm_{cap[0]}{cap[1]}"
    return None


HOPPER_REASON = _hopper_reason()
hopper = pytest.mark.skipif(HOPPER_REASON is not None, reason=str(HOPPER_REASON))


def inputs(B, H, Hkv, S, D, dtype, layout="bhsd", seed=0, grad=False):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (make((B, h, S, D), dtype, layout, gen=gen).requires_grad_(grad) for h in (H, Hkv, Hkv))
    return q, k, v


def lse_reference(q, k, v, causal, scale):
    """float64 logsumexp of the scaled logits in base 2 (B, H, S): what both forwards save for the backward."""
    H, Hkv, S = q.shape[1], k.shape[1], q.shape[2]
    logits = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.logsumexp(logits, -1) * ft.LOG2E


def check_forward(q, k, v, causal, config=None):
    """flash_gluon.forward against float64: o (relative), lse (absolute, base 2), o in q's layout.
    Returns the config that ran."""
    D = q.shape[-1]
    scale = 1 / math.sqrt(D)
    o, lse, ran = fg.forward(q, k, v, causal, scale, config)
    assert o.shape == q.shape and o.dtype == q.dtype and o.stride() == q.stride()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    err = rel_err(o, reference(q, k, v, causal, scale))
    lse_err = (lse.double() - lse_reference(q, k, v, causal, scale)).abs().max().item()
    where = f"S={q.shape[2]} D={D} causal={causal} {q.dtype} config={fg.describe('fwd', ran)}"
    assert err < TOL[q.dtype], f"out relative error {err:.2e} over {TOL[q.dtype]} ({where})"
    # lse is fp32 with the logits summed in fp32: H200 measured ~1e-6 (docs/attention-kernels.md).
    assert lse_err < 1e-3, f"lse off by {lse_err:.2e} ({where})"
    return ran


def check_attention_grads(B, H, Hkv, S, D, causal, dtype, layout="bhsd", seed=0, **kwargs):
    """flash.attention(**kwargs) forward and backward against float64; returns the kernels that ran, as text."""
    q, k, v = inputs(B, H, Hkv, S, D, dtype, layout, seed, grad=True)
    ran = flash.Kernels()
    out = flash.attention(q, k, v, causal, kernels=ran, **kwargs)
    desc = str(ran)
    dout = torch.randn(out.shape, dtype=dtype, device=q.device, generator=torch.Generator(q.device).manual_seed(seed))
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal, 1 / math.sqrt(D))
    ref.backward(dout.double())
    errors = dict(out=rel_err(out, ref), dq=rel_err(q.grad, q64.grad), dk=rel_err(k.grad, k64.grad),
                  dv=rel_err(v.grad, v64.grad))
    assert all(e < TOL[dtype] for e in errors.values()), f"relative errors {errors} over {TOL[dtype]} ({desc})"
    return str(ran)


# ---------------------------------------------------------------- CPU (and any device)


def test_tuner_times_once_and_keeps_the_choice_on_disk(tmp_path, monkeypatch):
    # The Gluon kernels' tuner: the fastest config per key, timed once, then read back from
    # disk by a new process (a new Tuner), and timed again for a new key, device or config list.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    times = {(128, 128, 2, "ws"): 3.0, (128, 128, 2, "pingpong"): 1.0, (128, 64, 3, "ws"): 2.0}
    timed = []

    def time_ms(config):
        timed.append(config)
        return times[config]

    configs = list(times)
    assert fg.Tuner("fwd").pick((8192, 128), configs, time_ms, "gpu0") == (128, 128, 2, "pingpong")
    assert len(timed) == 3
    assert fg.Tuner("fwd").pick((8192, 128), configs, time_ms, "gpu0") == (128, 128, 2, "pingpong")
    assert len(timed) == 3
    fg.Tuner("fwd").pick((1024, 128), configs, time_ms, "gpu0")
    fg.Tuner("fwd").pick((8192, 128), configs, time_ms, "gpu1")
    fg.Tuner("dq").pick((8192, 128), configs, time_ms, "gpu0")
    assert fg.Tuner("fwd").pick((8192, 128), configs[::2], time_ms, "gpu0") == (128, 64, 3, "ws")
    assert len(timed) == 3 * 4 + 2
    assert fg.Tuner("fwd").pick((1, 1), [(64, 3)], time_ms) == (64, 3)  # one config: nothing to time
    assert len(timed) == 14
    (tmp_path / "genbench-gluon-tuning.json").write_text("not json")  # a damaged file is timed over
    assert fg.Tuner("fwd").pick((8192, 128), configs, time_ms, "gpu0") == (128, 128, 2, "pingpong")
    assert len(timed) == 17


def test_tuner_takes_a_shipped_choice_untimed_and_forgets_on_retune(tmp_path, monkeypatch):
    # impls/attention/tuning.py hands shipped choices over with prefer(); forget() (--retune) times again.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    times = {(128, 128, 2, "ws"): 3.0, (128, 128, 2, "pingpong"): 1.0}
    timed = []

    def time_ms(config):
        timed.append(config)
        return times[config]

    tuner = fg.Tuner("fwd")
    tuner.prefer((8192, 128), (128, 128, 2, "ws"), "gpu0")
    assert tuner.pick((8192, 128), list(times), time_ms, "gpu0") == (128, 128, 2, "ws") and timed == []
    assert tuner.pick((8192, 128), [(128, 128, 2, "pingpong")] * 2, time_ms, "gpu0") == (128, 128, 2, "pingpong")
    assert len(timed) == 2  # the shipped choice is not among these configs: timed
    tuner.forget()
    assert tuner.pick((8192, 128), list(times), time_ms, "gpu0") == (128, 128, 2, "pingpong") and len(timed) == 4


@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="needs triton.experimental.gluon")
@pytest.mark.parametrize("version", ["3.6.0", "3.9.0"])
def test_supported_leaves_the_release_to_the_self_check(monkeypatch, version):
    # Whether a release may run the kernels is gluon_check's question (tests/impls/test_gluon_check.py):
    # supported() answers on the inputs alone, here that CPU tensors are no Hopper GPU's.
    monkeypatch.setattr(fg.triton, "__version__", version)
    q = torch.empty(1, 1, 4, 128)
    assert "Hopper" in fg.supported(q, q, q)


@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="needs triton.experimental.gluon")
def test_lse_rows_start_16_byte_aligned_per_head():
    # The head-dim-64 dK/dV loader reads lse and delta by TMA from one flat row, one head after another:
    # each head must start 16-byte aligned (a misaligned box faulted on the GPU at S=333).
    lse = torch.randn(2, 3, 8)
    assert fg._tma_rows(lse) is lse  # S a multiple of 4, contiguous: read in place
    for t in (torch.randn(2, 3, 333), torch.randn(2, 8, 3).transpose(1, 2)):
        rows = fg._tma_rows(t)
        assert rows.is_contiguous() and rows.shape[:2] == t.shape[:2] and rows.shape[2] % 4 == 0
        assert rows.shape[2] - t.shape[2] < 4 and torch.equal(rows[..., :t.shape[2]], t)
        assert not rows[..., t.shape[2]:].any()


@needs_kernel
@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="needs triton.experimental.gluon")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dq_from_accumulator_undoes_the_register_order(dtype):
    # The one-kernel backward adds dQ into an fp32 accumulator tile by tile in the order a warpgroup's
    # registers hold them (flash_gluon._register_order); dq_from_accumulator puts it back as rows, scaled,
    # into any layout of dq. Here the accumulator is built from the layout as documented, with a partial last
    # block (S=100) and a (B, S, H, D) dq.
    B, H, S = 2, 3, 100
    n = -(-S // 64)
    want = torch.randn(B, H, n * 64, 128, device=DEVICE)
    # row w*16 + mh*8 + r, column W*64 + c*8 + l*2 + nb at c*512 + w*128 + r*16 + l*4 + mh*2 + nb of tile W
    tiles = want.view(B, H, n, 4, 2, 8, 2, 8, 4, 2)  # (b, h, block, w, mh, r, W, c, l, nb)
    dqa = tiles.permute(0, 1, 2, 6, 7, 3, 5, 8, 4, 9).contiguous().view(-1)  # (b, h, block, W, c, w, r, l, mh, nb)
    dq = torch.full((B, S, H, 128), float("nan"), device=DEVICE, dtype=dtype).transpose(1, 2)
    fg.dq_from_accumulator(dqa, dq, 0.5)
    torch.testing.assert_close(dq.float(), want[:, :, :S] * 0.5, rtol=2 ** -7, atol=0)  # bf16: its rounding


def test_supported_refuses_cpu_tensors():
    q = torch.randn(1, 2, 8, 128, dtype=torch.bfloat16)
    reason = fg.supported(q, q, q)
    assert reason is not None and reason
    assert flash.gluon_reason(q, q, q) is not None
    assert not flash.uses_gluon(q, q, q, gluon=True)


@needs_kernel
@pytest.mark.skipif(not ft.INTERPRET, reason="the interpreter path: CPU only")
def test_gluon_true_under_interpreter_runs_triton():
    # gluon=True asks for the Gluon forward "wherever it can run": nowhere on CPU.
    desc = check_attention_grads(1, 2, 1, 20, 32, True, torch.float16, gluon=True)
    parts = desc.split("; ")
    assert [p.split(" BLOCK_M=")[0] for p in parts] == ["triton fwd", "triton bwd dkdv", "triton bwd dq"], desc
    assert flash._GLUON is None, "flash imported flash_gluon on the interpreter path"


@needs_kernel
@pytest.mark.skipif(not ft.INTERPRET, reason="the interpreter path: CPU only")
def test_interpreter_run_does_not_import_gluon():
    # A fresh process: flash on the interpreter never loads flash_gluon.
    code = (
        "import os, sys, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from impls.attention import flash\n"
        "q = torch.randn(1, 1, 5, 16)\n"
        "ran = flash.Kernels()\n"
        "flash.attention(q, q, q, True, gluon=True, kernels=ran)\n"
        "assert str(ran).startswith('triton fwd'), ran\n"
        "assert 'impls.attention.flash_gluon' not in sys.modules\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)


@needs_kernel
@pytest.mark.skipif(not ft.INTERPRET, reason="the interpreter path: CPU only")
@pytest.mark.parametrize("D, gluon, expect", [
    (32, None, "gluon"),   # a preferred head dim
    (16, None, "triton"),  # supported, not preferred
    (16, True, "gluon"),   # forced where it can run
    (32, False, "triton"),  # opted out
])
def test_choice_of_forward_with_a_stand_in(monkeypatch, D, gluon, expect):
    # A stand-in flash_gluon whose forward is the Triton one: checks attention()'s
    # choice, that the backward runs on the chosen forward's o/lse, and the kernels recorded.
    def forward(q, k, v, causal, scale, config=None):
        o, lse, _ = ft.forward(q, k, v, causal, scale)
        return o, lse, (32, 16, 1, "stand-in")

    fake = SimpleNamespace(supported=lambda q, k, v: None, PREFERRED_HEAD_DIMS=(32,), forward=forward,
                           describe=lambda kernel, config: "BLOCK_M=32 BLOCK_N=16 stages=1 warps=4",
                           supported_bwd=lambda q, k, v, do: "stand-in: no dK/dV kernel")
    monkeypatch.setattr(flash, "_gluon_module", lambda q: fake)
    monkeypatch.setattr(flash.gluon_check, "verdict", lambda device: flash.gluon_check.Verdict(True))
    assert flash.uses_gluon(*inputs(1, 1, 1, 4, D, torch.float32), gluon=gluon) == (expect == "gluon")
    desc = check_attention_grads(1, 2, 1, 19, D, True, torch.float32, gluon=gluon)
    parts = desc.split("; ")
    assert parts[0].startswith(f"{expect} fwd BLOCK_M="), desc
    assert parts[1].startswith("triton bwd dkdv BLOCK_M=") and parts[2].startswith("triton bwd dq BLOCK_M="), desc
    if expect == "gluon":
        assert parts[0] == "gluon fwd BLOCK_M=32 BLOCK_N=16 stages=1 warps=4"


# ---------------------------------------------------------------- Hopper GPU only


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", slow_after_first([torch.bfloat16, torch.float16]), ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", slow_after_first([128, 64]))
@pytest.mark.parametrize("causal", slow_after_first([False, True]))
def test_gpu_forward_matches_float64(dtype, D, causal):
    # Odd lengths (one token, one block, tails of 1 and 77 rows), GQA groups of 2, autotuned config.
    for seed, S in enumerate((1, 64, 257, 333)):
        check_forward(*inputs(1, 4, 2, S, D, dtype, seed=seed), causal)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_bshd_view(causal):
    # (B, S, H, D) tensors seen as (B, H, S, D) through transpose(1, 2): read in place, o in the same layout.
    q, k, v = inputs(2, 6, 3, 257, 128, torch.bfloat16, layout="bshd", seed=5)
    check_forward(q, k, v, causal)


@hopper
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("D, config", [(D, c) for D in sorted(fg.CONFIGS) for c in fg.CONFIGS[D]],
                         ids=lambda x: str(x).replace(" ", ""))
def test_gpu_each_config(D, config):
    for causal in (False, True) if config[3] != "persistent" else (False, ):
        check_forward(*inputs(1, 4, 2, 333, D, torch.bfloat16, seed=D), causal, config)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("D", slow_after_first([128, 64]))
def test_gpu_persistent_forward_walks_tiles(D):
    # The persistent kernel (non-causal only): several heads and lengths so that each program walks
    # more than one tile, and a (B, S, H, D) view; asked for causal it refuses, and the tuner never
    # offers it there.
    config = next(c for c in fg.CONFIGS[D] if c[3] == "persistent")
    for seed, (B, H, Hkv, S) in enumerate([(1, 4, 2, 333), (2, 64, 16, 1000), (3, 40, 40, 128)]):
        check_forward(*inputs(B, H, Hkv, S, D, torch.bfloat16, seed=seed), False, config)
    check_forward(*inputs(2, 6, 3, 257, D, torch.bfloat16, layout="bshd", seed=9), False, config)
    with pytest.raises(ValueError, match="non-causal"):
        check_forward(*inputs(1, 2, 2, 64, D, torch.bfloat16), True, config)
    ran = fg.describe("fwd", check_forward(*inputs(1, 2, 2, 300, D, torch.bfloat16), True))
    assert not ran.startswith("persistent"), ran


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("D", slow_after_first([128, 64]))
@pytest.mark.parametrize("causal", slow_after_first([True, False]))
def test_gpu_attention_gluon_grads(D, causal):
    # Gluon forward and backward (Triton's delta) against float64 gradients: at head dim 128 the
    # one-kernel backward, at 64 the dK/dV and dQ kernels.
    desc = check_attention_grads(1, 4, 2, 333, D, causal, torch.bfloat16, gluon=True)
    if D in fg.FUSED_HEAD_DIMS:
        assert desc.startswith("gluon fwd ") and "; gluon bwd dkdv+dq " in desc and "bwd dq " not in desc, desc
    else:
        assert desc.startswith("gluon fwd ") and "; gluon bwd dkdv " in desc and "; gluon bwd dq " in desc, desc


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", slow_after_first([True, False]))
def test_gpu_one_kernel_backward(causal):
    # The one-kernel backward on what tests its edges: one token, partial key and query blocks,
    # groups of 4 query heads, several programs a head, a (B, S, H, D) view, fp16; and fused_bwd=False
    # runs the pair of kernels on the same input.
    for seed, (B, H, Hkv, S, layout, dtype) in enumerate([(1, 4, 2, 1, "bhsd", torch.bfloat16),
                                                          (2, 8, 2, 333, "bhsd", torch.bfloat16),
                                                          (1, 4, 4, 1000, "bshd", torch.float16)]):
        desc = check_attention_grads(B, H, Hkv, S, 128, causal, dtype, layout, seed=seed, gluon=True)
        assert "; gluon bwd dkdv+dq " in desc, desc
    desc = check_attention_grads(1, 4, 2, 333, 128, causal, torch.bfloat16, gluon=True, fused_bwd=False)
    assert "; gluon bwd dkdv " in desc and "; gluon bwd dq " in desc, desc


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", slow_after_first([True, False]))
def test_gpu_triton_dq_after_gluon_dkdv(causal):
    desc = check_attention_grads(1, 4, 2, 333, 128, causal, torch.bfloat16, gluon=True, gluon_dq=False)
    assert "; gluon bwd dkdv " in desc and "; triton bwd dq " in desc, desc


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("concurrent", slow_after_first([True, False]))
def test_gpu_dq_beside_or_after_dkdv(concurrent):
    # dQ beside dK/dV on a side stream (attention(..., concurrent_dq=True)) or after it, twice in a row so that
    # the second call's inputs may reuse memory the first freed, and once inside a caller's own stream.
    for seed, (S, causal) in enumerate([(333, False), (2000, True)]):
        desc = check_attention_grads(2, 4, 2, S, 128, causal, torch.bfloat16, seed=seed, gluon=True,
                                     concurrent_dq=concurrent, fused_bwd=False)
        assert ("second stream" in desc) == concurrent, desc
    with torch.cuda.stream(torch.cuda.Stream()):
        check_attention_grads(1, 4, 4, 700, 128, True, torch.bfloat16, layout="bshd", seed=3, gluon=True,
                              concurrent_dq=concurrent, fused_bwd=False)
    torch.cuda.synchronize()


@hopper
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("config", fg.BWD_CONFIGS if fg is not None else [], ids=str)
def test_gpu_each_dkdv_config(monkeypatch, config):
    monkeypatch.setattr(fg, "BWD_CONFIGS", [config])
    for causal, S in ((False, 333), (True, 200)):
        desc = check_attention_grads(1, 4, 2, S, 128, causal, torch.bfloat16, seed=S, gluon=True, fused_bwd=False)
        assert f"BLOCK_M={config[0]} stages={config[1]}" in desc, desc


@hopper
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("config", fg.DQ_CONFIGS if fg is not None else [], ids=str)
def test_gpu_each_dq_config(monkeypatch, config):
    # The Gluon dQ kernel (attention(..., gluon_dq=True)) with each of its configs.
    monkeypatch.setattr(fg, "DQ_CONFIGS", [config])
    for causal, S, D in ((False, 333, 128), (True, 200, 128), (True, 257, 64)):
        desc = check_attention_grads(1, 4, 2, S, D, causal, torch.bfloat16, seed=S, gluon=True, gluon_dq=True,
                                     fused_bwd=False)
        assert f"gluon bwd dq ws BLOCK_M=128 BLOCK_N={config[0]} stages={config[1]}" in desc, desc


@hopper
@pytest.mark.gpu
def test_gpu_attention_gluon_bshd_fp16_grads():
    desc = check_attention_grads(2, 4, 2, 257, 128, True, torch.float16, layout="bshd", seed=3, gluon=True)
    assert desc.startswith("gluon fwd")


@hopper
@pytest.mark.gpu
def test_gpu_default_choice_follows_preferred_head_dims():
    for D in (64, 128):
        q, k, v = inputs(1, 2, 2, 100, D, torch.bfloat16)
        ran = flash.Kernels()
        flash.attention(q, k, v, True, kernels=ran)
        family = "gluon" if D in fg.PREFERRED_HEAD_DIMS else "triton"
        assert str(ran).startswith(f"{family} fwd"), (D, ran)
        flash.attention(q, k, v, True, gluon=False, kernels=ran)
        assert str(ran).startswith("triton fwd"), ran
