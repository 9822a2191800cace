"""Device memory: budgets, model footprints, the placement state machine, elastic instances.

Pure accounting (docs/scheduler.md section 4): nothing here loads, frees or measures a model except
``rss_anon()`` and the budget probes, which read what the caller injects or the OS.  Single-threaded:
the server calls it from one thread (its event loop).

    pl = Placement({"cpu": cpu_budget(explicit=4 << 30)})
    pl.register("mlp", Footprint(weight_bytes=..., workspace={1: ..., 32: ...}), "cpu", max_batch=32)
    plan = pl.request("mlp", now)     # Plan("ready"|"wait"|"load"|"blocked"); RESOURCE_EXHAUSTED raised
    for victim in plan.evict: unload(victim)        # before the load starts
    if plan.action == "load": load(...); pl.loaded("mlp", now)   # or pl.load_failed("mlp")
    pl.begin("mlp", now) ... pl.end("mlp", now)     # work in flight: never evicted meanwhile
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from tinyserve import wire

__all__ = ["DeviceBudget", "DeviceResolver", "ElasticController", "Footprint", "Placement", "Plan",
           "ResourceExhausted", "cpu_budget", "gpu_budget", "health_name", "map_cuda_to_nvml", "resolver",
           "rss_anon"]

ResourceExhausted = wire.ResourceExhausted


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.1f} MiB)"


# --- budgets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceBudget:
    """The bytes tinyserve may reserve on one device, and where the number came from."""

    device: str
    budget: int
    source: str  # "explicit" | "nvml" | "torch" | "meminfo"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0:
            raise ValueError(f"memory budget of {self.device} is {self.budget!r}; must be an integer >= 0 bytes")


def _explicit(device: str, explicit: int) -> DeviceBudget:
    if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
        raise ValueError(f"--memory-budget for {device} is {explicit!r}; must be a positive number of bytes")
    return DeviceBudget(device, explicit, "explicit")


def cpu_budget(explicit: int | None = None, reserve: int = 1 << 30, meminfo: str = "/proc/meminfo") -> DeviceBudget:
    """The CPU's budget: ``explicit`` bytes, else MemTotal minus ``reserve`` (at least 0)."""
    if explicit is not None:
        return _explicit("cpu", explicit)
    total = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceBudget("cpu", max(0, total - reserve), "meminfo")


def gpu_budget(index: int, explicit: int | None = None, reserve: int = 1 << 30,
               nvml_total: Callable[[int], int] | None = None,
               torch_mem_get_info: Callable[[int], tuple[int, int]] | None = None,
               nvml_index: int | None = None) -> DeviceBudget:
    """GPU ``cuda:index``'s budget: ``explicit`` bytes; else NVML's total (of NVML device
    ``nvml_index``, default ``index``: see DeviceResolver.nvml_index) minus ``reserve``; else
    ``torch.cuda.mem_get_info``'s total minus ``reserve``.  The probes are injectable (tests); a
    probe that raises is skipped.  ValueError when nothing gives a number."""
    device = f"cuda:{index}"
    nv = index if nvml_index is None else nvml_index
    if explicit is not None:
        return _explicit(device, explicit)
    if nvml_total is None:
        def nvml_total(i: int) -> int:
            import pynvml

            pynvml.nvmlInit()
            try:
                return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total)
            finally:
                pynvml.nvmlShutdown()
    if torch_mem_get_info is None:
        def torch_mem_get_info(i: int) -> tuple[int, int]:
            import torch

            return torch.cuda.mem_get_info(i)
    errors = []
    for source, probe in (("nvml", lambda: nvml_total(nv)), ("torch", lambda: torch_mem_get_info(index)[1])):
        try:
            total = int(probe())
        except Exception as exc:  # no driver, no NVML, no CUDA: try the next probe
            errors.append(f"{source}: {type(exc).__name__}: {exc}")
            continue
        return DeviceBudget(device, max(0, total - reserve), source)
    raise ValueError(f"no memory size for {device} ({'; '.join(errors)}); pass --memory-budget")


