"""The repository poller behind the server's ``poll`` model-control mode (docs/remote.md section 6).

``Poller.poll(now)`` lists the repository when ``interval_s`` has passed since the last listing
(time comes from the caller or an injected clock: nothing here sleeps) and reports, per model, the
versions its policy now selects that it did not select before (``load``) and those it no longer
selects (``unload``).  The server loads and warms each new version, moves traffic to it, then drains
and unloads the old ones.  A listing that fails leaves the known state unchanged and is reported in
``error``: the server keeps serving what it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinyserve.errors import ConfigError, TinyserveError
from tinyserve.remote.policy import VersionPolicy


@dataclass
class Changes:
    load: dict[str, list[int]] = field(default_factory=dict)    # versions that appeared (to load)
    unload: dict[str, list[int]] = field(default_factory=dict)  # versions that vanished (to unload)
    error: str | None = None

    def __bool__(self) -> bool:
        return bool(self.load or self.unload)


class Poller:
    """``repo``: anything with ``models()`` and ``versions(name)``.  ``models``: the names to watch
    (None: every model in the repository).  ``policies``: name -> VersionPolicy (default latest: 1)."""

    def __init__(self, repo, *, interval_s: float, models: list[str] | None = None,
                 policies: dict[str, VersionPolicy] | None = None, clock: Callable[[], float] = time.monotonic):
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0 < interval_s <= 86400:
            raise ConfigError(f"poll interval {interval_s!r} must be a number of seconds in (0, 86400]")
        self.repo = repo
        self.interval_s = float(interval_s)
        self.models = models
        self.policies = dict(policies or {})
        self.clock = clock
        self.selected: dict[str, list[int]] = {}
        self._next: float | None = None

    def policy(self, name: str) -> VersionPolicy:
        return self.policies.get(name, VersionPolicy("latest", 1))

    def due(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return self._next is None or now >= self._next

    def seconds_to_next(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        return 0.0 if self._next is None else max(0.0, self._next - now)

    def poll(self, now: float | None = None, force: bool = False) -> Changes:
        now = self.clock() if now is None else now
        if not force and not self.due(now):
            return Changes()
        self._next = now + self.interval_s
        try:
            names = self.models if self.models is not None else self.repo.models()
            current = {n: self.policy(n).select(self.repo.versions(n)) for n in names}
        except TinyserveError as exc:
            return Changes(error=f"{type(exc).__name__}: {exc}")
        changes = Changes()
        for n in sorted(set(current) | set(self.selected)):
            new, old = set(current.get(n, [])), set(self.selected.get(n, []))
            if new - old:
                changes.load[n] = sorted(new - old)
            if old - new:
                changes.unload[n] = sorted(old - new)
        self.selected = {n: v for n, v in current.items() if v}
        return changes
