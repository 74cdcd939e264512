"""Time `tiled`'s split-KV decode kernel (impls/attention/flash_triton.py
`decode`, called directly) against SDPA's backends and FlexAttention at decode shapes, with
triton.testing.do_bench, and check each against the float64 reference.

    python -m tools.bench_decode                        # batch 8, kv 32k, 32 heads over 8, D 128, bf16, q_len 1 and 64
    python -m tools.bench_decode --q-len 1 --splits auto,4,8,16,32 --page-size 0,16,256 --copy-gbps 3042
    python -m tools.bench_decode --causal --impl tiled --impl sdpa-cudnn --out decode.csv

Each row: the implementation, the splits and page size for `tiled`, the
median microseconds, the GB/s achieved on the bytes the call must move
(bench/metrics.py attention_bytes: Q, K, V and O once), with --copy-gbps the
percentage of that copy bandwidth, and the relative error against the float64
reference. An implementation that cannot run the shape is a row with the
reason. `--splits auto` lets the kernel choose (ft.decode_splits), `--rows
auto` takes every query row of a kv head's group, up to 128; a page
size of 0 is the dense cache, any other builds a paged copy of it with a
shuffled block table. Without CUDA everything runs on the CPU through
Triton's interpreter, timed by the wall clock: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bench import metrics  # noqa: E402  (after the checkout is on the path)
from impls.attention import flash, flex, naive, sdpa  # noqa: E402
from impls.attention import flash_triton as ft  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("tiled", *(f"sdpa-{name}" for name in sdpa.BACKENDS), "flex")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _time_us(fn, device: torch.device) -> float:
    """Median microseconds of fn(): do_bench on CUDA (L2 flushed between runs); elsewhere one call's wall clock."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    fn()  # the first call sets up (autotuner, caches)
    start = time.perf_counter()  # one timed call: through the interpreter, a smoke test (module docstring)
    fn()
    return (time.perf_counter() - start) * 1e6


def paged(k: torch.Tensor, v: torch.Tensor, page_size: int):
    """k, v (B, Hkv, S, D) as caches of pages (pages, page_size, Hkv, D) in shuffled order, and their block table."""
    B, Hkv, S, D = k.shape
    per_seq = math.ceil(S / page_size)
    order = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(0))
    table = order.reshape(B, per_seq).to(device=k.device, dtype=torch.int32)
    caches = []
    for t in (k, v):
        cache = torch.zeros(B * per_seq, page_size, Hkv, D, dtype=t.dtype, device=t.device)
        padded = torch.nn.functional.pad(t, (0, 0, 0, per_seq * page_size - S))
        cache[table.long()] = padded.reshape(B, Hkv, per_seq, page_size, D).permute(0, 2, 3, 1, 4)
        caches.append(cache)
    return caches[0], caches[1], table


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def cases(args, q, k, v):
    """(impl, splits, page_size, call or None, reason) for each row of one shape."""
    for impl in args.impl:
        if impl != "tiled":
            backend = impl.removeprefix("sdpa-")
            if impl == "flex":
                reason = flex.why_not(q, k, v, args.causal)
                call = lambda: flex.attention(q, k, v, args.causal)  # noqa: E731
            else:
                reason = sdpa.why_not(q, k, v, args.causal, backend)
                call = lambda backend=backend: sdpa.attention(q, k, v, args.causal, backend=backend)  # noqa: E731
            yield impl, "", "", (None if reason else call), reason
            continue
        scale = 1 / math.sqrt(q.shape[-1])
        for page_size in args.page_size:
            kc, vc, table = paged(k, v, page_size) if page_size else (k, v, None)
            # The last page may be part-filled: the cache holds kv_len keys of each sequence.
            lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device) if page_size else None
            reason = flash.supported(q, kc, vc, args.causal, block_table=table, cache_seqlens=lengths)
            for rows in args.rows:
                for splits in args.splits:
                    ran = flash.Kernels()

                    def call(kc=kc, vc=vc, table=table, lengths=lengths, ran=ran,
                             n=None if splits == "auto" else int(splits), rows=None if rows == "auto" else int(rows)):
                        out, description = ft.decode(q, kc, vc, args.causal, scale, ft.PLAIN, table, lengths, n, rows)
                        ran.fwd = "triton decode " + description
                        return out

                    yield impl, ran, page_size, (None if reason else call), reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--q-len", type=_ints, default=[1, 64], help="comma-separated, e.g. 1,16,64")
    parser.add_argument("--kv-len", type=_ints, default=[32768], help="comma-separated")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--causal", action="store_true", help="causal, aligned bottom-right (default: not)")
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help=f"repeat for several (default: tiled, sdpa-cudnn, sdpa-flash, flex); one of {IMPLS}")
    parser.add_argument("--splits", type=lambda s: s.split(","), default=["auto"],
                        help="tiled's key splits: auto or numbers, comma-separated")
    parser.add_argument("--page-size", type=_ints, default=[0], help="tiled's page sizes; 0 = the dense cache")
    parser.add_argument("--rows", type=lambda s: s.split(","), default=["auto"],
                        help="tiled's packed query rows a program holds: auto or powers of two >= 16")
    parser.add_argument("--copy-gbps", type=float, default=None, help="the calibrated copy bandwidth, for %% of it")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 reference (saves time)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows to this CSV file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.impl = args.impl or ["tiled", "sdpa-cudnn", "sdpa-flash", "flex"]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter, wall clock)'}; "
          f"batch {args.batch}, {args.heads} heads over {args.kv_heads}, D {args.head_dim}, {args.dtype}, "
          f"{'causal' if args.causal else 'not causal'}", flush=True)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for kv_len in args.kv_len:
        for q_len in args.q_len:
            shape = (args.batch, args.heads, q_len, args.head_dim), (args.batch, args.kv_heads, kv_len, args.head_dim)
            q = torch.randn(*shape[0], generator=gen, device=device, dtype=dtype)
            k, v = (torch.randn(*shape[1], generator=gen, device=device, dtype=dtype) for _ in range(2))
            ref = None if args.no_check else naive.reference(q, k, v, args.causal)[0]
            nbytes = metrics.attention_bytes(args.batch, args.heads, args.kv_heads, q_len, kv_len, args.head_dim,
                                             q.element_size(), "fwd")
            for impl, ran, page_size, call, reason in cases(args, q, k, v):
                row = {"impl": impl, "q_len": q_len, "kv_len": kv_len, "page_size": page_size, "kernel": "",
                       "us": "", "GBps": "", "pct_copy": "", "rel_err": "", "reason": reason or ""}
                if call is not None:
                    try:
                        with torch.no_grad():
                            out = call()
                            row["us"] = round(_time_us(call, device), 1)
                        row["kernel"] = str(ran) if isinstance(ran, flash.Kernels) else impl
                        row["GBps"] = round(metrics.GBps(nbytes, row["us"] / 1e3), 1)
                        if args.copy_gbps:
                            row["pct_copy"] = round(100 * row["GBps"] / args.copy_gbps, 1)
                        if ref is not None:
                            row["rel_err"] = f"{_rel_err(out, ref):.2e}"
                    except Exception as exc:  # noqa: BLE001 - a failing implementation is a row, not the end
                        row["reason"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print("  ".join(f"{key}={val}" for key, val in row.items() if val != ""), flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
