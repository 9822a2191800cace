"""The ejection policy: a pure state machine on a fake clock, with exact expectations."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyserve import errors
from tinyserve.health import (EJECTED, FAILED, PROBING, SERVING, EjectionConfig, EjectionPolicy, ModelInput,
                              assess)
from tinyserve.metrics import Metrics

A, B = ("a", 1), ("b", 1)


def fail(p, key, now, n=1, code="MODEL_ERROR"):
    out = None
    for _ in range(n):
        assert p.admit(key, now) is None
        out = p.record(key, False, code, now, message="boom") or out
    return out


def test_consecutive_failures_eject_probe_readmit():
    p = EjectionPolicy(EjectionConfig(consecutive_failures=3, error_rate=0, base_ejection_s=5.0))
    assert fail(p, A, 0.0, 2) is None
    assert p.record(A, True, "OK", 0.1) is None  # a success resets the run
    assert fail(p, A, 0.2, 2) is None
    t = fail(p, A, 0.3)
    assert t.kind == "eject" and t.state == EJECTED and t.until == pytest.approx(5.3) and t.ejections == 1
    assert "3 consecutive failures" in t.reason and "MODEL_ERROR: boom" in t.reason
    assert len(t.recent_errors) == 5  # the last failures, for reports
    assert p.state(A) == EJECTED
    reason = p.admit(A, 1.0)
    assert "ejected" in reason and "next probe in 4.3 s" in reason
    assert p.admit(B, 1.0) is None  # other models unaffected
    assert p.admit(A, 5.3) is None  # the probe
    assert p.state(A) == PROBING
    assert "probe request is in flight" in p.admit(A, 5.4)
    t = p.record(A, True, "OK", 5.5)
    assert t.kind == "readmit" and p.state(A) == SERVING and p.admit(A, 5.6) is None


def test_backoff_grows_and_probe_failure_re_ejects():
    cfg = EjectionConfig(consecutive_failures=1, error_rate=0, base_ejection_s=2.0, backoff_factor=3.0,
                         max_ejection_s=10.0, fail_after=0)
    p = EjectionPolicy(cfg)
    now = 0.0
    t = fail(p, A, now)
    waits = [t.until - now]
    for _ in range(3):
        now = t.until
        assert p.admit(A, now) is None  # probe
        t = p.record(A, False, "INTERNAL", now, "still broken")
        assert t.kind == "eject" and "probe failed: INTERNAL: still broken" in t.reason
        waits.append(t.until - now)
    assert waits == [2.0, 6.0, 10.0, 10.0]  # base * 3^(n-1), capped


def test_neutral_codes_never_count():
    p = EjectionPolicy(EjectionConfig(consecutive_failures=2, error_rate=0))
    for code in ("INVALID_INPUT", "DEADLINE_EXCEEDED", "UNAVAILABLE", "BAD_REQUEST", "TOO_MANY_REQUESTS",
                 "SHUTTING_DOWN", "NOT_FOUND"):
        for _ in range(5):
            assert p.record(A, False, code, 0.0) is None
    assert p.state(A) == SERVING
    fail(p, A, 1.0)
    p.record(A, False, "INVALID_INPUT", 1.0)  # neither resets nor counts
    assert fail(p, A, 1.0).kind == "eject"


def test_neutral_probe_lets_another_probe_through_and_probe_timeout():
    p = EjectionPolicy(EjectionConfig(consecutive_failures=1, error_rate=0, base_ejection_s=1.0, probe_timeout_s=30))
    fail(p, A, 0.0)
    assert p.admit(A, 1.0) is None
    assert p.record(A, False, "DEADLINE_EXCEEDED", 1.1) is None  # the probe expired in the queue: neutral
    assert p.state(A) == PROBING
    assert p.admit(A, 1.2) is None  # another probe
    assert p.admit(A, 1.3) is not None
    assert p.admit(A, 31.2) is None  # the second probe's answer never came: a third after probe_timeout_s


def test_error_rate_over_window():
    cfg = EjectionConfig(consecutive_failures=0, error_rate=0.5, error_rate_window_s=10.0, error_rate_min_requests=10)
    p = EjectionPolicy(cfg)
    for i in range(4):  # 4 failures, 4 successes: 8 < 10 answers in the window
        fail(p, A, float(i))
        p.record(A, True, "OK", float(i))
    assert p.state(A) == SERVING
    p.record(A, True, "OK", 4.0)  # 9 answers, 4 failures
    t = fail(p, A, 4.5)  # 10 answers, 5 failures: 50%
    assert t is not None and t.kind == "eject" and "error rate 5/10 = 50%" in t.reason
    # old answers leave the window
    p2 = EjectionPolicy(cfg)
    for _ in range(10):
        p2.record(A, True, "OK", 0.0)
    fail(p2, A, 0.0, 9)  # 19 answers at t=0, 9 failures: 47%
    assert p2.state(A) == SERVING
    assert fail(p2, A, 100.0) is None  # 100 s later only this failure is in the window
    assert p2.state(A) == SERVING


def test_repeated_ejections_fail_unless_pinned():
    cfg = EjectionConfig(consecutive_failures=1, error_rate=0, base_ejection_s=1.0, max_ejection_s=1.0,
                         fail_after=3, fail_window_s=100.0)
    for pinned in (False, True):
        p = EjectionPolicy(cfg, pinned=[A] if pinned else [])
        now, kinds = 0.0, []
        for _ in range(4):
            t = fail(p, A, now) if p.state(A) == SERVING else None
            if t is None:
                assert p.admit(A, now) is None
                t = p.record(A, False, "MODEL_ERROR", now, "x")
            kinds.append(t.kind)
            if t.kind == "fail":
                break
            now += 1.0
        if pinned:
            assert kinds == ["eject"] * 4 and p.state(A) == EJECTED
        else:
            assert kinds == ["eject", "eject", "fail"] and p.state(A) == FAILED
            assert "ejected 3 times within 100 s" in t.reason
            assert p.admit(A, 1e6) == p.info(A).reason  # FAILED: no probe, ever
            p.reset(A)  # an operator loads it again
            assert p.state(A) == SERVING and p.admit(A, 1e6) is None


def test_ejections_outside_the_window_do_not_add_up():
    cfg = EjectionConfig(consecutive_failures=1, error_rate=0, base_ejection_s=1.0, backoff_factor=2.0,
                         fail_after=2, fail_window_s=50.0)
    p = EjectionPolicy(cfg)
    fail(p, A, 0.0)
    assert p.admit(A, 1.0) is None
    p.record(A, True, "OK", 1.0)
    t = fail(p, A, 60.0)  # the first ejection is 60 s old: this is the first in the window again
    assert t.kind == "eject" and t.ejections == 1 and t.until == 61.0


def test_mark_failed_and_pin():
    p = EjectionPolicy()
    t = p.mark_failed(A, "device gpu0 lost", 3.0)
    assert t.kind == "fail" and p.state(A) == FAILED and "device gpu0 lost" in t.reason
    p.pin(B)
    t = p.mark_failed(B, "device gpu0 lost", 3.0)
    assert t.kind == "eject" and t.until == 3.0 + p.config.max_ejection_s


def test_answers_after_ejection_are_ignored():
    p = EjectionPolicy(EjectionConfig(consecutive_failures=1, error_rate=0))
    fail(p, A, 0.0)
    assert p.record(A, True, "OK", 0.1) is None  # a request admitted before the ejection
    assert p.state(A) == EJECTED


def test_config_validation_names_the_field():
    for field, bad in [("consecutive_failures", -1), ("error_rate", 1.5), ("error_rate_window_s", 0),
                       ("base_ejection_s", float("nan")), ("backoff_factor", 0.5), ("fail_after", True),
                       ("failure_codes", "MODEL_ERROR"), ("failure_codes", {"model error"}), ("probe_timeout_s", 0)]:
        with pytest.raises(errors.ConfigError, match=field):
            EjectionConfig(**{field: bad})
    with pytest.raises(errors.ConfigError, match="max_ejection_s"):
        EjectionConfig(base_ejection_s=10, max_ejection_s=5)
    with pytest.raises(errors.ConfigError, match="EjectionConfig"):
        EjectionPolicy({"consecutive_failures": 1})
    assert EjectionConfig(failure_codes=["MODEL_ERROR"]).failure_codes == frozenset({"MODEL_ERROR"})


@given(st.lists(st.tuples(st.sampled_from([A, B]), st.sampled_from(["OK", "MODEL_ERROR", "INVALID_INPUT"]),
                          st.floats(0, 5)), max_size=200))
def test_invariants_under_any_sequence(events):
    """Whatever happens: states are known, a non-serving key refuses with a reason unless a probe is
    due, and a FAILED key never serves again without reset."""
    p = EjectionPolicy(EjectionConfig(consecutive_failures=3, error_rate=0.5, error_rate_min_requests=4,
                                      base_ejection_s=2.0, fail_after=3))
    now = 0.0
    failed = set()
    for key, code, dt in events:
        now += dt
        reason = p.admit(key, now)
        state = p.state(key)
        assert state in (SERVING, EJECTED, PROBING, FAILED)
        if key in failed:
            assert state == FAILED and reason
            continue
        if reason is None:
            p.record(key, code == "OK", code, now, "m")
        else:
            assert state in (EJECTED, PROBING, FAILED) and isinstance(reason, str) and reason
        if p.state(key) == FAILED:
            failed.add(key)


# --- the scenario: a model that fails on a marked input --------------------------------------------
class FakeServer:
    """What the server does around a request, on a fake clock: admit -> run -> record (metrics, policy)."""

    def __init__(self, policy):
        self.policy = policy
        self.metrics = Metrics(clock=lambda: self.now)
        self.now = 0.0
        self.transitions = []

    def infer(self, key, x):
        ms = self.metrics.model(*key)
        reason = self.policy.admit(key, self.now)
        if reason is not None:
            ms.reject("UNAVAILABLE", reason)
            return "UNAVAILABLE"
        ms.recorder().admitted()
        code = "MODEL_ERROR" if x == "poison" else "OK"  # the model raises on the marked input
        ms.record(code, 1000, 5000, 7000, message="model 'a' raised ValueError: poison" if code != "OK" else None)
        t = self.policy.record(key, code == "OK", code, self.now, message="ValueError: poison")
        if t is not None:
            self.transitions.append(t)
        return code


def test_marked_input_scenario():
    srv = FakeServer(EjectionPolicy(EjectionConfig(consecutive_failures=5, error_rate=0, base_ejection_s=10.0)))
    assert [srv.infer(A, "ok") for _ in range(3)] == ["OK"] * 3
    assert [srv.infer(A, "poison") for _ in range(5)] == ["MODEL_ERROR"] * 5
    assert [t.kind for t in srv.transitions] == ["eject"]
    # while ejected: UNAVAILABLE at once, for good inputs too; the other model is unaffected
    srv.now = 3.0
    assert [srv.infer(A, "ok") for _ in range(4)] == ["UNAVAILABLE"] * 4
    assert [srv.infer(B, "ok") for _ in range(4)] == ["OK"] * 4
    rep = assess([ModelInput("a", 1, "READY"), ModelInput("b", 1, "READY")], policy=srv.policy, now=srv.now,
                 required=["a", "b"])
    assert not rep.ready and rep.models["a"]["state"] == EJECTED and rep.models["b"]["serving"]
    assert rep.models["a"]["versions"][0]["ejection"]["probe_in_s"] == 7.0
    # the model recovered: the probe after the back-off succeeds and it is re-admitted
    srv.now = 10.0
    assert srv.infer(A, "ok") == "OK"
    assert [t.kind for t in srv.transitions] == ["eject", "readmit"]
    assert srv.infer(A, "ok") == "OK"
    assert assess([ModelInput("a", 1, "READY")], policy=srv.policy, required=["a"]).ready
    a = srv.metrics.to_dict()["models"]["a"]
    assert a["requests"] == 3 + 5 + 4 + 2
    assert a["errors"] == {"MODEL_ERROR": 5, "UNAVAILABLE": 4}
    assert a["successes"] == 5 and a["in_flight"] == 0
    assert a["last_error"]["code"] == "UNAVAILABLE" and "ejected" in a["last_error"]["message"]
    assert srv.metrics.to_dict()["models"]["b"]["errors"] == {}


def test_fast_success_path_matches_record():
    """record_success_fast does what record(ok) does for a serving key, and declines otherwise."""
    cfg = EjectionConfig(consecutive_failures=3, error_rate=0.9, error_rate_min_requests=4, error_rate_window_s=10.0)
    a, b = EjectionPolicy(cfg), EjectionPolicy(cfg)
    key = ("m", 1)
    for p in (a, b):
        p.record(key, False, "MODEL_ERROR", 0.0, "x")
        p.record(key, False, "MODEL_ERROR", 0.1, "x")
    assert a.record_success_fast(key, 0.2) is True  # serving: done without the full path
    b.record(key, True, "OK", 0.2)
    assert a.info(key).consecutive == b.info(key).consecutive == 0
    # the same two more failures do not eject either (the success broke the run) ...
    for p in (a, b):
        p.record(key, False, "MODEL_ERROR", 0.3, "x")
        p.record(key, False, "MODEL_ERROR", 0.4, "x")
    assert a.state(key) == b.state(key) == SERVING
    # ... and once ejected, the fast path declines: the locked path must run
    a.record(key, False, "MODEL_ERROR", 0.5, "x")
    assert a.state(key) == EJECTED
    assert a.record_success_fast(key, 0.6) is False
