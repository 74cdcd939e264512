"""Developer tool: check and time the Triton FlashAttention kernel against PyTorch SDPA on one GPU.

Not part of the benchmark suite (`genbench attention` does the real runs); this
is what the development figures in docs/attention-kernels.md come from. One
invocation does everything, so that it fits in one call to a lent GPU; from the
repository root:

    PYTHONUNBUFFERED=1 python3 -m tools.tune_flash --out $OUT

1. the two ceilings: a large bf16 matrix product and a device-to-device copy;
2. correctness of every block configuration (each forced in turn) on an odd
   length with GQA, against float64, in parallel worker processes - which also
   fills Triton's on-disk kernel cache, so the main process compiles nothing;
3. autotuned timings, forward and forward+backward, of our kernel (pointer
   loads and, on Hopper, descriptor loads) and of SDPA's flash, cuDNN and
   memory-efficient backends, with triton.testing.do_bench (median, L2 flushed);
   this tool always runs the Triton forward (attention(..., gluon=False)):
   `--gluon` checks and times flash_gluon's forward, `--gluon-bwd` its
   backward kernels, `--schedule` how they are launched (dQ on a second
   stream, the persistent forward);
4. the autotuner's per-config timings and each compiled kernel's registers,
   spills and shared memory.

Writes correctness.csv, timing.csv, autotune.csv and kernels.csv under --out
and prints a short table last. `--experiment` times only the forward variants
in EXPERIMENT (experiment.csv); `--check-dtypes float16,float32` runs only
those correctness jobs; `--dry-run` exercises the correctness phase on CPU
under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from impls.attention import flash
from impls.attention import flash_triton as ft
from impls.attention import naive

ROOT = Path(__file__).resolve().parents[1]  # the workers run `python -m tools.tune_flash` from here
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --dry-run under TRITON_INTERPRET=1
KERNELS = {"fwd": ft._fwd_kernel, "dkdv": ft._bwd_dkdv_kernel, "dq": ft._bwd_dq_kernel}
RAN = flash.Kernels()  # the kernels the last fa() call ran
GLUON_RAN = {}  # "fwd", "dkdv", "dq" -> the last flash_gluon launch of that kernel here, described


def fa(q, k, v, causal, **options):
    """flash.attention(q, k, v, causal, **options), recording what ran on RAN."""
    return flash.attention(q, k, v, causal, kernels=RAN, **options)


def gluon_forward(q, k, v, causal, scale, config=None):
    from impls.attention import flash_gluon as fg
    o, lse, config = fg.forward(q, k, v, causal, scale, config)
    GLUON_RAN["fwd"] = fg.describe("fwd", config)
    return o, lse


def gluon_dkdv(q, k, v, do, lse, delta, causal, scale, config=None):
    from impls.attention import flash_gluon as fg
    dk, dv, config = fg.backward_dkdv(q, k, v, do, lse, delta, causal, scale, config)
    GLUON_RAN["dkdv"] = fg.describe("dkdv", config)
    return dk, dv


def gluon_dq(q, k, v, do, lse, delta, causal, scale, config=None):
    from impls.attention import flash_gluon as fg
    dq, config = fg.backward_dq(q, k, v, do, lse, delta, causal, scale, config)
    GLUON_RAN["dq"] = fg.describe("dq", config)
    return dq


# ---------------------------------------------------------------- cases

def timed_cases(quick: bool):
    """(label, B, H, S, D, causal, layout) of the timed shapes: 16k tokens, 16 heads, bf16."""
    cases = [(f"D{D}-S8192-{'causal' if c else 'full'}", 2, 16, 8192, D, c, "bhsd")
             for D in (128, 64) for c in (False, True)]
    cases.append(("D128-S8192-full-bshd", 2, 16, 8192, 128, False, "bshd"))
    if not quick:
        for S in (1024, 4096, 16384):
            for c in (False, True):
                cases.append((f"D128-S{S}-{'causal' if c else 'full'}", 16384 // S, 16, S, 128, c, "bhsd"))
    # The first case again, last: its spread says which differences are noise.
    cases.append((cases[0][0] + "-repeat",) + cases[0][1:])
    return cases


def check_jobs(tma: bool):
    """Correctness jobs: every config index for the timed kinds, plus single configs for the rest.

    A job is (dtype, D, causal, use_tma, fwd_index, dkdv_index, dq_index).
    """
    n = max(len(ft.FWD_CONFIGS), len(ft.DKDV_CONFIGS), len(ft.DQ_CONFIGS))
    kinds = [("bfloat16", D, causal, use_tma) for D in (128, 64) for causal in (False, True)
             for use_tma in ((False, True) if tma and D == 128 else (False,))]
    # What the GPU tests autotune (so their compiles come from the disk cache too).
    kinds += [("float16", 64, True, False), ("float32", 64, True, False)]
    jobs = [(*kind, i % len(ft.FWD_CONFIGS), i % len(ft.DKDV_CONFIGS), i % len(ft.DQ_CONFIGS))
            for kind in kinds for i in range(n)]
    # Other head dims, one small config each (the last of each list: fits D=256).
    jobs += [("bfloat16", D, True, False, -1, -1, -1) for D in (32, 96, 256)]
    return jobs


# ---------------------------------------------------------------- helpers

def reference(q, k, v, causal, scale):
    """The naive implementation in float64 (differentiable: the tests call backward on it)."""
    return naive.attention(q.double(), k.double(), v.double(), causal, scale)


def short(cfg):
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def forced_fwd(config):
    """Give the forward kernel one explicit triton.Config for the duration."""
    saved = ft._fwd_kernel.configs
    ft._fwd_kernel.configs = [config]
    try:
        yield
    finally:
        ft._fwd_kernel.configs = saved


@contextlib.contextmanager
def forced(fwd=None, dkdv=None, dq=None):
    """Give each autotuned kernel a single config (no benchmarking) for the duration."""
    saved = {name: kern.configs for name, kern in KERNELS.items()}
    try:
        for name, idx, pool in (("fwd", fwd, ft.FWD_CONFIGS), ("dkdv", dkdv, ft.DKDV_CONFIGS),
                                ("dq", dq, ft.DQ_CONFIGS)):
            if idx is not None:
                KERNELS[name].configs = [pool[idx % len(pool)]]  # modulo: the interpreter has one config
        yield
    finally:
        for name, kern in KERNELS.items():
            kern.configs = saved[name]


def run_check(job, B=1, H=4, Hkv=2, S=333 if DEVICE == "cuda" else 41):
    """Forward and backward of one forced configuration against float64; a dict row. The length is odd, so
    that every kernel ends on a partial block; on a CPU (the interpreter's blocks are 16 and 32 rows) 41
    still spans several blocks of each kernel, the causal diagonal included."""
    dtype_name, D, causal, use_tma, fi, ki, qi = job
    dtype = getattr(torch, dtype_name)
    row = dict(dtype=dtype_name, D=D, causal=causal, tma=use_tma, B=B, H=H, Hkv=Hkv, S=S,
               fwd_cfg=short(ft.FWD_CONFIGS[fi % len(ft.FWD_CONFIGS)]),
               dkdv_cfg=short(ft.DKDV_CONFIGS[ki % len(ft.DKDV_CONFIGS)]),
               dq_cfg=short(ft.DQ_CONFIGS[qi % len(ft.DQ_CONFIGS)]))
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr(job).encode()))
    q, k, v = (torch.randn(B, h, S, D, device=DEVICE, dtype=dtype, generator=gen) for h in (H, Hkv, Hkv))
    do = torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, generator=gen)
    scale = 1 / math.sqrt(D)
    try:
        with forced(fi, ki, qi):
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            out = fa(qg, kg, vg, causal, use_tma=use_tma, gluon=False)
            out.backward(do)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            row["ran"] = str(RAN)
    except Exception as exc:  # noqa: BLE001 - record and go on: one config's failure must not hide the rest
        name = type(exc).__name__
        row["skipped" if name == "OutOfResources" else "error"] = f"{name}: {str(exc)[:200]}"
        return row
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal, scale)
    ref.backward(do.double())
    row.update(out=rel_err(out, ref), dq=rel_err(qg.grad, q64.grad), dk=rel_err(kg.grad, k64.grad),
               dv=rel_err(vg.grad, v64.grad), nan=bool(torch.isnan(out).any() or torch.isnan(qg.grad).any()))
    return row


def tflops(B, H, S, D, causal, ms, with_bwd):
    # Forward: two (S x S x D) products per head, 2 FLOPs per multiply-add: 4 B H S^2 D;
    # half of it under a causal mask. Backward counted as 2.5 forwards (FlashAttention-2 paper's convention).
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0) * (3.5 if with_bwd else 1.0)
    return flops / (ms * 1e-3) / 1e12


def make_inputs(B, H, S, D, layout, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEVICE).manual_seed(S * D + B)

    def one():
        if layout == "bshd":
            return torch.randn(B, S, H, D, device=DEVICE, dtype=dtype, generator=gen).transpose(1, 2)
        return torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, generator=gen)

    q, k, v = one(), one(), one()
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.randn_like(q)


def impls(tma: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def f(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return f

    out = {"triton": lambda q, k, v, c: fa(q, k, v, c, use_tma=False, gluon=False)}
    if tma:
        out["triton-tma"] = lambda q, k, v, c: fa(q, k, v, c, use_tma=True, gluon=False)
    out.update({"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)})
    return out


def kernel_report():
    """Registers, spills and shared memory of every compiled variant of our kernels."""
    rows = []
    for name, kern in KERNELS.items():
        jit = kern.fn
        for device, entry in getattr(jit, "device_caches", {}).items():
            for key, ck in entry[0].items():
                meta = getattr(ck, "metadata", None)
                ptx = getattr(ck, "asm", {}).get("ptx", "")
                consts = getattr(getattr(ck, "src", None), "constants", {})
                rows.append(dict(kernel=name, constants=str({k: v for k, v in consts.items()
                                                             if not isinstance(v, str)})[:300],
                                 warps=getattr(meta, "num_warps", ""), stages=getattr(meta, "num_stages", ""),
                                 regs=getattr(ck, "n_regs", ""), spills=getattr(ck, "n_spills", ""),
                                 smem=getattr(meta, "shared", ""), wgmma="wgmma" in ptx,
                                 tma="cp.async.bulk.tensor" in ptx))
    return rows


def write_csv(path, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------- phases

def ceilings():
    from triton.testing import do_bench
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    mm = 2 * 8192**3 / (ms * 1e-3) / 1e12
    x = torch.empty(2 * 1024**3, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    bw = 2 * x.numel() / (ms * 1e-3) / 1e12
    del a, b, x, y
    return mm, bw


def start_checks(jobs, workers, tmpdir):
    """Start the correctness jobs in `workers` processes (their compiles run in parallel)."""
    os.makedirs(tmpdir, exist_ok=True)
    procs = []
    for w in range(workers):
        shard = jobs[w::workers]
        if not shard:
            continue
        path = os.path.join(tmpdir, f"check_{w}.json")
        procs.append((subprocess.Popen([sys.executable, "-m", "tools.tune_flash", "--worker", json.dumps(shard),
                                        "--worker-out", path], cwd=ROOT),
                      path, shard))
    return procs


def collect_checks(procs):
    rows = []
    for p, path, shard in procs:
        rc = p.wait()
        if rc != 0 or not os.path.exists(path):
            rows += [dict(job=str(j), error=f"worker exit {rc}") for j in shard]
            continue
        with open(path) as f:
            rows += json.load(f)
    return rows


def checks_parallel(jobs, workers, tmpdir):
    return collect_checks(start_checks(jobs, workers, tmpdir))


def timing(cases, tma, rep_ms):
    from triton.testing import do_bench
    rows, tune_rows = [], []
    fns = impls(tma)
    for label, B, H, S, D, causal, layout in cases:
        q, k, v, do = make_inputs(B, H, S, D, layout)
        outs = {}
        for name, f in fns.items():
            if name == "triton-tma" and (D != 128 or S != 8192):
                continue
            row = dict(case=label, impl=name, B=B, H=H, S=S, D=D, causal=causal, layout=layout)
            try:
                with torch.no_grad():
                    out = f(q, k, v, causal)  # autotunes here on first use of a key
                ms_f = do_bench(lambda: f(q, k, v, causal), warmup=25, rep=rep_ms, return_mode="median")
                out_g = f(q, k, v, causal)
                grads = torch.autograd.grad(out_g, (q, k, v), do)
                ms_fb = do_bench(lambda: torch.autograd.grad(f(q, k, v, causal), (q, k, v), do),
                                 warmup=25, rep=rep_ms, return_mode="median")
                outs[name] = (out, grads)
                row.update(fwd_ms=ms_f, fwd_tflops=tflops(B, H, S, D, causal, ms_f, False),
                           fwdbwd_ms=ms_fb, fwdbwd_tflops=tflops(B, H, S, D, causal, ms_fb, True))
                if name.startswith("triton"):
                    row["config"] = str(RAN)
                    for kname, kern in KERNELS.items():
                        for cfg, t in getattr(kern, "configs_timings", {}).items():
                            tune_rows.append(dict(case=label, impl=name, kernel=kname, config=short(cfg),
                                                  ms=t[0] if isinstance(t, (list, tuple)) else t))
                        kern.configs_timings = {}
            except Exception as exc:  # noqa: BLE001 - an unsupported backend is a row, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(row, flush=True)
        # Agreement with cuDNN at the timed size (both bf16): catches a config that breaks only at scale.
        if "sdpa-cudnn" in outs:
            ref_out, ref_grads = outs["sdpa-cudnn"]
            for r in rows:
                if r["case"] == label and r["impl"] in outs and r["impl"].startswith("triton"):
                    out, grads = outs[r["impl"]]
                    r["vs_cudnn_out"] = rel_err(out, ref_out.double())
                    r["vs_cudnn_dq"] = rel_err(grads[0], ref_grads[0].double())
                    r["vs_cudnn_dk"] = rel_err(grads[1], ref_grads[1].double())
                    r["vs_cudnn_dv"] = rel_err(grads[2], ref_grads[2].double())
        del q, k, v, do, outs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows, tune_rows


# Forward variants tried with --experiment (v3): 8 warps, 2 stages and a 128-register cap,
# so that two 128x64 programs fit on one SM (registers and shared memory) and one's
# softmax can overlap the other's tensor-core work.
EXPERIMENT = [
    (False, "128x64 w8 s3", dict(num_warps=8, num_stages=3)),
    (True, "128x64 w8 s3", dict(num_warps=8, num_stages=3)),
    (False, "128x64 w8 s2 r128", dict(num_warps=8, num_stages=2, maxnreg=128)),
    (True, "128x64 w8 s2 r128", dict(num_warps=8, num_stages=2, maxnreg=128)),
    (True, "128x64 w8 s2 r168", dict(num_warps=8, num_stages=2, maxnreg=168)),
    # Triton's automatic warp specialization of the main key loop (TMA loads only on Hopper).
    (True, "128x64 w8 s2 ws", dict(num_warps=8, num_stages=2, warp_spec=True)),
    (True, "128x64 w8 s3 ws", dict(num_warps=8, num_stages=3, warp_spec=True)),
    (True, "128x64 w4 s2 ws", dict(num_warps=4, num_stages=2, warp_spec=True)),
    (True, "128x128 w8 s2 ws", dict(num_warps=8, num_stages=2, warp_spec=True, BLOCK_N=128)),
]


def experiment(rep_ms, only: str = ""):
    import triton
    from triton.testing import do_bench
    rows = []
    for causal in (False, True):
        B, H, S, D = 2, 16, 8192, 128
        q, k, v, _ = make_inputs(B, H, S, D, "bhsd")
        with torch.no_grad():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).double()
            gen = torch.Generator(device=DEVICE).manual_seed(7)
            small = [torch.randn(1, h, 333, D, device=DEVICE, dtype=torch.bfloat16, generator=gen) for h in (4, 2, 2)]
            small_ref = reference(*small, causal, 1 / math.sqrt(D))
            for use_tma, label, opts in EXPERIMENT:
                if only and only != label:
                    continue
                row = dict(case=f"D128-S8192-{'causal' if causal else 'full'}", variant=label, tma=use_tma)
                opts = dict(opts)
                blocks = {"BLOCK_M": 128, "BLOCK_N": opts.pop("BLOCK_N", 64), "WARP_SPEC": opts.pop("warp_spec", False)}
                cfg = triton.Config(blocks, **opts)
                try:
                    with forced_fwd(cfg):
                        out = fa(q, k, v, causal, use_tma=use_tma, gluon=False)
                        ms = do_bench(lambda: fa(q, k, v, causal, use_tma=use_tma, gluon=False), warmup=25,
                                      rep=rep_ms, return_mode="median")
                        ms2 = do_bench(lambda: fa(q, k, v, causal, use_tma=use_tma, gluon=False), warmup=25,
                                       rep=rep_ms, return_mode="median")
                        err_small = rel_err(fa(*small, causal, use_tma=use_tma, gluon=False), small_ref)
                    row.update(fwd_ms=ms, fwd_ms_again=ms2, fwd_tflops=tflops(B, H, S, D, causal, min(ms, ms2), False),
                               vs_cudnn=rel_err(out, ref), vs_float64_S333=err_small)
                except Exception as exc:  # noqa: BLE001 - a variant that fails is a row
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(row, flush=True)
    return rows


def gluon_experiment(rep_ms, kinds=None):
    """The Gluon forward (flash_gluon.py): every config against float64 on small odd shapes, then
    timed at the issue's shapes next to the Triton forward and SDPA's cuDNN and flash backends."""
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from impls.attention import flash_gluon as fg
    check_rows, rows, kernels = [], [], []
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    for D in (128, 64):
        for cfg in fg.CONFIGS[D]:
            if kinds and cfg[3] not in kinds:
                continue
            for dtype in (torch.bfloat16, torch.float16):
                for S, causal, layout, (H, Hkv) in [(333, False, "bhsd", (4, 2)), (333, True, "bshd", (4, 2)),
                                                  (1, False, "bhsd", (2, 2)), (64, True, "bhsd", (2, 1)),
                                                  (700, True, "bhsd", (4, 4)), (257, False, "bshd", (6, 3))]:
                    if (dtype == torch.float16 and S != 333) or (causal and cfg[3] == "persistent"):
                        continue
                    shape = lambda h: (1, S, h, D) if layout == "bshd" else (1, h, S, D)  # noqa: E731
                    q, k, v = (torch.randn(shape(h), device=DEVICE, dtype=dtype, generator=gen)
                               for h in (H, Hkv, Hkv))
                    if layout == "bshd":
                        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    scale = 1 / math.sqrt(D)
                    row = dict(D=D, config=str(cfg), dtype=str(dtype).removeprefix("torch."), S=S, causal=causal,
                               layout=layout, H=H, Hkv=Hkv)
                    try:
                        o, lse = gluon_forward(q, k, v, causal, scale, cfg)
                        ref = reference(q, k, v, causal, scale)
                        row["out"] = rel_err(o, ref)
                        logits = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * scale
                        if causal:
                            logits = logits.masked_fill(torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1),
                                                        float("-inf"))
                        row["lse"] = (lse.double() - torch.logsumexp(logits, -1) * ft.LOG2E).abs().max().item()
                        row["same_layout"] = o.stride() == q.stride()
                    except Exception as exc:  # noqa: BLE001 - a failing config is a row
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    check_rows.append(row)
                    print(row, flush=True)
    for D in (128, 64):
        for causal in (False, True):
            for layout in ("bhsd", "bshd") if (D == 128 and not causal) else ("bhsd",):
                B, H, S = 2, 16, 8192
                q, k, v, _ = make_inputs(B, H, S, D, layout)
                case = f"D{D}-S{S}-{'causal' if causal else 'full'}" + ("-bshd" if layout == "bshd" else "")
                with torch.no_grad():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).double()
                    variants = [("sdpa-cudnn", lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)),
                                ("sdpa-flash", lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal)),
                                ("triton", lambda: fa(q, k, v, causal, gluon=False))]
                    variants += [(f"gluon {c}", lambda c=c: gluon_forward(q, k, v, causal, 1 / math.sqrt(D), c)[0])
                                 for c in fg.CONFIGS[D]
                                 if not (causal and c[3] == "persistent") and not (kinds and c[3] not in kinds)]
                    variants.append(("gluon autotuned", lambda: gluon_forward(q, k, v, causal, 1 / math.sqrt(D))[0]))
                    for label, fn in variants:
                        row = dict(case=case, impl=label)
                        try:
                            out = fn()
                            row["vs_cudnn"] = rel_err(out, ref)
                            ms = [do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") for _ in range(2)]
                            row.update(fwd_ms=ms[0], fwd_ms_again=ms[1],
                                       fwd_tflops=tflops(B, H, S, D, causal, min(ms), False))
                            if label.startswith("gluon"):
                                row["config"] = GLUON_RAN["fwd"]
                                if label != "gluon autotuned":
                                    kern = fg._launch(q, k, v, torch.empty_like(q),
                                                      torch.empty(B, H, S, device=DEVICE), causal, 0.1,
                                                      eval(label.removeprefix("gluon ")))
                                    kernels.append(dict(case=case, config=label, regs=kern.n_regs,
                                                        spills=kern.n_spills, smem=kern.metadata.shared))
                            elif label == "triton":
                                row["config"] = str(RAN)
                        except Exception as exc:  # noqa: BLE001 - a failing variant is a row
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        rows.append(row)
                        print({k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in row.items()},
                              flush=True)
    return check_rows, rows, kernels


def gluon_bwd_experiment(rep_ms, out):
    """The Gluon backward kernels (dK/dV and dQ): forward+backward and each kernel
    alone at the issue's shape, against Triton and cuDNN, then gradients against float64 on small odd
    shapes, each config of each."""
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend
    from impls.attention import flash_gluon as fg
    check_rows, rows = [], []
    # The shape first (the figures that matter if the call's time runs out), with errors against cuDNN.
    for causal in (False, True):
        B, H, S, D = 2, 16, 8192, 128
        q, k, v, do = make_inputs(B, H, S, D, "bhsd")
        case = f"D{D}-S{S}-{'causal' if causal else 'full'}"
        ref = torch.autograd.grad(_sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal), (q, k, v), do)
        variants = [("sdpa-cudnn", lambda: torch.autograd.grad(_sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),
                                                                (q, k, v), do)),
                    ("triton fwd+bwd", lambda: torch.autograd.grad(fa(q, k, v, causal, gluon=False),
                                                                   (q, k, v), do)),
                    ("gluon fwd + gluon dkdv + triton dq",
                     lambda: torch.autograd.grad(fa(q, k, v, causal, gluon=True, gluon_dq=False), (q, k, v), do)),
                    ("gluon fwd + gluon dkdv + gluon dq",
                     lambda: torch.autograd.grad(fa(q, k, v, causal, gluon=True, gluon_dq=True), (q, k, v), do))]
        for label, fn in variants:
            row = dict(case=case, impl=label)
            try:
                grads = fn()
                row.update({f"vs_cudnn_{n}": rel_err(g, r.double()) for n, g, r in zip("qkv", grads, ref)})
                ms = [do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") for _ in range(2)]
                row.update(fwdbwd_ms=ms[0], fwdbwd_ms_again=ms[1], fwdbwd_tflops=tflops(B, H, S, D, causal, min(ms), True))
                if label != "sdpa-cudnn":
                    row["config"] = str(RAN)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            write_csv(os.path.join(out, "gluon_bwd_timing.csv"), rows)
            print({k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in row.items()}, flush=True)
        # Each backward kernel alone, from the same lse and delta.
        with torch.no_grad():
            scale = 1 / math.sqrt(D)
            o, lse, _ = ft.forward(q, k, v, causal, scale)
            delta = (o.float() * do.float()).sum(-1)
            kernels = [(f"gluon dkdv {c}", lambda c=c: gluon_dkdv(q, k, v, do, lse, delta, causal, scale, c), None)
                       for c in fg.BWD_CONFIGS]
            kernels.append(("triton dkdv", lambda: ft.backward_dkdv(q, k, v, do, lse, delta, causal, scale),
                            ft._bwd_dkdv_kernel))
            kernels += [(f"gluon dq {c}", lambda c=c: gluon_dq(q, k, v, do, lse, delta, causal, scale, c), None)
                        for c in fg.DQ_CONFIGS]
            kernels.append(("triton dq", lambda: ft.backward_dq(q, k, v, do, lse, delta, causal, scale),
                            ft._bwd_dq_kernel))
            for label, launch, autotuned in kernels:
                row = dict(case=case, impl=label)
                try:
                    row["kernel_ms"] = do_bench(launch, warmup=10, rep=rep_ms, return_mode="median")
                    if autotuned is not None:
                        row["config"] = ft.describe(autotuned.best_config)
                except Exception as exc:  # noqa: BLE001 - a failing kernel is a row
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                write_csv(os.path.join(out, "gluon_bwd_timing.csv"), rows)
                print(row, flush=True)
    # Then gradients against float64 on small odd shapes, each config of each kernel.
    gen = torch.Generator(device=DEVICE).manual_seed(12)
    for kernel, cfg in [("dkdv", c) for c in fg.BWD_CONFIGS] + [("dq", c) for c in fg.DQ_CONFIGS]:
        for D, S, causal, layout, (H, Hkv), dtype in [
                (128, 333, False, "bhsd", (4, 2), torch.bfloat16), (128, 333, True, "bshd", (4, 2), torch.bfloat16),
                (64, 257, True, "bhsd", (2, 2), torch.bfloat16), (128, 64, True, "bhsd", (2, 1), torch.float16),
                (64, 700, False, "bshd", (6, 3), torch.float16), (128, 1, False, "bhsd", (2, 2), torch.bfloat16)]:
            shape = lambda h: (1, S, h, D) if layout == "bshd" else (1, h, S, D)  # noqa: E731
            q, k, v = (torch.randn(shape(h), device=DEVICE, dtype=dtype, generator=gen) for h in (H, Hkv, Hkv))
            if layout == "bshd":
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
            do = torch.randn_like(q)
            row = dict(kernel_checked=kernel, config=str(cfg), D=D, S=S, causal=causal, layout=layout, H=H, Hkv=Hkv,
                       dtype=str(dtype).removeprefix("torch."))
            try:
                name = {"dkdv": "BWD_CONFIGS", "dq": "DQ_CONFIGS"}[kernel]
                saved = getattr(fg, name)
                setattr(fg, name, [cfg])
                try:
                    grads = torch.autograd.grad(fa(q, k, v, causal, gluon=True, gluon_dq=kernel == "dq"), (q, k, v),
                                                do)
                finally:
                    setattr(fg, name, saved)
                row["kernel"] = str(RAN)
                ref = torch.autograd.grad(reference(q, k, v, causal, 1 / math.sqrt(D)), (q, k, v), do.double())
                row.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref)})
                # Relative errors are undefined where the reference is zero (S=1: dq = dk = 0).
                row.update({f"{n}_abs": (g.double() - r).abs().max().item()
                            for n, g, r in zip(("dq", "dk", "dv"), grads, ref)})
            except Exception as exc:  # noqa: BLE001 - a failing config is a row
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            check_rows.append(row)
            write_csv(os.path.join(out, "gluon_bwd_correctness.csv"), check_rows)
            print({k2: (f"{v2:.2e}" if isinstance(v2, float) else v2) for k2, v2 in row.items() if k2 != "kernel"},
                  flush=True)
    return check_rows, rows


def schedule_experiment(rep_ms, out, D=128):
    """How the Gluon kernels' programs are laid on the GPU, at the issue's shape: dQ beside dK/dV on a
    second stream or after it (flash.attention's concurrent_dq), the persistent forward against the
    warp-specialized one, each kernel alone, next to cuDNN. Every variant is timed in two rounds (all
    variants, then all again), so that drift over the run shows as a difference between the rounds."""
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend
    from impls.attention import flash_gluon as fg
    B, H, S = 2, 16, 8192
    scale = 1 / math.sqrt(D)
    rows = []

    for causal in (False, True):
        q, k, v, do = make_inputs(B, H, S, D, "bhsd")
        case = f"D{D}-S{S}-{'causal' if causal else 'full'}"
        with torch.no_grad():
            o, lse, _ = ft.forward(q, k, v, causal, scale)
            delta = (o.float() * do.float()).sum(-1)

        def gluon_fb(concurrent=True):
            return torch.autograd.grad(fa(q, k, v, causal, gluon=True, concurrent_dq=concurrent), (q, k, v), do)

        cudnn_fb = lambda: torch.autograd.grad(_sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),  # noqa: E731
                                               (q, k, v), do)
        variants = [  # (label, mode, fn)
            ("sdpa-cudnn", "fwd", lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)),
            ("gluon fwd", "fwd", lambda: gluon_forward(q, k, v, causal, scale)[0]),
            ("sdpa-cudnn", "fwd+bwd", cudnn_fb),
            ("gluon, dq after dkdv", "fwd+bwd", lambda: gluon_fb(concurrent=False)),
            ("gluon, dq on a second stream", "fwd+bwd", lambda: gluon_fb(concurrent=True)),
            ("gluon dkdv", "kernel", lambda: gluon_dkdv(q, k, v, do, lse, delta, causal, scale)),
            ("gluon dq", "kernel", lambda: gluon_dq(q, k, v, do, lse, delta, causal, scale)),
        ]
        if not causal:
            variants += [(f"gluon fwd {c}", "fwd", lambda c=c: gluon_forward(q, k, v, causal, scale, c)[0])
                         for c in fg.CONFIGS[D] if c[3] in ("ws", "persistent")]
        ref = {"fwd": _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal).double(), "fwd+bwd": cudnn_fb()}
        for rnd in (1, 2):
            for label, mode, fn in variants:
                row = dict(case=case, mode=mode, impl=label, round=rnd)
                try:
                    res = fn()
                    if rnd == 1 and mode == "fwd":
                        row["vs_cudnn"] = rel_err(res, ref["fwd"])
                    elif rnd == 1 and mode == "fwd+bwd":
                        row.update({f"vs_cudnn_d{n}": rel_err(g, r.double())
                                    for n, g, r in zip("qkv", res, ref["fwd+bwd"])})
                    row["ms"] = do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
                    if mode != "kernel":
                        row["tflops"] = tflops(B, H, S, D, causal, row["ms"], mode == "fwd+bwd")
                    row["config"] = (str(RAN) if mode == "fwd+bwd" and label != "sdpa-cudnn" else
                                     GLUON_RAN["fwd"] if label.startswith("gluon fwd") else
                                     GLUON_RAN["dkdv"] if label.startswith("gluon dkdv") else
                                     GLUON_RAN["dq"] if label.startswith("gluon dq") else "")
                except Exception as exc:  # noqa: BLE001 - a failing variant is a row
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                write_csv(os.path.join(out, "schedule_timing.csv"), rows)
                print({k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in row.items()
                       if k2 != "config"}, flush=True)
    return rows


def _sdpa(backend, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "results/flash_dev"))
    p.add_argument("--workers", type=int, default=12, help="processes for the correctness/compile phase")
    p.add_argument("--quick", action="store_true", help="only the seq-8k shapes")
    p.add_argument("--no-tma", action="store_true", help="skip descriptor (TMA) variants")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--experiment", action="store_true", help="only the forward variants in EXPERIMENT")
    p.add_argument("--gluon", action="store_true", help="only the Gluon forward: checks and timings")
    p.add_argument("--kinds", default="", help="with --gluon: only configs of these kinds (comma list)")
    p.add_argument("--gluon-bwd", action="store_true", help="only the Gluon backward kernels (dK/dV, dQ): timings, then checks")
    p.add_argument("--schedule", action="store_true",
                   help="only the Gluon kernels' launch order, dQ on a second stream, the persistent forward")
    p.add_argument("--variant", default="", help="with --experiment: only the variant with this label")
    p.add_argument("--check-dtypes", default="", help="comma list: run only these dtypes' correctness jobs")
    p.add_argument("--dry-run", action="store_true", help="checks only, on CPU under TRITON_INTERPRET=1")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition budget per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        rows = [run_check(tuple(j)) for j in json.loads(args.worker)]
        with open(args.worker_out, "w") as f:
            json.dump(rows, f)
        return

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.dry_run:
        rows = checks_parallel(check_jobs(False)[::4], args.workers, "/tmp/flash_checks")
        write_csv(os.path.join(args.out, "correctness.csv"), rows)
        for r in rows:
            print(r)
        return
    tma = flash.tma_available() and not args.no_tma
    print(f"torch {torch.__version__} triton {ft.triton.__version__} device {torch.cuda.get_device_name()} "
          f"tma {tma}", flush=True)
    mm, bw = ceilings()
    print(f"ceilings: bf16 matmul 8192^3 {mm:.0f} TFLOP/s, copy {bw:.2f} TB/s (read+write)  [{time.time()-t0:.0f}s]",
          flush=True)

    if args.gluon_bwd:
        gluon_bwd_experiment(args.rep_ms, args.out)  # writes its CSVs row by row
        return
    if args.schedule:
        schedule_experiment(args.rep_ms, args.out)  # writes its CSV row by row
        return

    if args.gluon:
        checks, rows, kernels = gluon_experiment(args.rep_ms, [k for k in args.kinds.split(",") if k])
        write_csv(os.path.join(args.out, "gluon_correctness.csv"), checks)
        write_csv(os.path.join(args.out, "gluon_timing.csv"), rows)
        write_csv(os.path.join(args.out, "gluon_kernels.csv"), kernels)
        return

    if args.experiment or args.check_dtypes:
        jobs = [j for j in check_jobs(False) if j[0] in args.check_dtypes.split(",")]
        procs = start_checks(jobs, args.workers, "/tmp/flash_checks")
        if args.experiment:
            write_csv(os.path.join(args.out, "experiment.csv"), experiment(args.rep_ms, args.variant))
            write_csv(os.path.join(args.out, "kernels.csv"), kernel_report())
        rows = collect_checks(procs)
        write_csv(os.path.join(args.out, "correctness.csv"), rows)
        print(f"correctness: {len(rows)} jobs, worst out/dq/dk/dv",
              max((max(r.get("out", 9), r.get("dq", 9), r.get("dk", 9), r.get("dv", 9)) for r in rows), default=None))
        return

    if not args.skip_checks:
        jobs = check_jobs(tma)
        rows = checks_parallel(jobs, args.workers, "/tmp/flash_checks")
        write_csv(os.path.join(args.out, "correctness.csv"), rows)
        # 3e-2: above the bf16 tolerance of the tests (2e-2), a screen for broken configs.
        bad = [r for r in rows if "error" in r or r.get("nan") or
               ("out" in r and max(r["out"], r["dq"], r["dk"], r["dv"]) > 3e-2)]
        skipped = [r for r in rows if "skipped" in r]
        print(f"correctness: {len(rows)} jobs, {len(bad)} failing, {len(skipped)} skipped (out of resources)"
              f"  [{time.time()-t0:.0f}s]", flush=True)
        for r in bad + skipped:
            print("  FAIL" if r in bad else "  SKIP", r, flush=True)

    rows, tune_rows = timing(timed_cases(args.quick), tma, args.rep_ms)
    write_csv(os.path.join(args.out, "timing.csv"), rows)
    write_csv(os.path.join(args.out, "autotune.csv"), tune_rows)
    write_csv(os.path.join(args.out, "kernels.csv"), kernel_report())

    print(f"\nceilings: matmul {mm:.0f} TFLOP/s, copy {bw:.2f} TB/s; total {time.time()-t0:.0f}s")
    print(f"{'case':28s} {'impl':15s} {'fwd TF/s':>9s} {'f+b TF/s':>9s}  config")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:28s} {r['impl']:15s} ERROR {r['error'][:80]}")
        else:
            print(f"{r['case']:28s} {r['impl']:15s} {r['fwd_tflops']:9.0f} {r['fwdbwd_tflops']:9.0f}  "
                  f"{r.get('config', '')}")


if __name__ == "__main__":
    main()
