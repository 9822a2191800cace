"""Ejection of failing models, in the manner of Envoy's outlier detection (docs/health.md section 3).

A pure state machine on an injected clock: every method takes `now` (seconds, any monotonic origin)
and nothing here reads a clock, sleeps or starts a thread.  The server owns one `EjectionPolicy`, calls
`admit(key, now)` before queuing a request and `record(key, ok, code, now)` when it is answered; `key`
is whatever identifies a model to the server (the server uses (name, version)).

States of a key:

    SERVING  -- failures pass a threshold -->  EJECTED (back-off)
    EJECTED  -- back-off over, next admit() --> PROBING (that one request is the probe)
    PROBING  -- probe succeeds --> SERVING ("readmit");  probe fails --> EJECTED, longer back-off
    EJECTED  -- ejected `fail_after` times within `fail_window_s`, not pinned --> FAILED ("fail")

FAILED is final until `reset(key)` (an operator loads the model again, or a new version arrives).
`record` and `mark_failed` return a `Transition` when the state changes, for logs and health.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from tinyserve import errors

__all__ = ["EJECTED", "FAILED", "FAILURE_CODES", "PROBING", "SERVING", "EjectionConfig", "EjectionPolicy",
           "ModelState", "Transition"]

SERVING, EJECTED, PROBING, FAILED = "SERVING", "EJECTED", "PROBING", "FAILED"

# Wire codes that count against the model.  Every other code is the client's doing or the server's
# policy (INVALID_INPUT, BAD_REQUEST, DEADLINE_EXCEEDED, UNAVAILABLE, TOO_MANY_REQUESTS, SHUTTING_DOWN,
# NOT_FOUND, DUPLICATE_ID, UNAUTHENTICATED, BAD_FRAME, FRAME_TOO_LARGE) and is neutral: it neither
# resets the consecutive-failure count nor enters the error rate.
FAILURE_CODES = frozenset({"MODEL_ERROR", "INTERNAL"})
RECENT_ERRORS = 5  # failures kept per key for reports
_SLOTS = 10  # the error-rate window is kept as this many time slots


def _number(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or value > hi or value < lo or (lo_open and value == lo):
        raise errors.ConfigError(f"ejection {name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], "
                                 f"got {value!r}")


def _integer(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise errors.ConfigError(f"ejection {name} must be an integer {lo}..{hi}, got {value!r}")


@dataclass(frozen=True)
class EjectionConfig:
    """Thresholds (defaults in docs/health.md section 3).  0 disables a threshold."""

    consecutive_failures: int = 5  # this many failures in a row -> eject (0: off)
    error_rate: float = 0.5  # failures / (failures + successes) over the window at or above -> eject (0: off)
    error_rate_window_s: float = 30.0
    error_rate_min_requests: int = 20  # the rate counts only once the window holds this many answers
    base_ejection_s: float = 5.0  # first back-off
    backoff_factor: float = 2.0  # each further ejection within fail_window_s multiplies the back-off
    max_ejection_s: float = 300.0
    probe_timeout_s: float = 30.0  # a probe not answered within this lets another probe through
    fail_after: int = 5  # ejections within fail_window_s -> FAILED (0: never)
    fail_window_s: float = 600.0
    failure_codes: frozenset = FAILURE_CODES

    def __post_init__(self) -> None:
        _integer("consecutive_failures", self.consecutive_failures, 0, 1 << 20)
        _number("error_rate", self.error_rate, 0.0, 1.0)
        _number("error_rate_window_s", self.error_rate_window_s, 0.0, 86400.0, lo_open=True)
        _integer("error_rate_min_requests", self.error_rate_min_requests, 1, 1 << 30)
        _number("base_ejection_s", self.base_ejection_s, 0.0, 86400.0, lo_open=True)
        _number("backoff_factor", self.backoff_factor, 1.0, 100.0)
        _number("max_ejection_s", self.max_ejection_s, 0.0, 86400.0 * 7, lo_open=True)
        if self.max_ejection_s < self.base_ejection_s:
            raise errors.ConfigError(f"ejection max_ejection_s ({self.max_ejection_s}) must be >= "
                                     f"base_ejection_s ({self.base_ejection_s})")
        _number("probe_timeout_s", self.probe_timeout_s, 0.0, 86400.0, lo_open=True)
        _integer("fail_after", self.fail_after, 0, 1 << 20)
        _number("fail_window_s", self.fail_window_s, 0.0, 86400.0 * 7, lo_open=True)
        codes = self.failure_codes
        if isinstance(codes, str) or not isinstance(codes, Iterable):
            raise errors.ConfigError(f"ejection failure_codes must be a set of wire codes, got {codes!r}")
        codes = frozenset(codes)
        if not codes or not all(isinstance(c, str) and c.isupper() and c.replace("_", "").isalpha() for c in codes):
            raise errors.ConfigError(f"ejection failure_codes must be non-empty upper-case wire codes, got "
                                     f"{sorted(map(repr, codes))}")
        object.__setattr__(self, "failure_codes", codes)

    def backoff(self, ejections: int) -> float:
        """The back-off of the n-th ejection (1-based) within fail_window_s."""
        n = max(1, ejections)
        try:
            s = self.base_ejection_s * self.backoff_factor ** (n - 1)
        except OverflowError:
            return self.max_ejection_s
        return min(s, self.max_ejection_s)


@dataclass(frozen=True)
class Transition:
    """A change of state: kind is "eject", "readmit" or "fail"."""

    key: Hashable
    kind: str
    state: str
    reason: str
    until: float | None = None  # EJECTED: when the next probe may go
    ejections: int = 0  # ejections within fail_window_s, this one included
    recent_errors: tuple = ()  # (now, code, message) of the last failures


@dataclass
class ModelState:
    """What the policy knows of one key (read with `EjectionPolicy.state`; do not mutate)."""

    state: str = SERVING
    reason: str = ""
    consecutive: int = 0
    until: float = 0.0  # EJECTED: end of the back-off
    probe_since: float | None = None  # PROBING: when the probe was admitted (None: no probe out)
    ejection_times: deque = field(default_factory=deque)
    slots: deque = field(default_factory=deque)  # [slot number, successes, failures] of past slots
    cur_slot: float = float("-inf")  # the current slot (now // slot width; -inf: none) and its counts
    cur_ok: int = 0
    cur_fail: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))
    ejections_total: int = 0
    pinned: bool = False

    def to_dict(self, now: float) -> dict:
        out = {"state": self.state, "reason": self.reason, "consecutive_failures": self.consecutive,
               "ejections_total": self.ejections_total, "pinned": self.pinned,
               "recent_errors": [{"code": c, "message": m, "age_s": round(max(0.0, now - t), 3)}
                                 for t, c, m in self.recent]}
        if self.state == EJECTED:
            out["probe_in_s"] = round(max(0.0, self.until - now), 3)
        return out


class EjectionPolicy:
    """See the module docstring.  Not thread-safe: call it from one thread (the event loop)."""

    def __init__(self, config: EjectionConfig | None = None, *, pinned: Iterable[Hashable] = ()) -> None:
        if config is None:
            config = EjectionConfig()
        if not isinstance(config, EjectionConfig):
            raise errors.ConfigError(f"EjectionPolicy needs an EjectionConfig, got {type(config).__name__}")
        self.config = config
        self._states: dict[Hashable, ModelState] = {}
        self._pinned = set(pinned)
        self._slot_s = config.error_rate_window_s / _SLOTS
        self._rate = config.error_rate > 0

    # --- queries ---------------------------------------------------------------------------------------
    def state(self, key: Hashable) -> str:
        st = self._states.get(key)
        return SERVING if st is None else st.state

    def info(self, key: Hashable) -> ModelState | None:
        return self._states.get(key)

    def states(self) -> list[tuple[Hashable, ModelState]]:
        """Every key the policy has seen (a copy of the list; safe to read from another thread)."""
        return list(self._states.items())

    def is_serving(self, key: Hashable) -> bool:
        return self.state(key) == SERVING

    # --- operator actions ------------------------------------------------------------------------------
    def pin(self, key: Hashable, pinned: bool = True) -> None:
        """A pinned key is ejected like any other but never FAILED (never unloaded)."""
        if pinned:
            self._pinned.add(key)
        else:
            self._pinned.discard(key)
        st = self._states.get(key)
        if st is not None:
            st.pinned = pinned

    def reset(self, key: Hashable) -> None:
        """Forget a key (an operator loaded it again, a new version arrived, it was unloaded)."""
        self._states.pop(key, None)

    def mark_failed(self, key: Hashable, reason: str, now: float) -> Transition:
        """Take a key out of service at once (its device is lost, its context poisoned): FAILED,
        or EJECTED for the longest back-off when pinned."""
        st = self._get(key)
        st.recent.append((now, "DEVICE_FAULT", reason))
        return self._eject(key, st, now, reason, force_fail=True)

    # --- the request path ------------------------------------------------------------------------------
    def admit(self, key: Hashable, now: float) -> str | None:
        """None: send the request.  Else the reason it must get UNAVAILABLE now."""
        st = self._states.get(key)
        if st is None or st.state == SERVING:
            return None
        if st.state == EJECTED:
            if now >= st.until:
                st.state = PROBING
                st.probe_since = now
                return None  # this request is the probe
            return f"{st.reason}; next probe in {st.until - now:.1f} s"
        if st.state == PROBING:
            if st.probe_since is None or now - st.probe_since >= self.config.probe_timeout_s:
                st.probe_since = now  # the last probe was neutral, or its answer never came
                return None
            return f"{st.reason}; a probe request is in flight"
        return st.reason  # FAILED

    def serving(self, key: Hashable) -> bool:
        """True when `admit(key, ...)` would let a request through without changing anything (the
        key is serving): a read the server makes without its policy lock before taking it."""
        st = self._states.get(key)
        return st is None or st.state is SERVING

    def record_success_fast(self, key: Hashable, now: float) -> bool:
        """The hot path of `record(key, True, "OK", now)` for a serving key: True when done (nothing
        changes state), False when the caller must call `record` (under its lock).  The server calls
        this without its policy lock from the one worker thread that serves `key`: it only resets the
        consecutive-failure count and counts a success in the error-rate window, so a concurrent
        locked `record` of the same key can at worst lose that one success from the window."""
        st = self._states.get(key)
        if st is None:
            return not self._rate_on()
        if st.state is not SERVING:
            return False
        st.consecutive = 0
        if self._rate:
            slot = now // self._slot_s
            if slot == st.cur_slot:
                st.cur_ok += 1
            else:
                return False  # rolling the window: the locked path
        return True

    def record(self, key: Hashable, ok: bool, code: str, now: float, message: str = "") -> Transition | None:
        """A request to `key` was answered (ok, or an error with its wire `code`)."""
        st = self._states.get(key)
        if ok and st is not None and st.state is SERVING:  # the hot path: a success of a serving model
            st.consecutive = 0
            if self._rate:
                slot = now // self._slot_s
                if slot == st.cur_slot:
                    st.cur_ok += 1
                else:
                    self._roll(st, slot, 1, 0)
            return None
        failed = not ok and code in self.config.failure_codes
        if st is None:
            if not failed and not self._rate_on():
                return None  # the common case: nothing to keep
            st = self._get(key)
        if st.state == SERVING:
            if ok:
                st.consecutive = 0
                self._count(st, now, 0)
                return None  # (a key's first answer: later successes take the hot path above)
            if not failed:
                return None
            st.consecutive += 1
            st.recent.append((now, code, str(message)[:512]))
            self._count(st, now, 1)
            cfg = self.config
            if cfg.consecutive_failures and st.consecutive >= cfg.consecutive_failures:
                return self._eject(key, st, now, f"{st.consecutive} consecutive failures (last: {code}: "
                                                 f"{_short(message)})")
            if cfg.error_rate > 0:
                ok_n, fail_n = self._window(st, now)
                total = ok_n + fail_n
                if total >= cfg.error_rate_min_requests and fail_n >= cfg.error_rate * total:
                    return self._eject(key, st, now, f"error rate {fail_n}/{total} = {fail_n / total:.0%} over "
                                                     f"{cfg.error_rate_window_s:g} s >= {cfg.error_rate:.0%} "
                                                     f"(last: {code}: {_short(message)})")
            return None
        if st.state == PROBING and st.probe_since is not None:
            if ok:
                st.state = SERVING
                st.consecutive = 0
                self._clear_window(st)
                st.probe_since = None
                was = st.reason
                st.reason = ""
                return Transition(key, "readmit", SERVING, f"probe succeeded after: {was}",
                                  ejections=len(st.ejection_times))
            if failed:
                st.recent.append((now, code, str(message)[:512]))
                return self._eject(key, st, now, f"probe failed: {code}: {_short(message)}")
            st.probe_since = None  # neutral: the next admit sends another probe
            return None
        return None  # EJECTED / FAILED: answers of requests admitted before the ejection

    # --- internals ---------------------------------------------------------------------------------------
    def _rate_on(self) -> bool:
        return self._rate

    def _get(self, key: Hashable) -> ModelState:
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = ModelState(pinned=key in self._pinned)
        return st

    def _count(self, st: ModelState, now: float, failed: int) -> None:
        if not self._rate:
            return
        slot = now // self._slot_s
        if slot == st.cur_slot:
            if failed:
                st.cur_fail += 1
            else:
                st.cur_ok += 1
        else:
            self._roll(st, slot, 1 - failed, failed)

    def _roll(self, st: ModelState, slot: float, ok_n: int, fail_n: int) -> None:
        """Start slot `slot` with these counts; keep the past slots still inside the window."""
        slots = st.slots
        if st.cur_ok or st.cur_fail:
            slots.append((st.cur_slot, st.cur_ok, st.cur_fail))
        st.cur_slot, st.cur_ok, st.cur_fail = slot, ok_n, fail_n
        while slots and slots[0][0] <= slot - _SLOTS:
            slots.popleft()

    def _clear_window(self, st: ModelState) -> None:
        st.slots.clear()
        st.cur_slot, st.cur_ok, st.cur_fail = float("-inf"), 0, 0

    def _window(self, st: ModelState, now: float) -> tuple[int, int]:
        """(successes, failures) over the last _SLOTS slots, the current one included."""
        oldest = now // self._slot_s - _SLOTS + 1
        ok_n = fail_n = 0
        if st.cur_slot >= oldest:
            ok_n, fail_n = st.cur_ok, st.cur_fail
        for slot, s, f in st.slots:
            if slot >= oldest:
                ok_n += s
                fail_n += f
        return ok_n, fail_n

    def _eject(self, key: Hashable, st: ModelState, now: float, why: str, force_fail: bool = False) -> Transition:
        cfg = self.config
        times = st.ejection_times
        times.append(now)
        while times and times[0] <= now - cfg.fail_window_s:
            times.popleft()
        n = len(times)
        st.ejections_total += 1
        st.consecutive = 0
        self._clear_window(st)
        st.probe_since = None
        recent = tuple(st.recent)
        if (force_fail or (cfg.fail_after and n >= cfg.fail_after)) and not st.pinned:
            st.state = FAILED
            st.reason = (f"failed: {why}" if force_fail else
                         f"failed: ejected {n} times within {cfg.fail_window_s:g} s (last: {why})")
            return Transition(key, "fail", FAILED, st.reason, None, n, recent)
        backoff = cfg.max_ejection_s if force_fail else cfg.backoff(n)
        st.state = EJECTED
        st.until = now + backoff
        st.reason = f"ejected ({n} within {cfg.fail_window_s:g} s, back-off {backoff:g} s): {why}"
        return Transition(key, "eject", EJECTED, st.reason, st.until, n, recent)


def _short(message: object, limit: int = 160) -> str:
    s = str(message).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."
