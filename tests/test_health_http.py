"""Prometheus collector and the /metrics, /healthz, /readyz listener (loopback, a port picked at run
time); health aggregation; JSON logs."""

import asyncio
import gzip
import http.client
import io
import json
import logging
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tinyserve import errors
from tinyserve.health import (DeviceMonitor, DeviceReading, EjectionConfig, EjectionPolicy, HealthReport,
                              JsonFormatter, MetricsServer, ModelInput, assess, configure_logging, log_event,
                              make_registry, on_loop)
from tinyserve.metrics import Metrics

from test_health_devices import FakeGPU, make_nvml  # pytest puts tests/ on sys.path


def get(port, path, method="GET", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def samples(text):
    """{(sample name, frozenset(labels)): value} from the text format, via prometheus-client's parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def lab(**kw):
    return frozenset(kw.items())


@pytest.fixture
def setup():
    metrics = Metrics(clock=lambda: 0.0)
    mon = DeviceMonitor(nvml=make_nvml([FakeGPU()]))
    mon.poll()
    policy = EjectionPolicy(EjectionConfig(consecutive_failures=2, error_rate=0))
    state = {"models": [ModelInput("mlp", 1, "READY", device="gpu0"), ModelInput("other", 3, "READY", device="gpu0")]}

    def health():
        return assess(state["models"], mon.latest(), policy=policy, required=["mlp"])

    reg = make_registry(metrics=metrics, monitor=mon, policy=policy, health=health)
    srv = MetricsServer("127.0.0.1", 0, registry=reg, health=health)
    srv.start()
    yield metrics, mon, policy, state, srv
    srv.stop()


def test_metrics_scrape_matches_what_was_recorded(setup):
    metrics, mon, policy, state, srv = setup
    ms = metrics.model("mlp", 1)
    rec = ms.recorder()
    # 7 successes: total latencies 10 us .. 70 us, 3 model errors at 5 ms, 2 rejected
    for i in range(1, 8):
        rec.admitted()
        rec.record("OK", 2_000, 5_000, i * 10_000)
    for _ in range(3):
        rec.admitted()
        rec.record("MODEL_ERROR", 1_000, 4_000_000, 5_000_000, "boom")
    rec.reject("INVALID_INPUT")
    rec.reject("INVALID_INPUT")
    rec.dequeued(10)  # the worker took the 10 answered ones off the queue
    rec.admitted(2)  # two still in flight, in the queue
    rec.batch(1)
    rec.batch(4)
    ms.record_load(1.25)
    ms.set_resident(123456)
    status, headers, body = get(srv.port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    s = samples(body.decode())
    L = lab(model="mlp", version="1")
    assert s[("tinyserve_requests_total", L)] == 12
    assert s[("tinyserve_request_successes_total", L)] == 7
    assert s[("tinyserve_request_errors_total", lab(model="mlp", version="1", code="MODEL_ERROR"))] == 3
    assert s[("tinyserve_request_errors_total", lab(model="mlp", version="1", code="INVALID_INPUT"))] == 2
    assert s[("tinyserve_requests_in_flight", L)] == 2
    assert s[("tinyserve_queue_depth", L)] == 2
    assert s[("tinyserve_model_loads_total", L)] == 1
    assert s[("tinyserve_model_load_seconds_total", L)] == 1.25
    assert s[("tinyserve_model_resident_bytes", L)] == 123456
    # the total-latency histogram: 10 answered, exact cumulative counts at power-of-two edges
    assert s[("tinyserve_request_duration_seconds_count", L)] == 10
    assert s[("tinyserve_request_duration_seconds_sum", L)] == pytest.approx((280_000 + 15_000_000) / 1e9)
    le = lambda us: lab(model="mlp", version="1", le=repr(us / 1e6))  # noqa: E731
    assert s[("tinyserve_request_duration_seconds_bucket", le(16))] == 1  # 10 us
    assert s[("tinyserve_request_duration_seconds_bucket", le(64))] == 6  # 10..60 us
    assert s[("tinyserve_request_duration_seconds_bucket", le(128))] == 7
    assert s[("tinyserve_request_duration_seconds_bucket", le(4096))] == 7
    assert s[("tinyserve_request_duration_seconds_bucket", le(8192))] == 10
    assert s[("tinyserve_request_duration_seconds_bucket", lab(model="mlp", version="1", le="+Inf"))] == 10
    assert s[("tinyserve_request_compute_seconds_bucket", le(16))] == 7
    assert s[("tinyserve_request_queue_seconds_sum", L)] == pytest.approx(17_000 / 1e9)
    assert s[("tinyserve_batch_size_bucket", lab(model="mlp", version="1", le="2.0"))] == 1
    assert s[("tinyserve_batch_size_bucket", lab(model="mlp", version="1", le="4.0"))] == 2
    assert s[("tinyserve_batch_size_sum", L)] == 5
    # devices and health
    G = lab(device="gpu0")
    assert s[("tinyserve_device_healthy", G)] == 1
    assert s[("tinyserve_device_memory_total_bytes", G)] == 80 << 30
    assert s[("tinyserve_device_temperature_celsius", G)] == 61
    assert s[("tinyserve_device_power_watts", G)] == 250
    assert s[("tinyserve_device_ecc_errors_total", lab(device="gpu0", type="corrected"))] == 3
    assert s[("tinyserve_device_throttled", lab(device="gpu0", reason="hw_thermal"))] == 1
    assert s[("tinyserve_ready", frozenset())] == 1
    assert s[("tinyserve_model_serving", lab(model="other", version="3", state="READY"))] == 1


def test_ejection_shows_in_metrics_and_readyz(setup):
    metrics, mon, policy, state, srv = setup
    assert get(srv.port, "/readyz")[0] == 200
    for _ in range(2):
        policy.admit(("mlp", 1), 0.0)
        policy.record(("mlp", 1), False, "MODEL_ERROR", 0.0, "boom")
    status, _, body = get(srv.port, "/readyz")
    rep = json.loads(body)
    assert status == 503 and rep["ready"] is False and rep["models"]["mlp"]["state"] == "EJECTED"
    assert any("'mlp' must be served" in r for r in rep["reasons"])
    assert get(srv.port, "/healthz")[0] == 200  # ejected is not dead
    s = samples(get(srv.port, "/metrics")[2].decode())
    assert s[("tinyserve_model_ejected", lab(model="mlp", version="1", state="EJECTED"))] == 1
    assert s[("tinyserve_model_ejections_total", lab(model="mlp", version="1"))] == 1
    assert s[("tinyserve_ready", frozenset())] == 0


def test_device_loss_makes_readyz_fail(setup):
    metrics, mon, policy, state, srv = setup
    mon.mark_fault("gpu0", "CUDA error: device-side assert triggered")
    status, _, body = get(srv.port, "/readyz")
    rep = json.loads(body)
    assert status == 503 and not rep["devices"]["gpu0"]["healthy"]
    assert rep["models"]["mlp"]["state"] == "DEVICE_FAULT"
    s = samples(get(srv.port, "/metrics")[2].decode())
    assert s[("tinyserve_device_healthy", lab(device="gpu0"))] == 0


def test_http_edges(setup):
    metrics, mon, policy, state, srv = setup
    status, headers, body = get(srv.port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert b"tinyserve_device_healthy" in gzip.decompress(body)
    status, headers, body = get(srv.port, "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and "openmetrics" in headers["Content-Type"] and body.endswith(b"# EOF\n")
    status, headers, body = get(srv.port, "/readyz", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert get(srv.port, "/nope")[0] == 404
    assert get(srv.port, "/healthz?verbose=1")[0] == 200
    status, headers, _ = get(srv.port, "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    # garbage instead of HTTP: answered with an error, and the listener keeps serving
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"\x00\xff garbage\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert b"400" in data and b"Bad request" in data
    assert get(srv.port, "/healthz")[0] == 200


def test_health_source_failures_answer_503():
    def broken():
        raise RuntimeError("report bug")

    srv = MetricsServer("127.0.0.1", 0, registry=make_registry(), health=broken)
    srv.start()
    try:
        for path in ("/healthz", "/readyz"):
            status, _, body = get(srv.port, path)
            assert status == 503 and "report bug" in json.loads(body)["reasons"][0]
        assert get(srv.port, "/metrics")[0] == 200
    finally:
        srv.stop()


def test_stuck_event_loop_fails_healthz():
    loop = asyncio.new_event_loop()
    release = threading.Event()
    t = threading.Thread(target=loop.run_forever)
    t.start()
    try:
        health = on_loop(loop, lambda: assess([]), timeout_s=0.5)
        assert health().live  # the loop answers
        srv = MetricsServer("127.0.0.1", 0, registry=make_registry(), health=health)
        srv.start()
        try:
            assert get(srv.port, "/healthz")[0] == 200
            loop.call_soon_threadsafe(release.wait, 10)  # the loop is stuck in a blocking call
            status, _, body = get(srv.port, "/healthz")
            assert status == 503 and "did not answer within 0.5 s" in json.loads(body)["reasons"][0]
            release.set()
            assert get(srv.port, "/healthz")[0] == 200
        finally:
            srv.stop()
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
    with pytest.raises(TimeoutError, match="closed"):
        health()


def test_listener_config_errors():
    for kw, field in (({"port": 70000}, "port"), ({"host": ""}, "host"), ({"max_connections": 0}, "max_connections")):
        with pytest.raises(errors.ConfigError, match=field):
            MetricsServer(registry=make_registry(), **kw)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        srv = MetricsServer("127.0.0.1", blocker.getsockname()[1], registry=make_registry())
        with pytest.raises(errors.ConfigError, match="metrics listener"):
            srv.start()
    finally:
        blocker.close()


# --- health aggregation --------------------------------------------------------------------------------------
def test_assess_states_and_fallback():
    gpu_ok = DeviceReading("gpu0", "gpu", True)
    rep = assess([ModelInput("m", 1, "READY"), ModelInput("m", 2, "FAILED", reason="load failed: bad file"),
                  ModelInput("n", 1, "LOADING")], [gpu_ok], required=["m"])
    assert rep.ready and rep.live
    m = rep.models["m"]
    assert (m["state"], m["version"], m["serving"]) == ("READY", 1, True)
    assert "version 2 is FAILED" in m["fallback"]
    assert [v["state"] for v in m["versions"]] == ["READY", "FAILED"]
    assert rep.models["n"]["state"] == "LOADING" and not rep.models["n"]["serving"]
    rep = assess([ModelInput("n", 1, "LOADING")], required=["n", ("m", 2)])
    assert not rep.ready
    assert any("'n' must be served: version 1 is LOADING" in r for r in rep.reasons)
    assert any("'m' version 2 must be served and is not loaded" in r for r in rep.reasons)
    assert assess([], listening=False).reasons == ("the server is not listening",)
    assert not assess([], draining=True).ready
    assert not assess([], require_model=True).ready  # an empty server is not ready when a model is required
    assert assess([]).ready
    d = rep.to_dict()
    assert set(d) == {"live", "ready", "reasons", "models", "devices"} and isinstance(rep, HealthReport)


def test_assess_policy_failed_wins_and_validation():
    p = EjectionPolicy()
    p.mark_failed(("m", 1), "ejected too often", 0.0)
    rep = assess([ModelInput("m", 1, "READY")], policy=p, required=["m"])
    assert rep.models["m"]["state"] == "FAILED" and not rep.ready
    with pytest.raises(errors.ConfigError, match="state"):
        ModelInput("m", 1, "SLEEPY")
    with pytest.raises(errors.ConfigError, match="version"):
        ModelInput("m", -1, "READY")
    with pytest.raises(errors.ConfigError, match="required"):
        assess([], required=[3])


# --- logs ------------------------------------------------------------------------------------------------------
def test_json_log_lines():
    buf = io.StringIO()
    handler = configure_logging(json_lines=True, stream=buf)
    try:
        log_event("eject", model="mlp", version=2, reason="5 consecutive failures", until=float("inf"),
                  extra={"codes": {"MODEL_ERROR"}}, msg="clash", level_hint=object.__name__)
        log_event("device_fault", device="gpu0", reason="lost")
        logging.getLogger("tinyserve.runtime").info("plain %s", "message")
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("tinyserve.server").exception("with a traceback")
        configure_logging(json_lines=True, stream=buf)  # replaces, does not duplicate
        log_event("readmit", model="mlp")
    finally:
        logging.getLogger("tinyserve").handlers.clear()
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(lines) == 5
    ej = lines[0]
    assert (ej["event"], ej["level"], ej["logger"], ej["model"], ej["version"]) == ("eject", "WARNING",
                                                                                  "tinyserve.events", "mlp", 2)
    assert ej["until"] == "inf" and ej["extra"] == {"codes": ["MODEL_ERROR"]} and ej["field_msg"] == "clash"
    assert ej["ts"].endswith("Z") and "eject model='mlp'" in ej["msg"]
    assert lines[1]["event"] == "device_fault" and lines[1]["level"] == "ERROR"
    assert lines[2]["msg"] == "plain message" and "event" not in lines[2]
    assert "ValueError: bad" in lines[3]["exc"]
    assert lines[4]["event"] == "readmit"
    assert handler not in logging.getLogger("tinyserve").handlers


def test_text_logs_and_unknown_kinds():
    buf = io.StringIO()
    configure_logging(json_lines=False, stream=buf)
    try:
        log_event("evict", model="m", bytes=10)
        log_event("something_new", x=1)
    finally:
        logging.getLogger("tinyserve").handlers.clear()
    out = buf.getvalue()
    assert "evict model='m' bytes=10" in out and "something_new x=1" in out
    assert JsonFormatter().format(logging.makeLogRecord({"msg": "%d", "args": ("x",)})).startswith("{")
