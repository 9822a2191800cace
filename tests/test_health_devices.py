"""Device monitor: a fake NVML (real pynvml error classes, fake functions), the host fallback."""

import threading
import types

import pynvml
import pytest

from tinyserve import errors
from tinyserve.health import DeviceMonitor, ModelInput, assess, host_reading

GIB = 1 << 30


def nvml_error(code):
    return pynvml.NVMLError(code)  # pynvml hands back the subclass for the code (NVMLError_GpuIsLost ...)


class FakeGPU:
    def __init__(self, name="Fake H100", used=10 * GIB, total=80 * GIB):
        self.name, self.used, self.total = name, used, total
        self.util, self.mem_util, self.temp, self.power_mw = 37, 12, 61, 250_000
        self.ecc = {0: 3, 1: 0}  # corrected, uncorrected
        self.throttle = 0x4 | 0x40  # sw power cap, hw thermal
        self.fail: dict[str, int] = {}  # query name -> NVML error code to raise


def make_nvml(gpus, *, init_error=None, count_error=None):
    calls = {"init": 0, "shutdown": 0}

    def q(what):
        def fn(handle, *args):
            gpu = gpus[handle]
            if what in gpu.fail or "*" in gpu.fail:
                raise nvml_error(gpu.fail.get(what, gpu.fail.get("*")))
            return getattr(gpu, "_" + what)(*args) if hasattr(gpu, "_" + what) else READ[what](gpu, *args)
        return fn

    READ = {
        "name": lambda g: g.name.encode(),
        "uuid": lambda g: f"GPU-{id(g):x}",
        "memory": lambda g: types.SimpleNamespace(used=g.used, total=g.total, free=g.total - g.used),
        "util": lambda g: types.SimpleNamespace(gpu=g.util, memory=g.mem_util),
        "temp": lambda g, sensor: g.temp,
        "power": lambda g: g.power_mw,
        "ecc": lambda g, kind, counter: g.ecc[kind],
        "throttle": lambda g: g.throttle,
    }

    def init():
        calls["init"] += 1
        if init_error is not None:
            raise nvml_error(init_error)

    def count():
        if count_error is not None:
            raise nvml_error(count_error)
        return len(gpus)

    mod = types.SimpleNamespace(
        nvmlInit=init, nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetCount=count, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=q("name"), nvmlDeviceGetUUID=q("uuid"), nvmlDeviceGetMemoryInfo=q("memory"),
        nvmlDeviceGetUtilizationRates=q("util"), nvmlDeviceGetTemperature=q("temp"),
        nvmlDeviceGetPowerUsage=q("power"), nvmlDeviceGetTotalEccErrors=q("ecc"),
        nvmlDeviceGetCurrentClocksEventReasons=q("throttle"),
        NVML_TEMPERATURE_GPU=0, NVML_MEMORY_ERROR_TYPE_CORRECTED=0, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0, calls=calls)
    return mod


def test_gpu_readings():
    gpus = [FakeGPU(), FakeGPU(name="Fake A100", used=1 * GIB, total=40 * GIB)]
    mon = DeviceMonitor(nvml=make_nvml(gpus), clock=lambda: 5.0)
    r0, r1 = mon.poll()
    assert mon.mode == "nvml"
    assert (r0.device, r0.kind, r0.healthy, r0.name) == ("gpu0", "gpu", True, "Fake H100")
    assert (r0.memory_used, r0.memory_total) == (10 * GIB, 80 * GIB)
    assert r0.utilization == pytest.approx(0.37) and r0.memory_utilization == pytest.approx(0.12)
    assert r0.temperature_c == 61.0 and r0.power_w == 250.0
    assert (r0.ecc_corrected, r0.ecc_uncorrected) == (3, 0)
    assert r0.throttle == ("sw_power_cap", "hw_thermal")
    assert r0.time == 5.0 and r0.errors == ()
    assert (r1.device, r1.name, r1.memory_total) == ("gpu1", "Fake A100", 40 * GIB)
    assert mon.latest() == (r0, r1)
    d = r0.to_dict()
    assert d["throttle"] == ["sw_power_cap", "hw_thermal"] and d["healthy"] is True


def test_device_lost_is_unhealthy_sticky_and_isolated():
    gpus = [FakeGPU(), FakeGPU()]
    mon = DeviceMonitor(nvml=make_nvml(gpus))
    assert all(r.healthy for r in mon.poll())
    gpus[1].fail["memory"] = pynvml.NVML_ERROR_GPU_IS_LOST
    r0, r1 = mon.poll()
    assert r0.healthy
    assert not r1.healthy and "gpu1 does not answer" in r1.reason and "GpuIsLost" in r1.reason
    gpus[1].fail.clear()  # NVML answers again: a lost GPU still needs a reset, so it stays unhealthy
    r0, r1 = mon.poll()
    assert not r1.healthy and "GpuIsLost" in r1.reason
    # not ready: the device and the model on it
    rep = assess([ModelInput("m", 1, "READY", device="gpu1"), ModelInput("n", 1, "READY", device="gpu0")],
                 mon.latest(), required=["m", "n"])
    assert not rep.ready
    assert rep.models["m"]["state"] == "DEVICE_FAULT" and not rep.models["m"]["serving"]
    assert rep.models["n"]["serving"]
    assert any("device gpu1" in r for r in rep.reasons) and any("'m'" in r for r in rep.reasons)


