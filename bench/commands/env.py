"""`genbench env`: the machine on one screen, and the measured peaks.

    genbench env                 device, driver, CUDA/cuDNN/NCCL, torch, triton and
                                 the ptxas it assembles with, the environment
                                 variables set that change them, SDPA backends,
                                 bf16/tf32/fp8, cached peaks
    genbench env --calibrate     measure the peaks now (seconds: each the best of
                                 several rounds) and cache them

Every "yes" about the device is found by running a tiny problem on it, not
read from a table: a backend or a number format counts when a call succeeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from bench.commands import Command, DeviceOpt, app, cached_peaks, cli_errors, console, measure_peaks

if TYPE_CHECKING:
    import torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _sdpa_backends(device: torch.device) -> tuple[str, dict[str, str]]:
    """The dtype tried, and for each forced SDPA backend 'yes' or 'no: why'."""
    import torch

    from impls.attention import sdpa

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)  # (B, H, S, D)
    found = {}
    for name in sdpa.BACKENDS:
        reason = sdpa.why_not(q, q, q, False, name)
        found[name] = "yes" if reason is None else f"no: {reason}"
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], found


def _bf16(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "yes" if native else "no native bf16 (emulated)"
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16)
        a @ a
    except RuntimeError as exc:
        return f"no: {_first_line(exc)}"
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private: feature-detected
    if avx512_bf16 is None:
        return "runs"
    return "runs, with AVX512-BF16 instructions" if avx512_bf16() else "runs, without AVX512-BF16 (converted to fp32)"


def _tf32(device: torch.device) -> str:
    import torch

    if device.type != "cuda":
        return "no: TF32 is a tensor-core mode of NVIDIA GPUs"
    cap = torch.cuda.get_device_capability(device)
    return "yes" if cap >= (8, 0) else f"no: needs sm_80 or newer, this is sm_{cap[0]}{cap[1]}"


def _fp8(device: torch.device) -> str:
    """Whether an fp8 (e4m3) matmul runs: the precision suite's answer
    (impls/fp8.why_not), then torch._scaled_mm, the op it calls (private, so
    feature-detected), on a tiny problem."""
    import torch

    from impls import fp8

    reason = fp8.why_not(device)
    if reason:
        return f"no: {reason}"
    a = torch.randn(16, 16, device=device).to(fp8.E4M3)
    b = torch.randn(16, 16, device=device).to(fp8.E4M3).t()  # the second operand column-major
    one = torch.tensor(1.0, device=device)
    try:
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"no: {_first_line(exc)}"
    return "yes (torch._scaled_mm)"


def _clocks(info: dict) -> str:
    """What NVML says of the clocks (bench/telemetry.py `device_info`), or why nothing."""
    if info.get("max_sm_clock_MHz") is None:
        return "- (NVML unavailable: pip install -e '.[gpu]')"
    locked = {True: "clocks locked", False: "clocks not locked", None: "clock locks unknown"}[info["clocks_locked"]]
    limit = f", power limit {info['power_limit_W']:.0f} W" if info.get("power_limit_W") is not None else ""
    return f"SM max {info['max_sm_clock_MHz']:.0f} MHz{limit}, {locked}"


def _device_rows(info: dict, device: torch.device) -> list[tuple[str, str]]:
    import torch

    rows = [("device", f"{info['device']}: {info['device_name']}")]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows += [
            ("gpus", str(info["gpu_count"])),
            ("capability", f"sm_{props.major}{props.minor}"),
            ("memory", f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"),
            ("clocks", _clocks(info)),
        ]
    rows.append(("cpu", f"{info['cpu']} ({info['cpu_count']} logical cores)"))
    return rows


@app.command("env", cls=Command)
@cli_errors
def env_command(
    calibrate_: Annotated[bool, typer.Option("--calibrate", help="Measure matmul rates and copy bandwidth now "
                                             "and cache them.")] = False,
    device: DeviceOpt = "auto",
):
    """The device, driver and library versions, SDPA backends, number formats, and calibrated peaks."""
    from bench import calibrate, env

    dev = env.resolve_device(device)
    env.cache_dir()  # an unwritable cache folder: one red line, before anything is measured
    info = env.collect(dev)
    table = Table(title="genbench env", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")

    def section(rows: list[tuple[str, str]]) -> None:
        for key, value in rows:
            table.add_row(key, value)
        table.add_section()

    def shown(key: str) -> str:
        return "-" if info[key] is None else str(info[key])

    section(_device_rows(info, dev))
    section([(key, shown(key)) for key in ("driver", "cuda", "cudnn", "nccl", "torch", "triton", "ptxas", "python")]
            + [("settings", " ".join(f"{k}={v}" for k, v in info["settings"].items()) or "none")])
    dtype, backends = _sdpa_backends(dev)
    runs = [name for name, verdict in backends.items() if verdict == "yes"]
    section([("sdpa backends", f"{', '.join(runs) or 'none'} run here ({dtype}, causal off)")]
            + [(f"  {name}", verdict) for name, verdict in backends.items() if verdict != "yes"])
    section([("bf16", _bf16(dev)), ("tf32", _tf32(dev)), ("fp8 matmul", _fp8(dev))])
    peaks = measure_peaks(dev) if calibrate_ else cached_peaks(dev)
    if peaks:
        for p in calibrate.PRECISIONS:
            value = peaks.get(f"{p}_tflops")
            table.add_row(f"{p} matmul", "unsupported" if value is None else f"{value:.3g} TFLOP/s (measured)")
        table.add_row("copy bandwidth", f"{peaks['copy_GBps']:.4g} GB/s (measured, read+write)")
        table.add_row("peaks file", str(calibrate.cache_path(dev)))
    else:
        table.add_row("peaks", "not measured yet: genbench env --calibrate")
    table.add_section()
    table.add_row("genbench", f"{info['genbench']} ({shown('git_commit')}) on {info['hostname']}")
    console.print(table)
