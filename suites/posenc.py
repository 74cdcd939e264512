"""The posenc suite: what each positional encoding costs per call, and how far
past its training length a model using it still predicts.

    genbench posenc --cost                       # GPU: 16 x 4096 tokens, 32 heads of 128, bf16 and fp32, fwd and fwd+bwd
    genbench posenc --cost --offset 0,30000 --dtype bf16
    genbench posenc --cost --encoding rope+attention --dtype bf16   # RoPE fused into tiled vs compiled RoPE + cuDNN
    genbench posenc --reach --model tiny         # CPU, minutes: one GPT per encoding at L = 64, scored at 64 .. 512
    genbench posenc --reach --model small        # GPU: L = 256, scored at 256 .. 2048

Cost (suite `posenc-cost`). Each row applies one encoding at one shape, q and
k (B, S, H, D), x (B, S, H·D), after a correctness gate against float64
(output, and gradients for fwd+bwd, bench/correctness.py tolerances):
- RoPE (`encoding` rope, `layout` neox or gptj, impls/posenc.py): `eager`
  (PyTorch ops, cos/sin from a cached table), `compile` (the same under
  torch.compile), and the fused Triton kernel of impls/posenc_triton.py:
  `triton` (cached table), `triton-computed` (cos/sin computed in the
  kernel), `triton-inplace` and `triton-inplace-computed` (q and k
  overwritten). Tokens sit at positions offset + s (`--offset 30000`: a
  decode step far into a sequence). fwd+bwd adds the backward, the rotation
  of dq, dk by −θ: through autograd, except in place, where the kernel
  rotates the gradients in place (what a training step that owns them does).
- RoPE with attention (`encoding` rope+attention): q and k (B, H, S, D)
  rotated, then causal attention with v: `compile+sdpa-cudnn` (the compiled
  RoPE, then SDPA's cuDNN backend; on a CPU unsupported), `compile+tiled`
  (the compiled RoPE, then tiled, impls/attention/flash.py) and
  `tiled-fused` (tiled's Triton kernels rotate each q and k tile as they
  load it, and rotate dq and dk back before storing them: no rotated copy
  of q and k is ever written). The table's speedup column is against
  compile+sdpa-cudnn.
- ALiBi (`encoding` alibi): causal attention with the bias, `sdpa-bias`
  (SDPA with an explicit (H, S, S) float bias, built once outside the timing;
  `bias_MiB` is its size), `flex` (FlexAttention's score_mod, no bias
  tensor) and `tiled` (the slopes applied inside tiled's kernels); `sdpa` is
  the same attention without ALiBi (is_causal), the cost the bias adds to,
  and the speedup column's baseline.
The tiled rows need a GPU; without one they run through Triton's
interpreter only at the tests' small shapes (INTERPRET_MAX_PAIRS) and are
`unsupported` otherwise, saying why.
- Absolute tables (`encoding` sinusoidal or learned): `eager` builds the
  table for the positions and adds it to x, as impls/gpt.py does; sinusoidal
  `cached` adds a table built beforehand.
RoPE and the tables are memory-bound: `bytes_moved` counts each tensor read
or written once (q, k in and out, the cos/sin table when one is read;
`rope_bytes`, `absolute_bytes`), GBps is bytes_moved over the median time, and
pct_of_peak is taken against the calibrated copy bandwidth when the row's
arithmetic intensity is below the ridge point (bench/metrics.py
roofline_bound; the attention rows, rope+attention and ALiBi, against the
matmul peak, their FLOPs attention's, plus RoPE's few per element).

Reach (suite `posenc-reach`). The shared GPT (impls/gpt.py, a preset's
shape) is trained once per encoding by impls/train.py `train_lm`, with the
same seed, steps, batches and corpus, at context L; then scored on held-out
text at L, 2L, 4L and 8L (`--eval-factors`): validation loss and perplexity
over every token of the same held-out stretch (the first `eval_tokens`
tokens of the val split, a multiple of 8L) cut into non-overlapping windows
of that length, as the ALiBi paper evaluates: every length and every
encoding scores the same tokens, and only the context they are seen in
differs. Trained models are cached (bench/checkpoints.py, keyed by
everything their training depended on), so a second run only scores. Every model is built with a context of 8L (the largest eval length)
so that it can be run there; for `learned` this means a table of 8L rows of
which only the first L are ever trained: past L it reads untrained rows, as a
learned table extended without training would. RoPE's inference-time
extensions are extra rows of the RoPE model, not models of their own:
`rope+pi` (position interpolation) and `rope+ntk` (NTK-aware base), each at
factor eval length / L (impls/posenc.py scaling_for), identical to `rope` at L.
An evaluation length that does not fit in memory is an `oom` row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from bench import calibrate, checkpoints, correctness, metrics
from bench.calibrate import Share
from bench.env import DTYPES
from bench.errors import BadInput, Unsupported
from bench.runner import Column, Context, Measurement, Sweep
from impls import posenc
from impls.attention import flex, naive
from impls.attention.naive import NO_MASKS, Masks
from impls.data import DataConfig, TextData
from impls.gpt import GPT, GPTConfig
from impls.precision import Precision
from impls.train import LMTraining, train_lm, training_precision

MODES = ("fwd", "fwd+bwd")
ROPE_IMPLS = ("eager", "compile", "triton", "triton-computed", "triton-inplace", "triton-inplace-computed")
ROPE_ATTENTION_IMPLS = ("compile+sdpa-cudnn", "compile+tiled", "tiled-fused")
ALIBI_IMPLS = ("sdpa", "sdpa-bias", "flex", "tiled")
ABSOLUTE_IMPLS = {"sinusoidal": ("eager", "cached"), "learned": ("eager",)}
COST_ENCODINGS = ("rope", "rope+attention", "alibi", "sinusoidal", "learned")
ATTENTION_ENCODINGS = ("rope+attention", "alibi")  # rows that time causal attention
# Each table's speedup is against the first of these it has: eager RoPE, RoPE
# then cuDNN attention (what tiled-fused is measured against), SDPA without ALiBi.
BASELINE = ("eager", "compile+sdpa-cudnn", "sdpa")
# Under Triton's interpreter (CPU) the tiled rows run only up to this many
# scored (query, key) pairs, B·H·S²: the tests' shapes. The CLI's CPU
# default (2 x 8 heads x 512²) would keep the interpreter busy for many
# minutes a row, as it runs every program in Python.
INTERPRET_MAX_PAIRS = 2**14


# -- cost ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostConfig:
    impl: str
    encoding: str  # rope | rope+attention | alibi | sinusoidal | learned
    layout: str  # neox | gptj for RoPE (and rope+attention), "" otherwise
    batch: int
    seq: int
    heads: int
    head_dim: int
    dtype: str
    mode: str
    offset: int  # position of the first token


@dataclass(frozen=True)
class CostOptions:
    """The cost sweep, as given on the command line."""

    batch: int = 16
    seqs: tuple[int, ...] = (4096,)
    heads: int = 32
    head_dim: int = 128
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    modes: tuple[str, ...] = MODES
    offsets: tuple[int, ...] = (0,)
    encodings: tuple[str, ...] = COST_ENCODINGS
    layouts: tuple[str, ...] = posenc.LAYOUTS
    impls: tuple[str, ...] = ()  # empty: every one of each encoding

    def __post_init__(self):
        for name, value in (("--batch", self.batch), ("--heads", self.heads), ("--head-dim", self.head_dim)):
            if value <= 0:
                raise BadInput(f"{name} must be positive, got {value}")
        if any(s <= 0 for s in self.seqs):
            raise BadInput(f"--seq lengths must be positive, got {self.seqs}")
        if any(o < 0 for o in self.offsets):
            raise BadInput(f"--offset must be 0 or more, got {self.offsets}")
        for name in self.dtypes:
            if name not in DTYPES:
                raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
        for mode in self.modes:
            if mode not in MODES:
                raise BadInput(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        for encoding in self.encodings:
            if encoding not in COST_ENCODINGS:
                raise BadInput(f"unknown --encoding {encoding!r} for --cost; known: {', '.join(COST_ENCODINGS)}")
        for layout in self.layouts:
            if layout not in posenc.LAYOUTS:
                raise BadInput(f"unknown --layout {layout!r}; known: {', '.join(posenc.LAYOUTS)}")
        known = sorted(set(ROPE_IMPLS) | set(ROPE_ATTENTION_IMPLS) | set(ALIBI_IMPLS)
                       | {i for v in ABSOLUTE_IMPLS.values() for i in v})
        for impl in self.impls:
            if impl not in known:
                raise BadInput(f"unknown --impl {impl!r}; known: {', '.join(known)}")
        if {"rope", "rope+attention"} & set(self.encodings) and self.head_dim % 2:
            raise BadInput(f"--head-dim {self.head_dim}: RoPE rotates pairs of dimensions, so the head dim must "
                           "be even (or leave rope and rope+attention out with --encoding)")

    def _impls(self, encoding: str) -> tuple[str, ...]:
        own = ({"rope": ROPE_IMPLS, "rope+attention": ROPE_ATTENTION_IMPLS, "alibi": ALIBI_IMPLS}.get(encoding)
               or ABSOLUTE_IMPLS[encoding])
        return tuple(i for i in own if not self.impls or i in self.impls)

    def configs(self) -> list[CostConfig]:
        out = []
        for dtype in self.dtypes:
            for mode in self.modes:
                for seq in self.seqs:
                    for encoding in self.encodings:
                        rope = encoding.startswith("rope")
                        layouts = self.layouts if rope else ("",)
                        offsets = self.offsets if rope else (0,)
                        for layout in layouts:
                            for offset in offsets:
                                out += [CostConfig(impl, encoding, layout, self.batch, seq, self.heads, self.head_dim,
                                                   dtype, mode, offset) for impl in self._impls(encoding)]
        return out


def rope_bytes(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, element_size: int, table: bool,
               mode: str) -> float:
    """Bytes applying RoPE to q (B, S, H, D) and k (B, S, Hkv, D) must move at
    the least: each read once and written once, and a cos/sin table (2 x S x
    D/2 float32) read once when one is used. fwd+bwd: twice that (dq, dk
    read and written, the table read again)."""
    qk = batch * seq * (heads + kv_heads) * head_dim * element_size
    table_bytes = 2 * seq * (head_dim // 2) * 4 if table else 0
    return float((2 * qk + table_bytes) * (2 if mode == "fwd+bwd" else 1))


def rope_flops(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, mode: str) -> float:
    """Two products and a sum per element, per rotation (fwd+bwd: two rotations)."""
    return 3.0 * batch * seq * (heads + kv_heads) * head_dim * (2 if mode == "fwd+bwd" else 1)


def absolute_bytes(batch: int, seq: int, dim: int, element_size: int, mode: str, built: bool = True) -> float:
    """Bytes adding a position table (S, C) to x (B, S, C) must move at the
    least: x read and the sum written, the table read by the add and, when
    `built` for the call (sinusoidal computed, learned gathered), written
    first. fwd+bwd: the gradient passed through (read and written) and
    reduced over the batch into the table's (written)."""
    x = batch * seq * dim * element_size
    table = seq * dim * element_size
    return float(2 * x + (2 if built else 1) * table + (2 * x + table if mode == "fwd+bwd" else 0))


