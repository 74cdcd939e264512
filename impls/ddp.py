"""Data parallelism as PyTorch ships it: DistributedDataParallel with the knobs
users tune, and the three collectives it and its successors (FSDP, ZeRO) are
built from. Run inside a process group (see bench/launch.py):

    knobs = DDPKnobs(bucket_mb=25, compression="bf16")
    model = wrap(GPT(config).to(device), device, knobs)   # gradients all-reduced during backward
    with model.no_sync(): ...                             # the same step without the all-reduce

    inp, out = collective_buffers("all_reduce", numel, world_size, torch.float32, device)
    run_collective("all_reduce", inp, out)

DDP (Li et al. 2020, "PyTorch Distributed", VLDB) groups gradients into
buckets of about `bucket_mb` MB in reverse order of the parameters, and
all-reduces a bucket as soon as backward has produced all of its gradients,
overlapping communication with the rest of backward. The knobs:
- bucket_mb: smaller buckets start communicating earlier but pay more
  per-call latency; larger ones overlap less.
- gradient_as_bucket_view: gradients live in the buckets themselves, saving
  one copy in and out and the memory of a second set of gradients.
- static_graph: the set of used parameters never changes, so DDP may skip
  re-checking it and reorder buckets to the order seen in the first steps.
- compression: a communication hook that casts each bucket to bf16 (or fp16)
  before the all-reduce and back after: half the bytes on the wire, at the
  cost of bf16's 8-bit mantissa in the summed gradients.
- find_unused_parameters: walk the autograd graph after each forward to find
  parameters that got no gradient (needed when some branch is skipped); off
  unless asked, because the walk costs time and every parameter here is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

COMPRESSION_HOOKS = {
    "none": None,
    "bf16": default_hooks.bf16_compress_hook,
    "fp16": default_hooks.fp16_compress_hook,
}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class DDPKnobs:
    bucket_mb: float = 25.0  # DistributedDataParallel's default bucket_cap_mb
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    compression: str = "none"  # none, bf16 or fp16
    find_unused_parameters: bool = False

    def __post_init__(self):
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {self.bucket_mb}")
        if self.compression not in COMPRESSION_HOOKS:
            raise ValueError(f"unknown compression {self.compression!r}; known: {', '.join(COMPRESSION_HOOKS)}")


def why_not(knobs: DDPKnobs, device: torch.device) -> str | None:
    """None if these knobs can run on `device`'s backend, else the reason."""
    if knobs.compression == "bf16" and device.type != "cuda":
        return "torch's bf16_compress_hook runs only with NCCL 2.10+ on CUDA, not with gloo"
    return None


def wrap(model: torch.nn.Module, device: torch.device, knobs: DDPKnobs) -> DistributedDataParallel:
    """`model` (already on `device`) wrapped for data parallelism over the default process group."""
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=knobs.bucket_mb,
        gradient_as_bucket_view=knobs.gradient_as_bucket_view,
        static_graph=knobs.static_graph,
        find_unused_parameters=knobs.find_unused_parameters,
    )
    hook = COMPRESSION_HOOKS[knobs.compression]
    if hook is not None:
        # state=None: the hooks then use the default process group.
        ddp.register_comm_hook(state=None, hook=hook)
    return ddp


def collective_buffers(name: str, numel: int, world_size: int, dtype: torch.dtype, device: torch.device):
    """(input, output) of one collective whose full tensor has `numel` elements.

    Sizes follow nccl-tests: `numel` is the all-reduced tensor, all-gather's
    output and reduce-scatter's input; each rank's shard is numel / world_size
    (numel must divide evenly). all_reduce works in place (output is input)."""
    if name not in COLLECTIVES:
        raise ValueError(f"unknown collective {name!r}; known: {', '.join(COLLECTIVES)}")
    if numel % world_size:
        raise ValueError(f"{numel} elements do not split evenly over {world_size} ranks")
    shard = numel // world_size
    if name == "all_reduce":
        buf = torch.ones(numel, dtype=dtype, device=device)
        return buf, buf
    if name == "all_gather":
        return torch.ones(shard, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device)
    return torch.ones(numel, dtype=dtype, device=device), torch.empty(shard, dtype=dtype, device=device)


# torch 2.13 renamed the tensor forms; older releases (the GPU machine's 2.11) have only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def run_collective(name: str, inp: torch.Tensor, out: torch.Tensor) -> None:
    """One call of the collective over the default process group (blocking the
    current stream until it is done, as DDP's own all-reduce does)."""
    if name == "all_reduce":
        dist.all_reduce(inp)
    elif name == "all_gather":
        _all_gather(out, inp)
    else:
        _reduce_scatter(out, inp)
