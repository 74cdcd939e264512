"""GPU telemetry: the sampler against a scripted NVML, the warning rule, and
the telemetry columns of a sweep's CSV (present, and empty on a CPU)."""

import csv
import sys
import time
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from bench import report, telemetry
from bench.runner import Context, Measurement, Sweep, run_sweep
from bench.stats import Stats
from bench.telemetry import COLUMNS, Sample, Sampler, Telemetry, clock_warning
from tests.conftest import requires_cuda

CUDA = torch.device("cuda", 0)  # a descriptor only: these tests never touch a GPU


class NVMLError(Exception):
    pass


def fake_nvml(**script):
    """A pynvml stand-in. Each reading takes the next value of its script
    (the last one repeats); a script that is an exception is raised."""
    calls = []

    def reader(name):
        values = list(script[name]) if isinstance(script[name], (list, tuple)) else script[name]

        def read(handle, *args):
            calls.append((name, handle, *args))
            if isinstance(values, Exception):
                raise values
            return values.pop(0) if len(values) > 1 else values[0]

        return read

    nvml = types.ModuleType("pynvml")
    nvml.calls = calls
    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.nvmlInit = lambda: calls.append(("init",))
    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus_id: calls.append(("pci", bus_id)) or "gpu0"
    nvml.nvmlDeviceGetHandleByIndex = lambda index: calls.append(("index", index)) or f"gpu{index}"
    defaults = dict(max_clock=[1980], clock=[1980], temperature=[60], power=[500_000], reasons=[0],
                    energy=[1_000_000, 1_250_000], app_clock=[1980], default_app_clock=[1980], power_limit=[700_000])
    script = {**defaults, **script}
    names = dict(max_clock="nvmlDeviceGetMaxClockInfo", clock="nvmlDeviceGetClockInfo",
                 temperature="nvmlDeviceGetTemperature", power="nvmlDeviceGetPowerUsage",
                 reasons="nvmlDeviceGetCurrentClocksEventReasons", energy="nvmlDeviceGetTotalEnergyConsumption",
                 app_clock="nvmlDeviceGetApplicationsClock", default_app_clock="nvmlDeviceGetDefaultApplicationsClock",
                 power_limit="nvmlDeviceGetEnforcedPowerLimit")
    for key, call in names.items():
        setattr(nvml, call, reader(key))
    return nvml


@pytest.fixture
def gpu_stub(monkeypatch):
    """torch.cuda as a sampler sees it, on a machine without a GPU."""
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x65, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def install(nvml):
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml

    return install


def _window(sampler: Sampler) -> Telemetry:
    with sampler.window() as w:
        pass
    return w.telemetry


def test_summary_by_hand():
    samples = [Sample(1980, 2619, 55, 400.0, 0x1), Sample(1755, 2619, 61, 700.0, 0x4),
               Sample(1740, 2619, 63, 690.0, 0x4 | 0x20), Sample(1980, 2619, 58, 410.0, 0x0),
               Sample(None, None, None, None, None)]  # a poll whose every reading failed
    t = Telemetry.of(samples, 1980, seconds=2.0, energy_mJ=(5_000_000, 6_100_000))
    # clocks sorted: 1740 1755 1980 1980 -> median (1755 + 1980) / 2; power mean 2200 / 4
    assert t.sm_clock_MHz == 1867.5 and t.min_sm_clock_MHz == 1740 and t.max_sm_clock_MHz == 1980
    assert t.mem_clock_MHz == 2619 and t.temp_C == 63 and t.power_W == 550.0
    assert t.energy_J == 1100.0  # (6 100 000 - 5 000 000) mJ
    assert t.throttle == "sw_power_cap;sw_thermal"  # gpu_idle (0x1) is not a throttle
    assert t.telemetry_samples == 5
    assert list(t.columns()) == list(COLUMNS) and "seconds" not in t.columns()


def test_energy_needs_a_long_enough_window_and_a_sane_counter():
    sample = [Sample(1980, 2619, 50, 300.0, 0)]
    assert Telemetry.of(sample, 1980, seconds=0.2, energy_mJ=(0, 60_000)).energy_J is None  # too short
    assert Telemetry.of(sample, 1980, seconds=3.0, energy_mJ=(None, 60_000)).energy_J is None
    assert Telemetry.of(sample, 1980, seconds=3.0, energy_mJ=(90_000, 60_000)).energy_J is None  # counter reset


def test_throttle_bits_decoded_by_name():
    assert telemetry.throttle_names(0x4 | 0x8 | 0x40 | 0x80) == ["sw_power_cap", "hw_slowdown", "hw_thermal",
                                                                 "hw_power_brake"]
    assert telemetry.throttle_names(0x1 | 0x2) == []  # idle, user-set clocks