def _eager_rope(q, k, cos, sin, layout):
    # q (B, S, H, D), cos and sin (S, 1, D/2): broadcast over the heads.
    return posenc.apply_rope(q, cos, sin, layout), posenc.apply_rope(k, cos, sin, layout)


def _compiled_rope():
    # Compiled afresh for each row (run_cost resets dynamo around it): a row's
    # shape, dtype, layout and grad mode never count against another's
    # recompile limit, past which dynamo would silently run eager code.
    return torch.compile(_eager_rope, dynamic=False)


def _compile_why_not(device: torch.device) -> str | None:
    """torch.compile needs a working backend here: tried once on a tiny input."""
    return _compile_probe(device.type)


@functools.cache
def _compile_probe(device_type: str) -> str | None:
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device_type))
    except Exception as exc:  # noqa: BLE001 - any compiler failure makes the compile rows unsupported, saying why
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"torch.compile does not work here: {type(exc).__name__}: {first}"
    return None


def _inputs(shape: tuple, dtype, device, seed: int, n: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(n)]


def _rope_row(cfg: CostConfig, ctx: Context) -> tuple[Measurement, float, float]:
    from impls import posenc_triton as pt  # imports Triton: only the RoPE rows need it

    device, dtype = ctx.device, DTYPES[cfg.dtype]
    B, S, H, D = cfg.batch, cfg.seq, cfg.heads, cfg.head_dim
    triton = cfg.impl.startswith("triton")
    if triton and pt.why_not(device):
        raise Unsupported(pt.why_not(device))
    if cfg.impl == "compile" and _compile_why_not(device):
        raise Unsupported(_compile_why_not(device))
    inplace, computed = "inplace" in cfg.impl, cfg.impl.endswith("computed")
    q, k, dq, dk = _inputs((B, S, H, D), dtype, device, ctx.seed, 4)
    pos = torch.arange(S, device=device) + cfg.offset
    cos, sin = posenc.rope_angles(pos, D)  # (S, D/2) float32: the eager rows' cached table
    cos, sin = cos[:, None], sin[:, None]  # (S, 1, D/2)
    table = None if computed or not triton else pt.RopeTable(cfg.offset + S, D, device)

    def reference(x, sign):
        c, s = posenc.rope_angles(pos, D, dtype=torch.float64)
        return posenc.apply_rope(x.double(), c[:, None], sign * s[:, None], cfg.layout)

    backward = cfg.mode == "fwd+bwd"
    if triton and inplace:
        def fwd(a, b):
            pt.apply(a, b, a, b, offset=cfg.offset, layout=cfg.layout, table=table)
            return a, b

        def bwd(ga, gb):
            pt.apply(ga, gb, ga, gb, offset=cfg.offset, layout=cfg.layout, table=table, inverse=True)
            return ga, gb
    else:
        if triton:
            def rotate(a, b):
                return pt.rope(a, b, offset=cfg.offset, layout=cfg.layout, table=table)
        else:
            fn = _compiled_rope() if cfg.impl == "compile" else _eager_rope

            def rotate(a, b):
                return fn(a, b, cos, sin, cfg.layout)

        def fwd(a, b):
            with torch.no_grad():
                return rotate(a, b)

        qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()

        def fwd_bwd():
            return torch.autograd.grad(rotate(qg, kg), (qg, kg), (dq, dk))

    # The gate, on copies (in place rows overwrite their inputs).
    got = list(fwd(q.clone(), k.clone()))
    want = [reference(q, 1.0), reference(k, 1.0)]
    if backward:
        got += list(bwd(dq.clone(), dk.clone()) if inplace and triton else fwd_bwd())
        want += [reference(dq, -1.0), reference(dk, -1.0)]
    err = correctness.max_rel_err(got, want)
    del got, want
    values = {"rel_err": err}
    if not correctness.passes(err, dtype):
        return Measurement(values, status="mismatch",
                           reason=f"rel_err {err:.2e} above the {cfg.dtype} tolerance {correctness.TOLERANCE[dtype]:.0e}"), 0, 0

    if not backward:
        def step():
            return fwd(q, k)
    elif inplace and triton:
        def step():
            fwd(q, k)
            return bwd(dq, dk)
    else:
        step = fwd_bwd
    stats = ctx.time(step)
    nbytes = rope_bytes(B, S, H, H, D, dtype.itemsize, table=not computed, mode=cfg.mode)
    m = Measurement(values, stats=stats)
    m.values["kernel"] = _rope_kernel_name(cfg, computed, inplace)
    return m, rope_flops(B, S, H, H, D, cfg.mode), nbytes


