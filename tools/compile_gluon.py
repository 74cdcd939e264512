"""Developer tool: compile the Gluon kernels for Hopper (sm_90a) without a GPU.

    python3 -m tools.compile_gluon            # from the repository root: every kernel and config, a table
    python3 -m tools.compile_gluon --sass DIR # also writes each kernel's SASS
    python3 -m tools.compile_gluon -k dq      # only the kernels whose label contains "dq"

No interpreter runs Gluon, and GPU time is scarce, so every kernel change in
flash_gluon.py was compiled here first: this prints, per kernel and config,
the shared memory, the registers a thread is launched with, the stack (spill)
bytes, and whether ptxas had to serialize the wgmma instructions for lack of
registers (its C7512 warning), which costs most of the kernel's speed. The
kernels compile side by side, one per core (--jobs), the rows in order. The
register and spill figures in docs/attention-kernels.md come from it, as
does the table there of the Triton releases that build every kernel. To
compile with another release, install it beside the project's and put it
first on the path:

    pip install --no-deps --target /tmp/triton-3.7.1 triton==3.7.1
    PYTHONPATH=/tmp/triton-3.7.1:. python3 -m tools.compile_gluon

The header names the ptxas that assembled the kernels. Triton 3.9 takes CUDA
13's for sm_90 and its wheel still carries CUDA 12's, which Triton's own
setting selects:

    TRITON_PTXAS_BLACKWELL_PATH=$(python3 -c "import triton, os; print(os.path.dirname(triton.__file__))")/backends/nvidia/bin/ptxas python3 -m tools.compile_gluon
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

from impls.attention import flash_gluon as fg
from impls.attention import gluon_compat
from impls.attention.ahead import cores
from tools.fork_map import fork_map

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int = 4):
    """triton.compile of a Gluon kernel for sm_90a, from example arguments (no device needed)."""
    constexprs = {**constexprs, "num_warps": num_warps}
    sig = {name: "constexpr" if name in constexprs else mangle_type(args[name]) for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def resources(kernel) -> dict:
    """Registers, stack and wgmma serialization from cuobjdump and ptxas on the compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True).stdout
        # Triton's own assembler for sm_90 (3.9 takes CUDA 13's), which reads the PTX version it wrote.
        assembled = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", cubin],
                                   capture_output=True, text=True)
        if assembled.returncode != 0:
            raise RuntimeError(f"ptxas: {assembled.stderr.strip()[-300:]}")
        warnings = assembled.stderr
    fields = dict(part.split(":") for part in usage.split() if ":" in part and part.split(":")[1].isdigit())
    return dict(smem=kernel.metadata.shared, regs=int(fields.get("REG", -1)), stack=int(fields.get("STACK", -1)),
                wgmma_serialized="C7512" in warnings)


def _desc(t, rows):
    flat = t.view(-1, t.shape[-1])
    block = [rows, t.shape[-1]]
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), block,
                            gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def jobs():
    """(label, kernel, example arguments, constexprs) for every kernel and config in flash_gluon."""
    for D in (128, 64):
        x = torch.empty(2, 16, 8192, D, dtype=torch.bfloat16)  # CPU tensors: only shapes and strides matter
        lse = torch.empty(2, 16, 8192)
        scalars = dict(H=16, GROUP=1, S=8191, qk_scale=0.5)

        def strides(*names):
            return {f"stride_{n}{a}": 3 for n in names for a in "bhs"}

        for causal in (False, True):
            for bm, bn, st, kind in fg.CONFIGS[D]:
                if kind == "persistent":
                    if causal:
                        continue
                    yield (f"fwd D={D} {kind} {bm}x{bn} s{st}", fg._fwd_persistent_kernel,
                           dict(q_desc=_desc(x, 64), k_desc=_desc(x, bn), v_desc=_desc(x, bn), O=x, LSE=lse,
                                n_tiles=2048, **scalars, **strides("q", "k", "v", "o")),
                           dict(HEAD_DIM=D, BLOCK_N=bn, STAGES=st, CONSUMER_REGS=fg.CONSUMER_REGS))
                    continue
                yield (f"fwd D={D} causal={causal} {kind} {bm}x{bn} s{st}", fg._fwd_kernel,
                       dict(q_desc=_desc(x, 64 if bm == 192 else bm), k_desc=_desc(x, bn), v_desc=_desc(x, bn),
                            O=x, LSE=lse, **scalars, **strides("q", "k", "v", "o")),
                       dict(HEAD_DIM=D, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, PINGPONG=kind == "pingpong",
                            CONSUMER_REGS=fg.consumer_regs(bm)))
            for bm, st, late in fg.BWD_CONFIGS:
                yield (f"dkdv D={D} causal={causal} {bm} s{st}{' lse-late' * late}", fg._dkdv_kernel,
                       dict(k_desc=_desc(x, 128), v_desc=_desc(x, 128), q_desc=_desc(x, bm), do_desc=_desc(x, bm),
                            lse_desc=fg._row_descriptor(lse, bm), delta_desc=fg._row_descriptor(lse, bm),
                            DK=x, DV=x, LSE_S=8192, sm_scale=0.1, **scalars,
                            **strides("q", "k", "v", "d", "dk", "dv")),
                       dict(HEAD_DIM=D, CAUSAL=causal, BLOCK_N=128, BLOCK_M=bm, STAGES=st, LSE_LATE=bool(late),
                            CONSUMER_REGS=fg.CONSUMER_REGS))
            if D in fg.FUSED_HEAD_DIMS:
                for st, slots, ds in fg.FUSED_CONFIGS:
                    yield (f"bwd D={D} causal={causal} s{st} slots{slots} ds{ds}", fg._bwd_kernel,
                           dict(k_desc=_desc(x, 128), v_desc=_desc(x, 128), q_desc=_desc(x, 64), do_desc=_desc(x, 64),
                                lse_desc=fg._row_descriptor(lse, 64), delta_desc=fg._row_descriptor(lse, 64),
                                dqa_desc=fg._accumulator_descriptor(torch.empty(2 * 16 * 8192 * D)), DK=x, DV=x,
                                NQB=128, LSE_S=8192, sm_scale=0.1, **scalars,
                                **strides("q", "k", "v", "d", "dk", "dv")),
                           dict(HEAD_DIM=D, CAUSAL=causal, STAGES=st, DQ_SLOTS=slots, DS_BUFFERS=ds,
                                CONSUMER_REGS=fg.CONSUMER_REGS))
            for bn, st in fg.DQ_CONFIGS:
                yield (f"dq D={D} causal={causal} {bn} s{st}", fg._dq_kernel,
                       dict(q_desc=_desc(x, 128), do_desc=_desc(x, 128), k_desc=_desc(x, bn), v_desc=_desc(x, bn),
                            DQ=x, LSE=lse, DELTA=lse, sm_scale=0.1, **scalars, **strides("q", "d", "k", "v", "dq")),
                       dict(HEAD_DIM=D, CAUSAL=causal, BLOCK_M=128, BLOCK_N=bn, STAGES=st,
                            CONSUMER_REGS=fg.CONSUMER_REGS))


