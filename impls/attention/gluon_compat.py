"""What differs in Gluon between the Triton releases that flash_gluon.py's kernels are built with, in one place.

    from impls.attention import gluon_compat
    gluon_compat.tma_load(desc, [row, col], barrier, smem)   # inside a @gluon.jit function
    gluon_compat.tma_add(desc, [row, col], smem)             # global[...] += smem, by TMA
    gluon_compat.measured("3.6.0")                          # True: timed and checked on a GPU
    gluon_compat.ptxas()                                    # "12.8": the assembler of the kernels' builds

Gluon (triton.experimental.gluon) is Triton's experimental layer and its API
moves between releases. The kernels call what moved through the names here,
so they read the same on every release and never branch on a version:

- the TMA copy from global to shared memory is `tma.async_copy_global_to_shared`
  up to Triton 3.7 and `tma.async_load` from 3.8, where 3.9 turned the old
  name into a stub that raises;
- the TMA reduce-add from shared to global memory is `tma.async_atomic_add`
  from 3.8; 3.6 and 3.7 have the builder call it lowers to
  (`create_async_tma_reduce`) and no Python name, so `tma_add` calls that.

The other Gluon calls the kernels make (warp_specialize's list of
(partition, args) with worker warps and registers, warpgroup_mma and its
wait, mbarrier, NVMMADistributedLayout, NVMMASharedLayout.get_default_for,
the host TensorDescriptor) keep their form from 3.6 to 3.9;
`python -m tools.compile_gluon` builds every kernel for sm_90a on each
(table in docs/attention-kernels.md).

A kernel that compiles has not yet run: MEASURED are the releases every
change to the kernels is run and timed with on a GPU (the GPU machines'
own). On any other release impls/attention/gluon_check.py checks them
against the Triton kernels on the device before `tiled` uses them, also on
3.7.1 and 3.9.0, which ran once (results/reference/h100/attention/
triton-releases/): a later change to the kernels is not run on those.
"""

from __future__ import annotations

# Releases (prefixes of triton.__version__) every change to the Gluon kernels is run and timed with on a Hopper GPU.
MEASURED = ("3.6.",)
# Releases whose Gluon builds every kernel for sm_90a (tools/compile_gluon.py; docs/attention-kernels.md).
COMPILES = ("3.6.", "3.7.", "3.8.", "3.9.")


def measured(version: str) -> bool:
    """Whether every change to the Gluon kernels is run and timed on a GPU with this Triton version."""
    return version.startswith(MEASURED)


def ptxas() -> str:
    """The release of the ptxas Triton assembles sm_90 kernels with ("12.8"), after TRITON_PTXAS_PATH or
    TRITON_PTXAS_BLACKWELL_PATH; "?" where this Triton does not say.

    Triton 3.9 assembles Hopper kernels with the CUDA 13 ptxas its wheel carries (3.6 to 3.8: CUDA 12's,
    which 3.9's wheel carries too), and that one spills where CUDA 12's does not: the dK/dV kernel at head
    dim 64, 160-168 bytes a thread against none (docs/attention-kernels.md, "Triton releases"). So what
    is kept per build of the kernels (the self-check's verdict, the tuners' choices) is keyed on it too.
    """
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).version
    except Exception:  # noqa: BLE001 - no Triton, or one that picks its assembler otherwise
        return "?"


def tma_load_of(tma):
    """The TMA global-to-shared copy of this Gluon's `tma` module: async_load where it exists (3.8 on)."""
    return getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


def tma_add_of(tma):
    """The TMA reduce-add of this Gluon's `tma` module: async_atomic_add where it exists (3.8 on), else the
    same operation built from the builder's create_async_tma_reduce."""
    return getattr(tma, "async_atomic_add", None) or _builder_tma_add


try:
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin
    from triton.experimental.gluon.language.nvidia.hopper import tma as _tma
except Exception:  # noqa: BLE001 - flash_gluon reports the missing Gluon itself
    _tma = None

if _tma is not None:
    @_builtin
    def _builder_tma_add(tensor_desc, coord, src, _semantic=None):
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    tma_load = tma_load_of(_tma)
    tma_add = tma_add_of(_tma)