def _rope_kernel_name(cfg: CostConfig, computed: bool, inplace: bool) -> str:
    if not cfg.impl.startswith("triton"):
        return f"{cfg.impl} {cfg.layout}, cos/sin table"
    return (f"triton {cfg.layout}, cos/sin {'computed' if computed else 'table'}, "
            f"{'in place' if inplace else 'out of place'}")


def _tiled_why_not(q, k, v, masks: Masks = NO_MASKS, rope: posenc.Rope | None = None) -> str | None:
    """None if tiled (impls/attention/flash.py) runs causal attention of these inputs here, else why not."""
    from impls.attention import flash  # imports Triton: only the tiled rows need it

    reason = flash.supported(q, k, v, True, masks, rope=rope)
    B, H, S, _ = q.shape
    if reason is None and flash.ft.INTERPRET and B * H * S * S > INTERPRET_MAX_PAIRS:
        reason = (f"no GPU: Triton's interpreter runs the tiled rows only up to {INTERPRET_MAX_PAIRS} scored "
                  f"pairs B·H·S², this shape has {B * H * S * S}")
    return reason


def _mismatch(values: dict, cfg: CostConfig) -> tuple[Measurement, float, float]:
    err, dtype = values["rel_err"], DTYPES[cfg.dtype]
    return Measurement(values, status="mismatch", reason=f"rel_err {err:.2e} above the {cfg.dtype} tolerance "
                       f"{correctness.TOLERANCE[dtype]:.0e}"), 0, 0


