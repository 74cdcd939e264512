"""FlashAttention for genbench's `tiled` attention: one differentiable function,
and the choice of the kernels behind it.

    from impls.attention import flash
    if flash.supported(q, k, v, causal=True) is None:
        ran = flash.Kernels()
        out = flash.attention(q, k, v, causal=True, kernels=ran)   # (B, H, S, D), differentiable
        out.sum().backward()
        str(ran)  # "triton fwd BLOCK_M=...; triton bwd dkdv BLOCK_M=...; triton bwd dq BLOCK_M=..."

The kernels live in flash_triton.py (Triton language: forward, delta, dK/dV
and dQ, on any CUDA GPU and, without one, in Triton's interpreter) and
flash_gluon.py (Gluon, warp-specialized for Hopper: forward, dK/dV and dQ).
This module decides, per call, which of them run (`plan`):
- Gluon's forward where it can run (flash_gluon.supported; on a Triton
  release it was not measured on, once gluon_check.py has passed it on this
  device, else the forward's `kernel` entry says why not) and, by default,
  only at the head dims where it is the faster one
  (flash_gluon.PREFERRED_HEAD_DIMS); `gluon=False` keeps every kernel
  Triton's, `gluon=True` takes Gluon's wherever they run;
- after a Gluon forward, Gluon's dK/dV and dQ kernels too, the dQ kernel on a
  second stream beside the dK/dV kernel (the two share only inputs, so each
  fills the SMs the other's last wave leaves idle); `gluon_dq=False` keeps
  Triton's dQ, `concurrent_dq=False` runs it after dK/dV. delta is always
  Triton's;
- descriptor (TMA) loads in the Triton kernels only when asked for
  (`use_tma=True`) and where they can run.
The measurements behind these defaults are in docs/attention-kernels.md.

Which kernel ran, with its block configuration, is written to a `Kernels`
record that the caller passes: the forward's at the call, the backward's when
autograd runs it. flash_gluon is imported only on the first CUDA call, never
on CPU or under the interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from impls.attention import flash_triton as ft
from impls.attention import gluon_check

# Whether the Triton kernels use descriptor (TMA) loads unless told: off, as
# they were slower in the forward and no faster in the backward
# (docs/attention-kernels.md).
PREFER_TMA = False


@dataclass
class Kernels:
    """The kernels one attention() call ran, each named with its family and
    block configuration: "triton fwd BLOCK_M=...", "gluon bwd dq ...". Empty
    until the kernel has run; the forward resets the backward's entries."""

    fwd: str = ""
    dkdv: str = ""
    dq: str = ""

    def __str__(self) -> str:
        ran = [d for d in (self.fwd, self.dkdv, self.dq) if d]
        return "; ".join(ran) if ran else "flash: nothing run yet"


@dataclass(frozen=True)
class Plan:
    """Which kernels one attention() call runs, decided from its inputs before any launch."""

    causal: bool
    scale: float
    tma: bool = False  # descriptor loads in the Triton kernels
    gluon: bool = False  # flash_gluon's forward, and its dK/dV where that can run
    gluon_dq: bool = True  # with gluon: flash_gluon's dQ kernel too
    concurrent_dq: bool = True  # with gluon and gluon_dq: dQ on a second stream beside dK/dV
    note: str = ""  # added to the forward's `kernel` entry: why Gluon is off, or that it was self-checked


# flash_gluon, imported on the first call that could use it: None until then,
# False if the import failed (_GLUON_ERROR says why).
_GLUON = None
_GLUON_ERROR: str | None = None


def _gluon_module(q: torch.Tensor):
    """flash_gluon where its forward could run q (a CUDA tensor, no interpreter), else None.

    Imported lazily so that CPU and TRITON_INTERPRET=1 runs never load Gluon
    (triton.experimental.gluon), which no interpreter runs.
    """
    global _GLUON, _GLUON_ERROR
    if ft.TRITON_ERROR is not None or ft.INTERPRET or not q.is_cuda:
        return None
    if _GLUON is None:
        try:
            from impls.attention import flash_gluon
            _GLUON = flash_gluon
        except Exception as exc:  # noqa: BLE001 - without Gluon the Triton kernels run
            _GLUON, _GLUON_ERROR = False, f"flash_gluon not importable: {type(exc).__name__}: {exc}"
    return _GLUON or None