def rss_anon(status: str = "/proc/self/status") -> int | None:
    """This process's anonymous resident memory (RssAnon) in bytes; None where /proc lacks it."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def health_name(device: str) -> str:
    """A device's name in health readings (tinyserve.health.devices, which names GPUs by their NVML
    index): "cpu", or "gpuM" for cuda:N, M being the NVML index of that GPU (resolver.nvml_index)."""
    return "cpu" if device == "cpu" else f"gpu{resolver.nvml_index(int(device.partition(':')[2] or 0))}"


def _cuda_pci_ids() -> list:
    """(domain, bus, device) of each CUDA device torch sees, in CUDA's order."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append((int(p.pci_domain_id), int(p.pci_bus_id), int(p.pci_device_id)))
    return out


def _nvml_pci_ids() -> list:
    """(domain, bus, device) of each GPU NVML sees, in NVML's order (PCI order: all GPUs, whatever
    CUDA_VISIBLE_DEVICES says)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            out.append((int(info.domain), int(info.bus), int(info.device)))
        return out
    finally:
        pynvml.nvmlShutdown()


def map_cuda_to_nvml(cuda_pci: Callable[[], list] | None = None, nvml_pci: Callable[[], list] | None = None,
                     visible: str | None = None) -> dict[int, int]:
    """{CUDA index: NVML index}.  CUDA numbers only the GPUs CUDA_VISIBLE_DEVICES leaves, in its own
    order (fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID); NVML numbers every GPU in PCI order.
    The two are matched by PCI address; where a probe fails, CUDA_VISIBLE_DEVICES as a list of
    integers gives the map (``visible``, default the environment); else the map is empty (identity)."""
    try:
        cuda, nvml = (cuda_pci or _cuda_pci_ids)(), (nvml_pci or _nvml_pci_ids)()
        where = {tuple(a): j for j, a in enumerate(nvml)}
        found = {i: where[tuple(a)] for i, a in enumerate(cuda) if tuple(a) in where}
        if found:
            return found
    except Exception:  # noqa: BLE001 - no CUDA, no NVML: fall back to the environment
        pass
    vis = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if vis:
        items = [x.strip() for x in vis.split(",")]
        if all(x.isdigit() for x in items):
            return {i: int(x) for i, x in enumerate(items)}
    return {}


class DeviceResolver:
    """The one seam between device names ("cpu", "cuda:N") and the machine: how many GPUs torch sees,
    which torch device runs a named device, and each device's budget probe.  The server and the
    runtime read the module-level ``resolver`` (never on the hot path: when a server starts and when
    an instance is built), so tests replace it to run "cuda:0", "cuda:1" on the host's CPU with fake
    NVML totals::

        memory.resolver = DeviceResolver(gpus=2, torch_devices={"cuda:0": "cpu", "cuda:1": "cpu"},
                                          nvml_total=lambda i: totals[i], reserve=0)

    ``gpus``: the GPU count (None: ``torch.cuda.device_count()`` when CUDA is available, else 0).
    ``torch_devices``: name -> the torch device that runs it (default: the name itself).
    ``nvml_total`` / ``torch_mem_get_info``: the GPU budget probes (None: the real ones, see gpu_budget).
    ``reserve``: bytes kept back from a probed total (an explicit budget is taken as given).
    """

    def __init__(self, gpus: int | None = None, torch_devices: dict[str, str] | None = None,
                 nvml_total: Callable[[int], int] | None = None,
                 torch_mem_get_info: Callable[[int], tuple[int, int]] | None = None,
                 reserve: int = 1 << 30, nvml_map: dict[int, int] | None = None) -> None:
        self._gpus = gpus
        self._torch_devices = dict(torch_devices or {})
        self._nvml_total = nvml_total
        self._torch_mem_get_info = torch_mem_get_info
        self.reserve = reserve
        self._nvml_map = nvml_map  # {CUDA index: NVML index}; None: map_cuda_to_nvml() when first asked

    def nvml_index(self, cuda_index: int) -> int:
        """The NVML index (what the health monitor and NVML's memory probe use) of CUDA device
        ``cuda_index``: they differ under CUDA_VISIBLE_DEVICES, or when CUDA orders by speed."""
        if self._nvml_map is None:
            self._nvml_map = map_cuda_to_nvml() if self.gpu_count() else {}
        return self._nvml_map.get(cuda_index, cuda_index)

    def gpu_count(self) -> int:
        if self._gpus is not None:
            return self._gpus
        try:
            import torch

            return torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - no driver: no GPU
            return 0

    def check(self, device: str, flag: str = "--device") -> None:
        """ValueError naming ``flag`` when ``device`` is not "cpu" or a cuda:N that torch sees."""
        if device == "cpu":
            return
        m = re.fullmatch(r"cuda:(\d{1,4})", device) if isinstance(device, str) else None
        if m is None:
            raise ValueError(f"{flag}: device {device!r} must be cpu or cuda:N")
        n = self.gpu_count()
        if int(m.group(1)) >= n:
            seen = f"cuda:0..cuda:{n - 1}" if n else "none"
            raise ValueError(f"{flag}: device {device}: torch sees {n} CUDA device(s) here ({seen}); "
                             "use cpu, auto or one of those")

    def torch_device(self, device: str) -> str:
        """The torch device that runs ``device``."""
        return self._torch_devices.get(device, device)

    def budget(self, device: str, explicit: int | None = None) -> DeviceBudget:
        """``device``'s budget: ``explicit`` bytes, else the probes (cpu_budget / gpu_budget)."""
        if device == "cpu":
            return cpu_budget(explicit, reserve=self.reserve)
        i = int(device.partition(":")[2])
        return gpu_budget(i, explicit, reserve=self.reserve, nvml_total=self._nvml_total,
                          torch_mem_get_info=self._torch_mem_get_info, nvml_index=self.nvml_index(i))


resolver = DeviceResolver()


# --- footprints ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """What one instance of a model occupies.

    weight_bytes: decoded weights (anonymous memory on the CPU).  mapped: {file: bytes} of raw tensors
    mapped from weights files; on the CPU they are page cache, shared by every mapping of the file and
    reclaimable, so they do NOT count against the budget; on a GPU they are copied to the device and
    count like any weight.  workspace: {batch size: bytes} measured during warm-up (activations,
    outputs); sizes between two measurements take the larger one's, sizes beyond the largest are
    extrapolated per row from it.
    """

    weight_bytes: int
    workspace: dict = field(default_factory=dict, hash=False)
    mapped: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for what, n in [("weight_bytes", self.weight_bytes), *((f"workspace[{k}]", v) for k, v in self.workspace.items()),
                        *((f"mapped[{k!r}]", v) for k, v in self.mapped.items())]:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"footprint {what} is {n!r}; must be an integer >= 0 bytes")
        for b in self.workspace:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"footprint workspace batch size {b!r} must be an integer >= 1")

    def workspace_for(self, batch: int) -> int:
        if not self.workspace:
            return 0
        sizes = sorted(self.workspace)
        for b in sizes:
            if b >= batch:
                return self.workspace[b]
        top = sizes[-1]
        return math.ceil(self.workspace[top] * batch / top)

    def bytes_for(self, device: str, batch: int) -> int:
        """Bytes reserved on ``device`` for an instance running batches of up to ``batch`` rows."""
        w = self.weight_bytes + self.workspace_for(batch)
        return w if device == "cpu" else w + sum(self.mapped.values())


# --- placement -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the caller does for a request.  action: "ready" (resident: run), "wait" (a load is under
    way: queue the request behind it; never a second load), "load" (first unload every model in
    ``evict``, in order, then load one copy on each of ``devices`` with batches capped at
    ``max_batch``), "blocked" (room exists only once busy models finish: retry after the next
    ``end``).  ``reason`` says why for "blocked"; ``reserved`` is the bytes held on all devices."""

    action: str
    evict: list = field(default_factory=list)
    max_batch: int = 0
    reserved: int = 0
    reason: str = ""
    devices: list = field(default_factory=list)


class _Model:
    __slots__ = ("name", "fp", "candidates", "want", "pinned", "max_batch", "state", "res", "devices", "cap",
                 "in_flight", "last_used", "loads", "evictions")

    def __init__(self, name, fp, candidates, want, pinned, max_batch) -> None:
        self.name, self.fp, self.pinned, self.max_batch = name, fp, pinned, max_batch
        self.candidates = candidates  # devices it may occupy, in preference order for ties
        self.want = want  # how many of them it occupies (-len(candidates): all of them, a fixed placement)
        self.state = "absent"  # absent -> loading -> resident -> absent
        self.res: dict[str, int] = {}  # device -> bytes reserved there (loading / resident only)
        self.devices: tuple = ()  # the devices it occupies (loading / resident only)
        self.cap = 0
        self.in_flight = 0
        self.last_used = -math.inf
        self.loads = 0
        self.evictions = 0

    @property
    def reserved(self) -> int:
        return sum(self.res.values())

    def release(self) -> None:
        self.state, self.res, self.devices, self.cap = "absent", {}, (), 0


class Placement:
    """Residency of models on devices, within each device's budget (docs/scheduler.md section 4.3).

    Invariant: on every device, the sum of the reservations there of loading and resident models is
    at most its budget.  A model's reservation on each device it occupies is its footprint there at
    its batch cap, taken when its load is planned and released when it is evicted or its load fails.
    """

    def __init__(self, budgets: dict[str, DeviceBudget | int]) -> None:
        self.budgets = {d: (b.budget if isinstance(b, DeviceBudget) else int(b)) for d, b in budgets.items()}
        self._models: dict[str, _Model] = {}

    def register(self, name: str, footprint: Footprint, device, *, pinned: bool = False,
                 max_batch: int = 1, count: int | None = None) -> None:
        """``device``: one device name, or a list of candidate devices.  ``count`` None: the model
        occupies every listed device (a fixed placement); else it occupies ``min(count, len)`` of them,
        chosen at each load (the ones with the most free bytes, ties to the earlier listed)."""
        cands = (device,) if isinstance(device, str) else tuple(device)
        if not cands:
            raise ValueError(f"model {name!r}: no device to place it on")
        for d in cands:
            if d not in self.budgets:
                raise ValueError(f"model {name!r}: device {d!r} has no budget (devices: {', '.join(self.budgets)})")
        if len(set(cands)) != len(cands):
            raise ValueError(f"model {name!r}: devices {list(cands)} repeat a device")
        if name in self._models:
            raise ValueError(f"model {name!r} is already registered")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"model {name!r}: device count {count!r} must be an integer >= 1")
        want = -len(cands) if count is None else min(count, len(cands))  # negative: fixed, every candidate
        self._models[name] = _Model(name, footprint, cands, want, pinned, max(1, int(max_batch)))

    def used(self, device: str) -> int:
        return sum(m.res.get(device, 0) for m in self._models.values())

    def free(self, device: str) -> int:
        return self.budgets[device] - self.used(device)

    def _evictable(self, m: _Model, device: str) -> list[_Model]:
        """Idle resident models occupying ``device`` (other than m), least recently used first."""
        c = [o for o in self._models.values() if o is not m and device in o.res and o.state == "resident"
             and not o.pinned and o.in_flight == 0]
        return sorted(c, key=lambda o: (o.last_used, o.name))

    def request(self, name: str, now: float) -> Plan:
        """Plan the residency of ``name`` for a request arriving at ``now``.  Raises
        ResourceExhausted (naming the device and the numbers) when the model cannot fit even at batch
        size 1 on an otherwise empty device (pinned models and static placements left in place): on
        any one of its devices for a fixed placement, on every candidate otherwise."""
        m = self._models[name]
        m.last_used = now
        if m.state == "resident":
            return Plan("ready", max_batch=m.cap, reserved=m.reserved, devices=list(m.devices))
        if m.state == "loading":
            return Plan("wait", max_batch=m.cap, reserved=m.reserved, devices=list(m.devices))
        short, rooms, frees = [], {}, {}
        for d in m.candidates:
            budget = self.budgets[d]
            fixed = sum(o.res.get(d, 0) for o in self._models.values() if o is not m and o.pinned)
            need1 = m.fp.bytes_for(d, 1)
            if need1 > budget - fixed:
                short.append(f"{_mib(need1)} on {d} at batch size 1, but the budget is {_mib(budget)} "
                             f"with {_mib(fixed)} held by pinned models")
                continue
            frees[d] = self.free(d)
            rooms[d] = frees[d] + sum(v.res[d] for v in self._evictable(m, d))
        fixed_place = m.want < 0
        if (fixed_place and short) or not rooms:
            raise ResourceExhausted(f"model {name!r} needs " + "; and ".join(short))
        usable = [d for d in rooms if self._cap(m, d, rooms[d]) > 0]
        if fixed_place and len(usable) < len(m.candidates) or not usable:
            d = next(d for d in rooms if d not in usable)
            return Plan("blocked", reason=(
                f"model {name!r} needs {_mib(m.fp.bytes_for(d, 1))} on {d}; {_mib(frees[d])} free and "
                f"{_mib(rooms[d] - frees[d])} evictable now, the rest is held by models with work in flight "
                "or loading"))
        if fixed_place:
            chosen = list(m.candidates)
        else:
            order = {d: i for i, d in enumerate(m.candidates)}
            chosen = sorted(usable, key=lambda d: (-frees[d], order[d]))[:m.want]
        cap = min(self._cap(m, d, rooms[d]) for d in chosen)
        evict, res = [], {}
        for d in chosen:
            need = res[d] = m.fp.bytes_for(d, cap)
            free = self.free(d)
            for v in self._evictable(m, d):  # afresh: an eviction for another device may have freed this one
                if free >= need:
                    break
                evict.append(v.name)
                free += v.res[d]
                v.release()
                v.evictions += 1
        m.state, m.res, m.devices, m.cap = "loading", res, tuple(chosen), cap
        m.loads += 1
        return Plan("load", evict=evict, max_batch=cap, reserved=m.reserved, devices=list(chosen))

    def _cap(self, m: _Model, device: str, room: int) -> int:
        """The largest batch size <= m.max_batch whose footprint on ``device`` fits in ``room`` (0: none)."""
        lo, hi, best = 1, m.max_batch, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            if m.fp.bytes_for(device, mid) <= room:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    def loaded(self, name: str, now: float) -> None:
        m = self._models[name]
        if m.state != "loading":
            raise ValueError(f"model {name!r} is {m.state}, not loading")
        m.state = "resident"
        m.last_used = now

    def load_failed(self, name: str) -> None:
        m = self._models[name]
        if m.state == "loading":
            m.release()

    def unload(self, name: str) -> bool:
        """An explicit unload (the `unload` op): release the reservation; False when it has work in flight."""
        m = self._models[name]
        if m.in_flight or m.state != "resident":
            return False
        m.release()
        m.evictions += 1
        return True

    def drop_device(self, name: str, device: str) -> bool:
        """A loaded model stops using ``device`` (a device fault stopped that copy): its reservation
        there is released; its other devices keep theirs.  False when it does not occupy ``device``
        or it is its only device (the caller unloads the model instead)."""
        m = self._models.get(name)
        if m is None or device not in m.res or len(m.res) < 2:
            return False
        del m.res[device]
        m.devices = tuple(d for d in m.devices if d != device)
        return True

    def registered(self, name: str) -> bool:
        return name in self._models

    def touch(self, name: str, now: float) -> None:
        """A request used the model at ``now`` (its place in the least-recently-used order)."""
        m = self._models.get(name)
        if m is not None and now > m.last_used:
            m.last_used = now

    def footprint(self, name: str) -> Footprint:
        """The footprint ``name`` is planned with (the estimate, or the last ``measured``)."""
        return self._models[name].fp

    def measured(self, name: str, footprint: Footprint) -> None:
        """Replace a model's estimated footprint with one measured at load; a resident or loading
        model's reservation on each of its devices follows it (it may exceed the plan by what the
        estimate missed: the next plan, or ``shed``, makes room for it)."""
        m = self._models[name]
        m.fp = footprint
        if m.state in ("loading", "resident"):
            m.res = {d: footprint.bytes_for(d, max(1, m.cap)) for d in m.devices}

    def shed(self, device: str, keep: str | None = None) -> list[str]:
        """Evict idle unpinned models occupying ``device``, least recently used first (never ``keep``),
        until the reservations fit its budget again: after a measured footprint came out larger than
        the estimate the load was planned with.  Returns their names (the caller unloads them)."""
        over = self.used(device) - self.budgets[device]
        out = []
        if over <= 0:
            return out
        idle = sorted((o for o in self._models.values() if device in o.res and o.state == "resident"
                       and not o.pinned and o.in_flight == 0 and o.name != keep),
                      key=lambda o: (o.last_used, o.name))
        for v in idle:
            if over <= 0:
                break
            out.append(v.name)
            over -= v.res[device]
            v.release()
            v.evictions += 1
        return out

    def set_in_flight(self, name: str, n: int) -> None:
        """The work in flight of ``name`` as the caller counts it (requests submitted and not yet
        finished): a model with work in flight is never evicted.  (``begin``/``end`` count it here
        instead.)"""
        m = self._models.get(name)
        if m is not None:
            m.in_flight = max(0, int(n))

    def begin(self, name: str, now: float, n: int = 1) -> None:
        m = self._models[name]
        m.in_flight += n
        m.last_used = now

    def end(self, name: str, now: float, n: int = 1) -> None:
        m = self._models[name]
        if n > m.in_flight:
            raise ValueError(f"model {name!r}: end({n}) with only {m.in_flight} in flight")
        m.in_flight -= n
        m.last_used = now

    def state(self, name: str) -> str:
        return self._models[name].state

    def devices_of(self, name: str) -> list[str]:
        """The devices a loading or resident model occupies (empty when absent)."""
        return list(self._models[name].devices)

    def to_dict(self) -> dict[str, Any]:
        """Residency, bytes and load/evict counts per model, and each device's budget and use.
        A model's ``device`` is the first it occupies (or may occupy, when absent), ``devices`` all
        it occupies, ``reserved`` the sum over them and ``reserved_by_device`` each one's part."""
        return {
            "devices": {d: {"budget": b, "reserved": self.used(d)} for d, b in self.budgets.items()},
            "models": {n: {"device": (m.devices or m.candidates)[0], "devices": list(m.devices),
                           "state": m.state, "reserved": m.reserved, "reserved_by_device": dict(m.res),
                           "max_batch": m.cap, "pinned": m.pinned, "in_flight": m.in_flight, "loads": m.loads,
                           "evictions": m.evictions} for n, m in self._models.items()},
        }