def _rope_attention_row(cfg: CostConfig, ctx: Context) -> tuple[Measurement, float, float]:
    """RoPE applied to q and k, then causal attention: rotated first by the
    compiled RoPE (then cuDNN's or tiled's attention), or inside tiled's
    kernels as they load q and k (tiled-fused)."""
    from impls.attention import flash, sdpa  # flash imports Triton: only these rows need it

    device, dtype = ctx.device, DTYPES[cfg.dtype]
    B, S, H, D = cfg.batch, cfg.seq, cfg.heads, cfg.head_dim
    backward = cfg.mode == "fwd+bwd"
    q, k, v, dout = _inputs((B, H, S, D), dtype, device, ctx.seed, 4)
    rope = posenc.Rope(cfg.layout, offset=cfg.offset)
    pos = torch.arange(S, device=device) + cfg.offset
    cos, sin = posenc.rope_angles(pos, D)  # (S, D/2) float32, the compiled rows' table
    ran = flash.Kernels()
    if cfg.impl == "compile+sdpa-cudnn":
        reason = sdpa.why_not(q, k, v, True, "cudnn")
    else:
        reason = _tiled_why_not(q, k, v, rope=rope if cfg.impl == "tiled-fused" else None)
    if reason is None and cfg.impl.startswith("compile"):
        reason = _compile_why_not(device)
    if reason:
        raise Unsupported(reason)

    if cfg.impl == "tiled-fused":
        def attend(a, b, c):
            return flash.attention(a, b, c, True, rope=rope, kernels=ran)
    else:
        rotate = _compiled_rope()

        def attend(a, b, c):
            a, b = rotate(a, b, cos, sin, cfg.layout)
            if cfg.impl == "compile+sdpa-cudnn":
                return sdpa.attention(a, b, c, True, backend="cudnn")
            return flash.attention(a, b, c, True, kernels=ran)

    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    # The reference: q and k rotated in float64, attention in float64; the
    # gradients w.r.t. the rotated q and k rotated back by −θ (R(θ)^T = R(−θ)).
    c64, s64 = posenc.rope_angles(pos, D, dtype=torch.float64)
    qr, kr = (posenc.apply_rope(t.detach().double(), c64, s64, cfg.layout) for t in (q, k))
    ref_out, ref_grads = naive.reference(qr, kr, v.detach(), True, dout if backward else None)
    del qr, kr
    got, want = [out], [ref_out]
    if backward:
        got += torch.autograd.grad(out, (q, k, v), dout)
        dq, dk, dv = ref_grads
        want += [posenc.apply_rope(dq, c64, -s64, cfg.layout), posenc.apply_rope(dk, c64, -s64, cfg.layout), dv]
    values = {"rel_err": correctness.max_rel_err(got, want)}
    del out, got, want, ref_out, ref_grads
    if cfg.impl == "compile+sdpa-cudnn":
        values["kernel"] = f"torch.compile RoPE {cfg.layout}, then sdpa cudnn"
    elif cfg.impl == "compile+tiled":
        values["kernel"] = f"torch.compile RoPE {cfg.layout}, then tiled: {ran}"
    else:
        values["kernel"] = f"RoPE {cfg.layout} in tiled's loads: {ran}"
    if not correctness.passes(values["rel_err"], dtype):
        return _mismatch(values, cfg)
    if backward:
        def step():
            return torch.autograd.grad(attend(q, k, v), (q, k, v), dout)
    else:
        def step():
            with torch.no_grad():
                return attend(q, k, v)
    stats = ctx.time(step)
    flops = metrics.attention_flops(B, H, S, S, D, True, cfg.mode) + rope_flops(B, S, H, H, D, cfg.mode)
    # The least the whole must move is attention's: q, k, v read and the output written (with
    # the backward, dO read and the gradients written), RoPE's table aside.
    nbytes = metrics.attention_bytes(B, H, H, S, S, D, dtype.itemsize, cfg.mode)
    return Measurement(values, stats=stats), flops, nbytes