def loaded_gluon():
    """flash_gluon if a call has imported it, else None (impls/attention/tuning.py seeds its tuners then)."""
    return _GLUON or None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> str | None:
    """None if `attention` can run on these inputs here, else a short reason."""
    if ft.TRITON_ERROR is not None:
        return ft.TRITON_ERROR
    if not ft.INTERPRET:
        if not torch.cuda.is_available():
            return "no CUDA, and Triton's interpreter is off (TRITON_INTERPRET=1 runs the kernel on CPU, slowly; `genbench attention --impl tiled` on a CPU turns it on)"
        if not q.is_cuda:
            return f"tensors on {q.device.type}: the kernel needs CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in ft.DTYPES:
        return f"dtype {str(q.dtype).removeprefix('torch.')} not supported"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v must share a dtype"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-d (B, H, S, D)"
    B, H, S, D = q.shape
    if D not in ft.HEAD_DIMS:
        return f"head dim {D} not supported ({', '.join(map(str, ft.HEAD_DIMS))})"
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, Hkv, S, D) matching q {tuple(q.shape)}"
    if k.shape[2] != S:
        return f"query length {S} and key length {k.shape[2]} differ (self-attention only)"
    if H % k.shape[1] != 0:
        return f"kv heads {k.shape[1]} do not divide query heads {H}"
    if S == 0 or B * H == 0:
        return "empty input"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "the head dim must be contiguous (stride 1)"
    return None


def gluon_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if flash_gluon's forward can run these inputs here, else why not (the Triton forward runs then)."""
    fg = _gluon_module(q)
    if fg is None:
        if _GLUON_ERROR is not None:
            return _GLUON_ERROR
        return "the Gluon forward needs a CUDA tensor on a Hopper GPU, outside Triton's interpreter"
    return fg.supported(q, k, v)


def uses_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gluon: bool | None = None) -> bool:
    """Whether attention(q, k, v, ..., gluon=gluon) runs flash_gluon's forward instead of the Triton one.

    gluon=None: where it can run and the head dim is one of
    flash_gluon.PREFERRED_HEAD_DIMS; True: wherever it can run; False: never.
    """
    return _gluon_choice(q, k, v, gluon)[0]


def _gluon_choice(q, k, v, gluon: bool | None) -> tuple[bool, str]:
    # (uses_gluon, a note for the forward's `kernel` entry). On a Triton the Gluon
    # kernels were not measured on, they run only once gluon_check has passed them here.
    if gluon is False:
        return False, ""
    fg = _gluon_module(q)
    if fg is None or fg.supported(q, k, v) is not None:
        return False, ""
    if not (gluon or q.shape[-1] in fg.PREFERRED_HEAD_DIMS):
        return False, ""
    checked = gluon_check.verdict(q.device)
    return checked.ok, f" ({checked.note})" if checked.note else ""


def tma_available() -> bool:
    """Whether descriptor (TMA) loads can be compiled here: Triton with tensor descriptors on Hopper or newer."""
    if ft.TRITON_ERROR is not None or ft.INTERPRET or not torch.cuda.is_available():
        return False
    return hasattr(ft.tl, "make_tensor_descriptor") and torch.cuda.get_device_capability()[0] >= 9


def _tma_allowed(*tensors: torch.Tensor) -> bool:
    # A TMA box needs a 16-byte-aligned base and 16-byte-aligned row strides;
    # kept to the 16-bit types and power-of-two head dims that were checked.
    t0 = tensors[0]
    if t0.dtype not in (torch.float16, torch.bfloat16) or t0.shape[-1] not in (64, 128):
        return False
    return all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None, *,
         use_tma: bool = PREFER_TMA, gluon: bool | None = None, gluon_dq: bool = True,
         concurrent_dq: bool = True) -> Plan:
    """The kernels attention(q, k, v, causal, scale, ...) with these options runs (see the module docstring)."""
    # Imports flash_gluon where it may run, before its tuners are seeded.
    use_gluon, note = _gluon_choice(q, k, v, gluon)
    return Plan(
        causal=bool(causal),
        scale=float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
        tma=bool(use_tma) and tma_available() and _tma_allowed(q, k, v),
        gluon=use_gluon,
        gluon_dq=gluon_dq,
        concurrent_dq=concurrent_dq,
        note=note,
    )


def _tma(use_tma: bool) -> str:
    return " tma" if use_tma else ""


