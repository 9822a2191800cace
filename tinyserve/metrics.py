"""Per-model statistics: counters, log-bucketed latency histograms, throughput (docs/health.md).

The hot path is `Recorder.record(code, queue_ns, compute_ns, total_ns)`: a few integer operations and
list increments, no lock, no allocation on success (bench/bench_stats.py measures it).  Counts stay
exact under concurrent recording because every recording thread writes only its own `Recorder`
(`ModelStats.recorder()` hands each thread its own); readers merge the recorders.  A reader running
while a thread records may see that one request half counted (its total histogram but not yet its
queue histogram, say); counts are never lost or double counted.

    stats = Metrics(clock=time.monotonic)           # the server's registry
    ms = stats.model("mlp", 1)                      # get or create (name, version)
    rec = ms.recorder()                             # this thread's recorder (cache it per thread)
    rec.admitted(n)                                 # n requests handed to the model's queue
    rec.dequeued(n)                                 # the worker took n requests off the queue
    rec.batch(n)                                    # n requests ran in one model call
    rec.record("OK", queue_ns, compute_ns, total_ns)            # an admitted request answered
    rec.record("MODEL_ERROR", q, c, t, message="...")           # ... with an error
    rec.reject("INVALID_INPUT", message="...")                  # refused before admission
    ms.record_load(seconds, ok=True); ms.set_resident(nbytes)   # loads (loop thread)
    ms.to_dict(now); stats.to_dict(name=None, now=None)        # the `stats` op's fields

Histograms count microseconds (nanoseconds floored to whole microseconds) in log-linear buckets: 16
exact buckets for 0..15 us, then 8 buckets per power of two (each at most 1/8 = 12.5% of its lower
edge wide).  Every power of two is a bucket edge, so the Prometheus buckets (`le` = 2^k us) are exact
sums of these buckets.  Percentiles report the inclusive upper edge of the bucket holding the rank
(never below the true value, at most 12.5% above it), capped at the largest value recorded.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from tinyserve import errors

__all__ = ["Histogram", "Metrics", "ModelStats", "OK", "Recorder", "Snapshot", "Throughput", "batch_summary",
           "bucket_index", "bucket_upper"]

OK = "OK"
SUB = 3  # 2**SUB buckets per power of two
NBUCKETS = (64 << SUB) + 1  # buckets 0..511 hold 0..2**66-1; the last one every larger value (clamped)
_TOP = NBUCKETS - 1
_CLAMP = (1 << 66)  # values at or above this are counted in the top bucket
MAX_BATCH = 1 << 20  # batch sizes above are counted as this
MAX_MESSAGE = 512  # characters of an error message kept as `last_error`
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def bucket_index(v: int) -> int:
    """The bucket of a non-negative integer (negative values count as 0; huge ones in the top bucket)."""
    if v < 0:
        return 0
    if v >= _CLAMP:
        return _TOP
    k = v.bit_length()
    if k <= SUB + 1:
        return v
    return ((k - SUB) << SUB) + ((v >> (k - SUB - 1)) & ((1 << SUB) - 1))


def bucket_upper(idx: int) -> int:
    """The largest value that `bucket_index` maps to bucket idx (the bucket's inclusive upper edge)."""
    if idx < (1 << (SUB + 1)):
        return idx
    k = (idx >> SUB) + SUB
    sub = idx & ((1 << SUB) - 1)
    return (((1 << SUB) + sub + 1) << (k - SUB - 1)) - 1


_TABLE_N = 1 << 15  # values below are looked up in _TABLE (32768 small ints: 256 KiB of pointers)
_TABLE = [bucket_index(v) for v in range(_TABLE_N)]
_slow_index = bucket_index


class Histogram:
    """A mergeable log-linear histogram of non-negative integers (microseconds, or batch sizes).

    `counts[i]` counts values in bucket i; `n` values in all; `total` their exact sum in the unit the
    caller chose (nanoseconds for latencies: see Recorder); `max` the largest value counted."""

    __slots__ = ("counts", "n", "total", "max")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.n = 0
        self.total = 0
        self.max = 0

    def add(self, v: int, amount: int | None = None) -> None:
        """Count one value; `total` grows by `amount` (default v: a latency counted in us may add
        its exact ns).  Not the hot path: Recorder inlines this."""
        if v < 0:
            v = 0
        self.counts[bucket_index(v)] += 1
        self.n += 1
        self.total += v if amount is None else amount
        if v > self.max:
            self.max = v

    def merge(self, other: "Histogram") -> "Histogram":
        """Add other's counts into this histogram (in place); returns self."""
        counts = self.counts
        for i, c in enumerate(list(other.counts)):  # list(): one atomic copy under the GIL
            if c:
                counts[i] += c
        self.n += other.n
        self.total += other.total
        if other.max > self.max:
            self.max = other.max
        return self

    @classmethod
    def merged(cls, hists: Iterable["Histogram"]) -> "Histogram":
        out = cls()
        for h in hists:
            out.merge(h)
        return out

    def quantile(self, q: float) -> int:
        """The upper edge of the bucket holding the value of rank ceil(q * n) (0 when empty), capped
        at `max`."""
        if not 0.0 <= q <= 1.0:
            raise errors.ConfigError(f"quantile must be in 0..1, got {q!r}")
        n = sum(self.counts)  # the buckets themselves (n may run ahead during a concurrent write)
        if not n:
            return 0
        rank = max(1, math.ceil(round(q * n, 9)))  # round: 0.9 * 10 is 9.000000000000002
        seen = 0
        for idx, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(bucket_upper(idx), self.max)
        return self.max

    def percentiles(self) -> dict:
        """{"p50", "p90", "p99", "max"} (0 when empty)."""
        out = {name: self.quantile(q) for name, q in PERCENTILES}
        out["max"] = self.max
        return out

    def cumulative(self, edges: Iterable[int]) -> list[int]:
        """For each edge e (ascending, each a bucket's upper edge + 1, e.g. a power of two >= 16): how
        many values are < e.  Exact because each such e is a bucket boundary."""
        out = []
        counts = self.counts
        idx = acc = 0
        for e in edges:
            stop = bucket_index(e)  # the first bucket at or above e: everything before it is < e
            while idx < stop:
                acc += counts[idx]
                idx += 1
            out.append(acc)
        return out


class Recorder:
    """One thread's counters for one model version.  Only its own thread writes it (not locked)."""

    __slots__ = ("owner", "thread", "requests", "successes", "errors", "admits", "dequeues",
                 "q_counts", "q_sum", "q_max", "c_counts", "c_sum", "c_max", "t_counts", "t_sum", "t_max",
                 "batches", "last_error")

    def __init__(self, owner: object = None, thread: threading.Thread | None = None) -> None:
        self.owner = owner
        self.thread = thread
        self.requests = 0  # answered: successes + errors (admitted or rejected)
        self.successes = 0
        self.errors: dict[str, int] = {}
        self.admits = 0
        self.dequeues = 0
        self.q_counts = [0] * NBUCKETS
        self.c_counts = [0] * NBUCKETS
        self.t_counts = [0] * NBUCKETS
        self.q_sum = self.c_sum = self.t_sum = 0
        self.q_max = self.c_max = self.t_max = 0
        self.batches: dict[int, int] = {}  # batch size -> model calls (exact: sizes are few)
        self.last_error: tuple | None = None  # (unix time, code, message)

    # --- the hot path -------------------------------------------------------------------------------
    def record(self, code: str, queue_ns: int, compute_ns: int, total_ns: int, message: str | None = None) -> None:
        """An admitted request was answered with `code` ("OK" for success).  The three durations are
        integer nanoseconds: waiting in the queue, running (pre/post-processing and the model), and
        from reading the request to queuing its reply."""
        self.requests += 1
        if code == "OK":
            self.successes += 1
        else:
            self._error(code, message)
        # three inlined bucket look-ups: a table for 0..32767 us, else bucket_index's arithmetic
        # (a function call each would cost more than the rest)
        table = _TABLE
        v = queue_ns // 1000
        if 0 <= v < _TABLE_N:
            self.q_counts[table[v]] += 1
        else:
            self.q_counts[_slow_index(v)] += 1
        if v > self.q_max:
            self.q_max = v
        self.q_sum += queue_ns
        v = compute_ns // 1000
        if 0 <= v < _TABLE_N:
            self.c_counts[table[v]] += 1
        else:
            self.c_counts[_slow_index(v)] += 1
        if v > self.c_max:
            self.c_max = v
        self.c_sum += compute_ns
        v = total_ns // 1000
        if 0 <= v < _TABLE_N:
            self.t_counts[table[v]] += 1
        else:
            self.t_counts[_slow_index(v)] += 1
        if v > self.t_max:
            self.t_max = v
        self.t_sum += total_ns

    def _error(self, code: str, message: str | None) -> None:
        if type(code) is not str or not code:
            code = "INTERNAL"
        errs = self.errors
        errs[code] = errs.get(code, 0) + 1
        if message is None:
            message = ""
        elif type(message) is not str:
            message = str(message)
        self.last_error = (time.time(), code, message[:MAX_MESSAGE])

    def reject(self, code: str, message: str | None = None) -> None:
        """A request for this model refused before it was admitted (INVALID_INPUT, UNAVAILABLE ...):
        counted as a request and an error, with no latency."""
        self.requests += 1
        self._error(code, message)

    def admitted(self, n: int = 1) -> None:
        """n requests were handed to the model's queue (in flight until record() answers them)."""
        self.admits += n

    def dequeued(self, n: int = 1) -> None:
        """The worker took n requests off the queue (they no longer count in the queue depth)."""
        self.dequeues += n

    def batch(self, n: int) -> None:
        """n requests ran in one model call (the batch-size histogram; sizes above MAX_BATCH count
        as MAX_BATCH)."""
        if type(n) is not int or n < 0:
            n = 0
        elif n > MAX_BATCH:
            n = MAX_BATCH
        b = self.batches
        b[n] = b.get(n, 0) + 1

    # --- reading ------------------------------------------------------------------------------------
    def _hist(self, which: str) -> Histogram:
        h = Histogram()
        h.counts = list(getattr(self, which + "_counts"))
        h.n = sum(h.counts)
        h.total = getattr(self, which + "_sum")
        h.max = getattr(self, which + "_max")
        return h


def batch_summary(sizes: dict) -> dict:
    """{"p50", "p90", "p99", "max", "mean", "batches"} of a {batch size: calls} map (exact)."""
    n = sum(sizes.values())
    out = {"p50": 0, "p90": 0, "p99": 0, "max": max(sizes, default=0), "mean": 0.0, "batches": n}
    if not n:
        return out
    items = sorted(sizes.items())
    for name, q in PERCENTILES:
        rank = max(1, math.ceil(round(q * n, 9)))
        seen = 0
        for size, c in items:
            seen += c
            if seen >= rank:
                out[name] = size
                break
    out["mean"] = round(sum(s * c for s, c in items) / n, 3)
    return out


class Snapshot:
    """Merged, read-only statistics of one model version (or of several, merged)."""

    __slots__ = ("requests", "successes", "errors", "in_flight", "queue_depth", "queue", "compute", "total",
                 "batch", "loads", "load_failures", "load_s", "last_load_s", "resident_bytes", "last_error",
                 "throughput_rps", "admits", "dequeues")

    def __init__(self) -> None:
        self.requests = self.successes = self.in_flight = self.queue_depth = 0
        self.admits = self.dequeues = 0
        self.errors: dict[str, int] = {}
        self.queue, self.compute, self.total = Histogram(), Histogram(), Histogram()
        self.batch: dict[int, int] = {}  # batch size -> model calls
        self.loads = self.load_failures = 0
        self.load_s = self.last_load_s = 0.0
        self.resident_bytes = 0
        self.last_error: tuple | None = None
        self.throughput_rps = 0.0

    def merge(self, other: "Snapshot") -> "Snapshot":
        self.requests += other.requests
        self.successes += other.successes
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.in_flight += other.in_flight
        self.queue_depth += other.queue_depth
        self.admits += other.admits
        self.dequeues += other.dequeues
        for name in ("queue", "compute", "total"):
            getattr(self, name).merge(getattr(other, name))
        for size, n in other.batch.items():
            self.batch[size] = self.batch.get(size, 0) + n
        self.loads += other.loads
        self.load_failures += other.load_failures
        self.load_s += other.load_s
        self.last_load_s = other.last_load_s or self.last_load_s
        self.resident_bytes += other.resident_bytes
        if other.last_error is not None and (self.last_error is None or other.last_error[0] >= self.last_error[0]):
            self.last_error = other.last_error
        self.throughput_rps += other.throughput_rps
        return self

    def to_dict(self) -> dict:
        """The fields of one model in the `stats` op (docs/health.md section 2)."""
        le = self.last_error
        return {
            "requests": self.requests,
            "successes": self.successes,
            "errors": dict(sorted(self.errors.items())),
            "in_flight": self.in_flight,
            "queue_depth": self.queue_depth,
            "latency_us": self.total.percentiles(),
            "queue_us": self.queue.percentiles(),
            "compute_us": self.compute.percentiles(),
            "batch_size": batch_summary(self.batch),
            "throughput_rps": round(self.throughput_rps, 3),
            "loads": self.loads,
            "load_failures": self.load_failures,
            "load_s": round(self.load_s, 6),
            "last_load_s": round(self.last_load_s, 6),
            "resident_bytes": self.resident_bytes,
            "last_error": None if le is None else {"time": round(le[0], 3), "code": le[1], "message": le[2]},
        }


class Throughput:
    """Completed requests per second over a sliding window, from samples of a cumulative count.

    `sample(count, now)` keeps (now, count) at most once per `resolution_s` and forgets samples older
    than `window_s`; `rate(count, now)` = (count - the oldest kept count) / (now - its time).  Nothing
    runs per request: the count is the recorders' cumulative total, read when sampled."""

    __slots__ = ("window_s", "resolution_s", "_samples", "_lock")

    def __init__(self, window_s: float = 60.0, resolution_s: float = 1.0, now: float = 0.0, count: int = 0) -> None:
        for name, v in (("window_s", window_s), ("resolution_s", resolution_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 86400:
                raise errors.ConfigError(f"throughput {name} must be a number in (0, 86400], got {v!r}")
        if resolution_s > window_s:
            raise errors.ConfigError(f"throughput resolution_s ({resolution_s}) must not exceed window_s ({window_s})")
        self.window_s = float(window_s)
        self.resolution_s = float(resolution_s)
        self._samples: deque = deque([(now, count)])
        self._lock = threading.Lock()  # readers on several threads (stats op, a /metrics scrape)

    def sample(self, count: int, now: float) -> None:
        with self._lock:
            self._sample(count, now)

    def _sample(self, count: int, now: float) -> None:
        s = self._samples
        if now - s[-1][0] >= self.resolution_s or now < s[-1][0]:
            if now < s[-1][0]:  # the clock went back (it should not): start afresh
                s.clear()
            s.append((now, count))
        horizon = now - self.window_s
        while len(s) > 1 and s[1][0] <= horizon:  # keep the newest sample at or before the horizon
            s.popleft()

    def rate(self, count: int, now: float) -> float:
        with self._lock:
            self._sample(count, now)
            t0, c0 = self._samples[0]
        dt = now - t0
        if dt <= 0:
            return 0.0
        return max(0, count - c0) / dt


class ModelStats:
    """The statistics of one model version: one Recorder per recording thread, merged on read."""

    def __init__(self, name: str, version: int, *, clock: Callable[[], float] = time.monotonic,
                 window_s: float = 60.0, resolution_s: float = 1.0) -> None:
        self.name = name
        self.version = version
        self._clock = clock
        self._lock = threading.Lock()  # guards the list of recorders (not the counts)
        self._recorders: list[Recorder] = []
        self._retired = Recorder(self)  # the counts of recorders whose thread has ended
        self._local = threading.local()
        self._throughput = Throughput(window_s, resolution_s, clock(), 0)
        self.loads = 0
        self.load_failures = 0
        self.load_s = 0.0
        self.last_load_s = 0.0
        self.resident_bytes = 0

    def __repr__(self) -> str:
        return f"<ModelStats {self.name}:{self.version}>"

    def recorder(self) -> Recorder:
        """The calling thread's Recorder (created on first use)."""
        try:
            return self._local.rec
        except AttributeError:
            rec = Recorder(self, threading.current_thread())
            with self._lock:
                self._recorders.append(rec)
            self._local.rec = rec
            return rec

    # conveniences for callers that do not keep the recorder (a threading.local look-up more)
    def record(self, code: str, queue_ns: int, compute_ns: int, total_ns: int, message: str | None = None) -> None:
        self.recorder().record(code, queue_ns, compute_ns, total_ns, message)

    def reject(self, code: str, message: str | None = None) -> None:
        self.recorder().reject(code, message)

    # --- loop-thread events (rare) --------------------------------------------------------------------
    def record_load(self, seconds: float, ok: bool = True) -> None:
        """A load of this version finished (ok) or failed after `seconds`."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            seconds = 0.0
        self.loads += 1
        if not ok:
            self.load_failures += 1
        self.load_s += seconds
        self.last_load_s = float(seconds)

    def set_resident(self, nbytes: int) -> None:
        """Bytes of this version's weights in memory now (0 once unloaded)."""
        self.resident_bytes = nbytes if isinstance(nbytes, int) and nbytes > 0 else 0

    # --- reading -----------------------------------------------------------------------------------------
    def _fold_dead(self) -> list[Recorder]:
        """Fold the recorders of ended threads into `_retired` (they are written no more); returns the
        live ones."""
        with self._lock:
            live, dead = [], []
            for r in self._recorders:
                (live if r.thread is None or r.thread.is_alive() else dead).append(r)
            if dead:
                self._recorders = live
                base = self._retired
                for r in dead:
                    _fold(base, r)
            return live

    def snapshot(self, now: float | None = None) -> Snapshot:
        recs = [self._retired] + self._fold_dead()
        s = Snapshot()
        for r in recs:
            s.requests += r.requests
            s.successes += r.successes
            for code, n in dict(r.errors).items():  # dict(): one atomic copy under the GIL
                s.errors[code] = s.errors.get(code, 0) + n
            s.admits += r.admits
            s.dequeues += r.dequeues
            s.queue.merge(r._hist("q"))
            s.compute.merge(r._hist("c"))
            s.total.merge(r._hist("t"))
            for size, n in dict(r.batches).items():
                s.batch[size] = s.batch.get(size, 0) + n
            le = r.last_error
            if le is not None and (s.last_error is None or le[0] >= s.last_error[0]):
                s.last_error = le
        completed = s.total.n  # admitted requests answered (rejections have no latency)
        s.in_flight = max(0, s.admits - completed)
        s.queue_depth = max(0, s.admits - s.dequeues)
        s.loads, s.load_failures, s.load_s, s.last_load_s = self.loads, self.load_failures, self.load_s, self.last_load_s
        s.resident_bytes = self.resident_bytes
        s.throughput_rps = self._throughput.rate(completed, self._clock() if now is None else now)
        return s

    def tick(self, now: float | None = None) -> None:
        """Take a throughput sample (the server calls this about once a second; reads sample too)."""
        self.snapshot(now)

    def to_dict(self, now: float | None = None) -> dict:
        return {"version": self.version, **self.snapshot(now).to_dict()}


def _fold(base: Recorder, r: Recorder) -> None:
    base.requests += r.requests
    base.successes += r.successes
    for code, n in r.errors.items():
        base.errors[code] = base.errors.get(code, 0) + n
    base.admits += r.admits
    base.dequeues += r.dequeues
    for size, n in r.batches.items():
        base.batches[size] = base.batches.get(size, 0) + n
    for w in ("q", "c", "t"):
        bc, rc = getattr(base, w + "_counts"), getattr(r, w + "_counts")
        for i, c in enumerate(rc):
            if c:
                bc[i] += c
        setattr(base, w + "_sum", getattr(base, w + "_sum") + getattr(r, w + "_sum"))
        setattr(base, w + "_max", max(getattr(base, w + "_max"), getattr(r, w + "_max")))
    if r.last_error is not None and (base.last_error is None or r.last_error[0] >= base.last_error[0]):
        base.last_error = r.last_error


class Metrics:
    """The registry of per-model-version statistics (created and mutated on the loop thread; read
    from any thread)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window_s: float = 60.0,
                 resolution_s: float = 1.0) -> None:
        Throughput(window_s, resolution_s)  # validates
        self._clock = clock
        self._window_s = window_s
        self._resolution_s = resolution_s
        self._models: dict[tuple[str, int], ModelStats] = {}

    def model(self, name: str, version: int) -> ModelStats:
        """The statistics of (name, version), created on first use (kept after an unload: counters
        only grow)."""
        key = (name, version)
        ms = self._models.get(key)
        if ms is None:
            if type(name) is not str or not name:
                raise errors.ConfigError(f"metrics: model name must be a non-empty string, got {name!r}")
            if type(version) is not int or version < 0:
                raise errors.ConfigError(f"metrics: model version must be an integer >= 0, got {version!r}")
            ms = self._models[key] = ModelStats(name, version, clock=self._clock, window_s=self._window_s,
                                                resolution_s=self._resolution_s)
        return ms

    def get(self, name: str, version: int) -> ModelStats | None:
        return self._models.get((name, version))

    def models(self) -> list[ModelStats]:
        """Every model version's statistics, sorted by (name, version)."""
        return [ms for _, ms in sorted(list(self._models.items()), key=lambda kv: kv[0])]

    def names(self) -> list[str]:
        return sorted({name for name, _ in list(self._models)})

    def tick(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        for ms in self.models():
            ms.tick(now)

    def model_dict(self, name: str, now: float | None = None) -> dict | None:
        """One model's fields for the `stats` op: the versions merged at the top level, and each
        version under `versions` (a list; a version is a value, never a map key)."""
        now = self._clock() if now is None else now
        versions = [ms for ms in self.models() if ms.name == name]
        if not versions:
            return None
        merged = Snapshot()
        per = []
        for ms in versions:
            snap = ms.snapshot(now)
            merged.merge(snap)
            per.append({"version": ms.version, **snap.to_dict()})
        out = merged.to_dict()
        out["last_load_s"] = per[-1]["last_load_s"]
        out["versions"] = per
        return out

    def to_dict(self, name: str | None = None, now: float | None = None) -> dict:
        """{"models": {name: model_dict}} for every model (or the one named)."""
        now = self._clock() if now is None else now
        names = self.names() if name is None else [name]
        out = {}
        for n in names:
            d = self.model_dict(n, now)
            if d is not None:
                out[n] = d
        return {"models": out}