def _alibi_row(cfg: CostConfig, ctx: Context) -> tuple[Measurement, float, float]:
    device, dtype = ctx.device, DTYPES[cfg.dtype]
    B, S, H, D = cfg.batch, cfg.seq, cfg.heads, cfg.head_dim
    backward = cfg.mode == "fwd+bwd"
    q, k, v, dout = _inputs((B, H, S, D), dtype, device, ctx.seed, 4)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    masks = Masks(alibi=cfg.impl != "sdpa")
    values = {}
    ran = None
    if cfg.impl == "flex":
        reason = flex.why_not(q, k, v, True, masks)
        if reason:
            raise Unsupported(reason)
        values["kernel"] = flex.describe(q)

        def attend():
            return flex.attention(q, k, v, True, masks=masks)
    elif cfg.impl == "tiled":
        from impls.attention import flash  # imports Triton: only the tiled rows need it

        reason = _tiled_why_not(q, k, v, masks)
        if reason:
            raise Unsupported(reason)
        ran = flash.Kernels()

        def attend():
            return flash.attention(q, k, v, True, masks=masks, kernels=ran)
    elif cfg.impl == "sdpa-bias":
        bias = naive.bias(S, S, True, masks, naive.alibi_slopes(H), dtype, device)  # (H, S, S), -inf above the diagonal
        values["bias_MiB"] = bias.numel() * bias.element_size() / 2**20
        values["kernel"] = "sdpa, explicit (H, S, S) bias"

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        values["kernel"] = "sdpa, is_causal, no bias"

        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = attend()
    ref_out, ref_grads = naive.reference(q.detach(), k.detach(), v.detach(), True, dout if backward else None,
                                         masks=masks)
    got, want = [out], [ref_out]
    if backward:
        got += torch.autograd.grad(out, (q, k, v), dout)
        want += ref_grads
    values["rel_err"] = correctness.max_rel_err(got, want)
    del out, got, want, ref_out, ref_grads
    if ran is not None:
        values["kernel"] = f"slopes in the kernel: {ran}"
    if not correctness.passes(values["rel_err"], dtype):
        return Measurement(values, status="mismatch", reason=f"rel_err {values['rel_err']:.2e} above the "
                           f"{cfg.dtype} tolerance {correctness.TOLERANCE[dtype]:.0e}"), 0, 0
    if backward:
        def step():
            return torch.autograd.grad(attend(), (q, k, v), dout)
    else:
        def step():
            with torch.no_grad():
                return attend()
    stats = ctx.time(step)
    flops = metrics.attention_flops(B, H, S, S, D, True, cfg.mode)
    nbytes = metrics.attention_bytes(B, H, H, S, S, D, dtype.itemsize, cfg.mode)
    if cfg.impl == "sdpa-bias":
        nbytes += values["bias_MiB"] * 2**20 * (2 if backward else 1)  # the bias read by the forward and the backward
    return Measurement(values, stats=stats), flops, nbytes