def test_sampler_reads_the_scripted_device(gpu_stub, monkeypatch):
    nvml = gpu_stub(fake_nvml(clock=[1980, 2619, 1755, 2619], temperature=[60, 71], power=[300_000, 700_000],
                              reasons=[0x1, 0x4], energy=[1_000_000, 1_450_000]))
    monkeypatch.setattr(telemetry, "ENERGY_MIN_WINDOW_S", 0.0)
    sampler = Sampler(CUDA, interval_s=60)  # no poll inside the window: one sample at each end
    assert ("pci", "00000000:65:00.0") in nvml.calls  # the device found by its PCI address
    t = _window(sampler)
    # start: SM 1980, mem 2619; end: SM 1755, mem 2619
    assert t.telemetry_samples == 2 and t.sm_clock_MHz == (1980 + 1755) / 2 and t.min_sm_clock_MHz == 1755
    assert t.max_sm_clock_MHz == 1980 and t.mem_clock_MHz == 2619 and t.temp_C == 71
    assert t.power_W == 500.0 and t.energy_J == 450.0 and t.throttle == "sw_power_cap"
    assert sampler.notes() == []


def test_sampler_polls_while_the_window_is_open(gpu_stub):
    gpu_stub(fake_nvml())
    sampler = Sampler(CUDA, interval_s=0.002)
    with sampler.window() as w:
        time.sleep(0.1)
    assert w.telemetry.telemetry_samples >= 10  # ~50 polls plus the two ends, on a busy machine fewer
    assert w.telemetry.energy_J is None and sampler.short_windows == 1
    assert "energy_J left empty for 1 timed window(s)" in sampler.notes()[0]


def test_refused_readings_become_none_not_errors(gpu_stub):
    gpu_stub(fake_nvml(clock=NVMLError("Not Supported"), energy=NVMLError("Not Supported"),
                       reasons=NVMLError("GPU is lost")))
    sampler = Sampler(CUDA, interval_s=60)
    t = _window(sampler)
    assert t.sm_clock_MHz is None and t.mem_clock_MHz is None and t.energy_J is None and t.throttle is None
    assert t.power_W == 500.0 and t.temp_C == 60 and t.telemetry_samples == 2
    assert sampler.short_windows == 0  # no energy to drop
    note = sampler.notes()[0]
    assert note.startswith("NVML refused:") and "sm_clock (NVMLError: Not Supported)" in note and "energy" in note


def test_bindings_without_event_reasons_fall_back_to_throttle_reasons(gpu_stub):
    nvml = fake_nvml()
    del nvml.nvmlDeviceGetCurrentClocksEventReasons
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: 0x40
    gpu_stub(nvml)
    assert _window(Sampler(CUDA, interval_s=60)).throttle == "hw_thermal"


def test_instant_power_preferred_when_the_driver_has_it(gpu_stub):
    nvml = fake_nvml(power=[100_000])  # the 1 s average, lagging
    field = SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=650_000))
    nvml.nvmlDeviceGetFieldValues = lambda handle, ids: [field] if ids == [telemetry.NVML_FI_DEV_POWER_INSTANT] else []
    gpu_stub(nvml)
    assert _window(Sampler(CUDA, interval_s=60)).power_W == 650.0


def test_handle_through_torchs_mapping_when_the_pci_address_is_unknown(gpu_stub, monkeypatch):
    nvml = fake_nvml()

    def unknown(bus_id):
        raise NVMLError("Not Found")

    nvml.nvmlDeviceGetHandleByPciBusId = unknown
    gpu_stub(nvml)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda index: 3, raising=False)  # CUDA_VISIBLE_DEVICES=3
    Sampler(CUDA, interval_s=60)
    assert ("index", 3) in nvml.calls


def test_missing_pynvml_is_one_note_and_empty_columns(gpu_stub):
    gpu_stub(None)  # sys.modules entry None: `import pynvml` raises ImportError
    sampler = Sampler(CUDA)
    assert not sampler.active and sampler.notes() == [telemetry.MISSING_NOTE]
    assert all(v is None for v in _window(sampler).columns().values())


def test_nvml_that_does_not_start_is_a_note(gpu_stub):
    nvml = fake_nvml()

    def no_driver():
        raise NVMLError("Driver Not Loaded")

    nvml.nvmlInit = no_driver
    gpu_stub(nvml)
    sampler = Sampler(CUDA)
    assert not sampler.active and "NVML did not start (NVMLError: Driver Not Loaded)" in sampler.note


