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
from dataclasses import dataclass, field
from typing import Any, Callable

from tinyserve import wire

__all__ = ["DeviceBudget", "ElasticController", "Footprint", "Placement", "Plan", "ResourceExhausted",
           "cpu_budget", "gpu_budget", "rss_anon"]

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
               torch_mem_get_info: Callable[[int], tuple[int, int]] | None = None) -> DeviceBudget:
    """GPU ``index``'s budget: ``explicit`` bytes; else NVML's total minus ``reserve``; else
    ``torch.cuda.mem_get_info``'s total minus ``reserve``.  The probes are injectable (tests); a
    probe that raises is skipped.  ValueError when nothing gives a number."""
    device = f"cuda:{index}"
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
    for source, probe in (("nvml", lambda: nvml_total(index)), ("torch", lambda: torch_mem_get_info(index)[1])):
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
    ``evict``, in order, then load with batches capped at ``max_batch``), "blocked" (room exists only
    once busy models finish: retry after the next ``end``).  ``reason`` says why for "blocked"."""

    action: str
    evict: list = field(default_factory=list)
    max_batch: int = 0
    reserved: int = 0
    reason: str = ""


class _Model:
    __slots__ = ("name", "fp", "device", "pinned", "max_batch", "state", "reserved", "cap", "in_flight",
                 "last_used", "loads", "evictions")

    def __init__(self, name, fp, device, pinned, max_batch) -> None:
        self.name, self.fp, self.device, self.pinned, self.max_batch = name, fp, device, pinned, max_batch
        self.state = "absent"  # absent -> loading -> resident -> absent
        self.reserved = 0
        self.cap = 0
        self.in_flight = 0
        self.last_used = -math.inf
        self.loads = 0
        self.evictions = 0


class Placement:
    """Residency of models on devices, within each device's budget (docs/scheduler.md section 4.3).

    Invariant: on every device, the sum of ``reserved`` over loading and resident models is at most
    the budget.  A model's reservation is its footprint at its batch cap, taken when its load is
    planned and released when it is evicted or its load fails.
    """

    def __init__(self, budgets: dict[str, DeviceBudget | int]) -> None:
        self.budgets = {d: (b.budget if isinstance(b, DeviceBudget) else int(b)) for d, b in budgets.items()}
        self._models: dict[str, _Model] = {}

    def register(self, name: str, footprint: Footprint, device: str, *, pinned: bool = False,
                 max_batch: int = 1) -> None:
        if device not in self.budgets:
            raise ValueError(f"model {name!r}: device {device!r} has no budget (devices: {', '.join(self.budgets)})")
        if name in self._models:
            raise ValueError(f"model {name!r} is already registered")
        self._models[name] = _Model(name, footprint, device, pinned, max(1, int(max_batch)))

    def used(self, device: str) -> int:
        return sum(m.reserved for m in self._models.values() if m.device == device)

    def free(self, device: str) -> int:
        return self.budgets[device] - self.used(device)

    def _evictable(self, m: _Model) -> list[_Model]:
        """Idle resident models on m's device, least recently used first."""
        c = [o for o in self._models.values() if o is not m and o.device == m.device and o.state == "resident"
             and not o.pinned and o.in_flight == 0]
        return sorted(c, key=lambda o: (o.last_used, o.name))

    def request(self, name: str, now: float) -> Plan:
        """Plan the residency of ``name`` for a request arriving at ``now``.  Raises
        ResourceExhausted (with the numbers) when the model cannot fit even at batch size 1 on an
        otherwise empty device (pinned models and static placements left in place)."""
        m = self._models[name]
        m.last_used = now
        if m.state == "resident":
            return Plan("ready", max_batch=m.cap, reserved=m.reserved)
        if m.state == "loading":
            return Plan("wait", max_batch=m.cap, reserved=m.reserved)
        budget = self.budgets[m.device]
        fixed = sum(o.reserved for o in self._models.values()
                    if o is not m and o.device == m.device and o.pinned)
        need1 = m.fp.bytes_for(m.device, 1)
        if need1 > budget - fixed:
            raise ResourceExhausted(
                f"model {name!r} needs {_mib(need1)} on {m.device} at batch size 1, but the budget is "
                f"{_mib(budget)} with {_mib(fixed)} held by pinned models")
        free = self.free(m.device)
        victims = self._evictable(m)
        room = free + sum(v.reserved for v in victims)
        cap = self._cap(m, room)
        if cap == 0:
            return Plan("blocked", reason=(
                f"model {name!r} needs {_mib(need1)} on {m.device}; {_mib(free)} free and {_mib(room - free)} "
                "evictable now, the rest is held by models with work in flight or loading"))
        need = m.fp.bytes_for(m.device, cap)
        evict = []
        for v in victims:
            if free >= need:
                break
            evict.append(v.name)
            free += v.reserved
            v.state, v.reserved, v.cap = "absent", 0, 0
            v.evictions += 1
        m.state, m.reserved, m.cap = "loading", need, cap
        m.loads += 1
        return Plan("load", evict=evict, max_batch=cap, reserved=need)

    def _cap(self, m: _Model, room: int) -> int:
        """The largest batch size <= m.max_batch whose footprint fits in ``room`` (0: none)."""
        lo, hi, best = 1, m.max_batch, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            if m.fp.bytes_for(m.device, mid) <= room:
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
            m.state, m.reserved, m.cap = "absent", 0, 0

    def unload(self, name: str) -> bool:
        """An explicit unload (the `unload` op): release the reservation; False when it has work in flight."""
        m = self._models[name]
        if m.in_flight or m.state != "resident":
            return False
        m.state, m.reserved, m.cap = "absent", 0, 0
        m.evictions += 1
        return True

    def registered(self, name: str) -> bool:
        return name in self._models

    def touch(self, name: str, now: float) -> None:
        """A request used the model at ``now`` (its place in the least-recently-used order)."""
        m = self._models.get(name)
        if m is not None and now > m.last_used:
            m.last_used = now

    def measured(self, name: str, footprint: Footprint) -> None:
        """Replace a model's estimated footprint with one measured at load; a resident or loading
        model's reservation follows it (it may exceed the plan by what the estimate missed: the
        next plan makes room for it)."""
        m = self._models[name]
        m.fp = footprint
        if m.state in ("loading", "resident"):
            m.reserved = footprint.bytes_for(m.device, max(1, m.cap))

    def shed(self, device: str, keep: str | None = None) -> list[str]:
        """Evict idle unpinned models on ``device``, least recently used first (never ``keep``), until
        the reservations fit its budget again: after a measured footprint came out larger than the
        estimate the load was planned with.  Returns their names (the caller unloads them)."""
        over = self.used(device) - self.budgets[device]
        out = []
        if over <= 0:
            return out
        idle = sorted((o for o in self._models.values() if o.device == device and o.state == "resident"
                       and not o.pinned and o.in_flight == 0 and o.name != keep),
                      key=lambda o: (o.last_used, o.name))
        for v in idle:
            if over <= 0:
                break
            out.append(v.name)
            over -= v.reserved
            v.state, v.reserved, v.cap = "absent", 0, 0
            v.evictions += 1
        return out

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

    def to_dict(self) -> dict[str, Any]:
        """Residency, bytes and load/evict counts per model, and each device's budget and use."""
        return {
            "devices": {d: {"budget": b, "reserved": self.used(d)} for d, b in self.budgets.items()},
            "models": {n: {"device": m.device, "state": m.state, "reserved": m.reserved, "max_batch": m.cap,
                           "pinned": m.pinned, "in_flight": m.in_flight, "loads": m.loads,
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
