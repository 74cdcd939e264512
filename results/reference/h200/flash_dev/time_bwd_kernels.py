"""Time flash_gluon's dK/dV kernel, each config, at the issue's shape.

For comparing two checkouts' kernels in one call (FLASH_NOTES.md v12): run it
once per checkout, with that checkout first on PYTHONPATH, appending to the
same CSV (columns: tree, causal, kernel, config, round, ms).

    PYTHONPATH=TREE python3 time_bwd_kernels.py LABEL OUT.csv
"""

import csv
import math
import os
import sys

import torch
from triton.testing import do_bench

from impls.attention import flash_gluon as fg

label, path = sys.argv[1:3]
B, H, S, D = 2, 16, 8192, 128
scale = 1 / math.sqrt(D)
new_file = not os.path.exists(path)
with open(path, "a", newline="") as f:
    out = csv.DictWriter(f, fieldnames=["tree", "causal", "kernel", "config", "round", "ms"])
    if new_file:
        out.writeheader()
    for causal in (False, True):
        gen = torch.Generator("cuda").manual_seed(1)
        q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        o, lse, _ = fg.forward(q, k, v, causal, scale, (128, 128, 2, "ws"))  # one config: no tuning, one compile
        delta = (o.float() * do.float()).sum(-1)
        kernels = [("dkdv", c, lambda c=c: fg.backward_dkdv(q, k, v, do, lse, delta, causal, scale, c))
                   for c in fg.BWD_CONFIGS]
        for rnd in (1, 2):
            for name, cfg, fn in kernels:
                ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
                out.writerow(dict(tree=label, causal=causal, kernel=name, config=str(cfg), round=rnd, ms=round(ms, 4)))
                f.flush()
                print(label, "causal" if causal else "full", name, cfg, rnd, f"{ms:.4f} ms", flush=True)
