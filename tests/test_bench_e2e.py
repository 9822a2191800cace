"""tinyserve bench end to end, with small bounds: the closed and open loops against an in-process
tinyserve server (test_client.RealServer), the `tinyserve bench` command (table, JSON, plots, exit
status), errors counted by code, the open loop's latency counted from the schedule (no coordinated
omission, against a fake target whose replies queue), and the HTTP mode against a loopback HTTP
server."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import numpy as np
import pytest

from test_client import RealServer, model_repo  # noqa: F401  (model_repo is a fixture)
from tinyserve.bench import inputs as inp
from tinyserve.bench import loadgen
from tinyserve.bench.stats import StopRule

pytestmark = pytest.mark.timeout(90)

QUICK = StopRule(window_s=0.2, k=3, tolerance=0.5, min_windows=3, max_windows=6, time_bound_s=1.5)


@pytest.fixture(scope="module")
def server(model_repo):  # noqa: F811
    srv = RealServer(repo=model_repo, models=("mlp",), torch_threads=1).start()
    yield srv
    srv.stop()


def mlp_target(port, model="mlp"):
    meta = loadgen.fetch_metadata("127.0.0.1", port, model)
    return loadgen.TinyserveTarget("127.0.0.1", port, model, inp.random_inputs(meta["inputs"], count=4))


def test_closed_loop_against_the_server(server):
    res = loadgen.run_closed_loop(mlp_target(server.port), concurrency=4, connections=2, rule=QUICK, warmup_s=0.1)
    assert res["mode"] == "closed" and res["connections"] == 2 and res["concurrency"] == 4
    assert res["errors"] == {} and res["ok"] > 20
    assert 3 <= len(res["windows"]) <= 6 and res["stop"] in ("stable", "max_windows", "time_bound")
    lat = res["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= res["max_us"]
    assert res["throughput"] == pytest.approx(res["completed"] / res["seconds"])
    # the server counted at least what was measured (plus warm-up and the tail)
    assert res["server"]["requests"] >= res["completed"]
    assert res["server"]["latency_us_cumulative"]["p50"] > 0
    # the server reports the queue / compute split (docs/health.md): it is carried through
    split = res["server"]["split"]
    assert split is not None and split["compute_us"]["p50"] > 0 and "p99" in split["queue_us"]
    assert 0 < res["loadgen"]["cpu_cores"] < 2.5


def test_open_loop_against_the_server(server):
    res = loadgen.run_open_loop(mlp_target(server.port), rate=300, connections=2, rule=QUICK, warmup_s=0.1, seed=5)
    assert res["mode"] == "open" and res["rate"] == 300 and res["errors"] == {}
    assert res["ok_throughput"] == pytest.approx(300, rel=0.5)
    assert res["loadgen"]["send_lag_us"]["p50"] is not None and res["loadgen"]["backlog_skipped"] == 0


def test_errors_are_counted_by_code(server):
    # encoder-bf16 is in the repository (metadata works) but not loaded: every infer is UNAVAILABLE
    rule = StopRule(window_s=0.1, k=3, min_windows=3, max_windows=3, time_bound_s=1)
    res = loadgen.run_closed_loop(mlp_target(server.port, "encoder-bf16"), concurrency=2, rule=rule, warmup_s=0)
    assert set(res["errors"]) == {"UNAVAILABLE"} and res["errors"]["UNAVAILABLE"] == res["completed"] > 0
    assert res["ok"] == 0 and res["latency_us"]["p50"] is None
    assert res["server"]["errors"].get("UNAVAILABLE", 0) >= res["completed"]


def test_bench_command(server, tmp_path, capsys):
    from tinyserve.cli import main

    out = tmp_path / "r.json"
    code = main(["bench", "mlp", "--port", str(server.port), "--concurrency", "1,4", "--connections", "2",
                 "--window", "0.2", "--time-bound", "1", "--max-windows", "5", "--warmup", "0.1",
                 "--json", str(out), "--plot", str(tmp_path / "plots"), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "c1 (1 conn)" in text and "c4 (2 conn)" in text and "p99.9" in text
    doc = json.loads(out.read_text())
    assert [p["concurrency"] for p in doc["points"]] == [1, 4]
    assert doc["server"]["metadata"]["inputs"][0]["name"] == "x"
    assert all(p["ok"] > 0 and sum(p["histogram"]["counts"]) == p["ok"] for p in doc["points"])
    for name in ("latency_vs_throughput.png", "latency_distribution.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_bench_command_inputs_from_npy_and_failures(server, tmp_path, capsys):
    from tinyserve.cli import main

    x = tmp_path / "x.npy"
    np.save(x, np.ones((3, 64), np.float32))
    common = ["--port", str(server.port), "--window", "0.1", "--time-bound", "0.3", "--max-windows", "3",
              "--warmup", "0", "--quiet"]
    assert main(["bench", "mlp", "--input", f"x={x}", "--rate", "100", *common]) == 0
    assert "rate 100/s" in capsys.readouterr().out
    # a request that fails is counted and makes the exit status 1
    assert main(["bench", "encoder-bf16", *common]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out
    # bad input: a clear error, exit 2
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((3, 65), np.float32))
    assert main(["bench", "mlp", "--input", f"x={bad}", *common]) == 2
    assert "shape [3, 65]" in capsys.readouterr().err
    assert main(["bench", "nope", *common]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "mlp", "--rate", "0"])
    assert "must be > 0" in capsys.readouterr().err


class Queued:
    """A fake target whose requests are served one at a time, `service_s` each (a single-worker
    server): offered above 1 / service_s, replies queue."""

    pipelining = True
    label = "queued"

    def __init__(self, service_s: float):
        self.service_s = service_s
        self.lock = None

    async def connect(self):
        if self.lock is None:
            self.lock = asyncio.Lock()
        target = self

        class Conn:
            async def request(self, i):
                async with target.lock:
                    await asyncio.sleep(target.service_s)

            async def close(self):
                pass

        return Conn()

    async def server_stats(self):
        return None


def test_open_loop_counts_latency_from_the_schedule():
    # capacity ~100/s (10 ms each); offered 200/s for ~1 s: the queue grows by ~100 requests per second,
    # so requests near the end wait hundreds of ms.  A closed loop (and a loop that measured from the
    # actual send) would report about 10 ms.
    rule = StopRule(window_s=0.25, k=3, tolerance=0.05, min_windows=3, max_windows=4, time_bound_s=1.0)
    res = loadgen.run_open_loop(Queued(0.01), rate=200, connections=1, rule=rule, warmup_s=0, seed=1)
    assert res["latency_us"]["p99"] > 200_000
    assert res["ok_throughput"] < 130
    assert any("server behind" in w for w in res["warnings"])
    closed = loadgen.run_closed_loop(Queued(0.01), concurrency=1, rule=rule, warmup_s=0)
    assert closed["latency_us"]["p99"] < 60_000


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Handler.seen.append(json.loads(body))
        status = 503 if self.path == "/bad" else 200
        out = b'{"y": [1.0]}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    t.join(10)


def test_http_mode(http_server):
    rule = StopRule(window_s=0.1, k=3, tolerance=0.9, min_windows=3, max_windows=3, time_bound_s=1)
    bodies = [json.dumps({"x": [[float(i)] * 4]}).encode() for i in range(3)]
    ok = loadgen.run_closed_loop(loadgen.HttpTarget(f"http://127.0.0.1:{http_server}/ok", bodies),
                                 concurrency=2, rule=rule, warmup_s=0)
    assert ok["errors"] == {} and ok["ok"] > 5 and ok["connections"] == 2
    assert {tuple(b["x"][0]) for b in _Handler.seen} == {(0.0,) * 4, (1.0,) * 4, (2.0,) * 4}
    bad = loadgen.run_closed_loop(loadgen.HttpTarget(f"http://127.0.0.1:{http_server}/bad", bodies),
                                  concurrency=1, rule=rule, warmup_s=0)
    assert set(bad["errors"]) == {"HTTP_503"} and bad["ok"] == 0
    with pytest.raises(Exception, match="only http://"):
        loadgen.HttpTarget("https://example.invalid/x", bodies)


def test_http_open_loop_opens_connections_as_needed(http_server):
    rule = StopRule(window_s=0.1, k=3, tolerance=0.9, min_windows=3, max_windows=3, time_bound_s=1)
    bodies = [b'{"x": [[1.0]]}']
    res = loadgen.run_open_loop(loadgen.HttpTarget(f"http://127.0.0.1:{http_server}/ok", bodies),
                                rate=200, connections=1, rule=rule, warmup_s=0.05, max_outstanding=4)
    assert res["errors"].keys() <= {"LOADGEN_BACKLOG"} and res["ok"] > 10
    assert 1 <= res["connections"] <= 4 + 1
