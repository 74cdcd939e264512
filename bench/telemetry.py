"""GPU telemetry: the clocks, temperature, power, throttle reasons and energy
of each timed window, so that a throttled GPU is not read as a regression.

On CUDA, with NVML's Python bindings importable (`pip install -e '.[gpu]'`,
which brings nvidia-ml-py, imported as `pynvml`), a `Sampler` polls NVML from
a background thread every `INTERVAL_S` while a window is open:

    sampler = Sampler(torch.device("cuda"))
    with sampler.window() as w:
        run_timed_steps()
    w.telemetry.columns()   # {"sm_clock_MHz": 1755.0, ..., "throttle": "sw_power_cap"}

Suites do not hold a sampler: `Context.time()` opens a window around its
timed repetitions, and a suite timing a loop with `StepTimer` wraps its timed
steps in `with ctx.telemetry():`. The runner adds the last window's columns to
the row. On a CPU, or without NVML, every column is None (an empty CSV cell):
nothing is made up. A reading NVML refuses is None too, never an exception.

What each column is (`COLUMNS`, NVML's API reference names the calls):
- sm_clock_MHz: median SM clock over the samples (nvmlDeviceGetClockInfo);
  min_sm_clock_MHz its minimum; max_sm_clock_MHz the device's maximum SM
  clock (nvmlDeviceGetMaxClockInfo); mem_clock_MHz the median memory clock;
- temp_C: the hottest reading (nvmlDeviceGetTemperature, GPU die);
- power_W: the mean of the power samples: the instantaneous reading
  (field NVML_FI_DEV_POWER_INSTANT) where the driver has it, else
  nvmlDeviceGetPowerUsage, which on Ampere and newer GPUs is itself an
  average over the last second and so lags a short window. The driver
  refreshes either on its own period, so a window of a few tens of
  milliseconds holds few fresh readings;
- energy_J: the difference of the total-energy counter (Volta and newer,
  nvmlDeviceGetTotalEnergyConsumption, mJ) between the window's ends. The
  counter advances in coarse steps, so a window shorter than
  `ENERGY_MIN_WINDOW_S` gets no energy rather than a wrong one;
- throttle: the clock-event reasons seen in any sample, ';'-joined
  (nvmlDeviceGetCurrentClocksEventReasons, formerly ...ThrottleReasons).
  An idle GPU and user-set clocks (application or locked clocks) are not
  throttling; the run's JSON says whether clocks are locked (`device_info`);
- telemetry_samples: how many samples the window took.

A row is flagged under the table (`clock_warning`) when it saw a throttle
reason, or when its median SM clock lies more than `CLOCK_TOLERANCE` below the
device's maximum: clocks move in steps of about 15 MHz, so 2% is a few steps,
more than the jitter of an unthrottled GPU, which runs at its maximum.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import threading
import time
from dataclasses import dataclass, fields

import torch

INTERVAL_S = 0.01  # NVML's clock, power and reason reads take microseconds each
ENERGY_MIN_WINDOW_S = 1.0  # the counter's steps are a small share of a window this long
CLOCK_TOLERANCE = 0.02
MISSING_NOTE = "GPU telemetry off: install nvidia-ml-py for clocks and power (pip install -e '.[gpu]')"

# Clock-event reason bits, as nvml.h defines them (nvmlClocksEventReason*).
# Idle and user-defined clocks (application or locked clocks, formerly named
# ApplicationsClocksSetting) are not throttling.
GPU_IDLE, USER_DEFINED_CLOCKS = 0x1, 0x2
THROTTLE_REASONS = {
    0x4: "sw_power_cap",  # the power limit
    0x8: "hw_slowdown",  # thermal or power brake, set by the hardware
    0x10: "sync_boost",  # held to the clock of the slowest GPU of a sync-boost group
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",  # the external power brake (e.g. the PSU)
    0x100: "display_clock_setting",
}
NVML_FI_DEV_POWER_INSTANT = 186  # nvml.h; older bindings lack the name

COLUMNS = ("sm_clock_MHz", "min_sm_clock_MHz", "max_sm_clock_MHz", "mem_clock_MHz", "temp_C", "power_W",
           "energy_J", "throttle", "telemetry_samples")


def throttle_names(mask: int) -> list[str]:
    """The throttling reasons in one clock-event bitmask (idle and application clocks left out)."""
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


@dataclass(frozen=True)
class Sample:
    """One poll; a field NVML would not give is None."""

    sm_MHz: float | None
    mem_MHz: float | None
    temp_C: float | None
    power_W: float | None
    reasons: int | None


@dataclass(frozen=True)
class Telemetry:
    """What one timed window saw; every field None where nothing was measured (a CPU)."""

    sm_clock_MHz: float | None = None
    min_sm_clock_MHz: float | None = None
    max_sm_clock_MHz: float | None = None
    mem_clock_MHz: float | None = None
    temp_C: float | None = None
    power_W: float | None = None
    energy_J: float | None = None
    throttle: str | None = None  # '' when read and none seen
    telemetry_samples: int | None = None
    seconds: float | None = None  # the window's wall-clock length; not a column

    @classmethod
    def of(cls, samples: list[Sample], max_sm_MHz: float | None, seconds: float,
           energy_mJ: tuple[float | None, float | None] = (None, None)) -> "Telemetry":
        def values(name):
            return [getattr(s, name) for s in samples if getattr(s, name) is not None]

        sm, mem, temp, power, reasons = (values(f.name) for f in fields(Sample))
        seen = 0
        for mask in reasons:
            seen |= mask
        start, stop = energy_mJ
        energy = None
        if start is not None and stop is not None and stop >= start and seconds >= ENERGY_MIN_WINDOW_S:
            energy = (stop - start) / 1e3
        return cls(
            sm_clock_MHz=float(statistics.median(sm)) if sm else None,
            min_sm_clock_MHz=float(min(sm)) if sm else None,
            max_sm_clock_MHz=None if max_sm_MHz is None else float(max_sm_MHz),
            mem_clock_MHz=float(statistics.median(mem)) if mem else None,
            temp_C=float(max(temp)) if temp else None,
            power_W=statistics.fmean(power) if power else None,
            energy_J=energy,
            throttle=";".join(throttle_names(seen)) if reasons else None,
            telemetry_samples=len(samples),
            seconds=seconds,
        )

    def columns(self) -> dict:
        return {name: getattr(self, name) for name in COLUMNS}


class Window:
    """An open window; `telemetry` is set when it closes without an error."""

    telemetry: Telemetry | None = None


def _load_nvml():
    """pynvml, initialised, or (None, why not)."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return None, MISSING_NOTE
    try:
        nvml.nvmlInit()
    except Exception as exc:  # no driver library, no permission: NVMLError's many subclasses
        return None, f"GPU telemetry off: NVML did not start ({type(exc).__name__}: {exc})"
    return nvml, None


