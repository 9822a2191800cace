"""The tinyserve server: the composition root (config -> repository, model instances, connections).

Public API (used by `tinyserve serve` and the tests):

    ServerConfig(repo, host="127.0.0.1", port=0, models=(), token=None, tls_certfile=None,
                 tls_keyfile=None, limits=wire.Limits(), max_connections=1024, max_in_flight=4096,
                 max_in_flight_per_connection=128, idle_timeout_s=300.0, torch_threads=None,
                 use_uvloop=True, verify="compressed", drain_timeout_s=30.0, max_frame_memory=1 << 30)
    server = Server(config)
    await server.start()            # loads + warms up config.models, then listens
    server.port / server.host       # the bound address (port 0 -> the one picked)
    await server.stop(drain_timeout=30.0)   # stop accepting, finish in-flight requests, close
    await server.wait_stopped()
    run(config, *, on_ready=None) -> int    # blocking; SIGTERM/SIGINT -> graceful stop -> 0

`tinyserve serve` (tinyserve/cli.py; also `python -m tinyserve serve`) runs `run()`.

Ops and error codes: docs/protocol.md.  The event loop does framing, validation and routing only;
each loaded model version has its own worker thread (tinyserve/runtime.py), which also encodes the
reply so the loop merely writes it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinyserve import errors, memory, wire
from tinyserve.config import parse_devices
from tinyserve.core.models import BLOCKED_RETRY_S, Models, _Blocked, _Listing, _weights_bytes  # noqa: F401 - re-exported
from tinyserve.core.requests import Histogram, Requests, Stats  # noqa: F401 - Histogram, Stats: re-exported
from tinyserve.core.service import Core
from tinyserve.frontends.tcp import TcpFrontEnd
from tinyserve.health import EjectionConfig, MetricsServer, make_registry, on_loop
from tinyserve.memory import Placement
from tinyserve.protocol import FrameMemory
from tinyserve.remote import VersionPolicy
from tinyserve.repository import Repository
from tinyserve.runtime import Completions, ModelInstance

__all__ = ["Server", "ServerConfig", "Stats", "run"]

log = logging.getLogger("tinyserve.server")
_perf_ns = time.perf_counter_ns
_monotonic = time.monotonic


# --- configuration ---------------------------------------------------------------------------------
def _model_ref(item: object) -> tuple[str, int | None]:
    """'name', 'name:version' or (name, version) -> (name, version or None)."""
    if isinstance(item, str):
        name, sep, ver = item.partition(":")
        if sep:
            if not ver.isdigit():
                raise errors.ConfigError(f"models: {item!r} must be NAME or NAME:VERSION")
            version: int | None = int(ver)
        else:
            version = None
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        name, version = item
    else:
        raise errors.ConfigError(f"models: {item!r} must be NAME, NAME:VERSION or (name, version)")
    try:
        Repository.validate_name(name)
        if version is not None:
            Repository.validate_version(version)
    except errors.InvalidNameError as exc:
        raise errors.ConfigError(f"models: {exc}") from None
    return name, version


def _positive_int(name: str, value: object, hi: int = 1 << 40) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise errors.ConfigError(f"{name} must be an integer 1..{hi}, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server is built from (validated at construction; ConfigError names the field)."""

    repo: str | os.PathLike
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (see Server.port)
    models: tuple = ()  # loaded and warmed up before the server listens: "name", "name:3", (name, 3)
    token: str | None = None  # shared secret; the first request must be hello with it
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    limits: wire.Limits = field(default_factory=wire.Limits)
    max_connections: int = 1024
    max_in_flight: int = 4096  # requests in flight, server-wide; beyond: TOO_MANY_REQUESTS
    max_in_flight_per_connection: int = 128  # beyond: the connection is not read (backpressure)
    idle_timeout_s: float = 300.0  # 0: never
    torch_threads: int | None = None  # torch.set_num_threads in each worker; None: torch's default
    use_uvloop: bool = True  # run(): uvloop when importable, else asyncio
    verify: str = "compressed"  # weights checks at load: none | compressed | all
    drain_timeout_s: float = 30.0  # run(): how long SIGTERM waits for in-flight requests
    max_frame_memory: int = 1 << 30  # bytes of large frames being received at once, server-wide
    repo_cache_s: float = 1.0  # how long repository listings are cached (reloaded on load/unload)
    direct_replies: bool = True  # workers write replies to plain-TCP sockets themselves (no loop wakeup)
    metrics_port: int | None = None  # HTTP /metrics, /healthz, /readyz (None: no listener; 0: any free port)
    metrics_host: str = "127.0.0.1"
    # the Open Inference Protocol (KServe v2) front ends on `host` (docs/http-grpc.md); None: off, 0: any free port
    http_port: int | None = None
    grpc_port: int | None = None
    device_poll_s: float = 5.0  # device monitor interval (NVML, or the host where there is none)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)  # docs/health.md section 3
    pinned: tuple = ()  # models ejected but never unloaded by the ejection policy: "name", "name:3"
    require_model: bool = False  # ready only while at least one model version serves
    # remote repositories (repo = "s3://bucket/prefix", docs/remote.md) and model control
    cache_dir: str | None = None  # the remote repository's local cache (default: see docs/remote.md)
    cache_bytes: int | None = None
    storage: dict = field(default_factory=dict)  # S3 options: endpoint_url, region, access_key, ...
    model_control: str = "explicit"  # explicit: load/unload ops only; poll: follow the repository
    poll_interval_s: float = 10.0
    version_policies: dict = field(default_factory=dict)  # name -> "latest: N" | "specific: [..]" | "all"
    # memory-aware placement (docs/scheduler.md section 4): with a budget, or on a GPU, a request for
    # a model version that is not loaded loads it on demand, evicting idle ones least-recently-used
    # first.  One size for every device in use, or {device: bytes} (a GPU without one: its probed size)
    memory_budget: int | dict | None = None
    # where models run: cpu, cuda:N, a comma list (cuda:0,cuda:1), or auto (every GPU torch sees, else cpu)
    device: str = "cpu"
    instances: int = 1  # worker threads per loaded version (a model's placement.min_instances wins)
    statistics: bool = True  # per-request statistics and the ejection policy's bookkeeping (off: for A/B cost runs)
    # the loop runs a request itself, without the thread hand-off, when the version's worker is idle and
    # its measured calls take at most this long (unbatched, one worker, on the CPU; runtime.py, inline
    # runs); 0: every request goes to the worker thread
    inline_max_us: int = 200

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise errors.ConfigError(f"host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise errors.ConfigError(f"port must be 0..65535, got {self.port!r}")
        models = self.models
        if isinstance(models, str):
            models = (models,)
        object.__setattr__(self, "models", tuple(_model_ref(m) for m in models))
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise errors.ConfigError("token must be a non-empty string or None")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise errors.ConfigError("tls_certfile and tls_keyfile go together")
        if not isinstance(self.limits, wire.Limits):
            raise errors.ConfigError(f"limits must be a wire.Limits, got {type(self.limits).__name__}")
        lim = self.limits
        _positive_int("limits.max_frame_bytes", lim.max_frame_bytes, (1 << 32) - 4)
        _positive_int("limits.max_header_bytes", lim.max_header_bytes, lim.max_frame_bytes)
        _positive_int("limits.max_tensors", lim.max_tensors, 1 << 16)
        _positive_int("max_connections", self.max_connections, 1 << 20)
        _positive_int("max_in_flight", self.max_in_flight, 1 << 24)
        _positive_int("max_in_flight_per_connection", self.max_in_flight_per_connection, 1 << 20)
        _positive_int("max_frame_memory", self.max_frame_memory, 1 << 48)
        for name in ("idle_timeout_s", "drain_timeout_s", "repo_cache_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9:
                raise errors.ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.torch_threads is not None:
            _positive_int("torch_threads", self.torch_threads, 1024)
        if self.verify not in ("none", "compressed", "all"):
            raise errors.ConfigError(f"verify must be none, compressed or all, got {self.verify!r}")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port <= 65535):
            raise errors.ConfigError(f"metrics_port must be 0..65535 or None, got {self.metrics_port!r}")
        for name in ("http_port", "grpc_port"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535):
                raise errors.ConfigError(f"{name} must be 0..65535 or None, got {v!r}")
        v = self.device_poll_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.01 <= v <= 3600:
            raise errors.ConfigError(f"device_poll_s must be a number in [0.01, 3600], got {v!r}")
        if not isinstance(self.ejection, EjectionConfig):
            raise errors.ConfigError(f"ejection must be an EjectionConfig, got {type(self.ejection).__name__}")
        if self.model_control not in ("explicit", "poll"):
            raise errors.ConfigError(f"model_control must be explicit or poll, got {self.model_control!r}")
        v = self.poll_interval_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 86400:
            raise errors.ConfigError(f"poll_interval_s must be a number of seconds in (0, 86400], got {v!r}")
        if not isinstance(self.version_policies, dict):
            raise errors.ConfigError("version_policies must map model names to policies")
        object.__setattr__(self, "version_policies",
                           {n: VersionPolicy.parse(spec) for n, spec in self.version_policies.items()})
        if not isinstance(self.storage, dict):
            raise errors.ConfigError("storage must be a dict of S3 options")
        if self.cache_bytes is not None:
            _positive_int("cache_bytes", self.cache_bytes, 1 << 60)
        if isinstance(self.memory_budget, dict):
            for dev, n in self.memory_budget.items():
                if not isinstance(dev, str) or not re.fullmatch(r"cpu|cuda:\d{1,4}", dev):
                    raise errors.ConfigError(f"memory_budget: {dev!r} is not a device (cpu or cuda:N)")
                _positive_int(f"memory_budget[{dev}]", n, 1 << 60)
            object.__setattr__(self, "memory_budget", dict(self.memory_budget))
        elif self.memory_budget is not None:
            _positive_int("memory_budget", self.memory_budget, 1 << 60)
        _positive_int("instances", self.instances, 256)
        if type(self.inline_max_us) is not int or not 0 <= self.inline_max_us <= 1_000_000:
            raise errors.ConfigError(f"inline_max_us must be an integer 0..1000000 (0: off), got {self.inline_max_us!r}")
        parse_devices(self.device, "device")  # ConfigError naming what is wrong
        pinned = self.pinned
        if isinstance(pinned, str):
            pinned = (pinned,)
        object.__setattr__(self, "pinned", tuple(_model_ref(m) for m in pinned))

    def limits_dict(self) -> dict:
        """The `limits` map of the hello reply (docs/protocol.md section 6)."""
        return {**self.limits.to_dict(), "max_in_flight_per_connection": self.max_in_flight_per_connection,
                "max_in_flight": self.max_in_flight, "max_connections": self.max_connections,
                "idle_timeout_s": self.idle_timeout_s}


def _pick_devices(text: str) -> list[str]:
    """ServerConfig.device -> the device names in use (auto: every GPU torch sees, else cpu), each
    checked against what torch sees (memory.resolver, the seam tests replace)."""
    names = parse_devices(text, "--device")
    res = memory.resolver
    if names == ("auto",):
        n = res.gpu_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    for d in names:
        try:
            res.check(d, "--device")
        except ValueError as exc:
            raise errors.ConfigError(str(exc)) from None
    return list(names)


def _budgets(devices: list[str], given: int | dict | None) -> dict:
    """The budget of each device in use: --memory-budget's (one size for all, or per device), else
    the probe's (cpu: MemTotal minus a reserve; GPU: NVML's total minus a reserve, or torch's)."""
    explicit = dict(given) if isinstance(given, dict) else {d: given for d in devices} if given is not None else {}
    extra = [d for d in explicit if d not in devices]
    if extra:
        raise errors.ConfigError(f"--memory-budget names {', '.join(extra)}, which the server does not use "
                                 f"(--device: {', '.join(devices)})")
    out = {}
    for d in devices:
        try:
            out[d] = memory.resolver.budget(d, explicit.get(d))
        except ValueError as exc:
            raise errors.ConfigError(str(exc)) from None
    return out




# --- the server ----------------------------------------------------------------------------------------
class Server:
    """See the module docstring.  All methods run on the event loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        if not isinstance(config, ServerConfig):
            raise errors.ConfigError(f"Server needs a ServerConfig, got {type(config).__name__}")
        self.config = config
        devices = _pick_devices(config.device)  # the devices in use ("cpu", "cuda:N")
        # placement is on with a budget, or whenever a GPU is used (each device has a budget)
        placement = (Placement(_budgets(devices, config.memory_budget))
                     if config.memory_budget is not None or any(d != "cpu" for d in devices) else None)
        # the model manager (tinyserve/core/models.py) and the request path (tinyserve/core/requests.py)
        self.models = models = Models(config, devices, placement)
        self.requests = models.requests = Requests(models, config)
        self.stats = self.requests.stats  # what no model version counts (the request path's)
        # the model manager's objects, the same ones under the names the tests and tools read
        self.repo = models.repo
        self.placement = models.placement
        self.metrics = models.metrics
        self.policy = models.policy
        self.monitor = models.monitor
        self._instances = models._instances
        self._routes = models._routes
        self._parked = models._parked
        self._blocked = models._blocked
        self._limits = config.limits
        self._token = config.token.encode("utf-8") if config.token is not None else None
        self._frame_memory = FrameMemory(config.max_frame_memory)
        self._stopped: asyncio.Event | None = None
        self._http: MetricsServer | None = None
        self._frontends: list = []  # the Open Inference Protocol front ends (HTTP, gRPC) over self.core
        # the wire-free API every front end goes through
        self.core = Core(models, self.requests, limits=self._limits, token=self._token,
                         body_memory=self._frame_memory)
        # tinyserve's own protocol (docs/protocol.md): always on, at config.host:config.port
        self.tcp = TcpFrontEnd(self.core, host=config.host, port=config.port,
                               max_connections=config.max_connections, max_in_flight=config.max_in_flight,
                               max_in_flight_per_connection=config.max_in_flight_per_connection,
                               idle_timeout_s=config.idle_timeout_s or None, direct_replies=config.direct_replies,
                               hello_limits=config.limits_dict())
        self.http_port: int | None = None  # the bound ports of the front ends, once started
        self.grpc_port: int | None = None

    # the lifecycle flags the composition root drives live on the model manager (it and the core read them)
    def _models_attr(name: str):  # noqa: N805 - a property factory, used in the class body only
        return property(lambda self: getattr(self.models, name), lambda self, v: setattr(self.models, name, v))

    _loop = _models_attr("_loop")
    _ready = _models_attr("_ready")
    _draining = _models_attr("_draining")
    _stopping = _models_attr("_stopping")
    clock = _models_attr("clock")  # the ejection policy's and the health report's clock (tests inject one)
    started_at = _models_attr("started_at")
    del _models_attr

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up the start-up models, then listen.  Raises (and cleans up) if a start-up
        model fails to load or the address cannot be bound."""
        loop = self._loop = asyncio.get_running_loop()
        self.tcp.prepare(loop)
        m = self.models
        m._completions = Completions(loop, self.requests._deliver)
        self._stopped = asyncio.Event()
        try:
            self.monitor.start()
            if m._remote:
                await m._refresh_listing()
            static = await m._static_models_remote() if m._remote else m._static_models()
            futs = [m._load(name, version) for name, version in m._startup + static]
            if futs:
                results = await asyncio.gather(*futs, return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise failed[0]
            ctx = None
            if self.config.tls_certfile is not None:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                try:
                    ctx.load_cert_chain(self.config.tls_certfile, self.config.tls_keyfile)
                except (OSError, ssl.SSLError) as exc:
                    raise errors.ConfigError(f"TLS certificate {self.config.tls_certfile!r} / key "
                                             f"{self.config.tls_keyfile!r}: {exc}") from None
            self.tcp.ssl = ctx
            await self.tcp.start()
            await self._start_front_ends()
            if self.config.metrics_port is not None:
                health = on_loop(loop, m.health_report, 2.0)
                self._http = MetricsServer(self.config.metrics_host, self.config.metrics_port,
                                           registry=make_registry(self.metrics, self.monitor, self.policy, health,
                                                                  storage=m._resume_counters()),
                                           health=health)
                self._http.start()
        except BaseException:
            self.tcp.close_listener()
            for fe in self._frontends:
                await fe.stop(0)
            self.monitor.stop()
            await m._stop_models(5.0)
            raise
        m._tick_handle = loop.call_later(1.0, m._tick)
        if m._poller is not None:
            # the first poll's loads finish before the server is ready (a host in poll mode serves
            # what the repository selects before a balancer's readiness check passes); later ones
            # run in the background
            await m.poll_step()
            m._poll_task = loop.create_task(m._poll_loop())
        # the objects of torch, the programs and the loaded models live as long as the server: move
        # them out of the collector's reach so a full collection while serving stays short (one took
        # 115-180 ms over ~335k start-up objects in bench/bench_latency.py)
        gc.collect()
        gc.freeze()
        self.started_at = time.time()
        self._ready = True

    async def _start_front_ends(self) -> None:
        """The Open Inference Protocol front ends the config asks for, on the same loop, host, token
        and TLS certificate as the TCP front end."""
        cfg = self.config
        tls = (cfg.tls_certfile, cfg.tls_keyfile) if cfg.tls_certfile is not None else None
        if cfg.http_port is not None:
            from tinyserve.frontends.http import HttpFrontEnd

            ctx = None
            if tls is not None:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(*tls)
            fe = HttpFrontEnd(self.core, host=cfg.host, port=cfg.http_port, ssl=ctx,
                              max_in_flight=cfg.max_in_flight, max_connections=cfg.max_connections,
                              max_in_flight_per_connection=cfg.max_in_flight_per_connection)
            await fe.start()
            self._frontends.append(fe)
            self.http_port = fe.port
        if cfg.grpc_port is not None:
            from tinyserve.frontends.grpc import GrpcFrontEnd

            fe = GrpcFrontEnd(self.core, host=cfg.host, port=cfg.grpc_port, ssl=tls, max_in_flight=cfg.max_in_flight)
            await fe.start()
            self._frontends.append(fe)
            self.grpc_port = fe.port

    @property
    def port(self) -> int:
        return self.tcp.port

    @property
    def host(self) -> str:
        return self.tcp.host

    @property
    def ready(self) -> bool:
        """Listening, not draining, every device healthy, every start-up model serving (not ejected),
        and with require_model at least one model version serving (health_report has the reasons)."""
        return self.health_report().ready

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def connections(self) -> frozenset:
        return frozenset(self.tcp.conns)

    @property
    def in_flight(self) -> int:
        return self.tcp.in_flight

    def instances(self) -> list[ModelInstance]:
        return list(self._instances.values())

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting connections, refuse new work (SHUTTING_DOWN), wait up to `drain_timeout`
        seconds for the requests in flight, close every connection, stop the model workers."""
        if self._loop is None:  # never started
            return
        if self._stopping:
            await self._stopped.wait()
            return
        m = self.models
        self._stopping = self._draining = True
        for name, version in sorted(m._blocked):  # loads waiting for room never start now
            m._fail_parked(name, version, wire.ShuttingDown(
                f"the server is stopping; model {name!r} version {version} was waiting for memory to load"))
        m._blocked.clear()
        if m._poll_task is not None:
            m._poll_task.cancel()
        for task in list(m._bg_tasks):
            task.cancel()
        loop = self._loop
        tcp = self.tcp
        tcp.close_listener()
        deadline = loop.time() + drain_timeout
        # the other front ends stop listening and finish what they owe while the TCP one drains
        fe_stops = [asyncio.ensure_future(fe.stop(drain_timeout)) for fe in self._frontends]
        try:
            await asyncio.wait_for(tcp.wait_idle(), max(drain_timeout, 0))
        except (asyncio.TimeoutError, TimeoutError):
            pass
        if fe_stops:
            try:
                await asyncio.wait_for(asyncio.gather(*fe_stops, return_exceptions=True),
                                       max(1.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                pass
        await tcp.close_connections(max(1.0, deadline - loop.time()))
        await m._stop_models(max(1.0, deadline - loop.time()))
        await tcp.wait_closed()
        self._ready = False
        if m._tick_handle is not None:
            m._tick_handle.cancel()
        if m._blocked_timer is not None:
            m._blocked_timer.cancel()
            m._blocked_timer = None
        if m._poll_task is not None:
            m._poll_task.cancel()
        if m._io_pool is not None:
            m._io_pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.stop()
        self.monitor.stop()
        gc.unfreeze()  # what start() froze can be collected again (and torch's bindings see it freed)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_connections_closed(self) -> None:
        """Resolves when no connection is open (tests, drain)."""
        await self.tcp.wait_connections_closed()

    # --- models (the model manager's, tinyserve/core/models.py) ----------------------------------------
    async def load(self, name: str, version: int | None = None) -> ModelInstance:
        """Load (and warm up) a model version; the latest in the repository when version is None."""
        return await self.models.load(name, version)

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        return await self.models.unload(name, version)

    def health_report(self):
        """Liveness, readiness and their reasons (tinyserve.health.assess), on the loop thread."""
        return self.models.health_report()

    def health_dict(self, repository: bool = False) -> dict:
        return self.models.health_dict(repository)

    def models_report(self) -> list:
        return self.models.models_report()

    def stats_report(self, name: str | None = None) -> dict:
        return self.models.stats_report(name)


# --- running it ---------------------------------------------------------------------------------------
def _loop_factory(use_uvloop: bool):
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop, "asyncio"
        return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


def _announce(server: Server, loop_name: str) -> None:
    models = ", ".join(f"{i.name}:{i.version}" for i in server.instances()) or "none"
    tls = " (TLS)" if server.config.tls_certfile else ""
    oip = "".join(f", {what} {server.host}:{port}{tls}" for what, port in
                  (("http", server.http_port), ("grpc", server.grpc_port)) if port is not None)
    print(f"tinyserve: listening on {server.host}:{server.port}{tls}{oip} [{loop_name}], models: {models}", flush=True)


async def _serve(config: ServerConfig, on_ready: Callable[[Server], None] | None, loop_name: str) -> int:
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
    try:
        if on_ready is not None:
            on_ready(server)
        else:
            _announce(server, loop_name)
        await stop.wait()
        if on_ready is None:
            print(f"tinyserve: draining ({server.in_flight} requests in flight)", flush=True)
        await server.stop(config.drain_timeout_s)
        if on_ready is None:
            print("tinyserve: stopped", flush=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


def run(config: ServerConfig, *, on_ready: Callable[[Server], None] | None = None) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; returns the exit code (0).

    Blocking.  Uses uvloop when `config.use_uvloop` and it is importable.  `on_ready(server)` is
    called once the server listens (default: print `tinyserve: listening on HOST:PORT ...`).
    Errors while starting (a model that fails to load, a port in use) propagate."""
    factory, name = _loop_factory(config.use_uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(config, on_ready, name))
