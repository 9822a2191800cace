"""The load generator's statistics: percentiles, measurement windows, the stability rule and the
Poisson arrival schedule.  Pure functions on plain numbers (no I/O, no clock): the tests drive them
with synthetic latencies.

Definitions (bench/README.md repeats them):

- Latencies are in microseconds.  A percentile is numpy's default (linear interpolation between
  the two closest ranks); `p99.9` of fewer than 1,000 samples is reported, but flagged by
  `summarize` through `samples`.
- A *window* is the set of requests whose reply (or error) arrived within one interval of
  `window_s` seconds of the measurement; its throughput is its completed requests (errors
  included) / the interval's length.
- *Stable*: the last `k` windows (default 3) each have a throughput and a p50 latency within
  `tolerance` (default 10%) of the mean of those `k` windows: ``|v - mean| <= tolerance * mean``.
- The Poisson schedule holds the intended send time of every request, drawn in advance:
  exponential gaps with mean ``1 / rate`` from a seeded generator, cumulated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tinyserve import errors

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)
MAX_SCHEDULE = 20_000_000  # arrivals in one open-loop schedule (160 MB of float64)


def pct_key(q: float) -> str:
    """50.0 -> 'p50', 99.9 -> 'p99.9'."""
    return f"p{q:g}"


def percentiles(latencies_us, qs: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """{'p50': ..., 'p90': ..., ...} of the samples (None for each when there are none)."""
    a = np.asarray(latencies_us, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return {pct_key(q): None for q in qs}
    for q in qs:
        if not 0.0 <= q <= 100.0:
            raise errors.ConfigError(f"percentile {q!r} is outside 0..100")
    vals = np.percentile(a, list(qs))
    return {pct_key(q): float(v) for q, v in zip(qs, vals)}


@dataclass
class Window:
    """One measurement window: what completed between `start` and `end` (seconds, any clock)."""

    index: int
    start: float
    end: float
    latencies_us: np.ndarray  # of the requests that succeeded in it
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def completed(self) -> int:
        return int(self.latencies_us.size) + sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50(self) -> float | None:
        return float(np.median(self.latencies_us)) if self.latencies_us.size else None

    def brief(self) -> dict:
        return {"index": self.index, "seconds": round(self.seconds, 6), "completed": self.completed,
                "throughput": round(self.throughput, 3),
                "p50_us": None if self.p50 is None else round(self.p50, 3),
                "errors": dict(self.errors)}


def within(values: Sequence[float], tolerance: float) -> bool:
    """Every value within `tolerance` (a fraction) of the values' mean (False for an empty list or
    a zero / missing value)."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return False
    mean = sum(values) / len(values)
    if mean <= 0:
        return False
    return all(abs(v - mean) <= tolerance * mean for v in values)


def stable(windows: Sequence[Window], k: int = 3, tolerance: float = 0.10) -> bool:
    """The stability rule: the last `k` windows' throughputs, and their p50 latencies, each within
    `tolerance` of their mean."""
    if k < 1:
        raise errors.ConfigError(f"k (windows that must agree) must be >= 1, got {k}")
    if not 0 < tolerance < 1:
        raise errors.ConfigError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if len(windows) < k:
        return False
    last = windows[-k:]
    return within([w.throughput for w in last], tolerance) and within([w.p50 for w in last], tolerance)


@dataclass
class StopRule:
    """When a measurement ends: stable after at least `min_windows`, or `max_windows`, or
    `time_bound_s` of measuring (whichever comes first)."""

    window_s: float = 1.0
    k: int = 3
    tolerance: float = 0.10
    min_windows: int = 3
    max_windows: int = 30
    time_bound_s: float = 60.0

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise errors.ConfigError(f"window must be > 0 seconds, got {self.window_s!r}")
        if self.k < 1 or self.min_windows < 1 or self.max_windows < max(self.k, self.min_windows):
            raise errors.ConfigError(f"windows: need k >= 1, min_windows >= 1, max_windows >= max(k, min_windows); "
                                     f"got k={self.k}, min_windows={self.min_windows}, max_windows={self.max_windows}")
        if not 0 < self.tolerance < 1:
            raise errors.ConfigError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        if not self.time_bound_s > 0:
            raise errors.ConfigError(f"time bound must be > 0 seconds, got {self.time_bound_s!r}")

    def verdict(self, windows: Sequence[Window]) -> str | None:
        """None: measure another window; else why to stop: 'stable', 'max_windows' or 'time_bound'."""
        n = len(windows)
        if n >= max(self.min_windows, self.k) and stable(windows, self.k, self.tolerance):
            return "stable"
        if n >= self.max_windows:
            return "max_windows"
        if n and windows[-1].end - windows[0].start + self.window_s > self.time_bound_s + 1e-9:
            return "time_bound"
        return None


