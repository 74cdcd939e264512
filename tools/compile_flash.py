"""Developer tool: compile the Triton attention kernels (flash_triton.py) for
Hopper (sm_90a) without a GPU, with each feature flag on and off.

    python3 -m tools.compile_flash                 # from the repository root: a table, one line a kernel variant
    python3 -m tools.compile_flash --only decode   # variants whose label contains "decode"
    python3 -m tools.compile_flash --only masks --only rope   # those with either word

Triton's interpreter, which the CPU tests run the kernels through, accepts
code the compiler refuses (a Python int where a tensor is needed, a return in
the wrong place), so every kernel change is compiled here too. Each line
gives the shared memory, the registers a thread is launched with, its stack
(spill) bytes, and whether ptxas serialized the wgmma instructions. The
variants compile side by side, one per core (--jobs), the lines in order.
Runs without TRITON_INTERPRET (set here), whatever the caller's environment.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the compiler, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from impls.attention import flash_triton as ft  # noqa: E402
from impls.attention.ahead import cores  # noqa: E402
from tools.compile_gluon import resources  # noqa: E402
from tools.fork_map import fork_map  # noqa: E402

FLOATS = {"qk_scale": "fp32", "sm_scale": "fp32", "cap_in": "fp32", "cap_out": "fp32"}


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    """triton.compile of a Triton kernel for sm_90a; arguments not named in types are i32, None ones constexpr."""
    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _optional(pointers: dict[str, tuple[str, bool]]) -> tuple[dict, dict]:
    """(types of the pointers given, None constexprs for those left out)."""
    return ({n: t for n, (t, on) in pointers.items() if on}, {n: None for n, (t, on) in pointers.items() if not on})


def jobs():
    """(label, fn, types, constexprs, num_warps) for each variant compiled."""
    bf16 = "*bf16"
    for label, (window, softcap, alibi, varlen, causal, rope) in {
            "causal": (False, False, False, False, True, False), "plain": (False, False, False, False, False, False),
            "window softcap alibi varlen causal": (True, True, True, True, True, False),
            "rope causal": (False, False, False, False, True, True)}.items():
        flags = dict(WINDOW=window, SOFTCAP=softcap, ALIBI=alibi, VARLEN=varlen, CAUSAL=causal, USE_TMA=False,
                     ROPE=rope, GPTJ=False, HEAD_DIM=128, D_PAD=128)
        given, absent = _optional({"SLOPES": ("*fp32", alibi), "CU_Q": ("*i32", varlen), "CU_K": ("*i32", varlen),
                                   "COS": (bf16, rope), "SIN": (bf16, rope)})
        lse = {"LSE": "*fp32", "DELTA": "*fp32"}
        yield (f"fwd {label}", ft._fwd_kernel.fn, {**dict.fromkeys("QKVO", bf16), **lse, **given, **FLOATS},
               {**flags, **absent, "BLOCK_M": 128, "BLOCK_N": 64, "WARP_SPEC": False}, 8)
        yield (f"dkdv {label}", ft._bwd_dkdv_kernel.fn,
               {**dict.fromkeys(["Q", "K", "V", "DO", "DK", "DV"], bf16), **lse, **given, **FLOATS},
               {**flags, **absent, "BLOCK_M": 32, "BLOCK_N": 128}, 8)
        yield (f"dq {label}", ft._bwd_dq_kernel.fn,
               {**dict.fromkeys(["Q", "K", "V", "DO", "DQ"], bf16), **lse, **given, **FLOATS},
               {**flags, **absent, "BLOCK_M": 128, "BLOCK_N": 64}, 8)
    # The tree variant is Medusa's verification: 64 queries, per-sequence lengths, no causal (the bits mask).
    for paged, split, rows, masks, tree in [(False, True, 16, False, False), (True, False, 128, True, False),
                                            (False, True, 64, False, True)]:
        given, absent = _optional({"O_PART": ("*fp32", split), "LSE_PART": ("*fp32", split),
                                   "SEQLENS": ("*i32", paged or tree), "BLOCK_TABLE": ("*i32", paged),
                                   "SLOPES": ("*fp32", masks), "TREE_BITS": ("*i64", tree)})
        flags = dict(HEAD_DIM=128, D_PAD=128, CAUSAL=not tree, WINDOW=masks, SOFTCAP=masks, ALIBI=masks, TREE=tree,
                     PAGED=paged, PAGE_SIZE=16 if paged else 1, SEQLENS_GIVEN=paged or tree, SPLIT=split,
                     BLOCK_R=rows, BLOCK_N=64)
        label = (f"decode rows={rows}{' split' if split else ''}{' paged' if paged else ''}{' masks' if masks else ''}"
                 f"{' tree' if tree else ''}")
        yield (label, ft._decode_kernel.fn, {**dict.fromkeys("QKVO", bf16), **given, **FLOATS},
               {**flags, **absent}, 4 if rows <= 64 else 8)
    yield ("decode combine", ft._decode_combine_kernel, {"O_PART": "*fp32", "LSE_PART": "*fp32", "O": bf16},
           dict(HEAD_DIM=128, D_PAD=128, SPLITS_PAD=8), 4)


def _line(i: int) -> str:
    """The table's line of the i-th variant; by index, as a forked worker rebuilds the jobs (kernels do not pickle)."""
    label, fn, types, constexprs, warps = list(jobs())[i]
    use = resources(compile_sm90(fn, types, constexprs, warps))
    return (f"{label:45s} smem={use['smem']} regs={use['regs']} stack={use['stack']} "
            f"wgmma_serialized={use['wgmma_serialized']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[],
                        help="compile only the variants whose label contains this (repeat: any of them)")
    parser.add_argument("--jobs", type=int, default=cores(), help="variants compiled at once")
    args = parser.parse_args(argv)
    chosen = [i for i, job in enumerate(jobs()) if not args.only or any(word in job[0] for word in args.only)]
    for line in fork_map(_line, chosen, args.jobs):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
