"""Peak device memory of one call.

On CUDA the figure is the allocator's peak during the call above what was
already allocated before it (reset_peak_memory_stats + max_memory_allocated):
the memory the call itself needs, inputs excluded. On CPU there is no
allocator counter that covers torch's tensors, so nothing is reported (None,
an empty CSV cell), never an estimate.
"""

from __future__ import annotations

from typing import Callable

import torch


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20
