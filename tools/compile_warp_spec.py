"""Developer tool: does Triton's automatic warp specialization change the Triton forward's code? No GPU needed.

    python3 -m tools.compile_warp_spec              # sm_90a (Hopper), from the repository root
    python3 -m tools.compile_warp_spec --arch 100   # sm_100a (Blackwell)
    python3 -m tools.compile_warp_spec --only tma   # the variants whose label has "tma"

flash_triton's forward can ask Triton to warp-specialize its unmasked key
loop (`tl.range(..., warp_specialize=WARP_SPEC)`, Triton 3.4 on). This
compiles `_fwd_kernel` at head dim 128, 128x64 blocks, with and without
WARP_SPEC, for pointer and descriptor (TMA) loads and a few warp and stage
counts, and prints per variant whether the specialized PTX differs from the
plain one, or why it did not compile (the compiles run side by side, one
per core: --jobs). Identical PTX means the option can only
add autotuning time, which is why it is not in FWD_CONFIGS
(docs/attention-kernels.md); run this again with a new Triton before timing it.
"""

from __future__ import annotations

import argparse
import functools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from impls.attention import flash_triton as ft
from impls.attention.ahead import cores
from tools.fork_map import fork_map

FLOATS = {"qk_scale": "fp32", "cap_in": "fp32", "cap_out": "fp32"}  # the forward's float arguments
VARIANTS = [(False, 8, 2), (False, 8, 3), (True, 8, 2), (True, 8, 3), (False, 4, 2)]  # (TMA, warps, stages)


def compile_fwd(arch: int, use_tma: bool, warp_spec: bool, num_warps: int, num_stages: int, head_dim: int = 128):
    """triton.compile of flash_triton's plain forward (no masks, no varlen), non-causal; no device needed."""
    fn = ft._fwd_kernel.fn
    flags = dict(WINDOW=False, SOFTCAP=False, ALIBI=False, VARLEN=False, CAUSAL=False, USE_TMA=use_tma,
                 HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_M=128, BLOCK_N=64, WARP_SPEC=warp_spec,
                 ROPE=False, GPTJ=False, SLOPES=None, CU_Q=None, CU_K=None, COS=None, SIN=None)
    types = {**dict.fromkeys("QKVO", "*bf16"), "LSE": "*fp32", **FLOATS}
    sig = {name: "constexpr" if name in flags else types.get(name, "i32") for name in fn.arg_names}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in flags.items() if k in fn.arg_names})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def _ptx(job: tuple[bool, int, int, bool], arch: int) -> str:
    """The PTX of one (use_tma, warps, stages, warp_spec) compile, or why it did not compile."""
    use_tma, warps, stages, warp_spec = job
    try:
        return compile_fwd(arch, use_tma, warp_spec, warps, stages).asm["ptx"]
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a row
        text = str(exc).strip().splitlines()
        return f"does not compile: {type(exc).__name__}: {text[-1][:80] if text else ''}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer: 90 (Hopper), 100, ...")
    p.add_argument("--only", default="", help="only the variants whose label contains this, e.g. 'w8 s2'")
    p.add_argument("--jobs", type=int, default=cores(), help="compiles run at once")
    args = p.parse_args()
    if ft.TRITON_ERROR is not None:
        raise SystemExit(f"compile_warp_spec: {ft.TRITON_ERROR}")
    if ft.INTERPRET:
        raise SystemExit("compile_warp_spec: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    print(f"triton {triton.__version__}, target sm_{args.arch}a, _fwd_kernel D=128 128x64 non-causal", flush=True)
    labels = {f"{'tma' if tma else 'pointer'} w{warps} s{stages}": (tma, warps, stages)
              for tma, warps, stages in VARIANTS}
    chosen = [label for label in labels if args.only in label]
    compiles = [(*labels[label], warp_spec) for label in chosen for warp_spec in (False, True)]
    results = fork_map(functools.partial(_ptx, arch=args.arch), compiles, args.jobs)
    for label in chosen:
        ptx = {False: next(results), True: next(results)}
        if not ptx[False].startswith("does not compile") and not ptx[True].startswith("does not compile"):
            ptx[True] = "same PTX as without" if ptx[True] == ptx[False] else "different PTX"
        plain = "compiles" if not ptx[False].startswith("does not compile") else ptx[False]
        print(f"{label:<16} plain: {plain}; warp_specialize: {ptx[True]}", flush=True)


if __name__ == "__main__":
    main()
