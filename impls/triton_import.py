"""Triton where it imports, for the kernel modules that fall back without it
(impls/decoding_triton.py, posenc_triton.py, vq_triton.py):

    from impls.triton_import import INTERPRET, TRITON_ERROR, tl, triton
    if triton is not None:
        @triton.jit
        def _kernel(...): ...

TRITON_ERROR is None, or why the import failed (the rows that need a kernel
say it); INTERPRET is whether TRITON_INTERPRET=1 runs the kernels on CPU
tensors through Triton's interpreter (it must be set before triton is imported).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure only means the kernels are unavailable
    triton = tl = None
    TRITON_ERROR = f"triton not importable: {type(exc).__name__}: {exc}"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