def test_soft_errors_and_unsupported_queries_keep_the_device_healthy():
    gpu = FakeGPU()
    gpu.fail = {"power": pynvml.NVML_ERROR_NOT_SUPPORTED, "temp": pynvml.NVML_ERROR_TIMEOUT}
    mon = DeviceMonitor(nvml=make_nvml([gpu]))
    (r,) = mon.poll()
    assert r.healthy and r.power_w is None and r.temperature_c is None
    assert len(r.errors) == 1 and "temperature" in r.errors[0] and "Timeout" in r.errors[0]


def test_uncorrected_ecc_is_unhealthy():
    gpu = FakeGPU()
    gpu.ecc[1] = 2
    (r,) = DeviceMonitor(nvml=make_nvml([gpu])).poll()
    assert not r.healthy and "2 uncorrected ECC errors" in r.reason


def test_no_handle_for_one_gpu():
    nv = make_nvml([FakeGPU(), FakeGPU()])

    def handle(i):
        if i == 1:
            raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)
        return i

    nv.nvmlDeviceGetHandleByIndex = handle
    r0, r1 = DeviceMonitor(nvml=nv).poll()
    assert r0.healthy and not r1.healthy and "no handle" in r1.reason


@pytest.mark.parametrize("init_error,count_error,gpus,why", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, None, 1, "LibraryNotFound"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, None, 1, "DriverNotLoaded"),
    (None, None, 0, "no GPU"),
    (None, pynvml.NVML_ERROR_UNKNOWN, 1, "cannot count"),
])
def test_host_fallback_never_fails(tmp_path, init_error, count_error, gpus, why):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000 kB\nMemFree:  1 kB\nMemAvailable:    6000 kB\n")
    mon = DeviceMonitor(nvml=make_nvml([FakeGPU()] * gpus, init_error=init_error, count_error=count_error),
                        meminfo_path=str(meminfo), loadavg=lambda: (0.5, 0.25, 0.125001))
    (r,) = mon.poll()
    assert mon.mode == "host" and why in mon.host_reason
    assert (r.device, r.kind, r.healthy) == ("cpu", "host", True)
    assert (r.memory_total, r.memory_used) == (16000 * 1024, 10000 * 1024)
    assert r.load_avg == (0.5, 0.25, 0.13) and why in r.reason  # rounded to 2 decimals


def test_host_reading_tolerates_missing_and_garbage_proc_files(tmp_path):
    bad = tmp_path / "meminfo"
    bad.write_bytes(b"MemTotal: lots\n\xff\xfe garbage\n")

    def broken():
        raise OSError("no loadavg")

    for path in (str(bad), str(tmp_path / "absent")):
        r = host_reading(meminfo_path=path, loadavg=broken)
        assert r.healthy and r.memory_total is None and r.memory_used is None and r.load_avg is None


def test_real_pynvml_on_this_machine_reports_something():
    """Whatever this machine has (no driver here: the host fallback), a poll never raises."""
    mon = DeviceMonitor()
    readings = mon.poll()
    assert readings and all(r.kind in ("gpu", "host") for r in readings)
    if mon.mode == "host":
        assert readings[0].memory_total and readings[0].memory_total > 0
    mon.stop()


def test_mark_fault_is_sticky():
    mon = DeviceMonitor(nvml=make_nvml([FakeGPU()]))
    mon.poll()
    mon.mark_fault("gpu0", "CUDA error: an illegal memory access was encountered")
    assert not mon.latest()[0].healthy  # at once, before the next poll
    (r,) = mon.poll()
    assert not r.healthy and "illegal memory access" in r.reason
    assert mon.faults() == {"gpu0": "CUDA error: an illegal memory access was encountered"}
    with pytest.raises(errors.ConfigError, match="device"):
        mon.mark_fault("", "x")


def test_polling_thread_and_callback():
    seen = []
    got = threading.Event()

    def on_reading(readings):
        seen.append(readings)
        if len(seen) >= 3:
            got.set()

    nv = make_nvml([FakeGPU()])
    mon = DeviceMonitor(nvml=nv, interval_s=0.01, on_reading=on_reading)
    mon.start()
    mon.start()  # idempotent
    assert got.wait(10)
    mon.stop()
    n = mon.polls
    assert n >= 3 and all(r[0].healthy for r in seen)
    assert nv.calls == {"init": 1, "shutdown": 1}
    assert mon.polls == n  # stopped: no more polls


def test_callback_and_bugs_never_escape():
    def bad_callback(readings):
        raise RuntimeError("callback bug")

    nv = make_nvml([FakeGPU()])
    nv.nvmlDeviceGetMemoryInfo = lambda h: 1 / 0  # a non-NVML exception from a query: a soft error
    mon = DeviceMonitor(nvml=nv, on_reading=bad_callback)
    (r,) = mon.poll()
    assert r.healthy and any("ZeroDivisionError" in e for e in r.errors)


def test_interval_validation():
    for bad in (0, -1, "5", True, 1e9):
        with pytest.raises(errors.ConfigError, match="interval_s"):
            DeviceMonitor(interval_s=bad)