def _compile_nth(i: int, sass: str | None = None) -> tuple[str, dict]:
    """(label, resources) of the i-th job, or (label, {"error": ...}) when it does not compile; by index, as
    a forked worker rebuilds the jobs (their kernels do not pickle). `sass`: a folder for its SASS."""
    label, fn, example, constexprs = list(jobs())[i]
    try:
        kernel = compile_sm90(fn, example, constexprs)
        if sass:
            os.makedirs(sass, exist_ok=True)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                text = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass", f.name],
                                      capture_output=True, text=True).stdout
            with open(os.path.join(sass, label.replace(" ", "_").replace("=", "") + ".sass"), "w") as f:
                f.write(text)
        return label, resources(kernel)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a row
        return label, {"error": f"{type(exc).__name__}: {str(exc).strip()}"}


def compile_labels(labels: list[str], workers: int | None = None) -> dict[str, dict]:
    """label -> resources() or {"error": ...} for the named jobs, compiled side by side."""
    index = {job[0]: i for i, job in enumerate(jobs())}
    return dict(fork_map(_compile_nth, [index[label] for label in labels], workers or cores()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sass", help="write each kernel's SASS (cuobjdump -sass) into this folder")
    p.add_argument("-k", default="", help="only the kernels whose label contains this")
    p.add_argument("--jobs", type=int, default=cores(), help="kernels compiled at once")
    args = p.parse_args()
    if fg.GLUON_ERROR is not None:
        raise SystemExit(f"compile_gluon: {fg.GLUON_ERROR}")
    measured = "measured on a GPU" if gluon_compat.measured(triton.__version__) else \
        "not measured on a GPU: `tiled` self-checks the kernels there first (impls/attention/gluon_check.py)"
    print(f"triton {triton.__version__}, target sm_90a, ptxas {gluon_compat.ptxas()}; this release is {measured}")
    print(f"{'kernel':<44} {'smem KB':>8} {'regs*':>5} {'stack':>6}  wgmma")
    print("(* registers a thread at launch; setmaxnreg then gives each consumer warpgroup "
          f"{fg.CONSUMER_REGS} ({fg.consumer_regs(192)} with three, BLOCK_M 192) and the loader warp 24. "
          "stack: bytes of spills.)", flush=True)
    chosen = [i for i, job in enumerate(jobs()) if args.k in job[0]]
    for label, r in fork_map(functools.partial(_compile_nth, sass=args.sass), chosen, args.jobs):
        if "error" in r:
            print(f"{label:<44} does not compile: {r['error'].splitlines()[0][:100]}", flush=True)
        else:
            print(f"{label:<44} {r['smem'] / 1024:>8.0f} {r['regs']:>5} {r['stack']:>6}  "
                  f"{'SERIALIZED' if r['wgmma_serialized'] else 'async'}", flush=True)


if __name__ == "__main__":
    main()
