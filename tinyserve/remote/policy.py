"""Version policies: which of a model's available versions a server serves (docs/remote.md section 5).

A policy is written as ``{"latest": N}`` (the N highest versions, 1 <= N <= 1024), ``{"specific":
[v, ...]}`` (exactly these, those that exist; 1..1024 distinct versions) or ``"all"`` (``{"all": {}}``
is accepted too).  ``select`` is a pure function of the available versions; the default version for
a request that names none is the highest selected one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tinyserve.errors import ConfigError

MAX_LATEST = 1024
MAX_SPECIFIC = 1024
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class VersionPolicy:
    kind: str                      # 'latest' | 'specific' | 'all'
    latest: int = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: object) -> VersionPolicy:
        if spec is None:
            return cls("latest", 1)
        if spec == "all":
            return cls("all")
        if isinstance(spec, str):
            text = spec.strip()
            if text.startswith("latest:"):
                return cls.parse({"latest": _int(text[7:].strip(), "latest")})
            if text.startswith("specific:"):
                items = [x for x in text[9:].replace("[", "").replace("]", "").split(",") if x.strip()]
                return cls.parse({"specific": [_int(x.strip(), "specific") for x in items]})
            raise ConfigError(f"version policy {spec!r} must be 'all', 'latest: N' or 'specific: [v, ...]'")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"version policy {spec!r} must be one of {{'latest': N}}, {{'specific': [...]}}, 'all'")
        (key, value), = spec.items()
        if key == "all":
            if value not in ({}, None, True):
                raise ConfigError(f"version policy 'all' takes no value, got {value!r}")
            return cls("all")
        if key == "latest":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LATEST:
                raise ConfigError(f"version policy latest: {value!r} must be an integer 1..{MAX_LATEST}")
            return cls("latest", value)
        if key == "specific":
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_SPECIFIC:
                raise ConfigError(f"version policy specific: must be a list of 1..{MAX_SPECIFIC} versions")
            for v in value:
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VERSION:
                    raise ConfigError(f"version policy specific: version {v!r} must be an integer 1..{MAX_VERSION}")
            if len(set(value)) != len(value):
                raise ConfigError(f"version policy specific: {value!r} repeats a version")
            return cls("specific", specific=tuple(sorted(value)))
        raise ConfigError(f"version policy key {key!r} is not 'latest', 'specific' or 'all'")

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions to serve, ascending."""
        avail = sorted(set(available))
        if self.kind == "all":
            return avail
        if self.kind == "latest":
            return avail[-self.latest:] if avail else []
        wanted = set(self.specific)
        return [v for v in avail if v in wanted]

    def default(self, available: Iterable[int]) -> int | None:
        """The version a request that names none gets: the highest selected, or None."""
        chosen = self.select(available)
        return chosen[-1] if chosen else None

    def to_obj(self) -> object:
        if self.kind == "all":
            return "all"
        if self.kind == "latest":
            return {"latest": self.latest}
        return {"specific": list(self.specific)}


def _int(text: str, what: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ConfigError(f"version policy {what}: {text!r} is not an integer") from None