# --- elastic instances -----------------------------------------------------------------------------
class ElasticController:
    """Decides when to add or remove an instance of an elastic model (docs/scheduler.md 4.4).

    ``decide(now, queue_depth, instances, memory_ok)`` returns +1, -1 or 0.  +1 when the queue has
    been deeper than ``depth`` continuously for ``up_after_s``, instances < max and ``memory_ok``;
    -1 when the queue has been empty for ``idle_after_s`` and instances > min; never two changes
    closer than ``cooldown_s``.  Below min it returns +1 at once (memory permitting), above max -1.
    """

    def __init__(self, min_instances: int, max_instances: int, depth: int, up_after_s: float,
                 idle_after_s: float, cooldown_s: float) -> None:
        if not 1 <= min_instances <= max_instances:
            raise ValueError(f"instances {min_instances}..{max_instances}: need 1 <= min <= max")
        self.min, self.max, self.depth = min_instances, max_instances, depth
        self.up_after, self.idle_after, self.cooldown = up_after_s, idle_after_s, cooldown_s
        self._deep_since: float | None = None
        self._idle_since: float | None = None
        self._last_change = -math.inf
        self.changes = 0

    @classmethod
    def from_config(cls, p) -> ElasticController:
        return cls(p.min_instances, p.max_instances, p.scale_up_queue_depth, p.scale_up_after_ms / 1e3,
                   p.scale_down_idle_ms / 1e3, p.cooldown_ms / 1e3)

    def decide(self, now: float, queue_depth: int, instances: int, memory_ok: bool = True) -> int:
        if queue_depth > self.depth:
            if self._deep_since is None:
                self._deep_since = now
        else:
            self._deep_since = None
        if queue_depth == 0:
            if self._idle_since is None:
                self._idle_since = now
        else:
            self._idle_since = None
        if instances < self.min:
            return self._change(now, +1) if memory_ok else 0
        if instances > self.max:
            return self._change(now, -1)
        if now - self._last_change < self.cooldown:
            return 0
        if (self._deep_since is not None and now - self._deep_since >= self.up_after
                and instances < self.max and memory_ok):
            self._deep_since = now  # the queue must stay deep for another period before the next
            return self._change(now, +1)
        if self._idle_since is not None and now - self._idle_since >= self.idle_after and instances > self.min:
            self._idle_since = now
            return self._change(now, -1)
        return 0

    def _change(self, now: float, d: int) -> int:
        self._last_change = now
        self.changes += 1
        return d
