"""Developer tool: the one-kernel Gluon backward (flash_gluon.backward) timed against the dK/dV + dQ pair.

    python -m tools.gluon_bwd5 [--seq 8192] [--causal both] [--config 2 1 1 --config 2 2 1] [--check-only]

At head dim 128 `tiled` runs flash_gluon.backward: dK, dV and dQ from one
kernel, five products a block pair, dQ added into an fp32 accumulator by a
reducer warp's TMA copies, then one pass that scales and casts it. The pair it
replaced, the dK/dV kernel and the dQ kernel (seven products), still runs
at head dim 64 and with flash.attention(..., fused_bwd=False). This prints,
per case, the largest differences of dQ, dK and dV against the pair's over
the largest magnitude, then the times (triton.testing.do_bench medians, in
turns, twice) of the pair one after the other, the pair with dQ on a second
stream as `tiled` runs it, and each given config of the one kernel; then,
for the first config, its kernel alone and the zeroing and final pass
around it.
Development only: the figures go to docs/measurements.md.
"""

from __future__ import annotations

import argparse

import torch

from impls.attention import flash, flash_gluon


def _pair(q, k, v, do, lse, delta, causal, scale, concurrent):
    if concurrent:
        p = flash.Plan(causal=causal, scale=scale, gluon=True, concurrent_dq=True, fused_bwd=False)
        return flash._gluon_dkdv_beside_dq(flash_gluon, q, k, v, do, lse, delta, p, flash.Kernels())
    dk, dv, _ = flash_gluon.backward_dkdv(q, k, v, do, lse, delta, causal, scale)
    dq, _ = flash_gluon.backward_dq(q, k, v, do, lse, delta, causal, scale)
    return dq, dk, dv


def _inputs(B, H, Hkv, S, causal, seed=0):
    from impls.attention import flash_triton
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = 128 ** -0.5
    o, lse, _ = flash_gluon.forward(q, k, v, causal, scale)
    return q, k, v, do, lse, flash_triton.delta(o, do), scale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--config", type=int, nargs=3, action="append",
                    metavar=("STAGES", "DQ_SLOTS", "DS_BUFFERS"),
                    help="a config of the one kernel (repeatable; default: flash_gluon.FUSED_CONFIGS)")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)
    from triton.testing import do_bench
    configs = [tuple(c) for c in args.config] if args.config else flash_gluon.FUSED_CONFIGS
    for causal in {"both": [False, True], "yes": [True], "no": [False]}[args.causal]:
        for B, H, Hkv, S in [(1, 4, 2, 333), (2, 4, 4, 1000), (1, 2, 2, 4096)]:
            q, k, v, do, lse, delta, scale = _inputs(B, H, Hkv, S, causal)
            ref = _pair(q, k, v, do, lse, delta, causal, scale, False)
            for config in configs:
                got = flash_gluon.backward(q, k, v, do, lse, delta, causal, scale, config)[:3]
                errs = [((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
                        for a, r in zip(got, ref)]
                print(f"check {config} causal={causal} B={B} H={H}/{Hkv} S={S}: rel. max diff dq {errs[0]:.2e} "
                      f"dk {errs[1]:.2e} dv {errs[2]:.2e}", flush=True)
        if args.check_only:
            continue
        q, k, v, do, lse, delta, scale = _inputs(args.batch, args.heads, args.heads, args.seq, causal)
        runs = {"pair": lambda: _pair(q, k, v, do, lse, delta, causal, scale, False),
                "pair, dq beside": lambda: _pair(q, k, v, do, lse, delta, causal, scale, True)}
        for config in configs:
            runs[f"one kernel {config}"] = (
                lambda c=config: flash_gluon.backward(q, k, v, do, lse, delta, causal, scale, c))
        B, H, S = args.batch, args.heads, args.seq
        dqa, dq = flash_gluon._dq_accumulator(B, H, S, q.device), torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        runs[f"its kernel alone {configs[0]}"] = lambda: flash_gluon._launch_bwd(q, k, v, do, dk, dv, dqa, lse, delta,
                                                                              causal, scale, configs[0])
        runs["zeroing and final pass"] = lambda: flash_gluon.dq_from_accumulator(dqa.zero_(), dq, scale)
        for _ in range(2):  # twice, in turns, to see the drift
            times = {name: do_bench(fn, warmup=25, rep=200, return_mode="median") for name, fn in runs.items()}
            print(f"time causal={causal} B={args.batch} H={args.heads} S={args.seq} D=128: "
                  + ", ".join(f"{name} {t:.3f}" for name, t in times.items()) + " ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
