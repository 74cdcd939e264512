"""`genbench env`: the machine on one screen, and the measured peaks."""

from __future__ import annotations

from typing import Annotated

import torch
import typer
from rich.table import Table

from bench import calibrate, env
from bench.commands import DeviceOpt, app, cli_errors, console
from impls.attention import sdpa


def _sdpa_backends(device: torch.device) -> str:
    """Which forced SDPA backends run a small bf16/fp32 problem on this device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    ok = [name for name in sdpa.BACKENDS if sdpa.why_not(q, q, q, False, name) is None]
    return ", ".join(ok) or "none"


@app.command("env")
@cli_errors
def env_command(
    calibrate_: Annotated[bool, typer.Option("--calibrate", help="Measure matmul rates and copy bandwidth now and cache them.")] = False,
    device: DeviceOpt = "auto",
):
    """The device, driver and library versions, SDPA backends, and calibrated peaks."""
    dev = env.resolve_device(device)
    info = env.collect(dev)
    table = Table(title="genbench env", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key in ("device", "device_name", "gpu_count", "gpu_capability", "driver", "cuda", "cudnn", "nccl",
                "torch", "triton", "genbench", "git_commit", "python", "cpu", "cpu_count", "hostname"):
        table.add_row(key, "" if info[key] is None else str(info[key]))
    table.add_row("sdpa backends", _sdpa_backends(dev))
    if dev.type == "cuda":
        table.add_row("bf16 / tf32", f"{torch.cuda.is_bf16_supported(including_emulation=False)} / "
                      f"{torch.cuda.get_device_capability(dev) >= (8, 0)}")
        table.add_row("fp8 matmul", str(torch.cuda.get_device_capability(dev) >= (8, 9)))
    if calibrate_:
        with console.status("measuring matmul rates and copy bandwidth"):
            peaks = calibrate.calibrate(dev)
    else:
        peaks = calibrate.load(dev)
    if peaks:
        for p in calibrate.PRECISIONS:
            value = peaks.get(f"{p}_tflops")
            table.add_row(f"{p} matmul", "unsupported" if value is None else f"{value:.3g} TFLOP/s (measured)")
        table.add_row("copy bandwidth", f"{peaks['copy_GBps']:.4g} GB/s (measured, read+write)")
    else:
        table.add_row("peaks", "not measured yet: genbench env --calibrate")
    console.print(table)
