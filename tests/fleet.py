"""Fleet helpers for tests and bench/bench_fleet.py: `tinyserve serve` processes, a SeaweedFS cluster
(master, volume servers, filer, S3 gateway as separate `weed` processes), HAProxy, and network
namespaces to put each of them on its own address (docs/deploy.md section 3).

Everything is started on free ports, waited for with bounded polls, and stopped by its pid (process
groups made by start_new_session); namespaces and veth pairs are made by this module and deleted by
name at teardown.  Nothing here is a fixture: tests/test_fleet.py and tests/test_client_failover.py
wrap these in their own module-scoped fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PY = sys.executable
WEED = Path(sys.executable).with_name("weed")
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(check, timeout: float, what: str, interval: float = 0.05):
    """Poll check() until it returns a truthy value (returned) or `timeout` seconds pass (raises)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except Exception as exc:  # noqa: BLE001 - not yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout} s (last error: {last!r})")


def http_status(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def stop_pid(proc: subprocess.Popen | None, sig=signal.SIGTERM, wait: float = 15.0) -> None:
    """Stop a process started with start_new_session (its group), by pid; SIGKILL after `wait`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# --- network namespaces --------------------------------------------------------------------------
class Netns:
    """A namespace with one veth into a bridge of the root namespace; `ip` is its address (10.<net>.0.k)."""

    def __init__(self, name: str, ip: str, bridge: str, k: int):
        self.name, self.ip, self.bridge = name, ip, bridge
        self.veth = f"{bridge}v{k}"[:15]

    def create(self) -> Netns:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            _ip("link", "set", self.veth, "master", self.bridge)
            _ip("link", "set", self.veth, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ip}/24", "dev", "eth0")
            _ip("-n", self.name, "link", "set", "eth0", "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def netns_available() -> str | None:
    """None when network namespaces can be made here (root, `ip` from iproute2), else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"tsprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add is not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class Places:
    """Where each process runs: its own namespace (ip netns) on one bridge (10.<net>.0.k/24; the root
    namespace is 10.<net>.0.254 on it) or, without namespaces, 127.0.<net>.k on the loopback (every
    127/8 address is local on Linux)."""

    def __init__(self, use_netns: bool, tag: str):
        self.use_netns = use_netns
        self.tag = tag
        self.spaces: list[Netns] = []
        self._net = 100 + os.getpid() % 100
        self._next = 1
        self.bridge = f"tsbr{tag}{os.getpid() % 10000}"[:12]
        self.here = f"127.0.{self._net}.254"
        if use_netns:
            _ip("link", "add", self.bridge, "type", "bridge")
            try:
                self.here = f"10.{self._net}.0.254"
                _ip("addr", "add", f"{self.here}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            except BaseException:
                self.close()
                raise

    def new(self, role: str) -> tuple[str, list[str]]:
        """(the address of a new place, the command prefix that runs a process there)."""
        k = self._next
        self._next += 1
        if not self.use_netns:
            return f"127.0.{self._net}.{k}", []
        ns = Netns(f"ts{self.tag}-{role}"[:12] + f"-{k}-{os.getpid() % 10000}", f"10.{self._net}.0.{k}",
                   self.bridge, k).create()
        self.spaces.append(ns)
        return ns.ip, ns.prefix()

    def close(self) -> None:
        for ns in self.spaces:
            ns.delete()
        self.spaces.clear()
        if self.use_netns:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


# --- tinyserve hosts -----------------------------------------------------------------------------
class ServeExited(RuntimeError):
    """A `tinyserve serve` process exited while it was expected to become ready."""


class ServeProcess:
    """`python -m tinyserve serve` in a subprocess; `addr` is host:port of its TCP protocol.  With
    `http=True` it also serves the Open Inference Protocol over HTTP (`--http-port`) on `http_port`."""

    def __init__(self, args: list[str], *, host: str = "127.0.0.1", prefix: list[str] | None = None,
                 env: dict | None = None, log_dir: Path | None = None, name: str = "serve", http: bool = False):
        self.args, self.host, self.prefix, self.name = args, host, prefix or [], name
        self.env = env
        self.http = http
        self.port = self.metrics_port = 0
        self.http_port = 0  # the HTTP front end's port (http=True), kept across restarts
        self.proc: subprocess.Popen | None = None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="ts-serve-"))
        self.log_path = self.log_dir / f"{name}.log"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, wait_ready: float | None = 90.0) -> ServeProcess:
        if not self.port:
            self.port = free_port() if not self.prefix else 8470
            self.metrics_port = free_port() if not self.prefix else 9470
        if self.http and not self.http_port:
            self.http_port = free_port() if not self.prefix else 8000
        http = ["--http-port", str(self.http_port)] if self.http else []
        cmd = [*self.prefix, PY, "-m", "tinyserve", "serve", "--host", self.host, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--metrics-host", self.host, "--threads", "1",
               "--device-poll", "60", *http, *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(self.env or {})}
        env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "S3_"))} | (self.env or {})
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                     start_new_session=True)
        if wait_ready:
            self.wait_ready(wait_ready)
        return self

    def readyz(self, timeout: float = 1.0) -> int:
        return http_status(f"http://{self.host}:{self.metrics_port}/readyz", timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # exited: no point waiting
                raise ServeExited(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if self.readyz() == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout} s; log: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, by pid (the process group)."""
        stop_pid(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_pid(self.proc)
        if self.proc is not None:
            self.log.close()


# --- SeaweedFS cluster ---------------------------------------------------------------------------
class WeedCluster:
    """master + N volume servers + filer + S3 gateway, each its own `weed` process (own place)."""

    def __init__(self, places: Places, *, volumes: int = 3, replication: str = "001",
                 bucket: str = "fleet", workdir: Path | None = None):
        self.places, self.n_volumes, self.replication, self.bucket = places, volumes, replication, bucket
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="ts-weedc-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.addrs: dict[str, tuple[str, int]] = {}
        self._prefix: dict[str, list[str]] = {}

    @property
    def endpoint(self) -> str:
        h, p = self.addrs["s3"]
        return f"http://{h}:{p}"

    def _start(self, role: str, args: list[str]) -> None:
        log = open(self.dir / f"{role}.log", "ab")
        self.procs[role] = subprocess.Popen([*self._prefix[role], str(WEED), *args], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={k: v for k, v in os.environ.items()
                                                 if not k.startswith(("AWS_", "S3_"))})

    def _place(self, role: str, port: int) -> str:
        ip, prefix = self.places.new(role)
        self._prefix[role] = prefix
        if not prefix:
            port = free_port(ip)
        self.addrs[role] = (ip, port)
        return ip

    def start(self, timeout: float = 90.0) -> WeedCluster:
        mip = self._place("master", 9333)
        mport = self.addrs["master"][1]
        master = f"{mip}:{mport}.{mport + 10000}"
        (self.dir / "m").mkdir()
        self._start("master", ["-logtostderr", "master", f"-ip={mip}", f"-ip.bind={mip}", f"-port={mport}",
                               f"-port.grpc={mport + 10000}", f"-mdir={self.dir}/m",
                               f"-defaultReplication={self.replication}", "-volumeSizeLimitMB=64"])
        wait_for(lambda: http_status(f"http://{mip}:{mport}/cluster/status") == 200, timeout, "weed master")
        for k in range(self.n_volumes):
            role = f"volume{k}"
            vip = self._place(role, 8080)
            vport = self.addrs[role][1]
            (self.dir / role).mkdir()
            # one rack per volume server: replication 010 needs racks; 001 needs servers in one rack
            self._start(role, ["-logtostderr", "volume", f"-ip={vip}", f"-ip.bind={vip}", f"-port={vport}",
                               f"-port.grpc={vport + 10000}", f"-dir={self.dir}/{role}", f"-mserver={master}",
                               "-max=20", "-dataCenter=dc1", "-rack=r1"])
        def volumes_up():
            with urllib.request.urlopen(f"http://{mip}:{mport}/dir/status", timeout=1) as r:
                topo = json.load(r)["Topology"]
            return sum(len(rk["DataNodes"]) for dc in topo["DataCenters"] for rk in dc["Racks"]) >= self.n_volumes
        wait_for(volumes_up, timeout, "weed volume servers")
        fip = self._place("filer", 8888)
        fport = self.addrs["filer"][1]
        (self.dir / "f").mkdir()
        self._start("filer", ["-logtostderr", "filer", f"-ip={fip}", f"-ip.bind={fip}", f"-port={fport}",
                              f"-port.grpc={fport + 10000}", f"-master={master}",
                              f"-defaultReplicaPlacement={self.replication}", f"-dataCenter=dc1",
                              f"-defaultStoreDir={self.dir}/f"])
        wait_for(lambda: http_status(f"http://{fip}:{fport}/") in (200, 404), timeout, "weed filer")
        sip = self._place("s3", 8333)
        sport = self.addrs["s3"][1]
        self._start("s3", ["-logtostderr", "s3", f"-ip.bind={sip}", f"-port={sport}",
                           f"-port.grpc={sport + 10000}", f"-filer={fip}:{fport}.{fport + 10000}"])
        c = self.client()
        def bucket():
            try:
                c.create_bucket(Bucket=self.bucket)
            except Exception as e:  # noqa: BLE001
                if "BucketAlready" not in str(e):
                    raise
            return True
        wait_for(bucket, timeout, "weed s3 gateway", 0.2)
        return self

    def client(self):
        import boto3
        import botocore
        from botocore.config import Config

        cfg = Config(signature_version=botocore.UNSIGNED, retries={"max_attempts": 1},
                     s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", config=cfg)

    def storage(self, prefix: str = "", **kw):
        from tinyserve.storage.s3 import S3Storage

        return S3Storage(self.bucket, prefix, anonymous=True, endpoint_url=self.endpoint, region="us-east-1", **kw)

    def serve_args(self, prefix: str) -> list[str]:
        return ["--repo", f"s3://{self.bucket}/{prefix}", "--endpoint-url", self.endpoint, "--region",
                "us-east-1", "--anonymous"]

    def kill(self, role: str) -> None:
        stop_pid(self.procs.get(role), signal.SIGKILL)

    def stop(self, role: str) -> None:
        stop_pid(self.procs.get(role))

    def stop_all(self) -> None:
        for role in reversed(list(self.procs)):
            stop_pid(self.procs[role], wait=5)
        self.procs.clear()


# --- HAProxy -------------------------------------------------------------------------------------
class HAProxy:
    """HAProxy in TCP mode in front of tinyserve hosts (backend `hosts`), health-checked by
    `GET /readyz` on each host's metrics port (deploy/haproxy/haproxy.cfg is the same configuration
    with fixed addresses).  When every backend serves HTTP (ServeProcess(http=True)), also an `http`
    mode frontend on `http_addr` over the hosts' Open Inference Protocol ports (backend `hosts_http`,
    checked by `GET /readyz` on the HTTP port itself), with keep-alive on both sides and L7 retries
    of the idempotent inference requests (docs/deploy.md section 3)."""

    def __init__(self, backends: list, *, host: str = "127.0.0.1", prefix: list[str] | None = None,
                 workdir: Path | None = None, inter_ms: int = 200, fall: int = 2, rise: int = 2):
        self.backends, self.host, self.prefix = backends, host, prefix or []
        self.inter_ms, self.fall, self.rise = inter_ms, fall, rise
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="ts-haproxy-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(host) if not self.prefix else 8470
        self.stats_port = free_port(host) if not self.prefix else 8404
        self.http = bool(backends) and all(getattr(b, "http_port", 0) for b in backends)
        self.http_port = (free_port(host) if not self.prefix else 8000) if self.http else 0
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_addr(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def backend_names(self) -> tuple[str, ...]:
        return ("hosts", "hosts_http") if self.http else ("hosts",)

    def config(self) -> str:
        lines = [
            "global", "    maxconn 4096", f"    stats socket {self.dir}/admin.sock mode 600 level admin", "",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 60s",
            "    timeout server 60s", "    retries 2", "    option redispatch", "",
            "frontend tinyserve", f"    bind {self.host}:{self.port}", "    default_backend hosts", "",
            "backend hosts", "    balance leastconn", "    option httpchk GET /readyz",
            "    http-check expect status 200",
            f"    default-server inter {self.inter_ms}ms fall {self.fall} rise {self.rise} "
            f"on-marked-down shutdown-sessions",
        ]
        for k, b in enumerate(self.backends):
            lines.append(f"    server h{k} {b.host}:{b.port} check port {b.metrics_port}")
        if self.http:
            # The Open Inference Protocol: HTTP/1.1 keep-alive on both sides; an infer is idempotent,
            # so a request whose host died under it (connect refused, connection closed with no
            # response, no response within `timeout server`, or 503: not loaded / shutting down) is
            # sent again, each retry to another host (redispatch 1); `retries 3` bounds it.
            lines += [
                "", "frontend oip", "    mode http", f"    bind {self.host}:{self.http_port}",
                "    option http-keep-alive", "    timeout http-request 10s", "    timeout http-keep-alive 30s",
                "    default_backend hosts_http", "",
                "backend hosts_http", "    mode http", "    balance leastconn", "    option http-keep-alive",
                "    http-reuse safe", "    option httpchk GET /readyz", "    http-check expect status 200",
                "    retries 3", "    option redispatch 1",
                "    retry-on conn-failure empty-response response-timeout 503",
                f"    default-server inter {self.inter_ms}ms fall {self.fall} rise {self.rise} "
                f"on-marked-down shutdown-sessions",
            ]
            for k, b in enumerate(self.backends):
                lines.append(f"    server h{k} {b.host}:{b.http_port} check")
        lines += ["", "frontend stats", "    mode http", f"    bind {self.host}:{self.stats_port}",
                  "    http-request return status 200 content-type text/plain string ok if { path /ok }", ""]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> HAProxy:
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(self.config())
        r = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"haproxy config check failed: {r.stdout}{r.stderr}")
        log = open(self.dir / "haproxy.log", "ab")
        self.proc = subprocess.Popen([*self.prefix, HAPROXY, "-db", "-f", str(cfg)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        def all_up():
            for backend in self.backend_names:
                states = self.server_states(backend)
                if not states or any(s != "UP" for s in states.values()):
                    return False
            return True
        wait_for(all_up, timeout, "haproxy backends UP")
        return self

    def admin(self, command: str) -> str:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(str(self.dir / "admin.sock"))
        s.sendall(command.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
        return out.decode()

    def stats(self) -> list[dict[str, str]]:
        """`show stat` as one dict per row (pxname, svname, status, stot, wretr, wredis, ...)."""
        rows = self.admin("show stat").splitlines()
        if not rows:
            return []
        head = rows[0].lstrip("# ").split(",")
        return [dict(zip(head, row.split(","))) for row in rows[1:] if row]

    def server_states(self, backend: str = "hosts") -> dict[str, str]:
        """{server name: UP / DOWN / ...} of one backend (`hosts`: TCP, `hosts_http`: HTTP) from `show stat`."""
        return {f["svname"]: f.get("status", "").split(" ")[0] for f in self.stats()
                if f.get("pxname") == backend and f.get("svname") not in ("BACKEND", "FRONTEND")}

    def stop(self) -> None:
        stop_pid(self.proc, wait=5)


def haproxy_available() -> str | None:
    return None if Path(HAPROXY).exists() else "haproxy not installed (Debian package haproxy)"


# --- models for the fleet tests (pack sources "fleet:mlp_v1" / "fleet:mlp_v2": different weights) ---
def mlp_v1():
    from tinyserve import examples

    return examples.mlp(0)


def mlp_v2():
    from tinyserve import examples

    return examples.mlp(1)


class Fleet:
    """The whole fleet: a SeaweedFS cluster holding `<bucket>/repo`, `n` tinyserve hosts polling it
    (each with its own cache), HAProxy in front.  Each process in its own network namespace when
    they can be made, else on its own 127.0.x.y address."""

    def __init__(self, workdir: Path, *, hosts: int = 3, volumes: int = 3, poll_interval: float = 0.5,
                 use_netns: bool | None = None, tag: str = "f", extra_args: list[str] | None = None,
                 http: bool = True):
        self.dir = Path(workdir)
        self.use_netns = netns_available() is None if use_netns is None else use_netns
        self.places = Places(self.use_netns, tag)
        self.n_hosts, self.n_volumes, self.poll_interval = hosts, volumes, poll_interval
        self.extra_args = extra_args or []
        self.http = http  # each host also serves the Open Inference Protocol over HTTP, behind HAProxy's `oip`
        self.weed: WeedCluster | None = None
        self.hosts: list[ServeProcess] = []
        self.proxy: HAProxy | None = None

    def host_args(self, k: int) -> list[str]:
        return [*self.weed.serve_args("repo"), "--model-control", "poll", "--poll-interval", str(self.poll_interval),
                "--cache-dir", str(self.dir / f"cache{k}"), "--require-model", "--part-attempts", "4",
                *self.extra_args]

    def start(self, *, push: list[tuple[str, str]] = (), proxy: bool = True) -> Fleet:
        try:
            self.weed = WeedCluster(self.places, volumes=self.n_volumes, workdir=self.dir / "weed").start()
            for name, source in push:
                self.push(name, source)
            for k in range(self.n_hosts):
                ip, prefix = self.places.new(f"h{k}")
                self.hosts.append(ServeProcess(self.host_args(k), host=ip, prefix=prefix, log_dir=self.dir,
                                               name=f"host{k}", http=self.http))
            for h in self.hosts:
                h.start(wait_ready=None)
            for h in self.hosts:
                h.wait_ready(120)
            if proxy:
                self.start_proxy(self.hosts)
        except BaseException:
            self.stop()
            raise
        return self

    def start_proxy(self, backends: list[ServeProcess]) -> HAProxy:
        ip, prefix = self.places.new("lb")
        self.proxy = HAProxy(backends, host=ip, prefix=prefix, workdir=self.dir / f"haproxy{len(backends)}")
        self.proxy.dir.mkdir(exist_ok=True)
        return self.proxy.start()

    def push(self, name: str, source: str) -> int:
        from tinyserve.pack import pack
        from tinyserve.remote import push
        from tinyserve.repository import Repository

        local = Repository(self.dir / f"local-{name}", create=True)
        version, _ = pack(local, name, source)
        return push(self.weed.storage("repo"), local.resolve(name, version), name)

    def restart_host(self, k: int, timeout: float = 120.0) -> ServeProcess:
        h = self.hosts[k]
        h.stop()
        h.start(wait_ready=timeout)
        return h

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for h in self.hosts:
            h.stop()
        if self.weed is not None:
            self.weed.stop_all()
        self.places.close()