def summarize(windows: Sequence[Window]) -> dict:
    """Throughput, percentiles, errors by code over the given windows, merged."""
    if not windows:
        return {"seconds": 0.0, "completed": 0, "ok": 0, "throughput": 0.0, "ok_throughput": 0.0,
                "latency_us": percentiles([]), "mean_us": None, "max_us": None, "errors": {}, "samples": 0}
    lat = np.concatenate([w.latencies_us for w in windows])
    seconds = sum(w.seconds for w in windows)
    errs: dict[str, int] = {}
    for w in windows:
        for c, n in w.errors.items():
            errs[c] = errs.get(c, 0) + n
    completed = int(lat.size) + sum(errs.values())
    return {
        "seconds": round(seconds, 6),
        "completed": completed,
        "ok": int(lat.size),
        "throughput": completed / seconds if seconds > 0 else 0.0,
        "ok_throughput": lat.size / seconds if seconds > 0 else 0.0,
        "latency_us": percentiles(lat),
        "mean_us": float(lat.mean()) if lat.size else None,
        "max_us": float(lat.max()) if lat.size else None,
        "errors": dict(sorted(errs.items())),
        "samples": int(lat.size),
    }


def poisson_schedule(rate: float, duration_s: float, seed: int = 0, limit: int = MAX_SCHEDULE) -> np.ndarray:
    """Intended send times (seconds from 0, increasing, all < duration_s) of a Poisson process of
    `rate` requests per second, drawn in advance."""
    if not (rate > 0 and math.isfinite(rate)):
        raise errors.ConfigError(f"rate must be > 0 requests/s, got {rate!r}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise errors.ConfigError(f"duration must be > 0 seconds, got {duration_s!r}")
    expected = rate * duration_s
    if expected > limit:
        raise errors.ConfigError(f"rate {rate:g}/s for {duration_s:g} s is {expected:.0f} arrivals, over the "
                                 f"limit of {limit} per schedule")
    rng = np.random.default_rng(seed)
    n = int(expected + 6 * math.sqrt(expected) + 16)  # enough gaps with overwhelming probability
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while t[-1] < duration_s:  # never in practice; bounded by the limit above
        more = t[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))
        t = np.concatenate([t, more])
        if t.size > 2 * limit:
            raise errors.ConfigError(f"Poisson schedule exceeded {2 * limit} arrivals")
    return t[t < duration_s]


def log_histogram(latencies_us, lo_us: float = 1.0, hi_us: float = 1e8, per_decade: int = 20) -> dict:
    """Counts in log-spaced buckets (edges in microseconds): a compact latency distribution for JSON."""
    a = np.asarray(latencies_us, dtype=np.float64).reshape(-1)
    edges = np.logspace(math.log10(lo_us), math.log10(hi_us), int(round(math.log10(hi_us / lo_us) * per_decade)) + 1)
    counts, _ = np.histogram(np.clip(a, lo_us, hi_us * 0.999999), bins=edges)
    nz = np.nonzero(counts)[0]
    if nz.size == 0:
        return {"edges_us": [], "counts": []}
    a0, a1 = nz[0], nz[-1] + 1
    return {"edges_us": [round(float(e), 3) for e in edges[a0:a1 + 1]], "counts": [int(c) for c in counts[a0:a1]]}


def merge_errors(parts: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for c, n in p.items():
            out[c] = out.get(c, 0) + n
    return dict(sorted(out.items()))
