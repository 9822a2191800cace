"""Device monitor: NVML readings per GPU, or the CPU host where there is no NVML (docs/health.md section 4).

    mon = DeviceMonitor(interval_s=5.0)       # nvml=None: import pynvml; a fake module in tests
    mon.start()                               # a daemon thread polls every interval_s (first poll at once)
    mon.latest()                              # tuple of DeviceReading, the newest poll (never blocks)
    mon.poll()                                # one poll now, in the calling thread (executor-friendly)
    mon.mark_fault("gpu0", "CUDA error: ...") # a fatal error seen by the runtime: sticky until restart
    mon.stop()

No call here raises: a missing library, a driver that is not loaded, a GPU that stops answering are
all readings (`healthy=False` with a `reason`, or the host fallback).  A device that NVML reports lost
(or that `mark_fault` marked) stays unhealthy for the life of the process: a lost GPU or a poisoned
CUDA context does not come back without a reset.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinyserve import errors

__all__ = ["DeviceMonitor", "DeviceReading", "THROTTLE_REASONS", "host_reading"]

log = logging.getLogger("tinyserve.health")

# NVML clock-event (throttle) reason bits -> names.  HW_SLOWDOWN, HW_THERMAL, HW_POWER_BRAKE and
# SW_THERMAL mean the hardware protects itself: reported (and counted in metrics), not unhealthy.
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
    0x100: "display_clocks",
}


# NVML errors that mean the device no longer answers (anything else on one query is a soft error:
# recorded in `errors`, the device stays healthy; NotSupported / NoPermission are just absent readings).
_LOST = frozenset({"NVMLError_GpuIsLost", "NVMLError_ResetRequired", "NVMLError_GpuNotFound", "NVMLError_Unknown",
                   "NVMLError_Uninitialized", "NVMLError_DriverNotLoaded", "NVMLError_LibRmVersionMismatch"})
_ABSENT = frozenset({"NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound",
                     "NVMLError_NotFound", "NVMLError_NoData"})


@dataclass(frozen=True)
class DeviceReading:
    """One device at one poll.  Absent readings (not supported, or not a GPU) are None."""

    device: str  # "gpu0", "gpu1", ... or "cpu"
    kind: str  # "gpu" or "host"
    healthy: bool
    reason: str = ""  # why not healthy (or, for the host fallback, why there is no GPU reading)
    name: str = ""
    uuid: str = ""
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    utilization: float | None = None  # GPU busy fraction 0..1 over NVML's last sample period
    memory_utilization: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    ecc_corrected: int | None = None  # volatile (since the driver loaded)
    ecc_uncorrected: int | None = None
    throttle: tuple = ()  # names from THROTTLE_REASONS
    load_avg: tuple | None = None  # host: 1, 5, 15 minute load averages
    cpus: int | None = None
    time: float = 0.0  # clock() at the poll
    errors: tuple = field(default=())  # "query: message" for readings that failed without making it unhealthy

    def to_dict(self) -> dict:
        out = {"device": self.device, "kind": self.kind, "healthy": self.healthy, "reason": self.reason}
        for k in ("name", "uuid", "memory_used", "memory_total", "utilization", "memory_utilization",
                  "temperature_c", "power_w", "ecc_corrected", "ecc_uncorrected", "cpus"):
            v = getattr(self, k)
            if v not in (None, ""):
                out[k] = v
        if self.kind == "gpu":
            out["throttle"] = list(self.throttle)
        if self.load_avg is not None:
            out["load_avg"] = list(self.load_avg)
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def _meminfo(path: str) -> tuple[int | None, int | None]:
    total = avail = None
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        v = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
                        if key == "MemTotal":
                            total = v
                        else:
                            avail = v
    except (OSError, UnicodeDecodeError):
        pass
    return total, avail


def host_reading(reason: str = "", *, now: float = 0.0, meminfo_path: str = "/proc/meminfo",
                 loadavg: Callable[[], tuple] = os.getloadavg) -> DeviceReading:
    """The CPU host as a device: memory from /proc/meminfo (used = MemTotal - MemAvailable), load
    averages.  Always healthy (a host that runs this code is up); fields it cannot read are None."""
    total, avail = _meminfo(meminfo_path)
    used = total - avail if total is not None and avail is not None else None
    try:
        la = tuple(round(float(x), 2) for x in loadavg())[:3]
    except (OSError, ValueError, TypeError):
        la = None
    return DeviceReading("cpu", "host", True, reason, name="host", memory_used=used, memory_total=total,
                         load_avg=la, cpus=os.cpu_count(), time=now)


def _decode(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class DeviceMonitor:
    """See the module docstring.  `nvml` is the pynvml module (or a fake with the same names)."""

    def __init__(self, *, nvml=None, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 meminfo_path: str = "/proc/meminfo", loadavg: Callable[[], tuple] = os.getloadavg,
                 on_reading: Callable[[tuple], None] | None = None) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0.01 <= interval_s <= 3600:
            raise errors.ConfigError(f"device poll interval_s must be a number in [0.01, 3600], got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._clock = clock
        self._meminfo = meminfo_path
        self._loadavg = loadavg
        self._on_reading = on_reading
        self._nvml = nvml
        self._inited = False
        self._init_error = ""  # why there is no NVML (host mode)
        self._handles: list = []
        self._faults: dict[str, str] = {}  # sticky: device -> reason
        self._lock = threading.Lock()  # one poll at a time
        self._latest: tuple = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    # --- NVML set-up -------------------------------------------------------------------------------------
    def _init(self) -> None:
        if self._inited:
            return
        self._inited = True
        nv = self._nvml
        if nv is None:
            try:
                import pynvml as nv
            except Exception as exc:  # noqa: BLE001 - a missing or broken binding is "no NVML"
                self._init_error = f"NVML unavailable: cannot import pynvml ({type(exc).__name__}: {exc})"
                return
            self._nvml = nv
        try:
            nv.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._init_error = f"NVML unavailable: {type(exc).__name__}: {exc}"
            self._nvml = None
            return
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001
            self._init_error = f"NVML cannot count devices: {type(exc).__name__}: {exc}"
            count = 0
        self._handles = []
        for i in range(max(0, min(count, 1024))):
            try:
                self._handles.append(nv.nvmlDeviceGetHandleByIndex(i))
            except Exception as exc:  # noqa: BLE001 - that GPU is reported unhealthy, the others polled
                self._handles.append(_NoHandle(f"gpu{i}: NVML gives no handle: {type(exc).__name__}: {exc}"))
        if not self._handles:
            self._init_error = self._init_error or "NVML reports no GPU"

    @property
    def mode(self) -> str:
        """"nvml" when GPUs are polled, else "host"."""
        self._init()
        return "nvml" if self._handles else "host"

    @property
    def host_reason(self) -> str:
        self._init()
        return self._init_error

    # --- readings -------------------------------------------------------------------------------------------
    def poll(self) -> tuple:
        """Read every device now; stores and returns the readings.  Never raises."""
        with self._lock:
            try:
                self._init()
                now = self._clock()
                if self._handles:
                    readings = tuple(self._read_gpu(i, h, now) for i, h in enumerate(self._handles))
                else:
                    readings = (host_reading(self._init_error, now=now, meminfo_path=self._meminfo,
                                             loadavg=self._loadavg),)
                readings = tuple(self._apply_fault(r) for r in readings)
            except Exception as exc:  # noqa: BLE001 - a bug here must not take the monitor down
                log.exception("tinyserve: device poll failed")
                readings = (DeviceReading("cpu", "host", True, f"device poll failed: {exc!r}"),)
            self._latest = readings
            self.polls += 1
        if self._on_reading is not None:
            try:
                self._on_reading(readings)
            except Exception:  # noqa: BLE001
                log.exception("tinyserve: device reading callback failed")
        return readings

    def latest(self) -> tuple:
        """The newest readings (empty before the first poll)."""
        return self._latest

    def mark_fault(self, device: str, reason: str) -> None:
        """A fatal error on `device` seen elsewhere (a CUDA error that poisons the context): the device
        is unhealthy from now on, for the life of the process."""
        if not isinstance(device, str) or not device:
            raise errors.ConfigError(f"mark_fault: device must be a non-empty string, got {device!r}")
        self._faults.setdefault(device, str(reason) or "fault reported")
        self._latest = tuple(self._apply_fault(r) for r in self._latest)

    def faults(self) -> dict[str, str]:
        return dict(self._faults)

    def _apply_fault(self, r: DeviceReading) -> DeviceReading:
        why = self._faults.get(r.device)
        if why is None:
            return r
        if not r.healthy and r.reason == why:
            return r
        return _replace(r, healthy=False, reason=why)

    def _read_gpu(self, index: int, handle, now: float) -> DeviceReading:
        nv = self._nvml
        dev = f"gpu{index}"
        if isinstance(handle, _NoHandle):
            self._faults.setdefault(dev, handle.reason)
            return DeviceReading(dev, "gpu", False, handle.reason, time=now)
        fields: dict = {}
        soft: list[str] = []
        lost: str | None = None

        def q(what: str, fn, *args):
            nonlocal lost
            if lost is not None:
                return None
            try:
                return fn(handle, *args)
            except Exception as exc:  # noqa: BLE001
                kind = type(exc).__name__
                if kind in _ABSENT:
                    return None  # this board does not report it: not a fault
                if kind in _LOST:
                    lost = f"{dev} does not answer: {what}: {kind}: {exc}"
                    return None
                soft.append(f"{what}: {kind}: {exc}")
                return None

        name = q("name", nv.nvmlDeviceGetName)
        uuid = q("uuid", nv.nvmlDeviceGetUUID)
        mem = q("memory", nv.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            fields["memory_used"], fields["memory_total"] = int(mem.used), int(mem.total)
        util = q("utilization", nv.nvmlDeviceGetUtilizationRates)
        if util is not None:
            fields["utilization"] = float(util.gpu) / 100.0
            fields["memory_utilization"] = float(util.memory) / 100.0
        temp = q("temperature", nv.nvmlDeviceGetTemperature, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
        if temp is not None:
            fields["temperature_c"] = float(temp)
        power = q("power", nv.nvmlDeviceGetPowerUsage)
        if power is not None:
            fields["power_w"] = float(power) / 1000.0  # NVML reports milliwatts
        volatile = getattr(nv, "NVML_VOLATILE_ECC", 0)
        ecc_c = q("ecc corrected", nv.nvmlDeviceGetTotalEccErrors, getattr(nv, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0),
                  volatile)
        ecc_u = q("ecc uncorrected", nv.nvmlDeviceGetTotalEccErrors,
                  getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1), volatile)
        if ecc_c is not None:
            fields["ecc_corrected"] = int(ecc_c)
        if ecc_u is not None:
            fields["ecc_uncorrected"] = int(ecc_u)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        bits = q("throttle reasons", reasons_fn) if reasons_fn is not None else None
        if bits is not None:
            bits = int(bits)
            fields["throttle"] = tuple(n for b, n in sorted(THROTTLE_REASONS.items()) if bits & b)
        healthy, reason = True, ""
        if lost is not None:
            healthy, reason = False, lost
            self._faults.setdefault(dev, lost)  # a lost GPU stays lost
        elif fields.get("ecc_uncorrected"):
            healthy, reason = False, (f"{dev}: {fields['ecc_uncorrected']} uncorrected ECC errors since the "
                                      "driver loaded (memory contents cannot be trusted; the GPU needs a reset)")
        return DeviceReading(dev, "gpu", healthy, reason, name=_decode(name) if name is not None else "",
                             uuid=_decode(uuid) if uuid is not None else "", time=now, errors=tuple(soft), **fields)

    # --- the polling thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Poll at once, then every interval_s in a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tinyserve-devices", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (if started) and shut NVML down; a later poll() initialises it again."""
        t = self._thread
        self._stop.set()
        if t is not None:
            t.join(timeout)
            self._thread = None
        nv = self._nvml
        if nv is not None and self._handles:
            try:
                nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._handles = []
            self._inited = False


class _NoHandle:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _replace(r: DeviceReading, **changes) -> DeviceReading:
    import dataclasses

    return dataclasses.replace(r, **changes)
