"""Tune the flash kernels on this GPU and write the choices that `tiled` ships
(impls/attention/tuned/<arch>-triton<version>.json; see impls/attention/tuning.py).

    python tools/tune_attention.py                           # bf16, D 64 and 128, S 1k..16k, causal and not
    python tools/tune_attention.py --seq 8k --head-dim 128 --dtype bf16 --dtype fp16 --out /tmp/choices.json

Every configuration of every kernel is timed here (the shipped and cached
choices are ignored first), for the forward and backward of `tiled` (the Gluon
kernels where they run) and of `tiled-triton`, at batch × seq = 16k tokens and
16 heads, the attention suite's default shape. Run it on the GPU the file is for,
with the Triton release it is for, and commit the file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _seq(text: str) -> int:
    text = text.lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def tune(seqs, head_dims, dtypes, heads: int = 16, tokens: int = 16 * 1024, log=print) -> dict:
    """Run every shape once forward and backward under fresh tuning; return the choices as data."""
    import triton

    from impls.attention import flash, flash_triton, tuning

    device = torch.device("cuda")
    tuning.retune()
    for dtype in dtypes:
        for d in head_dims:
            for s in seqs:
                for causal in (False, True):
                    for gluon in (None, False):
                        t0 = time.perf_counter()
                        q, k, v = (torch.randn(max(1, tokens // s), heads, s, d, device=device, dtype=DTYPES[dtype],
                                               requires_grad=True) for _ in range(3))
                        ran = flash.Kernels()
                        flash.attention(q, k, v, causal, gluon=gluon, kernels=ran).sum().backward()
                        torch.cuda.synchronize()
                        log(f"{dtype} D={d} S={s} causal={causal} {'triton' if gluon is False else 'tiled'}: "
                            f"{ran} ({time.perf_counter() - t0:.1f} s)")
    data = {"arch": tuning.arch(device), "triton": triton.__version__, "gpu": torch.cuda.get_device_name(device),
            "torch": torch.__version__, "triton_kernels": {}, "gluon": {}}
    for name, kernel in flash_triton.AUTOTUNED.items():
        data["triton_kernels"][name] = {repr(key): tuning.config_record(c) for key, c in kernel.cache.items()}
    fg = flash.loaded_gluon()
    if fg is not None:
        for name, tuner in fg.TUNERS.items():
            data["gluon"][name] = {repr(key): list(config) for (key, _, _), config in tuner._memo.items()}
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", action="append", help="sequence lengths (repeatable); default 1k 2k 4k 8k 16k")
    parser.add_argument("--head-dim", action="append", type=int, help="default 64 and 128")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default bf16")
    parser.add_argument("--out", type=Path, help="default: the file tiled reads on this GPU and Triton")
    args = parser.parse_args(argv)
    import triton

    from impls.attention import tuning

    data = tune([_seq(s) for s in (args.seq or ["1k", "2k", "4k", "8k", "16k"])], args.head_dim or [64, 128],
                args.dtype or ["bf16"])
    out = args.out or tuning.path_for(torch.device("cuda"), triton.__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {sum(map(len, data['triton_kernels'].values()))} Triton and "
          f"{sum(map(len, data['gluon'].values()))} Gluon choices")


if __name__ == "__main__":
    main()
