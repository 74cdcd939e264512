"""The attention suite: naive vs tiled (FlashAttention written here) vs
PyTorch's scaled_dot_product_attention, with PyTorch choosing its backend and
with each backend forced.

    genbench attention --seq 8k
    genbench attention --seq 1k,2k,4k --mode fwd+bwd --impl tiled --impl sdpa-flash
    genbench attention --q-len 1,64 --kv-len 4k,32k      # serving shapes: queries against a KV cache
    genbench attention --preset decode

`--seq S` is the square case (q_len = kv_len = S); `--q-len` and `--kv-len`
sweep queries against keys. Causal attention with q_len < kv_len is aligned
bottom-right, the queries being the last q_len positions (flash-attention's
convention; see impls/attention/naive.py `causal_mask`), in every row and in
the reference. Square runs keep the `seq` parameter, so they compare with
older runs, and write q_len and kv_len as extra columns; unequal runs have
q_len and kv_len as parameters instead of seq.

Masks: `--window N` (sliding window, with causal only: the query at
position i sees keys i - N < j <= i, in the bottom-right frame), `--softcap X`
(scores X·tanh(scores / X)), `--alibi` (ALiBi's per-head linear bias);
impls/attention/naive.py `Masks` defines them. naive, the reference, flex and
the SDPA rows take them (SDPA: window and ALiBi as an explicit float mask, no
soft-capping); tiled computes them inside its kernels, tiled-torch does not
and is unsupported. Each given
mask is a parameter (a column); a run without masks has none of them, so it
compares with older runs.

Variable-length batches: `--lengths 128,4k,900` (or `uniform:128-4k:16`,
`parse_lengths`) packs sequences of those lengths without padding, each
attending only to itself (impls/attention/naive.py `Varlen`); the rows get
q, k, v as (1, H, T, D) and `varlen=` (its `cu_seqlens`), and FLOPs and bytes
count the real tokens only. Paged KV caches: `--page-size N` stores K and V
as pages with a block table (naive.py `pages`); the rows get the pages as k, v
and `block_table=`, forward only. Which rows take each is said once, in
`Impl.varlen` and `Impl.paged`; `tiled` passes both to its kernels (`_flash_args`).

Beside TFLOP/s each row reports the bytes the call must move (`bytes_moved`,
bench/metrics.py attention_bytes) and the GB/s achieved. `bound` says which
ceiling `pct_of_peak` is taken against: "memory" (the calibrated copy
bandwidth) when the shape's arithmetic intensity, FLOPs over bytes_moved, is
below the device's ridge point (matmul peak of the dtype over copy
bandwidth, both calibrated), else "compute" (the matmul peak); empty without
calibrated peaks (bench/metrics.py roofline_bound).

Each configuration is checked against a float64 reference on the same inputs
(output, and gradients when the backward is measured) before it is timed.

The kernels users install (flash-attention 2 and 3, FlashInfer, xformers)
are rows too, `unsupported` with `not installed` where absent
(impls/attention/third_party.py).

Your own implementation is measured the same way, correctness gate included
(`find_impl`): `--impl mypkg.kernels:attention`, or by the name an installed
package gives it under the entry-point group `genbench.attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench import calibrate, correctness, metrics, registry
from bench.env import DTYPES
from bench.env import cache_dir
from bench.errors import BadInput
from bench.runner import Column, Context, Measurement, Sweep, Timed, timed_run
from impls.attention import ahead, flash, flex, gluon_check, naive, sdpa, third_party, tiled, tuning
from impls.attention.naive import NO_MASKS, Masks, Varlen

MODES = ("fwd", "bwd", "fwd+bwd")
TOKENS_PER_BATCH = 16 * 1024  # default batch: batch × seq = 16k tokens


@dataclass(frozen=True)
class Impl:
    """An attention implementation as the suite sees it."""

    fn: Callable[..., torch.Tensor]
    # None if it can run these inputs here, else the reason it cannot.
    why_not: Callable[..., str | None] = lambda q, k, v, causal, **kw: None
    # What actually ran (backend, kernel configuration), for the `kernel` column.
    kernel: Callable[..., str] = lambda q, k, v, causal, **kw: ""
    # None if fn, why_not and kernel take a keyword `masks` (naive.Masks), else
    # why the implementation cannot run a window, soft-capping or ALiBi.
    no_masks: str | None = "it takes no masks (window, softcap, ALiBi)"
    # None if they take a keyword `varlen` (naive.Varlen) with q, k, v packed (1, H, T, D), else why not.
    varlen: str | None = "it takes no packed variable-length batch (cu_seqlens)"
    # None if they take a keyword `block_table` with k, v as pages (naive.pages), else why not.
    paged: str | None = "it takes no paged KV cache (block table)"
    # Why it cannot soft-cap, where it takes the other masks but not that one.
    no_softcap: str | None = None


def _forced(backend: str) -> Impl:
    return Impl(
        fn=functools.partial(sdpa.attention, backend=backend),
        why_not=functools.partial(sdpa.why_not, backend=backend),
        kernel=lambda q, k, v, causal, masks=NO_MASKS, varlen=None, block_table=None: (
            ("gather+" if block_table is not None else "") + ("per-sequence " if varlen else "") + backend),
        no_masks=None, varlen=None, paged=None, no_softcap=sdpa.NO_SOFTCAP,
    )


def _square_only(q, k, name: str) -> str | None:
    if q.shape[-2] != k.shape[-2]:
        return f"{name} takes q_len == kv_len only (its causal mask assumes equal lengths)"
    return None


def _triton_why_not(q, k, v, causal, masks=NO_MASKS, varlen=None, block_table=None) -> str | None:
    (q, k, v), extra = _flash_args(q, k, v, varlen, block_table)
    reason = flash.supported(q, k, v, causal, masks, **extra)
    return reason and f"{reason}; tiled-torch is the CPU path"


def _triton_only_why_not(q, k, v, causal, masks=NO_MASKS, varlen=None, block_table=None) -> str | None:
    reason = _triton_why_not(q, k, v, causal, masks, varlen, block_table)
    if reason is None and (varlen is not None or block_table is not None
                           or not flash.uses_gluon(q, k, v, masks=masks)):
        reason = "tiled runs the Triton kernels here already"
    return reason


def _flash_args(q, k, v, varlen=None, block_table=None) -> tuple:
    """The suite's calling convention onto flash.attention's: a packed batch
    comes as (1, H, T, D) views with a naive.Varlen, which flash takes as
    (T, H, D) with cu_seqlens; a block table passes through."""
    if varlen is None:
        return (q, k, v), {"block_table": block_table} if block_table is not None else {}
    cu = varlen.cu_seqlens(q.device)
    return tuple(t[0].transpose(0, 1) for t in (q, k, v)), {
        "cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": varlen.max_len, "max_seqlen_k": varlen.max_len}


def _flash_call(q, k, v, causal, *, varlen=None, block_table=None, **options):
    (q, k, v), extra = _flash_args(q, k, v, varlen, block_table)
    out = flash.attention(q, k, v, causal, **extra, **options)
    return out.transpose(0, 1).unsqueeze(0) if varlen is not None else out


def _flash(why_not, **options) -> Impl:
    # Each call records the kernels it ran on `ran`; the kernel column reads the last call's.
    ran = flash.Kernels()
    return Impl(functools.partial(_flash_call, kernels=ran, **options), why_not=why_not,
                kernel=lambda q, k, v, causal, **kw: str(ran), no_masks=None, varlen=None, paged=None)


IMPLS: dict[str, Impl] = {
    "naive": Impl(naive.attention, kernel=lambda q, k, v, causal, **kw: "matmul+softmax+matmul", no_masks=None,
                  varlen=None, paged=None),
    # The Triton kernel: on CUDA, or on CPU through TRITON_INTERPRET=1 (slow, but the real kernel).
    "tiled": _flash(_triton_why_not),
    # tiled with the Triton kernels only, where tiled would run Gluon's (Hopper, head dim 128).
    "tiled-triton": _flash(_triton_only_why_not, gluon=False),
    # The same algorithm in PyTorch: the readable reference, and the CPU path.
    "tiled-torch": Impl(tiled.attention, why_not=lambda q, k, v, causal: _square_only(q, k, "tiled-torch"),
                        kernel=lambda q, k, v, causal: f"torch block={tiled.BLOCK}",
                        no_masks="tiled-torch, the PyTorch reference of tiled, takes no masks (window, softcap, ALiBi)",
                        varlen="tiled-torch takes no packed variable-length batch (cu_seqlens)",
                        paged="tiled-torch takes no paged KV cache (block table)"),
    # FlexAttention: compiled on CUDA, its eager fallback elsewhere (impls/attention/flex.py).
    "flex": Impl(flex.attention, why_not=flex.why_not,
                 kernel=lambda q, k, v, causal, block_table=None, **kw: (
                     ("gather+" if block_table is not None else "") + flex.describe(q)),
                 no_masks=None, varlen=None, paged=None),
    "sdpa": Impl(sdpa.attention, why_not=functools.partial(sdpa.why_not, backend=None), kernel=sdpa.chosen_backend,
                 no_masks=None, varlen=None, paged=None, no_softcap=sdpa.NO_SOFTCAP),
    **{f"sdpa-{name}": _forced(name) for name in sdpa.BACKENDS},
    # The kernels users install (impls/attention/third_party.py): unsupported, "not installed", where absent.
    **{name: Impl(row.attention, why_not=row.why_not, kernel=row.describe, no_masks=None, varlen=None, paged=None)
       for name, row in third_party.ROWS.items()},
}
BASELINE = "naive"
GROUP = "genbench.attention"  # where installed packages register implementations (bench/registry.py)


def find_impl(name: str) -> Impl:
    """A built-in implementation (IMPLS); one an installed package registers
    under the entry-point group genbench.attention, by its name; or your own,
    as `module:function`. Yours is a callable fn(q, k, v, causal) -> out, with
    q and out (B, H, Sq, D) and k, v (B, H_kv, Sk, D), causal aligned
    bottom-right when Sq < Sk (the correctness gate holds it to that); it may carry a
    `why_not(q, k, v, causal)` attribute returning None, or why it cannot run
    those inputs (the row is then unsupported, with that reason). A name that
    cannot be found or imported is a BadInput."""
    if name in IMPLS:
        return IMPLS[name]
    return _plugin(name)


@functools.cache
def _plugin(name: str) -> Impl:
    target, obj = registry.load(name, GROUP, "--impl", builtin=tuple(IMPLS))
    if isinstance(obj, Impl):
        return obj
    if not callable(obj):
        raise BadInput(f"--impl {name}: {target} is a {type(obj).__name__}, not a function of (q, k, v, causal)")
    why_not = getattr(obj, "why_not", None)
    return Impl(fn=_checked(obj, name), kernel=lambda q, k, v, causal: target,
                **({"why_not": why_not} if why_not is not None else {}))


def _checked(fn: Callable, name: str) -> Callable:
    """`fn`, or, when its signature cannot take (q, k, v, causal), a function
    raising a TypeError that says so: each of its rows is then an error row."""
    try:
        signature = inspect.signature(fn)
        signature.bind(None, None, None, False)
    except ValueError:  # no signature to read (a builtin): the call will tell
        return fn
    except TypeError:
        def wrong(q, k, v, causal):
            raise TypeError(f"--impl {name} takes {signature}; genbench calls it as fn(q, k, v, causal)")
        return wrong
    return fn


@dataclass(frozen=True)
class AttentionConfig:
    """One measured row: an implementation on one shape. `seq` for the square
    case (q_len and kv_len follow it), else None with q_len and kv_len given."""

    impl: str
    seq: int | None
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    mode: str
    q_len: int | None = None
    kv_len: int | None = None
    window: int | None = None
    softcap: float | None = None
    alibi: bool = False
    lengths: str | None = None  # a packed batch of these sequence lengths ("128,4096,0"); q_len = kv_len = total
    page_size: int | None = None  # K and V in pages of this many positions, with a block table

    @property
    def masks(self) -> Masks:
        return Masks(self.window, self.softcap, self.alibi)

    @property
    def varlen(self) -> Varlen | None:
        return None if self.lengths is None else Varlen(tuple(int(n) for n in self.lengths.split(",")))

    def __post_init__(self):
        if self.lengths is not None:
            total = self.varlen.total
            assert self.seq is None and self.q_len in (None, total) and self.kv_len in (None, total)
            object.__setattr__(self, "q_len", total)
            object.__setattr__(self, "kv_len", total)
        if self.seq is not None:
            assert self.q_len in (None, self.seq) and self.kv_len in (None, self.seq), "seq is the square case"
            object.__setattr__(self, "q_len", self.seq)
            object.__setattr__(self, "kv_len", self.seq)
        assert self.q_len is not None and self.kv_len is not None, "give seq, or q_len and kv_len"


@dataclass(frozen=True)
class AttentionOptions:
    """The sweep, as given on the command line: `seqs` (square), or `q_lens`
    and `kv_lens` (every pair of them)."""

    seqs: tuple[int, ...] = ()
    heads: int = 16
    kv_heads: int | None = None
    head_dim: int = 128
    dtype: str = "bf16"
    causal: tuple[bool, ...] = (False, True)
    modes: tuple[str, ...] = ("fwd",)
    impls: tuple[str, ...] = tuple(IMPLS)
    batch: int | None = None
    retune: bool = False  # time every kernel configuration here, ignoring shipped and cached choices
    q_lens: tuple[int, ...] = ()
    kv_lens: tuple[int, ...] = ()
    window: int | None = None
    softcap: float | None = None
    alibi: bool = False
    lengths: tuple[int, ...] = ()  # varlen: one packed batch of these sequences, instead of seqs or q_lens/kv_lens
    page_size: int | None = None

    @property
    def square(self) -> bool:
        return not (self.q_lens or self.kv_lens or self.lengths)

    @property
    def masks(self) -> Masks:
        return Masks(self.window, self.softcap, self.alibi)

    def __post_init__(self):
        if self.lengths:
            if self.seqs or self.q_lens or self.kv_lens:
                raise BadInput("--varlen packs the sequences --lengths gives: not with --seq, --q-len or --kv-len")
            if self.batch is not None:
                raise BadInput("--varlen packs the --lengths sequences into one batch: leave out --batch")
            if sum(self.lengths) == 0:
                raise BadInput("--lengths: every sequence is empty; give at least one token")
            if self.page_size is not None:
                raise BadInput("--page-size pages a decode KV cache (--q-len/--kv-len or --seq), not a --varlen batch")
        if self.page_size is not None:
            if self.page_size <= 0:
                raise BadInput(f"--page-size must be positive, got {self.page_size}")
            for kv in self.kv_lens or self.seqs:
                if kv % self.page_size:
                    raise BadInput(f"--page-size {self.page_size} does not divide kv_len {kv}: each sequence's "
                                   "cache must fill whole pages")
            if set(self.modes) != {"fwd"}:
                raise BadInput("--page-size measures the forward (decode against a paged cache): add --mode fwd")
        if self.seqs and not self.square:
            raise BadInput("--seq is the square case and cannot be combined with --q-len/--kv-len: give one or the other")
        if self.square and not self.seqs:
            raise BadInput("give --seq, or --q-len and --kv-len, or --varlen --lengths")
        if not self.square and not self.lengths and not (self.q_lens and self.kv_lens):
            raise BadInput(f"--{'kv-len' if self.q_lens else 'q-len'} is missing: --q-len and --kv-len go together")
        if True in self.causal and self.q_lens and max(self.q_lens) > min(self.kv_lens):
            raise BadInput(f"causal attention needs kv_len >= q_len (the queries are the last q_len positions), got "
                           f"--q-len {max(self.q_lens)} with --kv-len {min(self.kv_lens)}; add --no-causal or longer "
                           "--kv-len")
        if self.window is not None and self.window <= 0:
            raise BadInput(f"--window must be positive (keys each query sees), got {self.window}")
        if self.window is not None and self.causal != (True,):
            raise BadInput("--window is a causal sliding window: add --causal")
        if self.softcap is not None and not self.softcap > 0:
            raise BadInput(f"--softcap must be positive (scores become X·tanh(scores / X)), got {self.softcap}")
        kv = self.kv_heads or self.heads
        for name, value in (("--heads", self.heads), ("--kv-heads", kv), ("--head-dim", self.head_dim)):
            if value <= 0:
                raise BadInput(f"{name} must be positive, got {value}")
        if self.batch is not None and self.batch <= 0:
            raise BadInput(f"--batch must be positive, got {self.batch}")
        if self.heads % kv:
            raise BadInput(f"--heads {self.heads} is not divisible by --kv-heads {kv}")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        for mode in self.modes:
            if mode not in MODES:
                raise BadInput(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        for impl in self.impls:
            find_impl(impl)  # unknown, or yours not importable: an error now, before anything runs
        # Asked for what none of the named implementations takes: nothing would be measured.
        probe = self.configs()[0]
        reasons = [_lacks(find_impl(impl), probe) for impl in self.impls]
        if all(reasons):
            raise BadInput(f"--impl {', '.join(self.impls)}: {reasons[0]}; naive and flex take masks, --varlen "
                           "and --page-size")

    def configs(self) -> list[AttentionConfig]:
        # Shapes outermost, implementations innermost: rows that share a
        # reference (and a table) are measured one after another.
        # Unequal lengths: a default batch of 16k tokens of keys.
        shapes = ([(seq, None, None) for seq in self.seqs] if self.square
                  else [(None, None, None)] if self.lengths
                  else [(None, q, kv) for q in self.q_lens for kv in self.kv_lens])
        lengths = ",".join(map(str, self.lengths)) if self.lengths else None
        return [
            AttentionConfig(
                impl=impl, seq=seq, q_len=q_len, kv_len=kv_len,
                batch=1 if lengths else self.batch or max(1, TOKENS_PER_BATCH // (seq or kv_len)),
                heads=self.heads, kv_heads=self.kv_heads or self.heads, head_dim=self.head_dim,
                dtype=self.dtype, causal=causal, mode=mode,
                window=self.window, softcap=self.softcap, alibi=self.alibi,
                lengths=lengths, page_size=self.page_size,
            )
            for seq, q_len, kv_len in shapes for causal in self.causal for mode in self.modes for impl in self.impls
        ]


@dataclass(frozen=True)
class Preset:
    """Options a `--preset` fills where the command line leaves them out
    (None: the command's own default). Lengths as --seq/--q-len/--kv-len take them."""

    seq: str | None = None
    q_len: str | None = None
    kv_len: str | None = None
    batch: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    dtype: str | None = None
    causal: bool | None = None
    modes: tuple[str, ...] | None = None
    lengths: str | None = None  # varlen, as --lengths takes them


# Serving shapes, by name and device type ("cuda", or "cpu" for any other):
# grouped-query attention as Llama 3 8B has it (32 query heads over 8 kv heads
# of 128), forward only as served; on a CPU a small version of each, to check
# the rows rather than time them.
PRESETS: dict[str, dict[str, Preset]] = {
    # one new token per sequence against a KV cache
    "decode": {
        "cuda": Preset(q_len="1", kv_len="1k,4k,16k,32k,128k", batch=8, heads=32, kv_heads=8, head_dim=128,
                       dtype="bf16", causal=True, modes=("fwd",)),
        "cpu": Preset(q_len="1", kv_len="256,1k", batch=2, heads=8, kv_heads=2, head_dim=64, dtype="fp32",
                      causal=True, modes=("fwd",)),
    },
    # a prompt's attention over itself: square, causal
    "prefill": {
        "cuda": Preset(seq="1k,4k,16k", heads=32, kv_heads=8, head_dim=128, dtype="bf16", causal=True,
                       modes=("fwd",)),
        "cpu": Preset(seq="128,512", heads=8, kv_heads=2, head_dim=64, dtype="fp32", causal=True, modes=("fwd",)),
    },
    # prompts of different lengths prefilled together, packed: 16k tokens in ten sequences of 128 to 4k
    "prefill-varlen": {
        "cuda": Preset(lengths="4k,128,2500,900,3072,1800,128,2k,512,1200", heads=32, kv_heads=8, head_dim=128,
                       dtype="bf16", causal=True, modes=("fwd",)),
        "cpu": Preset(lengths="100,0,1,37,128,64", heads=8, kv_heads=2, head_dim=64, dtype="fp32", causal=True,
                      modes=("fwd",)),
    },
}


def preset(name: str, device_type: str) -> Preset:
    if name not in PRESETS:
        raise BadInput(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
    return PRESETS[name]["cuda" if device_type == "cuda" else "cpu"]


_SIZE = re.compile(r"^\s*(\d+)\s*([kK]?)\s*$")


def parse_seqs(text: str, option: str = "--seq") -> tuple[int, ...]:
    """'512' -> (512,), '8k' or '8K' -> (8192,), '1k,2k,4k' -> (1024, 2048, 4096).
    `option` names the option in the error (--seq, --q-len, --kv-len)."""
    seqs = []
    for part in text.split(","):
        match = _SIZE.match(part)
        if not match:
            raise BadInput(f"{option}: cannot read {part.strip()!r} as a length (examples: 512, 8k, 1k,2k,4k)")
        value = int(match.group(1)) * (1024 if match.group(2) else 1)
        if value <= 0:
            raise BadInput(f"{option}: lengths must be positive, got {part.strip()!r}")
        seqs.append(value)
    return tuple(seqs)


_DISTRIBUTION = re.compile(r"^\s*(\w+)\s*:\s*(\d+[kK]?)\s*-\s*(\d+[kK]?)\s*:\s*(\d+)\s*(?:@\s*(\d+))?\s*$")
DISTRIBUTIONS = ("uniform",)


def parse_lengths(text: str) -> tuple[int, ...]:
    """--lengths: a list, '128,4k,900,0,1' (0 and 1 allowed), or a distribution
    NAME:LO-HI:N[@SEED], 'uniform:128-4k:16@3': N lengths drawn uniformly from
    LO..HI inclusive by a torch.Generator seeded with SEED (default 0), so the
    same text gives the same lengths everywhere."""
    match = _DISTRIBUTION.match(text)
    if match:
        name, lo, hi, n, seed = match.groups()
        if name not in DISTRIBUTIONS:
            raise BadInput(f"--lengths: unknown distribution {name!r}; known: {', '.join(DISTRIBUTIONS)}")
        (lo, hi), n = (_size(x, "--lengths") for x in (lo, hi)), int(n)
        if lo > hi or n == 0:
            raise BadInput(f"--lengths {text.strip()}: need LO <= HI and N >= 1 (NAME:LO-HI:N[@SEED])")
        g = torch.Generator().manual_seed(int(seed or 0))
        return tuple(torch.randint(lo, hi + 1, (n,), generator=g).tolist())
    if ":" in text:
        raise BadInput(f"--lengths: cannot read {text.strip()!r} (examples: 128,4k,900 or uniform:128-4k:16@0)")
    return tuple(_size(part, "--lengths") for part in text.split(","))


def _size(part: str, option: str) -> int:
    match = _SIZE.match(part)
    if not match:
        raise BadInput(f"{option}: cannot read {part.strip()!r} as a length (examples: 128,4k,900 or uniform:128-4k:16@0)")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def _inputs(cfg: AttentionConfig, device: torch.device, seed: int):
    """q, k, v and the output gradient, the same for every impl of one shape."""
    dtype = DTYPES[cfg.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(cfg.batch, cfg.heads, cfg.q_len, cfg.head_dim, generator=g, device=device, dtype=dtype)
    k, v = (
        torch.randn(cfg.batch, cfg.kv_heads, cfg.kv_len, cfg.head_dim, generator=g, device=device, dtype=dtype)
        for _ in range(2)
    )
    dout = torch.randn(q.shape, generator=g, device=device, dtype=dtype)
    return q, k, v, dout


@functools.lru_cache(maxsize=1)
def _reference(shape: AttentionConfig, device: torch.device, seed: int, backward: bool):
    """Float64 output (and gradients), computed once for all impls of a shape."""
    q, k, v, dout = _inputs(shape, device, seed)
    return naive.reference(q, k, v, shape.causal, dout if backward else None, masks=shape.masks, varlen=shape.varlen)


def _lacks(impl: Impl, cfg: AttentionConfig) -> str | None:
    """Why `impl` cannot take what this configuration asks beyond plain attention, or None."""
    wants = ((cfg.varlen is not None, impl.varlen), (cfg.page_size is not None, impl.paged),
             (bool(cfg.masks), impl.no_masks), (cfg.softcap is not None, impl.no_softcap))
    return next((reason for asked, reason in wants if asked and reason), None)


@dataclass
class _Call:
    """One configuration's inputs, as its implementation takes them."""

    impl: Impl
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    kw: dict  # masks, a packed batch, a block table: for the implementations that take them
    values: dict  # the row's columns known before the call


def _call(cfg: AttentionConfig, ctx: Context) -> _Call | Measurement:
    """The inputs of `cfg`'s row, or its unsupported Measurement."""
    impl = find_impl(cfg.impl)
    backward = cfg.mode != "fwd"
    q, k, v, dout = _inputs(cfg, ctx.device, ctx.seed)
    if backward:  # before why_not: inputs that require grad ask it about the backward too
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    # A square run writes q_len and kv_len beside seq (its params are seq's); unequal runs have them as params.
    values = {"q_len": cfg.q_len, "kv_len": cfg.kv_len} if cfg.seq is not None else {}
    if cfg.varlen is not None:
        values["tokens"], values["sequences"] = cfg.varlen.total, len(cfg.varlen.lengths)
    # Masks, a packed batch and a block table go in as keywords, to the implementations that take them.
    reason = _lacks(impl, cfg)
    if reason:
        return Measurement(values, status="unsupported", reason=reason)
    kw = {"masks": cfg.masks} if cfg.masks else {}
    if cfg.varlen is not None:
        kw["varlen"] = cfg.varlen
    if cfg.page_size is not None:  # the reference's contiguous K and V; the rows read these pages instead
        k, block_table = naive.pages(k, cfg.page_size, torch.Generator().manual_seed(ctx.seed))
        v, _ = naive.pages(v, cfg.page_size, torch.Generator().manual_seed(ctx.seed))
        kw["block_table"] = block_table
    reason = impl.why_not(q, k, v, cfg.causal, **kw)
    if reason:
        return Measurement(values, status="unsupported", reason=reason)
    return _Call(impl, q, k, v, dout, kw, values)


# The rows whose kernels compile_ahead() compiles before the sweep's first row.
AHEAD = ("tiled", "tiled-triton")
# Processes compiling them while the device is calibrated: one per group of
# configurations that share kernels (implementation and masks, not mode), at most this many.
AHEAD_PROCESSES = 8
WORKER = "from suites.attention import _compile_ahead_worker as w; w()"  # an Ahead process's program
AHEAD_WAIT_S = 300.0  # past this, whatever the processes have not compiled is compiled here or by the rows
# A process skips a configuration whose inputs and gradients take more device
# memory than this, so that it never crowds the calibration running beside it.
AHEAD_PROCESS_BYTES = 2 * 2**30


def self_check(configs: list[AttentionConfig], ctx: Context) -> str | None:
    """Run the Gluon kernels' self-check (impls/attention/gluon_check.py) now where a row would start
    it: a line with its verdict, or None where no row needs one. Otherwise the first `tiled` row would
    run it under that row's progress line, and compile_ahead() before it, which cannot launch kernels,
    would leave the Gluon kernels to compile one after another in that row."""
    if ctx.device.type != "cuda":
        return None
    for cfg in configs:
        if cfg.impl not in AHEAD or cfg.varlen is not None or cfg.page_size is not None:
            continue
        q, k = _probe(cfg, ctx.device)
        if flash.gluon_check_due(q, k, k, cfg.masks):
            began = time.perf_counter()
            checked = gluon_check.verdict(ctx.device)
            return f"tiled: {checked.note}, in {time.perf_counter() - began:.1f} s (kept for later runs)"
    return None


def _probe(cfg: AttentionConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Inputs of cfg's kind, one batch and head, left unfilled: enough to ask which kernels would run.
    q = torch.empty(1, 1, cfg.q_len, cfg.head_dim, device=device, dtype=DTYPES[cfg.dtype])
    return q, q.new_empty(1, 1, cfg.kv_len, cfg.head_dim)


def compile_ahead(configs: list[AttentionConfig], ctx: Context, threads: int | None = None) -> str | None:
    """Compile the flash kernels every tiled row will launch, side by side
    (impls/attention/ahead.py, on `threads` threads, default one a core), so
    that the rows do not compile them one after another; a line saying so, or
    None where nothing was compiled."""
    todo = [cfg for cfg in configs if cfg.impl in AHEAD]
    if not todo or ctx.device.type != "cuda" or ahead.available() is not None:
        return None
    began = time.perf_counter()
    with ahead.compiling(threads) as pool:
        for cfg in todo:
            try:
                call = _call(cfg, ctx)
                if isinstance(call, Measurement):
                    continue
                out = call.impl.fn(call.q, call.k, call.v, cfg.causal, **call.kw)
                if cfg.mode != "fwd":
                    torch.autograd.grad(out, (call.q, call.k, call.v), call.dout)
            except Exception:  # noqa: BLE001 - the row itself, launching its kernels, reports what went wrong
                continue
    if not pool.kernels:
        return None
    return (f"{pool.kernels} kernels of {' and '.join(sorted({c.impl for c in todo}))} compiled (or loaded from "
            f"Triton's cache) ahead, {pool.workers} at a time, in {time.perf_counter() - began:.1f} s")


class Ahead:
    """compile_ahead() in other processes while the device is calibrated.

    A first run calibrates the device before its first row (bench/calibrate.py,
    seconds of GPU work). Started then, each process compiles one group's
    kernels into Triton's on-disk cache on its share of the host's cores;
    `finish` waits for them and runs compile_ahead() here, which loads what they
    compiled and compiles what they did not. Processes, because a Triton compile
    holds the GIL for much of its time, so one process's threads overlap only
    part of it; and only beside the calibration, because elsewhere their start
    (importing torch and Triton, a CUDA context each) would be a wait of its own.
    """

    def __init__(self, configs: list[AttentionConfig]):
        self.configs = configs
        self.procs: list = []  # ahead.spawn()'s
        self.began = self.ended = 0.0  # when the processes started, and when the last ended or was stopped

    def groups(self) -> list[list[AttentionConfig]]:
        by_kernels: dict[AttentionConfig, list[AttentionConfig]] = {}
        for cfg in self.configs:
            if cfg.impl in AHEAD:
                by_kernels.setdefault(dataclasses.replace(cfg, mode=""), []).append(cfg)
        groups = list(by_kernels.values())
        return [sum(groups[i::AHEAD_PROCESSES], []) for i in range(min(len(groups), AHEAD_PROCESSES))]

    def start(self, device: torch.device, seed: int) -> None:
        if device.type != "cuda" or ahead.available() is not None:
            return
        self.began = time.perf_counter()
        groups = self.groups()
        # Each process its share of the cores, one share left to the calibration.
        threads = max(1, ahead.cores() // (len(groups) + 1))
        self.procs = ahead.spawn(WORKER, [(str(device), seed, threads, group) for group in groups])

    def finish(self, ctx: Context) -> str | None:
        """Wait for the processes (at most AHEAD_WAIT_S), then compile_ahead() here."""
        ahead.wait(self.procs, AHEAD_WAIT_S)
        self.ended = time.perf_counter()
        line = compile_ahead(self.configs, ctx)
        if line and self.procs:
            line += (f"; before that, {len(self.procs)} processes compiled for "
                     f"{self.ended - self.began:.1f} s, beside the calibration")
        return line


def _tensor_bytes(cfg: AttentionConfig) -> int:
    q = cfg.batch * cfg.heads * cfg.q_len * cfg.head_dim
    kv = cfg.batch * cfg.kv_heads * cfg.kv_len * cfg.head_dim
    return 2 * (2 * q + 2 * kv) * DTYPES[cfg.dtype].itemsize  # q, dout, k, v and their gradients


def _compile_ahead_worker() -> None:
    """Entry of one Ahead process: (device, seed, threads, configs) pickled on stdin."""
    device, seed, threads, configs = ahead.payload()
    gluon_check.use_cache(cache_dir())
    small = [cfg for cfg in configs if _tensor_bytes(cfg) <= AHEAD_PROCESS_BYTES]
    compile_ahead(small, Context(device=torch.device(device), seed=seed), threads)


def prepare(cfg: AttentionConfig, ctx: Context) -> Timed | Measurement:
    """A row's inputs checked against float64 and its step ready to time, or the row's Measurement if it
    is unsupported or a mismatch."""
    call = _call(cfg, ctx)
    if isinstance(call, Measurement):
        return call
    impl, q, k, v, dout, kw, values = call.impl, call.q, call.k, call.v, call.dout, call.kw, call.values
    backward = cfg.mode != "fwd"

    # Correctness gate: output (and gradients) against float64, before any timing.
    shape = dataclasses.replace(cfg, impl="", mode="")
    ref_out, ref_grads = _reference(shape, ctx.device, ctx.seed, backward)
    out = impl.fn(q, k, v, cfg.causal, **kw)
    got, want = [out], [ref_out]
    if backward:
        got += torch.autograd.grad(out, (q, k, v), dout)
        want += ref_grads
    err = correctness.max_rel_err(got, want)
    values["rel_err"] = err
    values["kernel"] = impl.kernel(q, k, v, cfg.causal, **kw)  # after a call: autotuners have chosen
    del out, got, want
    dtype = DTYPES[cfg.dtype]
    if not correctness.passes(err, dtype):
        tol = correctness.TOLERANCE[dtype]
        return Measurement(values, status="mismatch", reason=f"rel_err {err:.2e} above the {cfg.dtype} tolerance {tol:.0e}")

    if cfg.mode == "fwd":
        def step():
            with torch.no_grad():
                return impl.fn(q, k, v, cfg.causal, **kw)
    elif cfg.mode == "bwd":
        out = impl.fn(q, k, v, cfg.causal, **kw)

        def step():
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(impl.fn(q, k, v, cfg.causal, **kw), (q, k, v), dout)

    def finish(stats) -> Measurement:
        flops = _flops(cfg)
        # A packed batch moves its T tokens of Q, K, V and O once, as one sequence of T would.
        nbytes = metrics.attention_bytes(cfg.batch, cfg.heads, cfg.kv_heads, cfg.q_len, cfg.kv_len, cfg.head_dim,
                                         dtype.itemsize, cfg.mode)
        rate, bandwidth = metrics.tflops(flops, stats.median), metrics.GBps(nbytes, stats.median)
        matmul = calibrate.matmul_key(dtype)
        peaks = ctx.peaks
        bound = metrics.roofline_bound(flops, nbytes, peaks and peaks.get(matmul), peaks and peaks.get("copy_GBps"))
        if bound == "memory":
            share = ctx.share_of_peak("copy_GBps", functools.partial(metrics.pct_of_peak, bandwidth))
        else:
            share = ctx.share_of_peak(matmul, functools.partial(metrics.pct_of_peak, rate))
        values.update(
            tflops=rate,
            bytes_moved=nbytes,
            GBps=bandwidth,
            bound=bound,
            pct_of_peak=share.pct,
            peak_mem_MiB=ctx.peak_memory_mib(step),
            do_bench_median_ms=ctx.do_bench_ms(step),
        )
        ctx.profile(step)  # --profile: a trace of the timed step
        return Measurement(values, stats=stats, reason=share.note)

    return Timed(step, finish)


run = timed_run(prepare)


DISPLAY = (
    Column("median_ms", "ms", "{:.4g}"),
    Column("iqr_ms", "IQR", "{:.2g}"),
    Column("tflops", "TFLOP/s", "{:.3g}"),
    Column("GBps", "GB/s", "{:.3g}"),
    Column("pct_of_peak", "%peak", "{:.0f}"),
    Column("peak_mem_MiB", "MiB", "{:.0f}"),
    Column("rel_err", "err", "{:.0e}"),
)


# The naive rows' work counts this many times their FLOPs in the progress
# bar's ETA: they write and read the whole S x S score matrix, several times
# slower than the fused kernels at the lengths where rows take long.
NAIVE_WEIGHT = 4.0


def _flops(cfg: AttentionConfig) -> float:
    if cfg.varlen is not None:  # each sequence attends to itself: the real tokens' pairs, no padding
        return sum(metrics.attention_flops(1, cfg.heads, n, n, cfg.head_dim, cfg.causal, cfg.mode, cfg.window)
                   for n in cfg.varlen.lengths)
    return metrics.attention_flops(cfg.batch, cfg.heads, cfg.q_len, cfg.kv_len, cfg.head_dim, cfg.causal, cfg.mode,
                                   cfg.window)


def work(cfg: AttentionConfig) -> float:
    return _flops(cfg) * (NAIVE_WEIGHT if cfg.impl == "naive" else 1.0)


def cost(cfg: AttentionConfig, mean_work: float) -> float:
    """A row's share of the sweep, for the ETA (bench/runner.py): a fixed part
    (the time budgets, the correctness gate, compilation), as large as the part
    that grows with the row's work, which is its work over the sweep's mean."""
    return 1.0 + work(cfg) / mean_work


def sweep(opts: AttentionOptions) -> Sweep:
    if opts.retune:
        tuning.retune()
    gluon_check.use_cache(cache_dir())  # where the Gluon kernels' self-check keeps its verdicts
    configs = opts.configs()
    early = Ahead(configs)
    mean_work = sum(map(work, configs)) / max(len(configs), 1)
    # Square runs keep seq as the parameter, so rows join with older runs' in compare, and
    # write q_len and kv_len beside it; unequal runs are keyed by q_len and kv_len.
    shape = ("seq",) if opts.square else ("lengths",) if opts.lengths else ("q_len", "kv_len")
    paged = ("page_size",) if opts.page_size is not None else ()
    # Each mask given is a parameter; without masks the keys are those of older runs.
    masks = tuple(name for name, given in (("window", opts.window is not None), ("softcap", opts.softcap is not None),
                                           ("alibi", opts.alibi)) if given)
    return Sweep(
        suite="attention",
        configs=configs,
        run=run,
        timed=prepare,
        params=("impl", *shape, "batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "mode", *masks, *paged),
        metrics=("kernel", "rel_err", "tflops", "pct_of_peak", "peak_mem_MiB", "do_bench_median_ms",
                 "bytes_moved", "GBps", "bound", *(("q_len", "kv_len") if opts.square else ()),
                 *(("tokens", "sequences") if opts.lengths else ())),
        display=DISPLAY,
        label="impl",
        baseline=BASELINE,
        note="kernel",
        cost=functools.partial(cost, mean_work=mean_work),
        start=early.start,
        prepare=(("self-checking the Gluon kernels on this Triton", functools.partial(self_check, configs)),
                 ("compiling tiled's kernels", early.finish)),
    )
