"""Prometheus exposition and the probe endpoints (docs/health.md sections 6 and 5).

    registry = make_registry(metrics=..., monitor=..., policy=..., health=...)   # a private CollectorRegistry
    http = MetricsServer("127.0.0.1", 9470, registry=registry, health=on_loop(loop, server_health, 2.0))
    http.start()            # a daemon thread; http.port is the bound port
    ...
    http.stop()

`/metrics` is prometheus-client's text format (or OpenMetrics when the scraper asks for it);
`/healthz` answers 200 while the process, and its event loop, answer (503 otherwise); `/readyz`
answers 200 when the server is ready (503 with the reasons otherwise).  The listener runs in its own
threads: a scrape never runs on the event loop, and a stuck event loop makes /healthz fail instead of
hang (`on_loop` bounds the wait).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tinyserve import errors
from tinyserve.health.ejection import SERVING
from tinyserve.metrics import Metrics

__all__ = ["BATCH_EDGES", "LATENCY_EDGES_US", "MetricsServer", "TinyserveCollector", "make_registry", "on_loop"]

log = logging.getLogger("tinyserve.health")

LATENCY_EDGES_US = tuple(1 << k for k in range(4, 26))  # le = 16 us .. 33.55 s: exact bucket boundaries
BATCH_EDGES = tuple(1 << k for k in range(0, 11))  # le = 1 .. 1024


def _key_labels(key) -> tuple[str, str]:
    if isinstance(key, tuple) and len(key) == 2:
        return str(key[0]), str(key[1])
    return str(key), ""


class TinyserveCollector:
    """A prometheus-client collector reading tinyserve's own statistics at scrape time.

    metrics: a metrics.Metrics; monitor: a DeviceMonitor (its latest readings); policy: an
    EjectionPolicy; health: a callable returning a HealthReport; storage: a callable returning a
    remote repository's resume counters (storage.base.ResumeCounters.snapshot); any may be None."""

    def __init__(self, metrics: Metrics | None = None, monitor=None, policy=None,
                 health: Callable | None = None, storage: Callable | None = None) -> None:
        self.metrics = metrics
        self.monitor = monitor
        self.policy = policy
        self.health = health
        self.storage = storage

    def collect(self):
        yield from self._models()
        yield from self._policy()
        yield from self._health()
        yield from self._devices()
        yield from self._storage()

    STORAGE_COUNTERS = (
        ("resumed_parts", "tinyserve_storage_resumed_parts_total",
         "Ranged reads of the remote repository completed after a broken body was re-requested."),
        ("resume_requests", "tinyserve_storage_resume_requests_total", "Re-requests of broken ranged reads."),
        ("kept_bytes", "tinyserve_storage_kept_bytes_total", "Bytes received before a break and kept."),
        ("resumed_bytes", "tinyserve_storage_resumed_bytes_total", "Bytes received through re-requests."),
        ("failed_parts", "tinyserve_storage_failed_parts_total", "Ranged reads given up after the last attempt."),
    )

    def _storage(self):
        if self.storage is None:
            return
        snap = self.storage()
        for key, name, doc in self.STORAGE_COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], snap.get(key, 0))
            yield c

    def _models(self):
        if self.metrics is None:
            return
        L = ["model", "version"]
        fam = {
            "req": CounterMetricFamily("tinyserve_requests_total", "Requests answered (successes and errors).", labels=L),
            "ok": CounterMetricFamily("tinyserve_request_successes_total", "Requests answered successfully.", labels=L),
            "err": CounterMetricFamily("tinyserve_request_errors_total", "Error replies by wire code.",
                                       labels=L + ["code"]),
            "inflight": GaugeMetricFamily("tinyserve_requests_in_flight", "Admitted requests not yet answered.", labels=L),
            "queue": GaugeMetricFamily("tinyserve_queue_depth", "Requests waiting in the model's queue.", labels=L),
            "tput": GaugeMetricFamily("tinyserve_throughput_requests_per_second",
                                      "Answered admitted requests per second over the sliding window.", labels=L),
            "loads": CounterMetricFamily("tinyserve_model_loads_total", "Loads of the version (failed ones too).", labels=L),
            "loadfail": CounterMetricFamily("tinyserve_model_load_failures_total", "Failed loads.", labels=L),
            "loads_s": CounterMetricFamily("tinyserve_model_load_seconds_total", "Seconds spent loading.", labels=L),
            "bytes": GaugeMetricFamily("tinyserve_model_resident_bytes", "Bytes of weights in memory.", labels=L),
        }
        hists = {
            "total": HistogramMetricFamily("tinyserve_request_duration_seconds",
                                           "From reading the request to queuing its reply.", labels=L),
            "queue": HistogramMetricFamily("tinyserve_request_queue_seconds", "Time in the model's queue.", labels=L),
            "compute": HistogramMetricFamily("tinyserve_request_compute_seconds",
                                             "Time running the model (pre/post-processing included).", labels=L),
        }
        batch = HistogramMetricFamily("tinyserve_batch_size", "Requests per model call.", labels=L)
        les = [floatToGoString(e / 1e6) for e in LATENCY_EDGES_US] + ["+Inf"]
        for ms in self.metrics.models():
            s = ms.snapshot()
            lv = [ms.name, str(ms.version)]
            fam["req"].add_metric(lv, s.requests)
            fam["ok"].add_metric(lv, s.successes)
            for code, n in sorted(s.errors.items()):
                fam["err"].add_metric(lv + [code], n)
            fam["inflight"].add_metric(lv, s.in_flight)
            fam["queue"].add_metric(lv, s.queue_depth)
            fam["tput"].add_metric(lv, s.throughput_rps)
            fam["loads"].add_metric(lv, s.loads)
            fam["loadfail"].add_metric(lv, s.load_failures)
            fam["loads_s"].add_metric(lv, s.load_s)
            fam["bytes"].add_metric(lv, s.resident_bytes)
            for name, h in (("total", s.total), ("queue", s.queue), ("compute", s.compute)):
                cum = h.cumulative(LATENCY_EDGES_US) + [sum(h.counts)]
                hists[name].add_metric(lv, list(zip(les, cum)), h.total / 1e9)
            sizes = sorted(s.batch.items())
            cum, acc, i = [], 0, 0
            for edge in BATCH_EDGES:
                while i < len(sizes) and sizes[i][0] <= edge:
                    acc += sizes[i][1]
                    i += 1
                cum.append(acc)
            n = sum(c for _, c in sizes)
            batch.add_metric(lv, list(zip([floatToGoString(e) for e in BATCH_EDGES] + ["+Inf"], cum + [n])),
                             float(sum(sz * c for sz, c in sizes)))
        yield from fam.values()
        yield from hists.values()
        yield batch

    def _policy(self):
        if self.policy is None:
            return
        ej = GaugeMetricFamily("tinyserve_model_ejected", "1 while the ejection policy holds the version out "
                               "of service (EJECTED, PROBING or FAILED).", labels=["model", "version", "state"])
        total = CounterMetricFamily("tinyserve_model_ejections_total", "Ejections of the version.",
                                    labels=["model", "version"])
        for key, st in self.policy.states():
            m, v = _key_labels(key)
            ej.add_metric([m, v, st.state], 0.0 if st.state == SERVING else 1.0)
            total.add_metric([m, v], st.ejections_total)
        yield ej
        yield total

    def _health(self):
        if self.health is None:
            return
        try:
            rep = self.health()
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.warning("tinyserve: health for /metrics failed: %r", exc)
            return
        g = GaugeMetricFamily("tinyserve_ready", "1 when the server is ready (see /readyz).")
        g.add_metric([], 1.0 if rep.ready else 0.0)
        yield g
        serving = GaugeMetricFamily("tinyserve_model_serving", "1 when the version takes requests.",
                                    labels=["model", "version", "state"])
        for name, m in sorted(rep.models.items()):
            for e in m.get("versions", ()):
                serving.add_metric([name, str(e["version"]), e["state"]], 1.0 if e["serving"] else 0.0)
        yield serving

    def _devices(self):
        if self.monitor is None:
            return
        readings = self.monitor.latest()
        D = ["device"]
        healthy = GaugeMetricFamily("tinyserve_device_healthy", "1 when the device answers and is fit to serve.", labels=D)
        used = GaugeMetricFamily("tinyserve_device_memory_used_bytes", "Device memory in use.", labels=D)
        total = GaugeMetricFamily("tinyserve_device_memory_total_bytes", "Device memory in all.", labels=D)
        util = GaugeMetricFamily("tinyserve_device_utilization_ratio", "GPU busy fraction (0..1).", labels=D)
        temp = GaugeMetricFamily("tinyserve_device_temperature_celsius", "GPU temperature.", labels=D)
        power = GaugeMetricFamily("tinyserve_device_power_watts", "GPU power draw.", labels=D)
        ecc = CounterMetricFamily("tinyserve_device_ecc_errors_total", "ECC errors since the driver loaded.",
                                  labels=D + ["type"])
        throttle = GaugeMetricFamily("tinyserve_device_throttled", "1 for each active clock-event (throttle) reason.",
                                     labels=D + ["reason"])
        load = GaugeMetricFamily("tinyserve_device_load_average", "Host load average.", labels=D + ["period"])
        for r in readings:
            d = [r.device]
            healthy.add_metric(d, 1.0 if r.healthy else 0.0)
            if r.memory_used is not None:
                used.add_metric(d, r.memory_used)
            if r.memory_total is not None:
                total.add_metric(d, r.memory_total)
            if r.utilization is not None:
                util.add_metric(d, r.utilization)
            if r.temperature_c is not None:
                temp.add_metric(d, r.temperature_c)
            if r.power_w is not None:
                power.add_metric(d, r.power_w)
            if r.ecc_corrected is not None:
                ecc.add_metric(d + ["corrected"], r.ecc_corrected)
            if r.ecc_uncorrected is not None:
                ecc.add_metric(d + ["uncorrected"], r.ecc_uncorrected)
            for reason in r.throttle:
                throttle.add_metric(d + [reason], 1.0)
            if r.load_avg is not None:
                for period, v in zip(("1m", "5m", "15m"), r.load_avg):
                    load.add_metric(d + [period], v)
        yield from (healthy, used, total, util, temp, power, ecc, throttle, load)


