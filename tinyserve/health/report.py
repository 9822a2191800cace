"""Health aggregation: live / ready with per-model and per-device states and reasons (docs/health.md section 5).

A pure function of what the server passes in (the loaded versions and their runtime states, the
device readings, the ejection policy): `assess(...) -> HealthReport`.  Nothing here reads the
server's objects, so the same answer serves the `health` op, `/healthz` and `/readyz`.

Effective state of a loaded version, most serious first:
    the runtime state when it is not READY (LOADING, UNLOADING, UNLOADED, FAILED);
    FAILED      the ejection policy failed it (it is being unloaded);
    DEVICE_FAULT its device is not healthy;
    EJECTED / PROBING  the ejection policy holds it out of service;
    READY       serving.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from tinyserve import errors
from tinyserve.health.ejection import EJECTED, FAILED, PROBING, EjectionPolicy

__all__ = ["DEVICE_FAULT", "HealthReport", "ModelInput", "assess"]

READY = "READY"  # runtime.READY (not imported: importing the runtime loads torch)
DEVICE_FAULT = "DEVICE_FAULT"
_RUNTIME_STATES = ("LOADING", "READY", "UNLOADING", "UNLOADED", "FAILED")


@dataclass(frozen=True)
class ModelInput:
    """One loaded model version as the server sees it."""

    name: str
    version: int
    state: str  # the runtime state: LOADING, READY, UNLOADING, UNLOADED, FAILED
    reason: str = ""  # the runtime's reason (a failed load's cause)
    device: str = "cpu"  # the device it runs on (a DeviceReading.device)
    key: Hashable = None  # its key in the ejection policy (default: (name, version))

    def __post_init__(self) -> None:
        if type(self.name) is not str or not self.name:
            raise errors.ConfigError(f"health: model name must be a non-empty string, got {self.name!r}")
        if type(self.version) is not int or self.version < 0:
            raise errors.ConfigError(f"health: model {self.name!r}: version must be an integer >= 0, "
                                     f"got {self.version!r}")
        if self.state not in _RUNTIME_STATES:
            raise errors.ConfigError(f"health: model {self.name!r} version {self.version}: state must be one of "
                                     f"{', '.join(_RUNTIME_STATES)}, got {self.state!r}")
        if self.key is None:
            object.__setattr__(self, "key", (self.name, self.version))


@dataclass(frozen=True)
class HealthReport:
    live: bool
    ready: bool
    reasons: tuple = ()  # why not ready (empty when ready)
    models: dict = field(default_factory=dict)  # name -> {state, reason, version, serving, device, versions}
    devices: dict = field(default_factory=dict)  # device -> DeviceReading.to_dict()

    def to_dict(self) -> dict:
        """The `health` op's reply fields (docs/protocol.md; docs/health.md section 5)."""
        return {"live": self.live, "ready": self.ready, "reasons": list(self.reasons), "models": self.models,
                "devices": self.devices}


def _required(items: Iterable) -> list[tuple[str, int | None]]:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append((it, None))
        elif isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) and (it[1] is None or type(it[1]) is int):
            out.append(it)
        else:
            raise errors.ConfigError(f"health: a required model must be NAME or (NAME, VERSION or None), got {it!r}")
    return out


def assess(models: Iterable[ModelInput], devices: Iterable = (), *, policy: EjectionPolicy | None = None,
           now: float = 0.0, required: Iterable = (), listening: bool = True, draining: bool = False,
           require_model: bool = False) -> HealthReport:
    """live: the caller answers (always True here; the HTTP probe adds the event loop's answer).
    ready: listening, not draining, every device healthy, every `required` model (a name: any version;
    (name, version): that one) has a version in state READY, and, with `require_model`, at least one
    model version is READY."""
    reasons: list[str] = []
    if not listening:
        reasons.append("the server is not listening")
    if draining:
        reasons.append("the server is shutting down")
    dev_out: dict[str, dict] = {}
    bad_devices: dict[str, str] = {}
    for d in devices:
        dev_out[d.device] = d.to_dict()
        if not d.healthy:
            bad_devices[d.device] = d.reason or "not healthy"
            reasons.append(f"device {d.device} is not healthy: {d.reason or 'no reason given'}")

    per_version: dict[str, list[dict]] = {}
    for m in models:
        state, reason = m.state, m.reason
        if state == READY:
            pstate = policy.state(m.key) if policy is not None else None
            info = policy.info(m.key) if policy is not None else None
            if pstate == FAILED:
                state, reason = FAILED, info.reason
            elif m.device in bad_devices:
                state, reason = DEVICE_FAULT, f"device {m.device}: {bad_devices[m.device]}"
            elif pstate in (EJECTED, PROBING):
                state, reason = pstate, info.reason
        entry = {"version": m.version, "state": state, "reason": reason, "device": m.device,
                 "serving": state == READY}
        if policy is not None:
            info = policy.info(m.key)
            if info is not None and (info.recent or info.ejections_total):
                entry["ejection"] = info.to_dict(now)
        per_version.setdefault(m.name, []).append(entry)

    model_out: dict[str, dict] = {}
    for name, vers in sorted(per_version.items()):
        vers.sort(key=lambda e: e["version"])
        serving = [e for e in vers if e["serving"]]
        top = serving[-1] if serving else vers[-1]
        out = {"state": top["state"], "reason": top["reason"], "version": top["version"], "device": top["device"],
               "serving": bool(serving), "versions": vers}
        newest = vers[-1]
        if serving and newest["version"] > top["version"]:
            out["fallback"] = (f"version {newest['version']} is {newest['state']}; version {top['version']} "
                               "serves meanwhile")
        model_out[name] = out

    for name, version in _required(required):
        vers = per_version.get(name, [])
        if version is None:
            if not any(e["serving"] for e in vers):
                if vers:
                    e = vers[-1]
                    reasons.append(f"model {name!r} must be served: version {e['version']} is {e['state']}"
                                   + (f" ({e['reason']})" if e["reason"] else ""))
                else:
                    reasons.append(f"model {name!r} must be served and is not loaded")
        else:
            e = next((e for e in vers if e["version"] == version), None)
            if e is None:
                reasons.append(f"model {name!r} version {version} must be served and is not loaded")
            elif not e["serving"]:
                reasons.append(f"model {name!r} version {version} must be served: it is {e['state']}"
                               + (f" ({e['reason']})" if e["reason"] else ""))
    if require_model and not any(m["serving"] for m in model_out.values()):
        reasons.append("no model version is serving")
    return HealthReport(True, not reasons, tuple(reasons), model_out, dev_out)