def test_cpu_is_all_none_and_never_asks_nvml(monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = Sampler(torch.device("cpu"))
    assert all(v is None for v in _window(sampler).columns().values())
    assert nvml.calls == [] and sampler.notes() == []
    assert telemetry.device_info(torch.device("cpu")) == {"clocks_locked": None, "max_sm_clock_MHz": None,
                                                          "power_limit_W": None}


def test_device_info_for_the_json(gpu_stub):
    gpu_stub(fake_nvml(reasons=[0x1]))
    assert telemetry.device_info(CUDA) == {"clocks_locked": False, "max_sm_clock_MHz": 1980, "power_limit_W": 700.0}
    gpu_stub(fake_nvml(app_clock=[1410], default_app_clock=[1980]))  # nvidia-smi -ac
    assert telemetry.device_info(CUDA)["clocks_locked"] is True
    gpu_stub(fake_nvml(app_clock=NVMLError("Not Supported"), reasons=[0x1 | 0x2]))  # nvidia-smi -lgc
    assert telemetry.device_info(CUDA)["clocks_locked"] is True
    gpu_stub(fake_nvml(app_clock=NVMLError("Not Supported"), reasons=NVMLError("Not Supported")))
    assert telemetry.device_info(CUDA)["clocks_locked"] is None


@pytest.mark.parametrize("row, expected", [
    ({"sm_clock_MHz": 1755.0, "max_sm_clock_MHz": 1980, "throttle": "sw_power_cap;hw_thermal"},
     "ran at 1755 MHz of 1980 MHz max, throttle: sw_power_cap, hw_thermal"),
    # 1935 < 0.98 * 1980 = 1940.4: below max without a reason
    ({"sm_clock_MHz": "1935.0", "max_sm_clock_MHz": "1980", "throttle": ""},
     "ran at 1935 MHz of 1980 MHz max, no throttle reason (idle gaps or set clocks?)"),
    ({"sm_clock_MHz": 1950.0, "max_sm_clock_MHz": 1980, "throttle": ""}, None),  # 1.5% below: within tolerance
    ({"sm_clock_MHz": 1980.0, "max_sm_clock_MHz": 1980, "throttle": ""}, None),
    ({"sm_clock_MHz": "", "max_sm_clock_MHz": "", "throttle": ""}, None),  # a CPU row read back
    ({"sm_clock_MHz": None, "max_sm_clock_MHz": None, "throttle": "hw_slowdown"}, "clocks unknown, throttle: hw_slowdown"),
    ({"status": "error"}, None),
])
def test_clock_warning_rule(row, expected):
    assert clock_warning(row) == expected


@dataclass(frozen=True)
class Toy:
    impl: str


def _toy_run(cfg: Toy, ctx: Context) -> Measurement:
    if cfg.impl == "untimed":  # e.g. a calibrated rate: no window, no stats
        return Measurement({"x": 1.0})
    if cfg.impl == "no-window":  # timed by hand, without a window
        return Measurement({"x": 1.0}, stats=Stats.of([1.0, 1.0, 1.0]))
    return Measurement({"x": 1.0}, stats=ctx.time(lambda: sum(range(100))))


def _toy_sweep(impls):
    return Sweep(suite="toy", configs=[Toy(i) for i in impls], run=_toy_run, params=("impl",), metrics=("x",))


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cpu_sweep_has_the_columns_empty(tmp_path):
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=2)
    writer = run_sweep(_toy_sweep(["a"]), ctx, tmp_path, {}, Console(file=open("/dev/null", "w")))
    with open(writer.csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert header[header.index("noisy") + 1: header.index("x")] == list(COLUMNS)  # after the stat columns
    row = _read(writer.csv_path)[0]
    assert row["median_ms"] != "" and all(row[c] == "" for c in COLUMNS)


def test_rows_carry_their_own_window_only(tmp_path, gpu_stub):
    gpu_stub(fake_nvml(clock=[1755], reasons=[0x4]))
    # A CPU timing loop with a scripted GPU sampler beside it: the wiring, not the device.
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=2, sampler=Sampler(CUDA, interval_s=60))
    sweep = _toy_sweep(["a", "no-window", "untimed"])
    writer = run_sweep(sweep, ctx, tmp_path, {}, Console(file=open("/dev/null", "w")))
    rows = _read(writer.csv_path)
    assert rows[0]["sm_clock_MHz"] == "1755.0" and rows[0]["throttle"] == "sw_power_cap"
    assert rows[0]["telemetry_samples"] == "2" and rows[0]["max_sm_clock_MHz"] == "1980.0"
    assert all(rows[i][c] == "" for i in (1, 2) for c in COLUMNS)  # the last window was row 0's
    # the lines under the tables, numbered as the CSV's rows; written rows and rows read back alike
    expected = ["row 0 (impl=a): ran at 1755 MHz of 1980 MHz max, throttle: sw_power_cap"]
    assert report.clock_warnings(sweep, writer.rows) == report.clock_warnings(sweep, rows) == expected


@requires_cuda
@pytest.mark.gpu
def test_real_sampler_around_matmuls():
    pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")
    device = torch.device("cuda")
    sampler = Sampler(device)
    assert sampler.active, sampler.note
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    with sampler.window() as w:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            for _ in range(8):
                a @ a
            torch.cuda.synchronize()
    t = w.telemetry
    assert t.telemetry_samples >= 20
    assert 0 < t.min_sm_clock_MHz <= t.sm_clock_MHz <= t.max_sm_clock_MHz
    assert t.mem_clock_MHz > 0 and 0 < t.temp_C < 120 and t.power_W > 0 and isinstance(t.throttle, str)
    if torch.cuda.get_device_capability(device) >= (7, 0):  # the energy counter: Volta and newer
        assert t.energy_J > 0
        assert 0.2 < t.energy_J / t.seconds / t.power_W < 5  # the counter and the samples roughly agree
    info = telemetry.device_info(device)
    assert info["max_sm_clock_MHz"] == t.max_sm_clock_MHz and info["clocks_locked"] in (True, False, None)
