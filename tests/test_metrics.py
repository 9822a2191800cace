"""tinyserve.metrics: buckets, histograms, recorders under concurrency, throughput on a fake clock."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyserve import errors
from tinyserve.metrics import (NBUCKETS, Histogram, Metrics, ModelStats, Recorder, Throughput, batch_summary,
                               bucket_index, bucket_upper)


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


# --- buckets ---------------------------------------------------------------------------------------------
@given(st.integers(min_value=0, max_value=(1 << 66) - 1))
def test_bucket_holds_value_and_is_narrow(v):
    idx = bucket_index(v)
    assert 0 <= idx < NBUCKETS
    hi = bucket_upper(idx)
    lo = bucket_upper(idx - 1) + 1 if idx else 0
    assert lo <= v <= hi
    assert hi - lo + 1 <= max(1, lo // 8)  # at most 12.5% of the lower edge wide


def test_bucket_edges_cover_every_integer_once():
    prev = -1
    for idx in range(0, 64 << 3):
        up = bucket_upper(idx)
        assert up > prev
        assert bucket_index(prev + 1) == idx and bucket_index(up) == idx
        prev = up


def test_bucket_index_clamps_bad_values():
    assert bucket_index(-5) == 0
    assert bucket_index(1 << 200) == NBUCKETS - 1
    h = Histogram()
    h.add(-3)
    h.add(1 << 100)
    assert h.n == 2 and h.counts[0] == 1 and h.counts[-1] == 1


# --- histograms ------------------------------------------------------------------------------------------
def test_percentiles_exact_below_16_and_upper_edges_above():
    h = Histogram()
    for v in range(1, 11):  # 1..10: exact buckets
        h.add(v)
    assert h.percentiles() == {"p50": 5, "p90": 9, "p99": 10, "max": 10}
    h = Histogram()
    for _ in range(99):
        h.add(100)
    h.add(5000)
    p = h.percentiles()
    assert p["p50"] == p["p90"] == p["p99"] == 103  # 100's bucket is 96..103
    assert p["max"] == 5000
    assert Histogram().percentiles() == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=200),
       st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
def test_quantile_bounds_the_true_value(values, q):
    h = Histogram()
    for v in values:
        h.add(v)
    s = sorted(values)
    import math
    true = s[max(1, math.ceil(round(q * len(s), 9))) - 1]
    got = h.quantile(q)
    assert true <= got <= max(true + true // 8, true)  # never below, at most one bucket width above
    assert got <= max(values)


@given(st.lists(st.integers(min_value=0, max_value=10**8)), st.lists(st.integers(min_value=0, max_value=10**8)))
def test_merge_equals_adding_everything(a, b):
    ha, hb, hall = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.add(v)
        hall.add(v)
    for v in b:
        hb.add(v)
        hall.add(v)
    m = Histogram.merged([ha, hb])
    assert m.counts == hall.counts and m.n == hall.n == len(a) + len(b)
    assert m.total == sum(a) + sum(b) and m.max == hall.max


@given(st.lists(st.integers(min_value=0, max_value=1 << 40), max_size=100))
def test_cumulative_at_powers_of_two_is_exact(values):
    h = Histogram()
    for v in values:
        h.add(v)
    edges = [1 << k for k in range(4, 42)]
    assert h.cumulative(edges) == [sum(1 for v in values if v < e) for e in edges]


def test_quantile_rejects_bad_q():
    with pytest.raises(errors.ConfigError, match="quantile"):
        Histogram().quantile(1.5)


# --- the recorder ----------------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(-10**6, 10**15), st.integers(-10**6, 10**15), st.integers(-10**6, 10**21)),
                max_size=60))
def test_record_matches_reference_histograms(samples):
    rec = Recorder()
    hq, hc, ht = Histogram(), Histogram(), Histogram()
    for q, c, t in samples:
        rec.record("OK", q, c, t)
        hq.add(q // 1000, q)
        hc.add(c // 1000, c)
        ht.add(t // 1000, t)
    for which, ref in (("q", hq), ("c", hc), ("t", ht)):
        got = rec._hist(which)
        assert got.counts == ref.counts
        assert got.n == ref.n == len(samples)
        assert got.total == ref.total
        assert got.max == ref.max
    assert rec.requests == rec.successes == len(samples)


def test_errors_rejections_and_last_error():
    ms = ModelStats("m", 1, clock=FakeClock())
    ms.record("OK", 1000, 2000, 4000)
    ms.record("MODEL_ERROR", 1000, 2000, 4000, message="boom")
    ms.reject("INVALID_INPUT", message="x" * 5000)
    ms.record(None, 0, 0, 0, message=12345)  # a bad code counts as INTERNAL, never crashes
    d = ms.to_dict()
    assert d["requests"] == 4 and d["successes"] == 1
    assert d["errors"] == {"INTERNAL": 1, "INVALID_INPUT": 1, "MODEL_ERROR": 1}
    assert d["last_error"]["code"] == "INTERNAL" and d["last_error"]["message"] == "12345"
    assert d["latency_us"]["p50"] == 4 and d["queue_us"]["max"] == 1 and d["compute_us"]["max"] == 2
    # the rejection has no latency: 3 timed requests
    assert ms.snapshot().total.n == 3
    ms2 = ModelStats("m", 2)
    ms2.reject("UNAVAILABLE", "y" * 5000)
    assert len(ms2.to_dict()["last_error"]["message"]) == 512


def test_in_flight_and_queue_depth():
    ms = ModelStats("m", 1, clock=FakeClock())
    rec = ms.recorder()
    rec.admitted(5)
    s = ms.snapshot()
    assert (s.in_flight, s.queue_depth) == (5, 5)
    rec.dequeued(3)
    rec.batch(2)
    rec.batch(1)
    rec.record("OK", 10, 10, 10)
    rec.record("DEADLINE_EXCEEDED", 10, 0, 10)
    s = ms.snapshot()
    assert (s.in_flight, s.queue_depth) == (3, 2)
    assert batch_summary(s.batch) == {"p50": 1, "p90": 2, "p99": 2, "max": 2, "mean": 1.5, "batches": 2}


def test_batch_summary_exact_and_bad_sizes():
    assert batch_summary({}) == {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0, "batches": 0}
    sizes = {1: 50, 8: 40, 32: 10}
    assert batch_summary(sizes) == {"p50": 1, "p90": 8, "p99": 32, "max": 32, "mean": 6.9, "batches": 100}
    rec = Recorder()
    rec.batch(-4)
    rec.batch("x")
    rec.batch(1 << 40)
    assert rec.batches == {0: 2, 1 << 20: 1}


def test_loads_resident_and_bad_values():
    ms = ModelStats("m", 1)
    ms.record_load(1.5)
    ms.record_load(0.5, ok=False)
    ms.record_load(float("nan"))
    ms.record_load(-1)
    ms.set_resident(4096)
    d = ms.to_dict()
    assert (d["loads"], d["load_failures"], d["load_s"], d["last_load_s"]) == (4, 1, 2.0, 0.0)
    assert d["resident_bytes"] == 4096
    ms.set_resident(-3)
    assert ms.to_dict()["resident_bytes"] == 0


# --- concurrency -----------------------------------------------------------------------------------------
def test_counts_exact_under_concurrent_recording():
    threads_n, per_thread = 8, 5000
    ms = ModelStats("m", 1)
    start = threading.Barrier(threads_n)

    def work(i):
        rec = ms.recorder()
        start.wait()
        for j in range(per_thread):
            rec.admitted()
            rec.dequeued()
            if j % 10 == 0:
                rec.record("MODEL_ERROR", 1000, 2000, 3000 + j, message=f"t{i}")
            else:
                ms.record("OK", 1000, 2000, 3000 + j)  # the threading.local path
        rec.batch(1)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    reads = []
    for t in ts:
        t.start()
    while any(t.is_alive() for t in ts):  # reading while they write never raises nor loses counts
        reads.append(ms.snapshot().requests)
    for t in ts:
        t.join()
    s = ms.snapshot()
    total = threads_n * per_thread
    assert s.requests == total
    assert s.errors == {"MODEL_ERROR": total // 10}
    assert s.successes == total - total // 10
    assert s.total.n == s.queue.n == s.compute.n == total
    assert s.in_flight == 0 and s.queue_depth == 0
    assert s.batch == {1: threads_n}
    assert all(r <= total for r in reads)
    assert ms._recorders == []  # the ended threads' recorders were folded
    assert ms.snapshot().requests == total  # and folding kept them


# --- throughput -------------------------------------------------------------------------------------------
def test_throughput_sliding_window_on_fake_clock():
    clock = FakeClock(100.0)
    ms = ModelStats("m", 1, clock=clock, window_s=10.0, resolution_s=1.0)
    rec = ms.recorder()
    for second in range(20):  # 50 requests a second for 20 s
        for _ in range(50):
            rec.record("OK", 0, 0, 0)
        clock.t += 1.0
        ms.tick()
    assert ms.snapshot().throughput_rps == pytest.approx(50.0)
    clock.t += 5.0  # 5 idle seconds: the window holds 5 busy and 5 idle seconds
    assert ms.snapshot().throughput_rps == pytest.approx(25.0)
    clock.t += 20.0
    assert ms.snapshot().throughput_rps == 0.0


def test_throughput_validation_and_clock_going_back():
    with pytest.raises(errors.ConfigError, match="window_s"):
        Throughput(window_s=0)
    with pytest.raises(errors.ConfigError, match="resolution_s"):
        Throughput(window_s=1, resolution_s=2)
    tp = Throughput(10.0, 1.0, now=50.0)
    assert tp.rate(10, 45.0) == 0.0  # the clock went back: no negative or infinite rates
    assert tp.rate(20, 47.0) == 5.0


# --- the registry ----------------------------------------------------------------------------------------
def test_registry_merges_versions_and_lists_them():
    clock = FakeClock()
    m = Metrics(clock=clock)
    a1, a2, b = m.model("a", 1), m.model("a", 2), m.model("b", 1)
    assert m.model("a", 1) is a1
    a1.record("OK", 0, 0, 1_000_000)
    a2.record("OK", 0, 0, 2_000_000)
    a2.record("MODEL_ERROR", 0, 0, 3_000_000, "bad")
    a1.set_resident(10)
    a2.set_resident(20)
    b.reject("UNAVAILABLE")
    d = m.to_dict()
    assert sorted(d["models"]) == ["a", "b"]
    a = d["models"]["a"]
    assert a["requests"] == 3 and a["errors"] == {"MODEL_ERROR": 1} and a["resident_bytes"] == 30
    assert [v["version"] for v in a["versions"]] == [1, 2]
    assert a["versions"][1]["requests"] == 2
    assert a["latency_us"]["max"] == 3000
    assert m.to_dict("b")["models"]["b"]["errors"] == {"UNAVAILABLE": 1}
    assert m.to_dict("nope") == {"models": {}}
    assert all(type(k) is str for k in d["models"])  # wire rule: map keys are strings


def test_registry_validates_keys():
    m = Metrics()
    with pytest.raises(errors.ConfigError, match="name"):
        m.model("", 1)
    with pytest.raises(errors.ConfigError, match="version"):
        m.model("a", "1")
    with pytest.raises(errors.ConfigError, match="window_s"):
        Metrics(window_s=-1)