def _absolute_row(cfg: CostConfig, ctx: Context) -> tuple[Measurement, float, float]:
    device, dtype = ctx.device, DTYPES[cfg.dtype]
    B, S, C = cfg.batch, cfg.seq, cfg.heads * cfg.head_dim
    backward = cfg.mode == "fwd+bwd"
    x, dy = _inputs((B, S, C), dtype, device, ctx.seed, 2)
    pos = torch.arange(S, device=device)
    if cfg.encoding == "learned":
        wpe = torch.nn.Embedding(S, C, device=device, dtype=dtype)
        torch.nn.init.normal_(wpe.weight, std=0.02)
        leaves = (x, wpe.weight)

        def add(a):
            return a + wpe(pos)

        def reference():
            return x.double() + wpe.weight.double()[pos]
        ref_grads = lambda: (dy.double(), dy.double().sum(0))  # noqa: E731 - the table's gradient: dy summed over the batch
        kernel = "embedding lookup + add"
    else:
        leaves = (x,)
        table = posenc.sinusoidal(pos, C).to(dtype)

        def add(a):
            if cfg.impl == "cached":
                return a + table
            return a + posenc.sinusoidal(pos, C).to(a.dtype)

        def reference():
            return x.double() + posenc.sinusoidal(pos, C).double()
        ref_grads = lambda: (dy.double(),)  # noqa: E731
        kernel = "table built in float64 + add" if cfg.impl == "eager" else "cached table + add"
    if backward:
        x.requires_grad_()
    got, want = [add(x)], [reference()]
    if backward:
        got += torch.autograd.grad(got[0], leaves, dy)
        want += ref_grads()
    err = correctness.max_rel_err(got, want)
    del got, want
    values = {"rel_err": err, "kernel": kernel}
    if not correctness.passes(err, dtype):
        return Measurement(values, status="mismatch",
                           reason=f"rel_err {err:.2e} above the {cfg.dtype} tolerance {correctness.TOLERANCE[dtype]:.0e}"), 0, 0
    if backward:
        def step():
            return torch.autograd.grad(add(x), leaves, dy)
    else:
        def step():
            with torch.no_grad():
                return add(x)
    stats = ctx.time(step)
    nbytes = absolute_bytes(B, S, C, dtype.itemsize, cfg.mode, built=cfg.impl != "cached")
    flops = float(B * S * C * (2 if backward else 1))
    return Measurement(values, stats=stats), flops, nbytes


def run_cost(cfg: CostConfig, ctx: Context) -> Measurement:
    row = {"rope": _rope_row, "rope+attention": _rope_attention_row, "alibi": _alibi_row}.get(cfg.encoding,
                                                                                              _absolute_row)
    compiled = cfg.impl.startswith("compile")
    if compiled:
        torch.compiler.reset()  # a fresh compilation per row, done in the gate and the warm-up
    try:
        m, flops, nbytes = row(cfg, ctx)
    finally:
        if compiled:
            torch.compiler.reset()
    if m.status != "ok":
        return m
    dtype = DTYPES[cfg.dtype]
    median = m.stats.median
    rate, bandwidth = metrics.tflops(flops, median), metrics.GBps(nbytes, median)
    matmul = calibrate.matmul_key(dtype)
    peaks = ctx.peaks
    bound = metrics.roofline_bound(flops, nbytes, peaks and peaks.get(matmul), peaks and peaks.get("copy_GBps"))
    if bound is None and cfg.encoding not in ATTENTION_ENCODINGS:
        # Without a matmul peak to place the ridge: RoPE and the tables do under one FLOP per byte,
        # below any GPU's or CPU's ridge point, so the copy bandwidth is their ceiling all the same.
        bound = "memory"
    if bound == "compute":
        share = ctx.share_of_peak(matmul, functools.partial(metrics.pct_of_peak, rate))
    elif bound == "memory":
        share = ctx.share_of_peak("copy_GBps", functools.partial(metrics.pct_of_peak, bandwidth))
    else:
        share = Share()
    m.values.update(tflops=rate, bytes_moved=nbytes, GBps=bandwidth, bound=bound, pct_of_peak=share.pct)
    m.reason = share.note
    return m


COST_DISPLAY = (
    Column("median_ms", "ms", "{:.4g}"),
    Column("iqr_ms", "IQR", "{:.2g}"),
    Column("GBps", "GB/s", "{:.3g}"),
    Column("pct_of_peak", "%peak", "{:.1f}"),
    Column("rel_err", "err", "{:.0e}"),
)


def cost_sweep(opts: CostOptions) -> Sweep:
    return Sweep(
        suite="posenc-cost",
        configs=opts.configs(),
        run=run_cost,
        params=("impl", "encoding", "layout", "batch", "seq", "heads", "head_dim", "dtype", "mode", "offset"),
        metrics=("kernel", "rel_err", "bytes_moved", "GBps", "bound", "pct_of_peak", "tflops", "bias_MiB"),
        display=COST_DISPLAY,
        label="impl",
        baseline=BASELINE,
        note="kernel",
    )


# -- reach -----------------------------------------------------------------------------------------

REACH_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")  # the models trained
EXTENSIONS = ("pi", "ntk")  # rows rope+pi, rope+ntk: the RoPE model scaled at evaluation


