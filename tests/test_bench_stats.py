"""tinyserve.bench statistics on synthetic latencies: percentiles, windows, the stability rule, the
stop rule, the Poisson schedule, inputs from metadata, and the report's pieces.  No sockets, no clock."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as hs

from tinyserve import errors
from tinyserve.bench import inputs as inp
from tinyserve.bench import loadgen, report
from tinyserve.bench import stats as st

pytestmark = pytest.mark.timeout(60)


def win(i, throughput, p50, seconds=1.0, errs=None, spread=0.0):
    """A window of `seconds` whose successes have median `p50` and count throughput * seconds."""
    n = int(round(throughput * seconds)) - sum((errs or {}).values())
    lat = np.full(n, float(p50))
    if spread and n > 1:
        lat = p50 + np.linspace(-spread, spread, n)
    return st.Window(i, i * seconds, (i + 1) * seconds, lat, dict(errs or {}))


# --- percentiles -------------------------------------------------------------------------------------
def test_percentiles_of_known_samples():
    p = st.percentiles(np.arange(1, 1001, dtype=float))
    assert list(p) == ["p50", "p90", "p95", "p99", "p99.9"]
    assert p["p50"] == pytest.approx(500.5)
    assert p["p90"] == pytest.approx(900.1)
    assert p["p99"] == pytest.approx(990.01)
    assert p["p99.9"] == pytest.approx(999.001)
    assert st.percentiles([7.0]) == {k: 7.0 for k in p}
    assert st.percentiles([]) == {k: None for k in p}


def test_percentile_out_of_range_is_refused():
    with pytest.raises(errors.ConfigError, match="101"):
        st.percentiles([1.0, 2.0], (50, 101))


@given(hs.lists(hs.floats(min_value=0, max_value=1e7, allow_nan=False), min_size=1, max_size=300))
def test_percentiles_are_ordered_and_within_the_samples(xs):
    p = st.percentiles(xs)
    vals = [p[k] for k in ("p50", "p90", "p95", "p99", "p99.9")]
    assert all(a <= b + 1e-6 for a, b in zip(vals, vals[1:]))
    assert min(xs) - 1e-6 <= vals[0] and vals[-1] <= max(xs) + 1e-6


# --- windows and the stability rule ---------------------------------------------------------------
def test_window_counts_errors_in_throughput_not_in_latency():
    w = st.Window(0, 10.0, 10.5, np.array([100.0, 200.0, 300.0]), {"UNAVAILABLE": 2})
    assert w.completed == 5 and w.throughput == pytest.approx(10.0)
    assert w.p50 == 200.0
    assert w.brief()["errors"] == {"UNAVAILABLE": 2}
    assert st.Window(1, 0, 1, np.zeros(0)).p50 is None


def test_within():
    assert st.within([100, 109, 91], 0.10)
    assert not st.within([100, 120, 80], 0.10)  # 120 is 20% above the mean
    assert not st.within([], 0.1)
    assert not st.within([100, None, 100], 0.1)
    assert not st.within([0, 0, 0], 0.1)


def test_stable_needs_k_windows_agreeing_on_throughput_and_p50():
    steady = [win(i, 1000, 200) for i in range(3)]
    assert st.stable(steady)
    assert not st.stable(steady[:2])
    # throughput drifts by 25%: not stable even though p50 agrees
    assert not st.stable([win(0, 800, 200), win(1, 1000, 200), win(2, 1200, 200)])
    # p50 drifts: not stable even though throughput agrees
    assert not st.stable([win(0, 1000, 150), win(1, 1000, 200), win(2, 1000, 260)])
    # only the last k count: a slow first window (warm-up) does not matter
    assert st.stable([win(0, 100, 5000)] + steady)
    assert st.stable(steady, k=2, tolerance=0.01)
    with pytest.raises(errors.ConfigError, match="k"):
        st.stable(steady, k=0)
    with pytest.raises(errors.ConfigError, match="tolerance"):
        st.stable(steady, tolerance=1.5)


@given(hs.lists(hs.floats(min_value=1, max_value=1e6), min_size=3, max_size=3),
       hs.sampled_from([2.0 ** -10, 0.25, 0.5, 2.0, 8.0, 2.0 ** 20]))
def test_stability_does_not_depend_on_units(p50s, scale):
    # powers of two scale floats exactly, so the verdict must not move
    a = [win(i, 1000, p) for i, p in enumerate(p50s)]
    b = [win(i, 1000, p * scale) for i, p in enumerate(p50s)]
    assert st.stable(a) == st.stable(b)
    assert st.stable(a) == st.within(p50s, 0.10)


def test_stop_rule():
    rule = st.StopRule(window_s=1.0, k=3, tolerance=0.1, min_windows=3, max_windows=6, time_bound_s=100)
    ws = [win(0, 500, 900)]
    assert rule.verdict(ws) is None
    ws += [win(1, 1000, 200), win(2, 1000, 200)]
    assert rule.verdict(ws) is None  # the warm window is among the last 3
    ws.append(win(3, 1000, 200))
    assert rule.verdict(ws) == "stable"
    noisy = [win(i, 1000 if i % 2 else 500, 200) for i in range(6)]
    assert rule.verdict(noisy[:5]) is None
    assert rule.verdict(noisy) == "max_windows"
    timed = st.StopRule(window_s=1.0, max_windows=100, time_bound_s=4.0)
    assert timed.verdict(noisy[:3]) is None
    assert timed.verdict(noisy[:4]) == "time_bound"  # a fifth window would end past 4 s


@pytest.mark.parametrize("kw, fragment", [
    ({"window_s": 0}, "window"), ({"k": 0}, "k >= 1"), ({"max_windows": 2}, "max_windows"),
    ({"tolerance": 0}, "tolerance"), ({"time_bound_s": -1}, "time bound"), ({"window_s": float("inf")}, "window"),
])
def test_stop_rule_refuses_bad_settings(kw, fragment):
    with pytest.raises(errors.ConfigError, match=fragment):
        st.StopRule(**kw)


def test_summarize_merges_windows():
    ws = [st.Window(0, 0, 1, np.array([100.0, 300.0]), {"UNAVAILABLE": 1}),
          st.Window(1, 1, 2, np.array([200.0, 400.0]), {"UNAVAILABLE": 1, "MODEL_ERROR": 2})]
    s = st.summarize(ws)
    assert s["completed"] == 8 and s["ok"] == 4 and s["seconds"] == 2
    assert s["throughput"] == 4.0 and s["ok_throughput"] == 2.0
    assert s["errors"] == {"MODEL_ERROR": 2, "UNAVAILABLE": 2}
    assert s["latency_us"]["p50"] == 250.0 and s["mean_us"] == 250.0 and s["max_us"] == 400.0
    assert st.summarize([])["completed"] == 0


def test_recorder_cuts_a_window_from_its_records():
    rec = loadgen._Recorder(100)
    for t, lat, code in [(0.1, 100, None), (0.2, 50, "UNAVAILABLE"), (0.3, 300, None), (0.4, 1, None)]:
        rec.add(t, lat, code)
    w = rec.window(0, 0, 3, 0.0, 0.35)
    assert list(w.latencies_us) == [100, 300] and w.errors == {"UNAVAILABLE": 1} and w.completed == 3


def test_log_histogram_keeps_every_sample():
    lat = np.concatenate([np.full(10, 150.0), np.full(5, 2500.0), [0.5, 5e9]])
    h = st.log_histogram(lat)
    assert sum(h["counts"]) == lat.size
    assert len(h["edges_us"]) == len(h["counts"]) + 1
    assert h["edges_us"][0] <= 1.0 and h["edges_us"][-1] >= 1e7
    assert st.log_histogram([]) == {"edges_us": [], "counts": []}


# --- the Poisson schedule ------------------------------------------------------------------------------
def test_poisson_schedule_statistics():
    rate, dur = 2000.0, 10.0
    t = st.poisson_schedule(rate, dur, seed=3)
    n = rate * dur
    assert abs(t.size - n) < 5 * math.sqrt(n)
    assert t[0] >= 0 and t[-1] < dur and np.all(np.diff(t) > 0)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean
    # exponential tail: P(gap > 3 / rate) = e^-3
    assert (gaps > 3 / rate).mean() == pytest.approx(math.exp(-3), abs=0.01)
    # arrivals per 100 ms are Poisson(200): variance == mean
    counts = np.histogram(t, bins=np.arange(0, dur + 1e-9, 0.1))[0]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.35)


def test_poisson_schedule_is_drawn_from_the_seed():
    a = st.poisson_schedule(100, 5, seed=1)
    assert np.array_equal(a, st.poisson_schedule(100, 5, seed=1))
    assert not np.array_equal(a[:50], st.poisson_schedule(100, 5, seed=2)[:50])


@pytest.mark.parametrize("rate, dur, fragment", [
    (0, 1, "rate"), (-5, 1, "rate"), (float("nan"), 1, "rate"), (10, 0, "duration"),
    (1e9, 1e3, "over the limit"),
])
def test_poisson_schedule_refuses_bad_arguments(rate, dur, fragment):
    with pytest.raises(errors.ConfigError, match=fragment):
        st.poisson_schedule(rate, dur)


# --- inputs ------------------------------------------------------------------------------------------------
SPECS = [{"name": "x", "dtype": "float32", "shape": [-1, 64]}, {"name": "ids", "dtype": "int64", "shape": [-1, 16]},
         {"name": "m", "dtype": "bool", "shape": [-1]}, {"name": "t", "dtype": "bytes", "shape": [-1]}]


def test_random_inputs_match_the_metadata():
    pool = inp.random_inputs(SPECS, batch=3, count=4, seed=1, low=5, high=9)
    assert len(pool) == 4
    for one in pool:
        assert one["x"].shape == (3, 64) and one["x"].dtype == np.float32
        assert one["ids"].shape == (3, 16) and one["ids"].dtype == np.int64
        assert one["ids"].min() >= 5 and one["ids"].max() < 9
        assert one["m"].dtype == np.bool_ and one["m"].shape == (3,)
        assert len(one["t"]) == 3 and all(isinstance(s, bytes) and len(s) == 16 for s in one["t"])
    assert not np.array_equal(pool[0]["x"], pool[1]["x"])
    again = inp.random_inputs(SPECS, batch=3, count=4, seed=1, low=5, high=9)
    assert np.array_equal(pool[2]["x"], again[2]["x"])


def test_random_inputs_bfloat16_and_shape_overrides():
    torch = pytest.importorskip("torch")
    pool = inp.random_inputs([{"name": "h", "dtype": "bfloat16", "shape": [-1, -1, 8]}], count=1,
                             dims={"h": [2, 5, 8]})
    assert pool[0]["h"].dtype == torch.bfloat16 and tuple(pool[0]["h"].shape) == (2, 5, 8)


@pytest.mark.parametrize("specs, kw, fragment", [
    ([], {}, "no inputs"),
    ([{"name": "h", "shape": [-1, -1], "dtype": "float32"}], {}, "--shape h="),
    (SPECS[:1], {"dims": {"y": [1]}}, "unknown inputs"),
    (SPECS[:1], {"count": 0}, "pool size"),
    (SPECS[:1], {"batch": 0}, "batch"),
    ([{"name": "f", "dtype": "float8_e4m3fn", "shape": [1]}], {}, "float8"),
    ([{"name": "x", "dtype": "float32", "shape": [-1, 1 << 20]}], {"batch": 64, "count": 64}, "over the limit"),
])
def test_random_inputs_refusals_name_the_problem(specs, kw, fragment):
    with pytest.raises(errors.ConfigError, match=fragment):
        inp.random_inputs(specs, **kw)


def test_npy_inputs_checked_against_the_metadata(tmp_path):
    good = tmp_path / "x.npy"
    np.save(good, np.ones((2, 64), np.float32))
    pool = inp.npy_inputs({"x": str(good)}, SPECS[:1])
    assert pool[0]["x"].shape == (2, 64)
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.ones((2, 63), np.float32))
    with pytest.raises(errors.ConfigError, match="shape"):
        inp.npy_inputs({"x": str(wrong)}, SPECS[:1])
    f64 = tmp_path / "d.npy"
    np.save(f64, np.ones((2, 64)))
    with pytest.raises(errors.ConfigError, match="float64"):
        inp.npy_inputs({"x": str(f64)}, SPECS[:1])
    with pytest.raises(errors.ConfigError, match="not the model's inputs"):
        inp.npy_inputs({"y": str(good)}, SPECS[:1])
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    with pytest.raises(errors.ConfigError, match="junk.npy"):
        inp.npy_inputs({"x": str(junk)})


# --- server stats and the report ---------------------------------------------------------------------------
def test_server_delta_and_the_split_once_reported():
    before = {"requests": 10, "errors": {"UNAVAILABLE": 1}}
    after = {"requests": 60, "errors": {"UNAVAILABLE": 4, "MODEL_ERROR": 0}, "latency_us": {"p50": 95}}
    d = loadgen.server_delta(before, after)
    assert d["requests"] == 50 and d["errors"] == {"UNAVAILABLE": 3}
    assert d["split"] is None and "queue_us" in d["split_note"]
    after["queue_us"] = {"p50": 12}
    after["compute_us"] = {"p50": 70}
    assert loadgen.server_delta(before, after)["split"] == {"queue_us": {"p50": 12}, "compute_us": {"p50": 70}}
    assert loadgen.server_delta(before, None) is None
    # per model: the model's latency and split, the server-wide request and error counts
    after["models"] = {"mlp": {"requests": 40, "latency_us": {"p50": 80}, "queue_us": {"p50": 5}}}
    d = loadgen.server_delta(before, after, "mlp")
    assert d["requests"] == 50 and d["latency_us_cumulative"] == {"p50": 80} and d["split"] == {"queue_us": {"p50": 5}}


def test_error_codes():
    from tinyserve.client import ConnectionLost

    assert loadgen.error_code(ConnectionLost("x")) == "CONNECTION_LOST"
    assert loadgen.error_code(TimeoutError()) == "TIMEOUT"
    assert loadgen.error_code(ConnectionResetError()) == "CONNECTION_LOST"
    assert loadgen.error_code(ValueError()) == "ValueError"


def fake_result(mode="closed", **over):
    ws = [win(i, 1000, 200, spread=50) for i in range(3)]
    res = loadgen._point_result(mode, type("T", (), {"label": "fake"})(), ws, "stable",
                                st.StopRule(), 0.95, {"concurrency": 4, "connections": 2, "rate": 1000.0},
                                None, None)
    res.update(over)
    return res


def test_point_result_warns_on_a_saturated_generator_and_writes_clean_json(tmp_path):
    res = fake_result()
    assert res["loadgen"]["saturated"] and any("saturated" in w for w in res["warnings"])
    assert res["windows_reported"] == 3 and res["stable"]
    text = report.table([res], "title")
    assert "c4 (2 conn)" in text and "p99.9" in text and "WARNING" in text
    doc = json.loads(report.to_json({"points": [res]}))
    assert "_latencies_us" not in doc["points"][0] and doc["points"][0]["latency_us"]["p50"] == pytest.approx(200)
    path = tmp_path / "sub" / "r.json"
    report.write_atomic(path, b"{}")
    report.write_atomic(path, report.to_json(doc).encode())
    assert json.loads(path.read_text())["points"][0]["completed"] == 3000
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["r.json"]  # no temporary left behind


def test_plots_are_png_files(tmp_path):
    files = report.plot([fake_result(), fake_result(concurrency=8)], tmp_path, title="t")
    assert {f.name for f in files} == {"latency_vs_throughput.png", "latency_distribution.png"}
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
