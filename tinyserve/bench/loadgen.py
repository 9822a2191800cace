"""The load generator: closed loop (N connections x P requests in flight, and a concurrency sweep)
and open loop (Poisson arrivals scheduled in advance, and a rate sweep), against a tinyserve server
(`TinyserveTarget`, `tinyserve.AsyncClient`) or an HTTP endpoint (`HttpTarget`, for the peers in
bench/peers/).

Everything runs on one event loop thread (uvloop when installed).  A measurement:

1. opens the connections, then runs the load for `warmup_s` (not measured);
2. cuts measurement windows of `StopRule.window_s` (by the time replies arrive) until the stability
   rule holds (tinyserve.bench.stats), `max_windows` were measured or `time_bound_s` passed;
3. reports the windows that decided (the last k when stable, else all) merged: throughput,
   p50/p90/p95/p99/p99.9, errors by code; its own CPU use (process CPU time / wall time, in cores;
   `saturated` when it is >= 0.9: one thread, so it may be setting the pace); for the open loop how
   late requests were sent against their schedule; and for tinyserve the server's `stats` (requests
   and errors during the point, its latency percentiles, and its queue / compute split when the
   server reports one).

Closed loop: each of `concurrency` workers sends its next request when the previous reply came;
the workers are spread round-robin over `connections` connections (a tinyserve connection carries
several in flight: pipelining; an HTTP/1.1 connection carries one, so HTTP gets one connection per
worker).  Latency = reply received - request started.

Open loop: arrival times come from `stats.poisson_schedule`, computed before the run; a request is
sent at (or as soon as the loop can after) its intended time whatever the state of earlier ones,
and its latency counts from the intended time, so a slow server (or a late generator) cannot hide
queueing (no coordinated omission).  At most `max_outstanding` requests are in flight; an arrival
beyond that is counted as error `LOADGEN_BACKLOG` instead of being sent.

Every loop is bounded: by the stop rule's time bound, by `max_records` completions per point and by
the sweep's length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tinyserve import errors
from tinyserve.bench import stats as st

SATURATION = 0.9  # cores of the generator's one thread above which it warns
SEND_LAG_WARN_US = 2000.0  # open loop: p99 of (sent - intended) above which it warns
MAX_RECORDS = 20_000_000
SPLIT_FIELDS = ("queue_us", "compute_us")  # the server's latency split, once it reports one


def error_code(exc: BaseException) -> str:
    """The code a failed request is counted under."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "TIMEOUT"
    if isinstance(exc, ConnectionError):
        return "CONNECTION_LOST"
    return type(exc).__name__


# --- targets ---------------------------------------------------------------------------------------
class TinyserveTarget:
    """Requests to a model on a tinyserve server, cycling through `inputs` (a list of input sets)."""

    pipelining = True
    kind = "tinyserve"

    def __init__(self, host: str, port: int, model: str, inputs: Sequence[Mapping], *, version: int | None = None,
                 token: str | None = None, ssl=None, timeout: float = 30.0, outputs: Sequence[str] | None = None,
                 label: str | None = None):
        if not inputs:
            raise errors.ConfigError("no input sets for the requests")
        self.host, self.port, self.model, self.version = host, int(port), model, version
        self.inputs = list(inputs)
        self.token, self.ssl, self.timeout, self.outputs = token, ssl, timeout, outputs
        self.label = label or f"tinyserve {model}" + (f":{version}" if version is not None else "")

    async def connect(self):
        from tinyserve.client import AsyncClient

        client = await AsyncClient.connect(self.host, self.port, token=self.token, ssl=self.ssl,
                                           timeout=self.timeout, connect_attempts=2)
        inputs, n, model, version, outputs, timeout = (self.inputs, len(self.inputs), self.model, self.version,
                                                        self.outputs, self.timeout)

        class Conn:
            async def request(self, i: int) -> None:
                await client.infer(model, inputs[i % n], version=version, outputs=outputs, timeout=timeout)

            async def close(self) -> None:
                await client.close()

        return Conn()

    async def server_stats(self) -> dict | None:
        from tinyserve.client import AsyncClient

        try:
            client = await AsyncClient.connect(self.host, self.port, token=self.token, ssl=self.ssl,
                                               timeout=10.0, connect_attempts=1)
        except (errors.TinyserveError, OSError):
            return None
        try:
            return await client.stats()
        except (errors.TinyserveError, OSError):
            return None
        finally:
            await client.close()