def _handle(nvml, device: torch.device):
    """NVML's handle of a torch device. NVML numbers every GPU of the machine,
    CUDA only the visible ones in its own order (CUDA_VISIBLE_DEVICES,
    CUDA_DEVICE_ORDER), so the PCI address is what ties the two together."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    pci = [getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
    if None not in pci:
        with contextlib.suppress(Exception):  # an address NVML does not know: torch's own mapping below
            return nvml.nvmlDeviceGetHandleByPciBusId("{:08x}:{:02x}:{:02x}.0".format(*pci))
    mapping = getattr(torch.cuda, "_get_nvml_device_index", None)  # reads CUDA_VISIBLE_DEVICES
    return nvml.nvmlDeviceGetHandleByIndex(mapping(index) if mapping else index)


class Sampler:
    """Samples one device's clocks, power and throttle reasons during windows.
    Inert (every column None) on a CPU or where NVML is missing; `note` says
    why, once, for the run's output."""

    def __init__(self, device: torch.device, interval_s: float = INTERVAL_S):
        self.device = device
        self.interval_s = interval_s
        self.note: str | None = None
        self.unreadable: dict[str, str] = {}  # reading -> NVML's first refusal, said once after the tables
        self.short_windows = 0  # windows too short for the energy counter
        self._nvml = self._handle = None
        if device.type != "cuda":
            return
        self._nvml, self.note = _load_nvml()
        if self._nvml is None:
            return
        try:
            self._handle = _handle(self._nvml, device)
        except Exception as exc:
            self.note = f"GPU telemetry off: NVML has no handle for {device} ({type(exc).__name__}: {exc})"
            return
        self._reasons = (getattr(self._nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                         or getattr(self._nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
        self._instant_power = self._read_instant_power() is not None
        self.max_sm_MHz = self._read("max_sm_clock", "nvmlDeviceGetMaxClockInfo", self._nvml.NVML_CLOCK_SM)

    @property
    def active(self) -> bool:
        return self._handle is not None

    def _read(self, what: str, call: str, *args):
        """One NVML reading, or None: a refused reading must never cost a row its timings."""
        try:
            return getattr(self._nvml, call)(self._handle, *args)
        except Exception as exc:  # NVMLError (not supported, lost GPU ...) or a call these bindings lack
            self.unreadable.setdefault(what, f"{type(exc).__name__}: {exc}")
            return None

    def _read_instant_power(self) -> float | None:
        try:
            value = self._nvml.nvmlDeviceGetFieldValues(self._handle, [NVML_FI_DEV_POWER_INSTANT])[0]
        except Exception:  # bindings or driver without field values: the 1 s average instead
            return None
        return value.value.uiVal / 1e3 if value.nvmlReturn == 0 else None

    def _power_W(self) -> float | None:
        if self._instant_power:
            power = self._read_instant_power()
            if power is not None:
                return power
        mW = self._read("power", "nvmlDeviceGetPowerUsage")
        return None if mW is None else mW / 1e3

    def _reasons_mask(self) -> int | None:
        if self._reasons is None:
            self.unreadable.setdefault("throttle", "these NVML bindings read no clock-event reasons")
            return None
        try:
            return int(self._reasons(self._handle))
        except Exception as exc:
            self.unreadable.setdefault("throttle", f"{type(exc).__name__}: {exc}")
            return None

    def sample(self) -> Sample:
        nvml = self._nvml
        return Sample(
            sm_MHz=self._read("sm_clock", "nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM),
            mem_MHz=self._read("mem_clock", "nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_MEM),
            temp_C=self._read("temperature", "nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU),
            power_W=self._power_W(),
            reasons=self._reasons_mask(),
        )

    def _poll(self, samples: list[Sample], stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            samples.append(self.sample())

    @contextlib.contextmanager
    def window(self):
        """Sample while the block runs. The device is synchronized at both
        ends, so the window holds the block's device work and no earlier
        (warm-up) work: only when sampling, so timings without NVML are untouched."""
        window = Window()
        if not self.active:
            yield window
            window.telemetry = Telemetry()
            return
        torch.cuda.synchronize(self.device)
        energy_start = self._read("energy", "nvmlDeviceGetTotalEnergyConsumption")
        t0 = time.perf_counter()
        samples = [self.sample()]
        stop = threading.Event()
        thread = threading.Thread(target=self._poll, args=(samples, stop), name="genbench-telemetry", daemon=True)
        thread.start()
        try:
            yield window
            torch.cuda.synchronize(self.device)
        finally:
            stop.set()
            thread.join()
        seconds = time.perf_counter() - t0
        samples.append(self.sample())
        energy = (energy_start, self._read("energy", "nvmlDeviceGetTotalEnergyConsumption"))
        if None not in energy and seconds < ENERGY_MIN_WINDOW_S:
            self.short_windows += 1
        window.telemetry = Telemetry.of(samples, self.max_sm_MHz, seconds, energy)

    def notes(self) -> list[str]:
        """What the run's output should say once about the telemetry."""
        lines = [self.note] if self.note else []
        if self.unreadable:
            lines.append("NVML refused: " + "; ".join(f"{k} ({v})" for k, v in self.unreadable.items()))
        if self.short_windows:
            lines.append(f"energy_J left empty for {self.short_windows} timed window(s) under "
                         f"{ENERGY_MIN_WINDOW_S:g} s, too short for NVML's energy counter: give rows more time "
                         "(--rep-ms, --steps) to measure energy")
        return lines


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def clock_warning(row: dict) -> str | None:
    """Why a row's timing may be a throttled GPU's, or None: a throttle reason
    was seen, or the median SM clock lies more than CLOCK_TOLERANCE below the
    device's maximum. Works on rows as written and as read back (text)."""
    throttle = row.get("throttle") or ""
    sm, top = _number(row.get("sm_clock_MHz")), _number(row.get("max_sm_clock_MHz"))
    below = sm is not None and bool(top) and sm < (1 - CLOCK_TOLERANCE) * top
    if not throttle and not below:
        return None
    clock = f"ran at {sm:.0f} MHz of {top:.0f} MHz max" if sm is not None and top else "clocks unknown"
    why = f"throttle: {throttle.replace(';', ', ')}" if throttle else "no throttle reason (idle gaps or set clocks?)"
    return f"{clock}, {why}"


def device_info(device: torch.device | None) -> dict:
    """For the run's JSON: whether clocks are pinned (application clocks away
    from their default, or the application-clocks reason active), the maximum
    SM clock and the enforced power limit. None where unknown or on a CPU."""
    info = {"clocks_locked": None, "max_sm_clock_MHz": None, "power_limit_W": None}
    if device is None or device.type != "cuda":
        return info
    sampler = Sampler(device)
    if not sampler.active:
        return info
    nvml = sampler._nvml
    read = sampler._read
    info["max_sm_clock_MHz"] = sampler.max_sm_MHz
    limit = read("power_limit", "nvmlDeviceGetEnforcedPowerLimit")
    info["power_limit_W"] = None if limit is None else limit / 1e3
    pinned = []
    for clock in (nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM):
        current = read("applications_clock", "nvmlDeviceGetApplicationsClock", clock)
        default = read("applications_clock", "nvmlDeviceGetDefaultApplicationsClock", clock)
        if current is not None and default is not None:
            pinned.append(current != default)
    reasons = sampler._reasons_mask()
    if reasons is not None:
        pinned.append(bool(reasons & USER_DEFINED_CLOCKS))
    info["clocks_locked"] = any(pinned) if pinned else None
    return info