def _forward(q, k, v, p: Plan, ran: Kernels):
    if p.gluon:
        # flash_gluon's forward writes o in q's layout and the same base-2 lse
        # as flash_triton's, so either backward runs on it.
        fg = _gluon_module(q)
        o, lse, config = fg.forward(q, k, v, p.causal, p.scale)
        ran.fwd = "gluon fwd " + fg.describe("fwd", config)
    else:
        o, lse, config = ft.forward(q, k, v, p.causal, p.scale, p.tma)
        ran.fwd = "triton fwd " + ft.describe(config) + _tma(p.tma)
    ran.fwd += p.note
    ran.dkdv = ran.dq = ""
    return o, lse


def _backward(q, k, v, o, lse, do, p: Plan, ran: Kernels):
    if do.stride(-1) != 1 or (p.tma and not _tma_allowed(do)):
        do = do.contiguous()  # e.g. the stride-0 gradient of a .sum()
    delta = ft.delta(o, do)
    fg = _gluon_module(q) if p.gluon else None
    if fg and fg.supported_bwd(q, k, v, do) is not None:
        fg = None
    if fg and p.gluon_dq and p.concurrent_dq:
        return _gluon_dkdv_beside_dq(fg, q, k, v, do, lse, delta, p, ran)
    if fg:
        dk, dv, config = fg.backward_dkdv(q, k, v, do, lse, delta, p.causal, p.scale)
        ran.dkdv = "gluon bwd dkdv " + fg.describe("dkdv", config)
    else:
        dk, dv, config = ft.backward_dkdv(q, k, v, do, lse, delta, p.causal, p.scale, p.tma)
        ran.dkdv = "triton bwd dkdv " + ft.describe(config) + _tma(p.tma)
    if fg and p.gluon_dq:
        dq, config = fg.backward_dq(q, k, v, do, lse, delta, p.causal, p.scale)
        ran.dq = "gluon bwd dq " + fg.describe("dq", config)
    else:
        dq, config = ft.backward_dq(q, k, v, do, lse, delta, p.causal, p.scale, p.tma)
        ran.dq = "triton bwd dq " + ft.describe(config) + _tma(p.tma)
    return dq, dk, dv


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _gluon_dkdv_beside_dq(fg, q, k, v, do, lse, delta, p: Plan, ran: Kernels):
    # The dQ kernel on a side stream while dK/dV runs on the caller's. The inputs
    # were made on the caller's stream, which waits for the side stream before
    # its next work, so no memory is reused under a running kernel; dq is made
    # on the side stream and handed to the caller's (record_stream).
    main = torch.cuda.current_stream(q.device)
    side = _side_streams.setdefault(q.device, torch.cuda.Stream(q.device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        dq, dq_config = fg.backward_dq(q, k, v, do, lse, delta, p.causal, p.scale)
    dk, dv, dkdv_config = fg.backward_dkdv(q, k, v, do, lse, delta, p.causal, p.scale)
    main.wait_stream(side)
    dq.record_stream(main)
    ran.dkdv = "gluon bwd dkdv " + fg.describe("dkdv", dkdv_config)
    ran.dq = "gluon bwd dq " + fg.describe("dq", dq_config) + ", beside dkdv on a second stream"
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: Plan, ran: Kernels | None = None):
        ran = Kernels() if ran is None else ran
        o, lse = _forward(q, k, v, p, ran)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.ran = p, ran
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.plan, ctx.ran)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float | None = None, *, use_tma: bool = PREFER_TMA, gluon: bool | None = None,
              gluon_dq: bool = True, concurrent_dq: bool = True, kernels: Kernels | None = None) -> torch.Tensor:
    """softmax(q k^T * scale (+ causal mask)) v for q (B, H, S, D), k and v (B, Hkv, S, D).

    Returns (B, H, S, D) in q's dtype and layout; differentiable in q, k, v.
    scale defaults to 1/sqrt(D). use_tma: descriptor loads in the Triton
    kernels where they can run. gluon: None runs flash_gluon's kernels where
    they can run and are the faster ones, True wherever they can run, False
    never; gluon_dq and concurrent_dq: see the module docstring. kernels, if
    given, is filled with what ran (the backward's entries once it has run).
    """
    reason = supported(q, k, v, causal)
    if reason is not None:
        raise ValueError(f"flash attention cannot run this input: {reason}")
    p = plan(q, k, v, causal, scale, use_tma=use_tma, gluon=gluon, gluon_dq=gluon_dq, concurrent_dq=concurrent_dq)
    if q.is_cuda and not ft.INTERPRET:
        from impls.attention import tuning
        tuning.seed(q.device)
    return _FlashAttention.apply(q, k, v, p, kernels)