@dataclass(frozen=True)
class ReachPreset:
    """One reach run's shape: the GPT preset, its training, its corpus."""

    gpt: str  # impls/gpt.py preset
    train_len: int  # L
    steps: int
    batch: int
    lr: float
    data: str  # impls/data.py preset
    eval_tokens: int  # held-out tokens scored at each evaluation length


REACH_PRESETS = {
    # A CPU finishes this in minutes: 2 layers of 128, the small BPE corpus.
    "tiny": ReachPreset(gpt="tiny", train_len=64, steps=300, batch=8, lr=3e-3, data="stdlib-small", eval_tokens=8192),
    # 8 layers of 512 on the full corpus; a GPU finishes it in minutes.
    "small": ReachPreset(gpt="small", train_len=256, steps=2000, batch=32, lr=1e-3, data="stdlib", eval_tokens=65536),
}


@dataclass(frozen=True)
class ReachConfig:
    encoding: str  # a trained encoding, or rope+pi / rope+ntk
    eval_len: int
    model: str
    train_len: int
    steps: int


@dataclass(frozen=True)
class ReachOptions:
    model: str = "tiny"
    encodings: tuple[str, ...] = REACH_ENCODINGS
    extensions: tuple[str, ...] = EXTENSIONS
    steps: int | None = None  # default: the preset's
    train_len: int | None = None
    eval_factors: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self):
        if self.model not in REACH_PRESETS:
            raise BadInput(f"unknown --model {self.model!r} for --reach; known: {', '.join(REACH_PRESETS)}")
        for encoding in self.encodings:
            if encoding not in REACH_ENCODINGS:
                raise BadInput(f"unknown --encoding {encoding!r} for --reach; known: {', '.join(REACH_ENCODINGS)} "
                               f"(rope+{'/rope+'.join(EXTENSIONS)} come with rope)")
        if self.steps is not None and self.steps <= 0:
            raise BadInput(f"--steps must be positive, got {self.steps}")
        if self.train_len is not None and self.train_len < 2:
            raise BadInput(f"--train-len must be at least 2, got {self.train_len}")
        if not self.eval_factors or any(f < 1 for f in self.eval_factors):
            raise BadInput(f"--eval-factors must be whole numbers of at least 1, got {self.eval_factors}")

    @property
    def preset(self) -> ReachPreset:
        p = REACH_PRESETS[self.model]
        return replace(p, steps=self.steps or p.steps, train_len=self.train_len or p.train_len)

    @property
    def context(self) -> int:
        """Every model's block_size: the longest evaluation length."""
        return self.preset.train_len * max(self.eval_factors)

    def labels(self) -> list[str]:
        out = []
        for encoding in self.encodings:
            out.append(encoding)
            if encoding == "rope":
                out += [f"rope+{e}" for e in self.extensions]
        return out

    def configs(self) -> list[ReachConfig]:
        p = self.preset
        return [ReachConfig(label, p.train_len * f, self.model, p.train_len, p.steps)
                for f in sorted(set(self.eval_factors)) for label in self.labels()]

    def gpt_config(self, encoding: str, vocab_size: int) -> GPTConfig:
        heads = GPTConfig.from_name(self.preset.gpt).n_head
        n_embd = GPTConfig.from_name(self.preset.gpt).n_embd
        if encoding == "rope" and (n_embd // heads) % 2:
            raise BadInput(f"{self.preset.gpt}'s head dim {n_embd // heads} is odd: RoPE needs it even")
        return GPTConfig.from_name(self.preset.gpt, vocab_size=vocab_size, block_size=self.context,
                                   pos_encoding=encoding)


def data_config(opts: ReachOptions) -> DataConfig:
    return DataConfig.from_name(opts.preset.data)


CODE_VERSION = 1  # part of every cached model's key: bump it when training here changes


class Trained:
    """The models of one sweep, one per encoding: read from the cache, else
    trained on first use and cached."""

    def __init__(self, opts: ReachOptions, data: TextData):
        self.opts, self.data = opts, data
        self.models: dict[str, tuple[GPT, dict] | BaseException] = {}

    def get(self, encoding: str, ctx: Context) -> tuple[GPT, dict, bool]:
        """(model, training info, whether this call trained or loaded it)."""
        fresh = encoding not in self.models
        if fresh:
            try:
                self.models[encoding] = self._load_or_train(encoding, ctx)
            except torch.OutOfMemoryError as exc:
                self.models[encoding] = exc
        got = self.models[encoding]
        if isinstance(got, BaseException):
            raise got
        return got[0], got[1], fresh

    def _load_or_train(self, encoding: str, ctx: Context) -> tuple[GPT, dict]:
        p = self.opts.preset
        config = self.opts.gpt_config(encoding, self.data.vocab_size)
        training = LMTraining(steps=p.steps, batch_size=p.batch, seq_len=p.train_len, lr=p.lr,
                              warmup=max(1, p.steps // 20))
        precision = training_precision(ctx.device).name
        key = checkpoints.key(CODE_VERSION, config, training, self.data.path.name, ctx.seed, precision)
        path = checkpoints.path("posenc", encoding, key)
        if path.exists():
            payload = checkpoints.load(path, "posenc", required=("state_dict", "info"))
            model = GPT(config)
            model.load_state_dict(payload["state_dict"])
            return model.to(ctx.device).eval(), {**payload["info"], "cached": True}

        def progress(phase, done, total, info):
            ctx.step(done, total, "train")

        model, info = train_lm(config, self.data, training, ctx.device, ctx.seed, progress=progress)
        checkpoints.save(path, dict(state_dict={k: v.cpu() for k, v in model.state_dict().items()}, info=info))
        return model, {**info, "cached": False}


def _scaled(model: GPT, scaling: posenc.RopeScaling | None) -> GPT:
    """The same weights under another RoPE scaling (RoPE has no parameters)."""
    if scaling is None:
        return model
    scaled = GPT(replace(model.config, rope_scaling=scaling)).to(next(model.parameters()).device)
    scaled.load_state_dict(model.state_dict())
    return scaled.eval()


EVAL_BATCH_TOKENS = 16_384  # tokens scored per forward: windows of 8L are fewer per batch than windows of L


def held_out(data: TextData, opts: ReachOptions) -> torch.Tensor:
    """The tokens every row scores, plus one for the last target: the first
    eval_tokens of the val split, rounded down to a multiple of the longest
    window (so that every length cuts them into whole windows)."""
    longest = opts.preset.train_len * max(opts.eval_factors)
    n = max(1, min(opts.preset.eval_tokens, len(data.val) - 1) // longest) * longest
    return data.val[: n + 1].long()


@torch.no_grad()
def score(model: GPT, tokens: torch.Tensor, window: int, precision: Precision, device: torch.device) -> float:
    """Mean next-token loss over tokens[:-1] cut into non-overlapping windows
    of `window`, each scored from its own start (position 0)."""
    x = tokens[:-1].view(-1, window)  # (N, window)
    y = tokens[1:].view(-1, window)
    per_batch = max(1, EVAL_BATCH_TOKENS // window)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for xs, ys in zip(x.split(per_batch), y.split(per_batch)):
        with precision.context(device):
            _, loss = model(xs.to(device), ys.to(device))
        total += loss.double() * ys.numel()
    return float(total) / y.numel()  # the one synchronization


def run_reach(cfg: ReachConfig, ctx: Context, trained: Trained) -> Measurement:
    base, _, extension = cfg.encoding.partition("+")
    model, info, fresh = trained.get(base, ctx)
    scaling = posenc.scaling_for(extension or None, cfg.eval_len, cfg.train_len)
    tokens = held_out(trained.data, trained.opts)
    precision = training_precision(ctx.device)
    try:
        loss = score(_scaled(model, scaling), tokens, cfg.eval_len, precision, ctx.device)
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc):  # the CPU allocator's out of memory, an oom row like CUDA's
            raise torch.OutOfMemoryError(str(exc)) from exc
        raise
    values = dict(val_loss=loss, ppl=math.exp(loss), scaling=scaling.factor if scaling else None,
                  eval_tokens=len(tokens) - 1, n_params=info["params"], precision=info["precision"])
    if fresh:  # the row that trained (or loaded) the model carries how
        values.update(train_seconds=info["seconds"], train_loss=info["train_loss"], trained_steps=info["steps"],
                      cached=info["cached"])
    notes = []
    if base == "learned" and cfg.eval_len > cfg.train_len:
        notes.append(f"positions {cfg.train_len}..{cfg.eval_len - 1} read untrained rows of the table")
    if scaling is not None:
        notes.append(f"{extension} x{scaling.factor:g}")
    values["note"] = "; ".join(notes)
    return Measurement(values)


REACH_DISPLAY = (
    Column("ppl", "ppl", "{:.4g}"),
    Column("val_loss", "loss", "{:.4f}"),
    Column("train_seconds", "train s", "{:.0f}"),
)


def reach_sweep(opts: ReachOptions, data: TextData) -> Sweep:
    trained = Trained(opts, data)
    configs = opts.configs()
    trains = {c.encoding: i for i, c in reversed(list(enumerate(configs))) if "+" not in c.encoding}
    training_rows = set(trains.values())
    return Sweep(
        suite="posenc-reach",
        configs=configs,
        run=functools.partial(run_reach, trained=trained),
        params=("encoding", "eval_len", "model", "train_len", "steps"),
        metrics=("ppl", "val_loss", "scaling", "eval_tokens", "n_params", "precision", "train_seconds", "train_loss",
                 "trained_steps", "cached", "note"),
        display=REACH_DISPLAY,
        label="encoding",
        primary="ppl",
        note="note",
        # A row that trains its model is most of the sweep's work; scoring is a few forwards.
        cost=lambda c: 1.0 + 20.0 * (configs.index(c) in training_rows),
    )