class _HttpConn(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, one request at a time (h11 does the HTTP)."""

    def __init__(self):
        import h11

        self.h11 = h11
        self.conn = h11.Connection(h11.CLIENT)
        self.transport = None
        self.waiter: asyncio.Future | None = None
        self.status = 0
        self.lost: BaseException | None = None

    def connection_made(self, transport):
        import socket

        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes):
        h11 = self.h11
        try:
            self.conn.receive_data(data)
            while True:
                ev = self.conn.next_event()
                if ev is h11.NEED_DATA:
                    return
                if isinstance(ev, h11.Response):
                    self.status = ev.status_code
                elif isinstance(ev, h11.EndOfMessage):
                    w, self.waiter = self.waiter, None
                    if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                        self.conn.start_next_cycle()
                    else:
                        self.transport.close()
                    if w is not None and not w.done():
                        w.set_result(self.status)
                    return
                elif isinstance(ev, h11.ConnectionClosed):
                    self._fail(ConnectionResetError("the HTTP server closed the connection"))
                    return
        except h11.RemoteProtocolError as exc:
            self._fail(ConnectionResetError(f"bad HTTP reply: {exc}"))

    def connection_lost(self, exc):
        self._fail(exc or ConnectionResetError("the HTTP server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class HttpError(errors.TinyserveError):
    code = "HTTP"


class HttpTarget:
    """POST requests to an HTTP endpoint (the peers), cycling through pre-encoded bodies.  A reply
    with a status other than 200 counts as error `HTTP_<status>`."""

    pipelining = False
    kind = "http"

    def __init__(self, url: str, bodies: Sequence[bytes], *, content_type: str = "application/json",
                 timeout: float = 30.0, label: str | None = None):
        from urllib.parse import urlsplit

        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise errors.ConfigError(f"HTTP target {url!r}: only http://host:port/path URLs are supported")
        if not bodies:
            raise errors.ConfigError("no request bodies")
        self.url, self.host, self.port = url, u.hostname, u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.bodies = [bytes(b) for b in bodies]
        self.content_type, self.timeout = content_type, timeout
        self.label = label or url

    async def _open(self) -> _HttpConn:
        loop = asyncio.get_running_loop()
        _tr, proto = await asyncio.wait_for(loop.create_connection(_HttpConn, self.host, self.port), self.timeout)
        return proto

    async def connect(self):
        import h11

        target = self
        state = {"p": await self._open()}
        headers_of = [[("Host", f"{self.host}:{self.port}"), ("Content-Type", self.content_type),
                       ("Content-Length", str(len(b))), ("Connection", "keep-alive")] for b in self.bodies]
        n = len(self.bodies)

        class Conn:
            async def request(self, i: int) -> None:
                p = state["p"]
                if p.lost is not None or p.transport.is_closing():
                    p = state["p"] = await target._open()
                fut = asyncio.get_running_loop().create_future()
                p.waiter = fut
                p.transport.write(p.conn.send(h11.Request(method="POST", target=target.path,
                                                          headers=headers_of[i % n])))
                p.transport.write(p.conn.send(h11.Data(data=target.bodies[i % n])))
                p.transport.write(p.conn.send(h11.EndOfMessage()))
                try:
                    status = await asyncio.wait_for(fut, target.timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    p.transport.close()  # the reply may still come: do not reuse the connection
                    raise
                if status != 200:
                    e = HttpError(f"HTTP status {status}")
                    e.code = f"HTTP_{status}"
                    raise e

            async def close(self) -> None:
                if state["p"].transport is not None:
                    state["p"].transport.close()

        return Conn()

    async def server_stats(self) -> dict | None:
        return None


# --- one measurement -------------------------------------------------------------------------------
class _Recorder:
    __slots__ = ("t", "lat", "code", "limit")

    def __init__(self, limit: int):
        self.t: list[float] = []
        self.lat: list[float] = []
        self.code: list[str | None] = []
        self.limit = limit

    def add(self, t: float, lat_us: float, code: str | None) -> None:
        self.t.append(t)
        self.lat.append(lat_us)
        self.code.append(code)

    def window(self, index: int, lo: int, hi: int, start: float, end: float) -> st.Window:
        lat = np.asarray(self.lat[lo:hi], dtype=np.float64)
        codes = self.code[lo:hi]
        errs: dict[str, int] = {}
        ok = np.ones(hi - lo, dtype=bool)
        for j, c in enumerate(codes):
            if c is not None:
                ok[j] = False
                errs[c] = errs.get(c, 0) + 1
        return st.Window(index, start, end, lat[ok], errs)


async def _sleep_until(t: float) -> None:
    d = t - time.perf_counter()
    if d > 0:
        await asyncio.sleep(d)


async def _measure(rec: _Recorder, rule: st.StopRule, warmup_s: float, on_window: Callable | None,
                   stopped: Callable[[], bool]) -> tuple[list[st.Window], str, float]:
    """Cut windows from the recorder as the load runs; (windows, why it stopped, CPU cores used)."""
    await _sleep_until(time.perf_counter() + warmup_s)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    mark, start = len(rec.t), t0
    windows: list[st.Window] = []
    why = None
    while why is None:
        await _sleep_until(start + rule.window_s)
        end = time.perf_counter()
        hi = len(rec.t)
        windows.append(rec.window(len(windows), mark, hi, start, end))
        mark, start = hi, end
        if on_window is not None:
            on_window(windows[-1])
        why = rule.verdict(windows)
        if why is None and (hi >= rec.limit or stopped()):
            why = "record_limit" if hi >= rec.limit else "load_ended"
    cpu = (time.process_time() - cpu0) / max(1e-9, time.perf_counter() - t0)
    return windows, why, cpu


def _point_result(mode: str, target, windows: list[st.Window], why: str, rule: st.StopRule, cpu: float,
                  extra: dict, before: dict | None, after: dict | None) -> dict:
    decided = windows[-rule.k:] if why == "stable" else windows
    summary = st.summarize(decided)
    lat = np.concatenate([w.latencies_us for w in decided]) if decided else np.zeros(0)
    warnings = []
    if cpu >= SATURATION:
        warnings.append(f"load generator saturated: it used {cpu:.2f} cores of its one thread; the figures may "
                        f"be the generator's limit, not the server's (run more generator processes or lower the load)")
    if why != "stable":
        warnings.append(f"not stable: stopped by {why} after {len(windows)} windows (throughput and p50 of the "
                        f"last {rule.k} windows not within {rule.tolerance:.0%} of their mean)")
    if summary["samples"] and summary["samples"] < 1000:
        warnings.append(f"p99.9 from only {summary['samples']} samples")
    res = {
        "mode": mode,
        "target": target.label,
        **extra,
        "stop": why,
        "stable": why == "stable",
        "windows": [w.brief() for w in windows],
        "windows_reported": len(decided),
        **summary,
        "histogram": st.log_histogram(lat),
        "loadgen": {"cpu_cores": round(cpu, 3), "saturated": cpu >= SATURATION},
        "server": server_delta(before, after, getattr(target, "model", None)),
        "warnings": warnings,
        "_latencies_us": lat,
    }
    return res


def server_delta(before: dict | None, after: dict | None, model: str | None = None) -> dict | None:
    """What the server's `stats` (server-wide, as the `stats` op without `model` returns it) says
    about a point: requests and errors by code during it (after - before, every op of every client:
    the server counts a refused request, such as UNAVAILABLE, only server-wide), the model's latency
    percentiles (cumulative since the server started), and the model's queue / compute split when the
    server reports one (`queue_us`, `compute_us`: maps of percentiles, per model or server-wide)."""
    if not after:
        return None
    b = before or {}
    mine = (after.get("models") or {}).get(model) if model is not None else None
    mine = mine if isinstance(mine, dict) else after
    out = {"requests": (after.get("requests") or 0) - (b.get("requests") or 0),
           "errors": {}, "latency_us_cumulative": mine.get("latency_us")}
    for code, n in (after.get("errors") or {}).items():
        d = n - (b.get("errors") or {}).get(code, 0)
        if d:
            out["errors"][code] = d
    split = {k: mine[k] for k in SPLIT_FIELDS if k in mine} or {k: after[k] for k in SPLIT_FIELDS if k in after}
    out["split"] = split or None
    if isinstance(mine.get("batch_size"), dict):  # requests per model call (dynamic batching), cumulative
        out["batch_size_cumulative"] = mine["batch_size"]
    if not split:
        out["split_note"] = "the server does not report a queue / compute split (stats has no queue_us / compute_us)"
    return out


async def closed_loop_async(target, *, concurrency: int = 1, connections: int = 1, rule: st.StopRule | None = None,
                            warmup_s: float = 1.0, on_window: Callable | None = None,
                            max_records: int = MAX_RECORDS) -> dict:
    """One closed-loop point: `concurrency` requests in flight over `connections` connections."""
    rule = rule or st.StopRule()
    if concurrency < 1 or connections < 1:
        raise errors.ConfigError(f"concurrency and connections must be >= 1, got {concurrency}, {connections}")
    n_conn = min(concurrency, connections) if target.pipelining else concurrency
    before = await target.server_stats()
    conns = []
    try:
        for _ in range(n_conn):
            conns.append(await target.connect())
    except BaseException:
        for c in conns:
            await c.close()
        raise
    rec = _Recorder(max_records)
    state = {"stop": False}

    async def worker(conn, wid: int) -> None:
        i = wid
        add, perf = rec.add, time.perf_counter
        while not state["stop"]:
            t0 = perf()
            try:
                await conn.request(i)
                code = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted by its code
                code = error_code(exc)
            t1 = perf()
            add(t1, (t1 - t0) * 1e6, code)
            i += concurrency
            if code is not None and (t1 - t0) < 0.001:
                await asyncio.sleep(0.001)  # a failure without a round trip: do not spin
            if len(rec.t) >= max_records:
                return

    tasks = [asyncio.ensure_future(worker(conns[w % n_conn], w)) for w in range(concurrency)]
    try:
        windows, why, cpu = await _measure(rec, rule, warmup_s, on_window, lambda: all(t.done() for t in tasks))
    finally:
        state["stop"] = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.close()
    after = await target.server_stats()
    res = _point_result("closed", target, windows, why, rule, cpu,
                        {"concurrency": concurrency, "connections": n_conn}, before, after)
    res["all_completions"] = len(rec.t)  # warm-up and the tail included
    return res


async def open_loop_async(target, *, rate: float, connections: int = 4, rule: st.StopRule | None = None,
                          warmup_s: float = 1.0, seed: int = 0, max_outstanding: int = 10_000,
                          on_window: Callable | None = None, max_records: int = MAX_RECORDS) -> dict:
    """One open-loop point: Poisson arrivals at `rate` requests/s, sent over `connections`
    connections (round-robin; HTTP targets open up to `max_outstanding` connections as needed)."""
    rule = rule or st.StopRule()
    if connections < 1 or max_outstanding < 1:
        raise errors.ConfigError(f"connections and max_outstanding must be >= 1, got {connections}, {max_outstanding}")
    horizon = warmup_s + rule.time_bound_s + 2 * rule.window_s  # the schedule outlasts any measurement
    sched = st.poisson_schedule(rate, horizon, seed)
    before = await target.server_stats()
    conns = []
    free: list = []  # HTTP: idle connections (one request each at a time)
    try:
        for _ in range(connections):
            conns.append(await target.connect())
    except BaseException:
        for c in conns:
            await c.close()
        raise
    free.extend(conns)
    rec = _Recorder(max_records)
    lags: list[float] = []
    outstanding: set = set()
    state = {"stop": False, "sent": 0, "backlog": 0}
    loop = asyncio.get_running_loop()
    perf = time.perf_counter

    async def one(conn, i: int, t_int: float) -> None:
        try:
            await conn.request(i)
            code = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            code = error_code(exc)
        t1 = perf()
        rec.add(t1, (t1 - t_int) * 1e6, code)
        if not target.pipelining:
            free.append(conn)

    async def sender() -> None:
        base = perf() + 0.005
        times = sched + base
        n, i = times.size, 0
        while i < n and not state["stop"] and len(rec.t) < max_records:
            now = perf()
            if times[i] > now:
                await asyncio.sleep(times[i] - now)
                continue
            while i < n and times[i] <= now:
                t_int = float(times[i])
                if len(outstanding) >= max_outstanding:
                    rec.add(t_int, 0.0, "LOADGEN_BACKLOG")
                    state["backlog"] += 1
                else:
                    if target.pipelining:
                        conn = conns[i % len(conns)]
                    else:
                        if not free:
                            try:
                                c = await target.connect()
                            except (OSError, asyncio.TimeoutError, errors.TinyserveError) as exc:
                                rec.add(perf(), (perf() - t_int) * 1e6, error_code(exc))
                                i += 1
                                continue
                            conns.append(c)
                            free.append(c)
                        conn = free.pop()
                    task = loop.create_task(one(conn, i, t_int))
                    outstanding.add(task)
                    task.add_done_callback(outstanding.discard)
                    lags.append((perf() - t_int) * 1e6)
                    state["sent"] += 1
                i += 1
            await asyncio.sleep(0)  # let replies in between bursts

    send_task = asyncio.ensure_future(sender())
    try:
        windows, why, cpu = await _measure(rec, rule, warmup_s, on_window, send_task.done)
    finally:
        state["stop"] = True
        send_task.cancel()
        left = len(outstanding)
        for t in list(outstanding):
            t.cancel()
        await asyncio.gather(send_task, *outstanding, return_exceptions=True)
        for c in conns:
            await c.close()
    after = await target.server_stats()
    res = _point_result("open", target, windows, why, rule, cpu,
                        {"rate": rate, "connections": len(conns), "seed": seed}, before, after)
    lag = st.percentiles(lags, (50.0, 99.0, 100.0))
    res["loadgen"]["send_lag_us"] = {k.replace("p100", "max"): v for k, v in lag.items()}
    res["loadgen"]["backlog_skipped"] = state["backlog"]
    res["loadgen"]["in_flight_at_end"] = left
    res["offered_rate"] = rate
    res["all_completions"] = len(rec.t)
    if lag["p99"] is not None and lag["p99"] > SEND_LAG_WARN_US:
        res["warnings"].append(f"requests were sent late: p99 {lag['p99']:.0f} us after their intended time "
                               f"(the generator cannot keep the schedule; latency counts from the schedule)")
    if state["backlog"]:
        res["warnings"].append(f"{state['backlog']} arrivals skipped: {max_outstanding} requests already in flight")
    if res["ok_throughput"] < 0.9 * rate and why != "load_ended":
        res["warnings"].append(f"server behind: {res['ok_throughput']:.0f} answers/s for {rate:g} offered/s")
    return res


# --- sweeps and blocking entry points --------------------------------------------------------------
def _run(coro):
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def sweep_async(target, points: Sequence[dict], mode: str, *, on_point: Callable | None = None,
                      stop_when_saturated: bool = True, **kw) -> list[dict]:
    """Run `points` (each the keyword arguments of one point: {'concurrency': c} or {'rate': r})
    in order.  An open-loop sweep stops after the first point the server cannot keep up with
    (answers below 90% of the offered rate) when `stop_when_saturated`."""
    out = []
    for p in points:
        fn = closed_loop_async if mode == "closed" else open_loop_async
        res = await fn(target, **{**kw, **p})
        out.append(res)
        if on_point is not None:
            on_point(res)
        if mode == "open" and stop_when_saturated and res["ok_throughput"] < 0.9 * res["rate"]:
            break
    return out


def run_closed_loop(target, **kw) -> dict:
    """Blocking: one closed-loop point (see closed_loop_async)."""
    return _run(closed_loop_async(target, **kw))


def run_open_loop(target, **kw) -> dict:
    """Blocking: one open-loop point (see open_loop_async).  Used by other benchmarks as a library:

        from tinyserve.bench.loadgen import TinyserveTarget, run_open_loop
        from tinyserve.bench.stats import StopRule
        res = run_open_loop(TinyserveTarget("127.0.0.1", port, "mlp", inputs), rate=2000,
                            rule=StopRule(window_s=1, time_bound_s=20))
        res["throughput"], res["latency_us"]["p99"], res["errors"]
    """
    return _run(open_loop_async(target, **kw))


def run_sweep(target, points: Sequence[dict], mode: str, **kw) -> list[dict]:
    """Blocking: a concurrency sweep (mode 'closed') or a rate sweep (mode 'open')."""
    if mode not in ("closed", "open"):
        raise errors.ConfigError(f"mode must be 'closed' or 'open', got {mode!r}")
    return _run(sweep_async(target, points, mode, **kw))


def fetch_metadata(host: str, port: int, model: str, version: int | None = None, **client_kw) -> dict:
    from tinyserve.client import Client

    with Client(host, port, connect_attempts=2, **client_kw) as c:
        return c.metadata(model, version)