def make_registry(metrics: Metrics | None = None, monitor=None, policy=None, health: Callable | None = None,
                  storage: Callable | None = None) -> CollectorRegistry:
    """A private registry (not prometheus-client's global one) holding a TinyserveCollector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TinyserveCollector(metrics, monitor, policy, health, storage))
    return reg


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable, timeout_s: float = 2.0) -> Callable:
    """A callable for another thread that runs fn() on `loop` and returns its result, or raises
    TimeoutError when the loop does not run it within timeout_s (a stuck or stopped loop)."""

    def call():
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:
            raise TimeoutError("the event loop is closed") from None
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the event loop did not answer within {timeout_s:g} s") from None

    return call


class _Handler(BaseHTTPRequestHandler):
    server_version = "tinyserve-metrics"
    protocol_version = "HTTP/1.0"
    timeout = 10.0  # socket timeout: a slow client cannot hold a thread for long

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("metrics http: " + format, *args)

    def _send(self, code: int, body: bytes, ctype: str, extra: tuple = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: dict) -> None:
        self._send(code, (json.dumps(obj, default=str, sort_keys=True) + "\n").encode(), "application/json")

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        srv: MetricsServer = self.server.owner
        try:
            if path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept"))
                body = encoder(srv.registry)
                extra = ()
                if gzip_accepted(self.headers.get("Accept-Encoding")):
                    body, extra = gzip.compress(body), (("Content-Encoding", "gzip"),)
                self._send(200, body, ctype, extra)
            elif path in ("/healthz", "/readyz"):
                self._probe(srv, path == "/readyz")
            else:
                self._json(404, {"error": f"no such path {path[:100]!r} (paths: /metrics, /healthz, /readyz)"})
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        except Exception as exc:  # noqa: BLE001 - answer 500, keep serving
            log.exception("tinyserve: metrics endpoint %s failed", path)
            try:
                self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
            except OSError:
                pass

    do_HEAD = do_GET

    def _probe(self, srv: "MetricsServer", ready: bool) -> None:
        if srv.health is None:
            self._json(200 if not ready else 503, {"live": True, "ready": False,
                                                    "reasons": ["no health source configured"]})
            return
        try:
            rep = srv.health()
        except Exception as exc:  # noqa: BLE001 - a stuck loop (TimeoutError) or a failing report
            self._json(503, {"live": False, "ready": False, "reasons": [f"{type(exc).__name__}: {exc}"]})
            return
        body = rep.to_dict()
        if ready:
            self._json(200 if rep.ready and rep.live else 503, body)
        else:
            self._json(200 if rep.live else 503, {"live": rep.live, "ready": rep.ready, "reasons": list(rep.reasons)})

    def _not_allowed(self) -> None:
        self._send(405, b'{"error": "only GET and HEAD"}\n', "application/json", (("Allow", "GET, HEAD"),))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 32

    def __init__(self, addr, owner: "MetricsServer", family: int) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address):
        if not self.owner._slots.acquire(blocking=False):  # too many open: refuse, do not queue a thread
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._slots.release()


class MetricsServer:
    """The HTTP listener for /metrics, /healthz and /readyz (see the module docstring).

    health: a thread-safe callable returning a HealthReport (use `on_loop` to compute it on the event
    loop).  At most `max_connections` requests are served at once; others are closed unanswered."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, registry: CollectorRegistry,
                 health: Callable | None = None, max_connections: int = 16) -> None:
        if not isinstance(host, str) or not host:
            raise errors.ConfigError(f"metrics host must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise errors.ConfigError(f"metrics port must be 0..65535, got {port!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or not 1 <= max_connections <= 1024:
            raise errors.ConfigError(f"metrics max_connections must be 1..1024, got {max_connections!r}")
        self.host = host
        self._port = port
        self.registry = registry
        self.health = health
        self._slots = threading.BoundedSemaphore(max_connections)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    def start(self) -> None:
        """Bind and serve in a daemon thread.  ConfigError when the address cannot be bound."""
        if self._httpd is not None:
            return
        try:
            infos = socket.getaddrinfo(self.host, self._port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            self._httpd = _HTTPServer((self.host, self._port), self, family)
        except OSError as exc:
            raise errors.ConfigError(f"metrics listener {self.host}:{self._port}: {exc}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="tinyserve-metrics-http", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
