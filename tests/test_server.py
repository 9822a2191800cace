"""The server over loopback, on asyncio and on uvloop: every op, every bad input of issue 3 (each followed
by a check that the server still answers another client), auth, TLS, flow control, leaks, shutdown.

The clients here are raw sockets speaking tinyserve.wire (tinyserve.client is tested on its own).
Models: the example MLP (torch.export) and python models packed into a temporary repository; the
`gate` model blocks inside forward() on x[0,0] == 42 until the test releases it through a socket, so
tests can hold a request in flight without sleeping."""

import asyncio
import concurrent.futures
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import uvloop

from tinyserve import errors, examples, protocol, wire
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.health import EjectionConfig
from tinyserve.server import Histogram, Server, ServerConfig

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent
LOOPS = ["asyncio", "uvloop"]

GATE_MODEL = '''
import socket, torch

class Gate(torch.nn.Module):
    def __init__(self, port):
        super().__init__()
        self.port = port
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        first = float(x.reshape(-1)[0]) if x.numel() else 0.0
        if first == 42.0:  # wait until the test lets us go
            s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            try:
                s.recv(1)
            finally:
                s.close()
        if first == -1.0:
            raise ValueError("gate refuses -1")
        return self.lin(x)

def build(params):
    return Gate(params["port"])
'''

TEXT_MODEL = '''
import torch

class Lengths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale

def build(params):
    return Lengths()

def preprocess(inputs):
    return {"x": torch.tensor([float(len(t)) for t in inputs["text"]])}

def postprocess(outputs):
    n = outputs["y"].shape[0]
    return {"y": outputs["y"], "upper": [b"OK"] * n}
'''


def pack_gate(repo, tmp, name: str, port: int, **config) -> None:
    """Pack the gate model (GATE_MODEL) as `name`, with extra config fields (batching, placement)."""
    lin = torch.nn.Linear(4, 4)
    sd, py = tmp / f"{name}.pt", tmp / f"{name}.py"
    torch.save({"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach()}, sd)
    py.write_text(GATE_MODEL)
    cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"port": port}, **config}
    pack(repo, name, str(sd), program=str(py), config=cfg)


# --- fixtures ----------------------------------------------------------------------------------------
class Gate:
    """The far end of the gate model's socket: `wait()` for a gated request to be running, `release()`."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(60)
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []

    def wait(self):
        conn, _ = self.listener.accept()
        self.open.append(conn)

    def release(self):
        while self.open:
            c = self.open.pop(0)
            try:
                c.sendall(b"x")
            finally:
                c.close()


@pytest.fixture(scope="session")
def gate():
    g = Gate()
    yield g
    g.release()
    g.listener.close()


@pytest.fixture(scope="session")
def repo_root(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("server")
    repo = Repository(tmp / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")

    def python_model(name, source, config, state):
        sd = tmp / f"{name}.pt"
        torch.save(state, sd)
        py = tmp / f"{name}.py"
        py.write_text(source)
        pack(repo, name, str(sd), program=str(py), config=config)

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    gate_cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}], "extra": {"port": gate.port}}
    python_model("gate", GATE_MODEL, gate_cfg, {"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach()})
    python_model("text", TEXT_MODEL, {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}],
                                      "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]},
                 {"scale": torch.ones(1)})
    python_model("broken", GATE_MODEL.replace(  # (pack builds it on the meta device: that works)
        "return Gate(params[\"port\"])",
        "if not torch.empty(0).is_meta:\n        raise RuntimeError('no build today')\n    return Gate(params[\"port\"])"),
                 gate_cfg, {"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach()})
    pack(repo, "mlp", "tinyserve.examples:mlp", version=5)  # a second version (same weights)
    return str(repo.root)


class ServerThread:
    """A Server on its own event loop thread (asyncio or uvloop)."""

    def __init__(self, config: ServerConfig, kind: str):
        self.kind = kind
        self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"test-server-{kind}", daemon=True)
        self.thread.start()
        self.server = Server(config)
        try:
            self.call(self.server.start(), timeout=120)
        except BaseException:
            self._end()
            raise
        self.port = self.server.port

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn):
        async def wrapper():
            return fn()
        return self.call(wrapper())

    def task_count(self) -> int:
        async def count():
            return len(asyncio.all_tasks()) - 1
        return self.call(count())

    def conn_of(self, client) -> protocol.Connection:
        name = client.sock.getsockname()

        def find():
            return [c for c in self.server.connections if c.peername == name]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = self.run(find)
            if found:
                return found[0]
        raise AssertionError("server has no such connection")

    def stop(self):
        try:
            self.call(self.server.stop(5), timeout=60)
        finally:
            self._end()

    def _end(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module", params=LOOPS)
def st(request, repo_root):
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp", "gate", "text"), torch_threads=1), request.param)
    yield s
    s.stop()


@pytest.fixture(params=LOOPS)
def kind(request):
    return request.param


class Client:
    def __init__(self, port, *, ssl_ctx=None, timeout=30, rcvbuf=None, sndbuf=None):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_ctx is not None:
            s = ssl_ctx.wrap_socket(s, server_hostname="127.0.0.1")
        self.sock = s
        self.buf = bytearray()
        self.rid = 0

    def next_id(self):
        self.rid += 1
        return self.rid

    def send(self, header, views=()):
        if type(header.get("id")) is int:
            self.rid = max(self.rid, header["id"])
        self.sock.sendall(b"".join(bytes(p) for p in wire.encode_frame(header, views)))

    def send_raw(self, data):
        self.sock.sendall(data)

    def _fill(self):
        d = self.sock.recv(1 << 20)
        if not d:
            raise EOFError("server closed the connection")
        self.buf += d

    def recv(self):
        while len(self.buf) < 8:
            self._fill()
        total, _ = wire.frame_size(self.buf, wire.Limits())
        while len(self.buf) < total:
            self._fill()
        data = bytes(self.buf[:total])
        del self.buf[:total]
        [(h, payload)] = wire.iter_frames(data)
        return h, payload

    def call(self, op, **fields):
        rid = self.next_id()
        self.send({"id": rid, "op": op, **fields})
        h, p = self.recv()
        assert h["id"] == rid, h
        return h

    def infer_send(self, model, tensors, rid=None, **fields):
        rid = rid or self.next_id()
        self.rid = max(self.rid, rid)
        descs, views = wire.tensor_parts(tensors)
        self.send({"id": rid, "op": "infer", "model": model, "inputs": descs, **fields}, views)
        return rid

    def infer(self, model, tensors, **fields):
        rid = self.infer_send(model, tensors, **fields)
        h, payload = self.recv()
        assert h["id"] == rid, h
        return h, outputs_of(h, payload)

    def closed_by_server(self) -> bool:
        """Drain what is left; True when the server closed the connection."""
        try:
            while True:
                d = self.sock.recv(1 << 16)
                if not d:
                    return True
                self.buf += d
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def outputs_of(h, payload):
    if not h.get("ok"):
        return None
    return {n: wire.to_array(*t) for n, t in wire.split_tensors(h["outputs"], payload, wire.Limits()).items()}


def error_of(h, code, *fragments):
    assert h["ok"] is False, h
    assert h["error"]["code"] == code, h
    for f in fragments:
        assert f in h["error"]["message"], (f, h["error"]["message"])


MLP, _ = examples.mlp()
# The reference runs with one torch thread, like the servers' workers (torch_threads=1): a different
# thread count can move float results by an ulp.
_REF = concurrent.futures.ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))


def mlp_ref(x):
    def run():
        with torch.inference_mode():
            return MLP(torch.from_numpy(x)).numpy()
    return _REF.submit(run).result()


def assert_alive(st_or_port):
    """Another client gets answers: ping, and an MLP inference equal to the module's."""
    port = st_or_port if isinstance(st_or_port, int) else st_or_port.port
    with Client(port) as c:
        assert c.call("ping") == {"id": 1, "ok": True}
        x = np.random.default_rng(1).standard_normal((2, 64), dtype=np.float32)
        h, out = c.infer("mlp", {"x": x})
        assert h["ok"], h
        np.testing.assert_array_equal(out["output0"], mlp_ref(x))


def repo_root_of(st):
    return str(st.server.repo.root)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def settle(st):
    """No connection open, and the loop has run its close callbacks (uvloop closes a socket's fd in a
    libuv close callback, after connection_lost)."""
    st.call(st.server.wait_connections_closed())
    for _ in range(3):
        st.run(lambda: None)


def fds_after(st, target, timeout=10.0):
    """fd_count() once it reaches `target` (or the deadline passes): closes finish asynchronously."""
    deadline = time.monotonic() + timeout
    n = fd_count()
    while n != target and time.monotonic() < deadline:
        st.run(lambda: None)
        n = fd_count()
    return n


# --- ops -------------------------------------------------------------------------------------------------
def test_hello_and_ping(st):
    with Client(st.port) as c:
        h = c.call("hello", protocol=1, client="tests")
        assert h["ok"] and h["server"] == "tinyserve" and h["protocol"] == 1
        assert h["limits"] == {"max_frame_bytes": 256 << 20, "max_header_bytes": 1 << 20, "max_tensors": 256,
                               "max_in_flight_per_connection": 128, "max_in_flight": 4096,
                               "max_connections": 1024, "idle_timeout_s": 300.0}
        assert c.call("ping") == {"id": 2, "ok": True}
        error_of(c.call("hello", protocol=2), "BAD_REQUEST", "protocol 2")


def test_infer_mlp(st):
    rng = np.random.default_rng(0)
    with Client(st.port) as c:
        for batch in (1, 3, 64):
            x = rng.standard_normal((batch, 64), dtype=np.float32)
            h, out = c.infer("mlp", {"x": x})
            assert h["model"] == "mlp" and h["version"] == 5  # the highest loaded version by default
            assert h["outputs"] == [{"name": "output0", "dtype": "float32", "shape": [batch, 10], "nbytes": batch * 40}]
            np.testing.assert_array_equal(out["output0"], mlp_ref(x))
        x = rng.standard_normal((1, 64), dtype=np.float32)
        h, out = c.infer("mlp", {"x": torch.from_numpy(x)}, outputs=["output0"], timeout_ms=60_000, priority=15)
        np.testing.assert_array_equal(out["output0"], mlp_ref(x))


def test_infer_big_request_through_the_dedicated_buffer(st):
    x = np.random.default_rng(2).standard_normal((4096, 64), dtype=np.float32)  # 1 MiB frame
    with Client(st.port) as c:
        h, out = c.infer("mlp", {"x": x})
        np.testing.assert_array_equal(out["output0"], mlp_ref(x))


def test_pipelined_requests_on_one_connection(st):
    rng = np.random.default_rng(3)
    xs = {}
    with Client(st.port) as c:
        for i in range(200):
            if i % 5 == 4:
                c.send({"id": 1000 + i, "op": "ping"})
            else:
                x = rng.standard_normal((1, 64), dtype=np.float32)
                xs[c.infer_send("mlp", {"x": x})] = x
        seen = set()
        for _ in range(200):
            h, p = c.recv()
            seen.add(h["id"])
            if h["id"] in xs:
                np.testing.assert_array_equal(outputs_of(h, p)["output0"], mlp_ref(xs[h["id"]]))
        assert seen == set(xs) | {1000 + i for i in range(200) if i % 5 == 4}


def test_bytes_inputs_with_pre_and_post_processing(st):
    with Client(st.port) as c:
        h, out = c.infer("text", {"text": ["héllo", b"ab", ""]})
        assert h["ok"], h
        np.testing.assert_array_equal(out["y"], np.array([6, 2, 0], np.float32))
        assert out["upper"] == [b"OK"] * 3


def test_models_metadata_health_stats(st):
    with Client(st.port) as c:
        models = {m["name"]: m for m in c.call("models")["models"]}
        assert set(models) >= {"mlp", "gate", "text", "broken"}
        assert models["mlp"]["versions"] == [1, 5]
        assert models["mlp"]["loaded"] == [{"version": 5, "state": "READY", "bytes": 340008, "instances": 1}]
        assert models["broken"]["loaded"] == []
        md = c.call("metadata", model="mlp")
        assert md["version"] == 5 and md["platform"] == "torch_export" and md["batching"] is None
        assert md["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 64]}]
        assert md["outputs"] == [{"name": "output0", "dtype": "float32", "shape": [-1, 10]}]
        assert c.call("metadata", model="mlp", version=1)["version"] == 1  # not loaded: read from the repository
        assert c.call("metadata", model="text")["platform"] == "python"
        error_of(c.call("metadata", model="nope"), "NOT_FOUND", "'nope'")
        error_of(c.call("metadata", model="mlp", version=9), "NOT_FOUND", "version 9")
        health = c.call("health")
        assert health["live"] is True and health["ready"] is True
        m = health["models"]["mlp"]
        assert (m["state"], m["reason"], m["version"], m["serving"], m["device"]) == ("READY", "", 5, True, "cpu")
        assert health["reasons"] == [] and health["devices"]["cpu"]["healthy"] is True
        before = c.call("stats", model="mlp")
        c.infer("mlp", {"x": np.zeros((1, 64), np.float32)})
        c.infer("mlp", {"x": np.zeros((1, 65), np.float32)})
        after = c.call("stats", model="mlp")
        assert after["requests"] == before["requests"] + 2
        assert after["errors"].get("INVALID_INPUT", 0) == before["errors"].get("INVALID_INPUT", 0) + 1
        lat = after["latency_us"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        everything = c.call("stats")
        assert everything["requests"] >= after["requests"] and "mlp" in everything["models"]
        assert everything["connections"] >= 1 and everything["in_flight"] == 1
        error_of(c.call("stats", model="nope"), "NOT_FOUND")


def test_load_and_unload(st):
    with Client(st.port) as c:
        h = c.call("load", model="mlp", version=1)
        assert h == {"id": h["id"], "ok": True, "model": "mlp", "version": 1, "state": "READY"}
        x = np.ones((1, 64), np.float32)
        h, out = c.infer("mlp", {"x": x}, version=1)
        assert h["version"] == 1
        assert c.call("load", model="mlp", version=1)["state"] == "READY"  # already loaded: at once
        h = c.call("unload", model="mlp", version=1)
        assert h["versions"] == [1]
        weights_v1 = os.path.join(repo_root_of(st), "mlp", "1", "weights.tsw")
        open_files = [os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd")
                      if os.path.exists(f"/proc/self/fd/{f}")]
        assert weights_v1 not in open_files  # unloading released the weights (and their mapping)
        error_of(c.infer("mlp", {"x": x}, version=1)[0], "UNAVAILABLE", "version 1 is not loaded")
        assert c.infer("mlp", {"x": x})[0]["version"] == 5  # the other version still serves
        assert c.call("unload", model="mlp", version=1)["versions"] == []  # nothing to do
        error_of(c.call("unload", model="nope"), "NOT_FOUND", "'nope'")
        error_of(c.call("load", model="nope"), "NOT_FOUND", "'nope'")
        error_of(c.call("load", model="mlp", version=3), "NOT_FOUND", "version 3")
        error_of(c.call("load", model="../etc"), "BAD_REQUEST", "../etc")
        error_of(c.call("load"), "BAD_REQUEST", "'model'")
        error_of(c.call("load", model="mlp", version="5"), "BAD_REQUEST", "'version'")


def test_failed_load_is_reported_and_kept_with_its_reason(st):
    with Client(st.port) as c:
        error_of(c.call("load", model="broken"), "MODEL_ERROR", "no build today")
        health = c.call("health")
        assert health["models"]["broken"]["state"] == "FAILED"
        assert "no build today" in health["models"]["broken"]["reason"]
        assert health["ready"] is True  # not a start-up model
        error_of(c.infer("broken", {"x": np.ones((1, 4), np.float32)})[0], "UNAVAILABLE", "FAILED", "no build today")
        assert c.call("unload", model="broken")["versions"] == [1]
        # health lists every repository model (issue 12.7): unloaded, the failure no longer held against it
        assert c.call("health")["models"]["broken"]["state"] == "UNLOADED"
    assert_alive(st)


def test_start_refuses_to_listen_when_a_startup_model_fails(repo_root, kind):
    with pytest.raises(errors.ModelError, match="no build today"):
        ServerThread(ServerConfig(repo=repo_root, models=("mlp", "broken")), kind)


# --- bad input and faults (issue 3), each followed by assert_alive -------------------------------------------------
def test_truncated_frame_then_close(st):
    data = wire.encode_bytes({"id": 1, "op": "ping"})
    for cut in (3, 8, 12, len(data) - 1):
        with Client(st.port) as c:
            c.send_raw(data[:cut])
            c.sock.shutdown(socket.SHUT_WR)
            h, _ = c.recv()
            error_of(h, "BAD_FRAME", "ended inside a frame")
            assert c.closed_by_server()
    assert_alive(st)


@pytest.mark.parametrize("prefix, code, fragment", [
    (struct.pack("<II", 0xFFFFFFFC, 8), "FRAME_TOO_LARGE", "max_frame_bytes 268435456"),  # near 2^32
    (struct.pack("<II", (256 << 20) + 4, 8), "FRAME_TOO_LARGE", "max_frame_bytes"),
    (struct.pack("<II", 1 << 20, (1 << 20) + 8), "FRAME_TOO_LARGE", "max_header_bytes 1048576"),
    (struct.pack("<II", 13, 1), "BAD_FRAME", "multiple of 8"),
])
def test_bad_lengths_close_the_connection(st, prefix, code, fragment):
    with Client(st.port) as c:
        c.send_raw(prefix + bytes(8))
        h, _ = c.recv()
        assert h["id"] == 0
        error_of(h, code, fragment)
        assert c.closed_by_server()
    assert_alive(st)


@pytest.mark.parametrize("head, fragment", [
    (b"\xc1\xc1\xc1", "not valid msgpack"),
    (b"hello world!", "not valid msgpack"),
    (msgpack.packb([1, "ping"]), "not a map"),
    (msgpack.packb("ping"), "not a map"),
])
def test_headers_that_are_not_msgpack_maps(st, head, fragment):
    off = wire.align8(8 + len(head))
    frame = struct.pack("<II", off - 4, len(head)) + head + bytes(off - 8 - len(head))
    with Client(st.port) as c:
        c.send_raw(frame)
        h, _ = c.recv()
        assert h["id"] == 0
        error_of(h, "BAD_FRAME", fragment)
        assert c.closed_by_server()
    assert_alive(st)


X1 = {"name": "x", "dtype": "float32", "shape": [1, 64], "nbytes": 256}


@pytest.mark.parametrize("header, payload, code, fragments", [
    ({"op": "infer", "model": "mlp"}, b"", "BAD_REQUEST", ["'inputs'"]),
    ({"op": "infer", "inputs": [X1]}, bytes(256), "BAD_REQUEST", ["'model'"]),
    ({"op": "infer", "model": 7, "inputs": [X1]}, bytes(256), "BAD_REQUEST", ["'model'", "7"]),
    ({"op": "infer", "model": ["mlp"], "inputs": [X1]}, bytes(256), "BAD_REQUEST", ["'model'"]),
    ({"op": "infer", "model": "mlp", "inputs": "x"}, b"", "BAD_REQUEST", ["'inputs'"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1], "version": "5"}, bytes(256), "BAD_REQUEST", ["'version'"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1], "timeout_ms": -1}, bytes(256), "BAD_REQUEST", ["timeout_ms"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1], "timeout_ms": 1.5}, bytes(256), "BAD_REQUEST", ["timeout_ms"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1], "priority": 16}, bytes(256), "BAD_REQUEST", ["priority", "0..15"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1], "outputs": "output0"}, bytes(256), "BAD_REQUEST", ["'outputs'"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1], "outputs": ["logits"]}, bytes(256), "INVALID_INPUT", ["'logits'", "output0"]),
    ({"op": "infer", "model": "mlp", "inputs": [dict(X1, nbytes=252)]}, bytes(256), "INVALID_INPUT", ["'x'", "nbytes is 252", "needs 256"]),
    ({"op": "infer", "model": "mlp", "inputs": [X1]}, bytes(128), "INVALID_INPUT", ["'x'", "payload holds 128"]),
    ({"op": "infer", "model": "mlp", "inputs": [dict(X1, dtype="float64", nbytes=512)]}, bytes(512), "INVALID_INPUT", ["'x'", "float64", "float32"]),
    ({"op": "infer", "model": "mlp", "inputs": [dict(X1, shape=[1, 63], nbytes=252)]}, bytes(256), "INVALID_INPUT", ["'x'", "[1, 63]", "[-1, 64]"]),
    ({"op": "infer", "model": "mlp", "inputs": [dict(X1, shape=[64], nbytes=256)]}, bytes(256), "INVALID_INPUT", ["'x'", "[64]"]),
    ({"op": "infer", "model": "mlp", "inputs": [dict(X1, name="y")]}, bytes(256), "INVALID_INPUT", ["'y'", "not an input"]),
    ({"op": "infer", "model": "mlp", "inputs": []}, b"", "INVALID_INPUT", ["'x'", "missing"]),
    ({"op": "infer", "model": "mlp", "inputs": [dict(X1, dtype="complex64")]}, bytes(256), "INVALID_INPUT", ["complex64"]),
    ({"op": "infer", "model": "nope", "inputs": [X1]}, bytes(256), "NOT_FOUND", ["'nope'"]),
    ({"op": "infer", "model": "mlp", "version": 4, "inputs": [X1]}, bytes(256), "NOT_FOUND", ["version 4"]),
    ({"op": "infer", "model": "../mlp", "inputs": [X1]}, bytes(256), "BAD_REQUEST", ["../mlp"]),
    ({"op": "infer", "model": "broken", "inputs": [X1]}, bytes(256), "UNAVAILABLE", ["'broken'", "not loaded"]),
    ({"op": "launch"}, b"", "BAD_REQUEST", ["unknown op 'launch'"]),
    ({"op": 5}, b"", "BAD_REQUEST", ["unknown op 5"]),
    ({"op": ["infer"]}, b"", "BAD_REQUEST", ["unknown op ['infer']"]),
    ({"op": {"a": 1}}, b"", "BAD_REQUEST", ["unknown op"]),
    ({}, b"", "BAD_REQUEST", ["unknown op None"]),
    ({"op": "metadata"}, b"", "BAD_REQUEST", ["'model'"]),
    ({"op": "unload", "model": None}, b"", "BAD_REQUEST", ["'model'"]),
    ({"op": "stats", "model": 3}, b"", "BAD_REQUEST", ["'model'"]),
])
def test_bad_requests_keep_the_connection(st, header, payload, code, fragments):
    with Client(st.port) as c:
        descs = header.get("inputs")
        data = bytearray(wire.encode_bytes({"id": 77, **header}))
        if payload:
            data += payload  # hand-made payload (may disagree with the descriptors)
            body_len = len(data) - 4 + (-len(data) % 8)
            data += bytes(-len(data) % 8)
            struct.pack_into("<I", data, 0, body_len)
        c.send_raw(bytes(data))
        h, _ = c.recv()
        assert h["id"] == 77
        error_of(h, code, *fragments)
        assert c.call("ping")["ok"]  # same connection still works
        del descs
    assert_alive(st)


def test_bad_request_ids(st):
    with Client(st.port) as c:
        for bad in (0, -5, "seven", None, 1.0):
            c.send({"id": bad, "op": "ping"} if bad is not None else {"op": "ping"})
            h, _ = c.recv()
            assert h["id"] == 0
            error_of(h, "BAD_REQUEST", "request id")
        assert c.call("ping")["ok"]
    assert_alive(st)


def test_request_id_reused_while_in_flight(st, gate):
    with Client(st.port) as c:
        c.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=5)
        gate.wait()  # id 5 is running
        try:
            c.send({"id": 5, "op": "ping"})
            h, _ = c.recv()
            assert h["id"] == 5
            error_of(h, "DUPLICATE_ID", "5")
        finally:
            gate.release()
        h, _ = c.recv()
        assert h["id"] == 5 and h["ok"]
        assert c.call("ping")["ok"]
    assert_alive(st)


def test_model_that_raises_gets_model_error_naming_it(st):
    with Client(st.port) as c:
        h, _ = c.infer("gate", {"x": np.full((1, 4), -1, np.float32)})
        error_of(h, "MODEL_ERROR", "'gate'", "ValueError", "gate refuses -1")
        h, out = c.infer("gate", {"x": np.ones((1, 4), np.float32)})
        assert h["ok"] and out["y"].shape == (1, 4)
    assert_alive(st)


def test_loop_stays_responsive_while_a_model_runs(st, gate):
    with Client(st.port) as busy, Client(st.port) as other:
        busy.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)})
        gate.wait()
        try:
            assert other.call("ping")["ok"]
            h, _ = other.infer("mlp", {"x": np.ones((1, 64), np.float32)})
            assert h["ok"]
            assert other.call("stats")["in_flight"] >= 2
        finally:
            gate.release()
        assert busy.recv()[0]["ok"]


def test_deadline_exceeded_before_it_ran(st, gate):
    with Client(st.port) as c:
        c.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
        gate.wait()
        try:
            sent = time.monotonic()
            c.infer_send("gate", {"x": np.ones((1, 4), np.float32)}, rid=2, timeout_ms=1)
            c.send({"id": 3, "op": "ping"})
            assert c.recv()[0]["id"] == 3  # the infer before it was dispatched (queued behind id 1)
            while time.monotonic() < sent + 0.005:  # its deadline has certainly passed (same clock)
                pass
        finally:
            gate.release()
        replies = {h["id"]: h for h in (c.recv()[0], c.recv()[0])}
        assert replies[1]["ok"]
        error_of(replies[2], "DEADLINE_EXCEEDED", "'gate'", "before it could run")
    assert_alive(st)


def test_inference_on_an_unloading_model(st, gate):
    with Client(st.port) as a, Client(st.port) as b:
        a.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
        gate.wait()
        try:
            b.send({"id": 100, "op": "unload", "model": "gate"})
            assert b.call("ping")["ok"]  # the unload was dispatched: the model is UNLOADING
            h, _ = b.infer("gate", {"x": np.ones((1, 4), np.float32)})
            error_of(h, "UNAVAILABLE", "'gate'", "UNLOADING")
            assert b.call("health")["models"]["gate"]["state"] == "UNLOADING"
        finally:
            gate.release()
        assert a.recv()[0]["ok"]  # the request in flight finished
        h, _ = b.recv()
        assert h["id"] == 100 and h["versions"] == [1]
        error_of(b.infer("gate", {"x": np.ones((1, 4), np.float32)})[0], "UNAVAILABLE", "not loaded")
        assert b.call("health")["ready"] is False  # a start-up model is gone
        assert b.call("load", model="gate")["state"] == "READY"
        assert b.call("health")["ready"] is True
    assert_alive(st)


def test_requests_read_before_an_unload_still_run(st):
    with Client(st.port) as c:
        descs, views = wire.tensor_parts({"x": np.ones((1, 4), np.float32)})
        c.send_raw(wire.encode_bytes({"id": 1, "op": "infer", "model": "gate", "inputs": descs}, views)
                   + wire.encode_bytes({"id": 2, "op": "unload", "model": "gate"})
                   + wire.encode_bytes({"id": 3, "op": "infer", "model": "gate", "inputs": descs}, views))
        replies = {h["id"]: h for h in (c.recv()[0], c.recv()[0], c.recv()[0])}
        assert replies[1]["ok"], replies[1]
        assert replies[2]["versions"] == [1]
        error_of(replies[3], "UNAVAILABLE", "'gate'")
        assert c.call("load", model="gate")["state"] == "READY"


def test_disconnect_mid_frame_and_mid_reply(st, gate):
    settle(st)
    base_fds = fd_count()
    big = wire.encode_bytes({"id": 1, "op": "infer", "model": "mlp",
                             "inputs": [{"name": "x", "dtype": "float32", "shape": [8192, 64], "nbytes": 8192 * 256}]},
                            [memoryview(np.ones((8192, 64), np.float32).reshape(-1).view(np.uint8))])
    for cut in (4, 100, len(big) // 2, len(big) - 8):
        c = Client(st.port)
        c.send_raw(big[:cut])
        c.close()
    # mid-reply: big replies, read a little, then vanish
    c = Client(st.port)
    for i in range(1, 6):
        c.infer_send("mlp", {"x": np.ones((20000, 64), np.float32)}, rid=i)
    c.sock.recv(100)
    c.close()
    # a reply to a connection that is gone
    c = Client(st.port)
    c.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)})
    gate.wait()
    c.close()  # (the server treats the EOF as a half-close: it owes a reply, so it waits for it)
    gate.release()
    assert_alive(st)  # (also: every earlier connection has been accepted)
    settle(st)
    assert fds_after(st, base_fds) == base_fds
    assert st.run(lambda: st.server.in_flight) == 0


def test_client_that_never_reads_cannot_grow_server_memory(st):
    """Pipelined metadata requests (~40 bytes) whose replies (~300 bytes) are never read: the server's
    write buffer stops at its high-water mark and the server stops reading the connection."""
    md = wire.encode_bytes({"id": 1, "op": "metadata", "model": "mlp"})
    chunk = b"".join(wire.encode_bytes({"id": i, "op": "metadata", "model": "mlp"}) for i in range(1, 1001))
    c = Client(st.port, rcvbuf=4096, sndbuf=4096)
    conn = st.conn_of(c)
    c.sock.setblocking(False)
    sent, paused, peak = 0, False, 0
    deadline = time.monotonic() + 60
    pos = 0
    while time.monotonic() < deadline and sent < (200 << 20):
        try:
            n = c.sock.send(chunk[pos:])
            sent += n
            pos = (pos + n) % len(chunk)
            if pos % len(md):  # keep frames whole at the wrap point
                continue
        except BlockingIOError:
            state = st.run(lambda: (conn.reading_paused, conn.transport.get_write_buffer_size() if conn.transport else 0))
            peak = max(peak, state[1])
            if state[0]:
                paused = True
                break
            select.select([], [c.sock], [], 0.2)
    assert paused, f"the server kept reading ({sent} bytes sent)"
    size = st.run(lambda: conn.transport.get_write_buffer_size())
    assert size <= protocol.WRITE_HIGH_WATER + (2 << 20), size  # high water + at most one read's replies
    assert conn.in_flight == 0
    c.close()
    st.call(st.server.wait_connections_closed())
    assert_alive(st)


def test_thousands_of_connections_opened_and_dropped(st):
    assert_alive(st)
    settle(st)
    fds, tasks = fd_count(), st.task_count()
    half = wire.encode_bytes({"id": 1, "op": "ping"})[:10]
    for batch in range(10):
        socks = [socket.create_connection(("127.0.0.1", st.port), timeout=30) for _ in range(100)]
        for i, s in enumerate(socks):
            if i % 3 == 1:
                s.sendall(half)  # mid-frame
            elif i % 3 == 2:
                s.sendall(wire.encode_bytes({"id": 1, "op": "ping"}))  # a request whose reply is never read
        for s in socks:
            s.close()
    # accepts are FIFO: once a new client is answered, every earlier connection was accepted and
    # registered, so "no connection open" then really means all of them are gone
    assert_alive(st)
    settle(st)
    n_after = fds_after(st, fds)
    assert n_after == fds
    assert st.task_count() == tasks
    assert st.run(lambda: st.server.in_flight) == 0


# --- configurations of their own -------------------------------------------------------------------------------------
def test_token_auth(repo_root, kind):
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), token="s3cret-token", torch_threads=1), kind)
    try:
        with Client(s.port) as c:  # anything before hello
            c.send({"id": 1, "op": "ping"})
            error_of(c.recv()[0], "UNAUTHENTICATED", "hello")
            assert c.closed_by_server()
        with Client(s.port) as c:  # wrong token
            c.send({"id": 1, "op": "hello", "protocol": 1, "token": "s3cret-tokem"})
            error_of(c.recv()[0], "UNAUTHENTICATED", "token")
            assert c.closed_by_server()
        with Client(s.port) as c:  # no token
            c.send({"id": 1, "op": "hello", "protocol": 1})
            error_of(c.recv()[0], "UNAUTHENTICATED")
            assert c.closed_by_server()
        with Client(s.port) as c:
            c.send({"id": 1, "op": "infer", "model": "mlp", "inputs": []})
            error_of(c.recv()[0], "UNAUTHENTICATED")
            assert c.closed_by_server()
        with Client(s.port) as c:
            assert c.call("hello", protocol=1, token="s3cret-token")["ok"]
            h, out = c.infer("mlp", {"x": np.ones((1, 64), np.float32)})
            np.testing.assert_array_equal(out["output0"], mlp_ref(np.ones((1, 64), np.float32)))
            assert c.call("stats")["errors"]["UNAUTHENTICATED"] == 4
    finally:
        s.stop()


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls(repo_root, kind, tls_pair):
    cert, key = tls_pair
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), tls_certfile=cert, tls_keyfile=key, torch_threads=1), kind)
    try:
        ctx = ssl.create_default_context(cafile=cert)
        with Client(s.port, ssl_ctx=ctx) as c:
            assert c.call("hello", protocol=1)["ok"]
            for batch in (1, 2048):  # a small frame, and a big one through the dedicated buffer
                x = np.random.default_rng(batch).standard_normal((batch, 64), dtype=np.float32)
                h, out = c.infer("mlp", {"x": x})
                np.testing.assert_array_equal(out["output0"], mlp_ref(x))
        with Client(s.port) as plain:  # plain TCP to a TLS server: no answer, closed
            plain.send({"id": 1, "op": "ping"})
            assert plain.closed_by_server() and not plain.buf.startswith(b"\x08")
        untrusting = ssl.create_default_context()
        with pytest.raises(ssl.SSLError):
            Client(s.port, ssl_ctx=untrusting)
        with Client(s.port, ssl_ctx=ctx) as c:
            assert c.call("ping")["ok"]
    finally:
        s.stop()


def test_bad_tls_files_fail_at_start(repo_root, kind, tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(errors.ConfigError, match="bogus.pem"):
        ServerThread(ServerConfig(repo=repo_root, tls_certfile=str(bogus), tls_keyfile=str(bogus)), kind)


def test_connection_and_in_flight_limits(repo_root, kind, gate):
    s = ServerThread(ServerConfig(repo=repo_root, models=("gate",), max_connections=2, max_in_flight=1), kind)
    try:
        a, b = Client(s.port), Client(s.port)
        assert a.call("ping")["ok"] and b.call("ping")["ok"]
        with Client(s.port) as c:
            h, _ = c.recv()
            assert h["id"] == 0
            error_of(h, "TOO_MANY_REQUESTS", "max_connections 2")
            assert c.closed_by_server()
        a.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
        gate.wait()
        try:
            b.send({"id": 9, "op": "load", "model": "gate"})  # (monitoring ops pass the cap: test_conformance)
            h, _ = b.recv()
            assert h["id"] == 9
            error_of(h, "TOO_MANY_REQUESTS", "max_in_flight 1")
        finally:
            gate.release()
        assert a.recv()[0]["ok"]
        assert b.call("ping")["ok"]
        b.close()
        a.close()
        s.call(s.server.wait_connections_closed())
        with Client(s.port) as c:
            assert c.call("ping")["ok"]
    finally:
        s.stop()


def test_per_connection_in_flight_limit_is_backpressure(repo_root, kind, gate):
    s = ServerThread(ServerConfig(repo=repo_root, models=("gate",), max_in_flight_per_connection=1), kind)
    try:
        with Client(s.port) as c:
            c.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
            gate.wait()
            try:
                c.send({"id": 2, "op": "ping"})  # held, not refused
                conn = s.conn_of(c)
                assert s.run(lambda: conn.in_flight) == 1
            finally:
                gate.release()
            assert [c.recv()[0]["id"], c.recv()[0]["id"]] == [1, 2]
    finally:
        s.stop()


def test_idle_connections_are_closed(repo_root, kind):
    s = ServerThread(ServerConfig(repo=repo_root, idle_timeout_s=0.2), kind)
    try:
        with Client(s.port) as c:
            assert c.call("ping")["ok"]
            assert c.closed_by_server()  # waits (bounded by the socket timeout) for the server to close
        s.call(s.server.wait_connections_closed())
    finally:
        s.stop()


def test_stop_drains_in_flight_requests(repo_root, kind, gate):
    s = ServerThread(ServerConfig(repo=repo_root, models=("gate",)), kind)
    try:
        c = Client(s.port)
        c.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
        gate.wait()
        stopping = asyncio.run_coroutine_threadsafe(s.server.stop(30), s.loop)
        c2 = None
        try:
            s.run(lambda: None)
            c.send({"id": 2, "op": "infer", "model": "gate", "inputs": []})
            h, _ = c.recv()
            error_of(h, "SHUTTING_DOWN")
            assert c.call("health")["ready"] is False
            with pytest.raises(OSError):
                c2 = Client(s.port, timeout=5)
                c2.call("ping")
        finally:
            gate.release()
        assert c.recv()[0]["ok"]  # finished, then closed
        assert c.closed_by_server()
        stopping.result(60)
        c.close()
        if c2 is not None:
            c2.close()
    finally:
        s._end()


@pytest.mark.parametrize("loop_flag", ["--no-uvloop", None])
def test_sigterm_graceful_shutdown_subprocess(repo_root, gate, loop_flag):
    cmd = [sys.executable, "-m", "tinyserve", "serve", "--repo", repo_root, "--port", "0", "--model", "gate", "--model", "mlp"]
    if loop_flag:
        cmd.append(loop_flag)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT), text=True)
    try:
        def line(timeout=60):
            r, _, _ = select.select([proc.stdout], [], [], timeout)
            assert r, "the server printed nothing"
            return proc.stdout.readline()

        ready = line()
        assert "listening on 127.0.0.1:" in ready, ready + proc.stderr.read()
        assert ("[asyncio]" if loop_flag else "[uvloop]") in ready
        port = int(ready.split("listening on 127.0.0.1:")[1].split()[0])
        c = Client(port)
        c.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
        gate.wait()
        try:
            proc.send_signal(signal.SIGTERM)
            assert "draining" in line()
            c.send({"id": 2, "op": "infer", "model": "mlp", "inputs": []})
            error_of(c.recv()[0], "SHUTTING_DOWN")
            assert c.call("ping")["ok"]
        finally:
            gate.release()
        h, _ = c.recv()
        assert h["id"] == 1 and h["ok"]
        assert c.closed_by_server()
        assert proc.wait(60) == 0
        assert "stopped" in proc.stdout.read()
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# --- config and small parts --------------------------------------------------------------------------------------------
def test_server_config_validation(repo_root):
    cfg = ServerConfig(repo=repo_root, models=["mlp", "mlp:5", ("gate", 1)])
    assert cfg.models == (("mlp", None), ("mlp", 5), ("gate", 1))
    assert cfg.host == "127.0.0.1" and cfg.port == 0 and cfg.use_uvloop
    for kwargs, match in [({"port": 70000}, "port"), ({"models": ("a:b",)}, "NAME:VERSION"),
                          ({"models": ("../x",)}, "model name"), ({"token": ""}, "token"),
                          ({"tls_certfile": "c"}, "go together"), ({"max_connections": 0}, "max_connections"),
                          ({"max_in_flight": True}, "max_in_flight"), ({"idle_timeout_s": -1}, "idle_timeout_s"),
                          ({"torch_threads": 0}, "torch_threads"), ({"verify": "some"}, "verify"),
                          ({"limits": {}}, "wire.Limits"),
                          ({"limits": wire.Limits(max_header_bytes=1 << 30)}, "max_header_bytes")]:
        with pytest.raises(errors.ConfigError, match=match):
            ServerConfig(repo=repo_root, **kwargs)
    with pytest.raises(errors.RepositoryError):
        Server(ServerConfig(repo="/nonexistent/repo/dir"))


def test_histogram_is_bounded_and_close():
    h = Histogram()
    values = list(range(1, 100_001))
    for v in values:
        h.add(v)
    p = h.percentiles()
    assert p["max"] == 100_000 and len(h.counts) == 512
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact = values[int(q * len(values)) - 1]
        assert exact <= p[key] <= exact * 1.13, (key, p[key], exact)
    assert Histogram().percentiles() == {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    small = Histogram()
    for v in (0, 1, 2, 3):
        small.add(v)
    assert small.percentiles()["p50"] == 1


# --- review fixes ----------------------------------------------------------------------------------------
def test_unauthenticated_prefixes_allocate_nothing(repo_root, kind):
    """With a token, a frame prefix announcing a huge frame is refused before hello: FRAME_TOO_LARGE,
    no buffer of that size, the connection closed."""
    s = ServerThread(ServerConfig(repo=repo_root, token="sesame"), kind)
    try:
        clients = [Client(s.port) for _ in range(4)]
        for c in clients:
            c.send_raw(struct.pack("<II", (256 << 20) - 4, 16))
        for c in clients:
            h, _ = c.recv()
            error_of(h, "FRAME_TOO_LARGE", "before hello")
            assert c.closed_by_server()
            c.close()
        assert s.run(lambda: s.server._frame_memory.used) == 0
        with Client(s.port) as c:
            assert c.call("hello", protocol=wire.PROTOCOL_VERSION, token="sesame")["ok"]
            assert c.call("ping")["ok"]
    finally:
        s.stop()


def test_large_frames_share_a_server_wide_memory_budget(repo_root, kind):
    big = protocol.BIG_FRAME * 4
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), max_frame_memory=big + big // 2), kind)
    try:
        x = np.random.default_rng(3).standard_normal((big // 256, 64), dtype=np.float32)
        descs, views = wire.tensor_parts({"x": x})
        data = wire.encode_bytes({"id": 1, "op": "infer", "model": "mlp", "inputs": descs}, views)
        with Client(s.port) as a, Client(s.port) as b:
            a.send_raw(data[:4096])  # a's frame is being received: its size is reserved
            deadline = time.monotonic() + 10
            while s.run(lambda: s.server._frame_memory.used) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.run(lambda: s.server._frame_memory.used) == len(data)
            b.send_raw(data[:4096])  # b's does not fit: b is not read meanwhile
            conn_b = s.conn_of(b)
            deadline = time.monotonic() + 10
            while not s.run(lambda: conn_b.reading_paused) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.run(lambda: conn_b.reading_paused and conn_b._big is None)
            a.send_raw(data[4096:])
            b.send_raw(data[4096:])
            for c in (a, b):
                h, payload = c.recv()
                assert h["ok"], h
                np.testing.assert_array_equal(outputs_of(h, payload)["output0"], mlp_ref(x))
        assert s.run(lambda: s.server._frame_memory.used) == 0
    finally:
        s.stop()


def test_disconnect_keeps_queued_requests_in_the_budget_and_they_do_not_run(repo_root, kind, gate):
    s = ServerThread(ServerConfig(repo=repo_root, models=("gate",), max_in_flight=16,
                                  max_in_flight_per_connection=8), kind)
    try:
        with Client(s.port) as a:
            a.infer_send("gate", {"x": np.full((1, 4), 42, np.float32)}, rid=1)
            gate.wait()  # the worker is busy with a's request
            try:
                b = Client(s.port)
                for i in range(1, 9):
                    b.infer_send("gate", {"x": np.ones((1, 4), np.float32)}, rid=i)
                deadline = time.monotonic() + 10
                while s.run(lambda: s.server.in_flight) < 9 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert s.run(lambda: s.server.in_flight) == 9
                b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                b.close()  # reset: the 8 requests are still queued in the worker
                deadline = time.monotonic() + 10
                while s.run(lambda: len(s.server.connections)) > 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert s.run(lambda: s.server.in_flight) == 9  # still counted: the work is still queued
                before = s.run(lambda: s.server.metrics.model_dict("gate")["requests"])
            finally:
                gate.release()
            assert a.recv()[0]["ok"]
            deadline = time.monotonic() + 10
            while s.run(lambda: s.server.in_flight) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.run(lambda: s.server.in_flight) == 0
            # only a's request was answered (and counted); b's were skipped, not run
            assert s.run(lambda: s.server.metrics.model_dict("gate")["requests"]) == before + 1
    finally:
        s.stop()


def test_a_client_that_never_reads_is_aborted_after_the_close_grace(repo_root, kind, monkeypatch):
    monkeypatch.setattr(protocol, "CLOSE_GRACE_S", 0.3)
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), idle_timeout_s=0.5), kind)
    try:
        c = Client(s.port, rcvbuf=4096)
        x = np.zeros((2000, 64), np.float32)
        descs, views = wire.tensor_parts({"x": x})
        frame_ = wire.encode_bytes({"id": 1, "op": "infer", "model": "mlp", "inputs": descs}, views)
        conn = s.conn_of(c)
        for i in range(1, 40):  # replies (~80 KB each) pile up in the server's write buffer
            c.send_raw(frame_.replace(b"\xa2id\x01", b"\xa2id" + bytes([i]), 1))
            if s.run(lambda: conn.reading_paused):
                break
        deadline = time.monotonic() + 20
        while s.run(lambda: len(s.server.connections)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.run(lambda: len(s.server.connections)) == 0  # idle close, then abort: the slot is free
        c.close()
    finally:
        s.stop()


@pytest.mark.parametrize("outputs, fragment", [([[1]], "strings"), ([1], "strings"), ([None], "strings"),
                                               (["output0", "output0"], "more than once")])
def test_outputs_must_be_distinct_names(st, outputs, fragment):
    with Client(st.port) as c:
        h, _ = c.infer("mlp", {"x": np.zeros((1, 64), np.float32)}, outputs=outputs)
        error_of(h, "BAD_REQUEST", fragment)
        assert c.call("ping")["ok"]


def test_refused_connection_is_counted_once(repo_root, kind):
    s = ServerThread(ServerConfig(repo=repo_root, max_connections=1), kind)
    try:
        with Client(s.port) as a:
            assert a.call("ping")["ok"]
            with Client(s.port) as b:
                error_of(b.recv()[0], "TOO_MANY_REQUESTS", "max_connections 1")
                assert b.closed_by_server()
            st_ = a.call("stats")
            assert st_["errors"] == {"TOO_MANY_REQUESTS": 1}
    finally:
        s.stop()


def test_histogram_upper_edges_are_never_below_the_values():
    for v in list(range(0, 300)) + [1000, 12345, 1 << 20]:
        h = Histogram()
        h.add(v)
        h.add(v)
        h.max = 1 << 40  # (the max clamp must not hide the edge)
        p = h.percentiles()["p50"]
        assert v <= p <= max(v * 1.13, v + 1), (v, p)
    h = Histogram()
    for _ in range(10):
        h.add(17)
    assert h.percentiles()["p50"] == 17
    h = Histogram()
    for _ in range(10):
        h.add(16)
    assert h.percentiles()["p50"] == 16


def test_requests_for_unknown_models_do_not_scan_the_repository_each_time(st, monkeypatch):
    calls = []
    real = st.server.repo.resolve

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(st.server.repo, "resolve", counting)
    with Client(st.port) as c:
        for _ in range(20):
            h, _ = c.infer("nosuchmodel", {"x": np.zeros((1, 64), np.float32)})
            error_of(h, "NOT_FOUND", "nosuchmodel")
            error_of(c.call("stats", model="nosuchmodel"), "NOT_FOUND")
            assert c.call("metadata", model="mlp")["ok"]
    assert len(calls) <= 2, calls


# --- direct replies from the worker threads ------------------------------------------------------------------------
@pytest.mark.parametrize("direct", [True, False])
def test_replies_written_by_workers_survive_a_client_that_reads_late(repo_root, kind, monkeypatch, direct):
    """Thousands of pipelined infers to a client with a tiny receive buffer that reads nothing until
    the server has stopped reading it: the worker's direct writes meet full socket buffers (partial
    writes and EAGAIN hand the rest to the loop), and yet every reply arrives once, whole, in a
    parseable stream, with the right answer; with direct replies off the loop writes them all."""
    seen = {"full": 0, "short": 0}
    real_writev = os.writev

    def spy(fd, bufs):
        try:
            n = real_writev(fd, bufs)
        except BlockingIOError:
            seen["short"] += 1
            raise
        seen["full" if n == sum(memoryview(b).nbytes for b in bufs) else "short"] += 1
        return n

    monkeypatch.setattr(os, "writev", spy)
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, direct_replies=direct), kind)
    try:
        c = Client(s.port, rcvbuf=4096)
        conn = s.conn_of(c)
        # a small send buffer on the server's side too, so that direct writes meet a full socket
        s.run(lambda: conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096))
        rng = np.random.default_rng(7)
        xs = rng.standard_normal((16, 1, 64), dtype=np.float32)
        n = 3000
        frames = []
        for rid in range(1, n + 1):
            desc, view = wire.tensor_parts({"x": xs[rid % 16]})
            frames.append(wire.encode_bytes({"id": rid, "op": "infer", "model": "mlp", "inputs": desc}, view))
        sender = threading.Thread(target=c.send_raw, args=(b"".join(frames),), daemon=True)
        sender.start()
        # until the server has stopped reading the client, or has answered everything into its buffers
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if s.run(lambda: conn.reading_paused) or (not sender.is_alive() and s.run(lambda: s.server.in_flight) == 0):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the server neither paused nor answered")
        want = [mlp_ref(xs[i]) for i in range(16)]
        got = set()
        for _ in range(n):
            h, payload = c.recv()
            assert h["ok"], h
            rid = h["id"]
            assert rid not in got
            got.add(rid)
            np.testing.assert_array_equal(outputs_of(h, payload)["output0"], want[rid % 16])
        sender.join(30)
        assert got == set(range(1, n + 1))
        if direct:
            assert seen["full"] > 0 and seen["short"] > 0, seen  # both paths of reply_threadsafe ran
        else:
            assert seen == {"full": 0, "short": 0}
        c.close()
        assert_alive(s.port)
    finally:
        s.stop()


# --- health: ejection, metrics listener, device faults (issue 6) -----------------------------------------------------
class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_failing_model_is_ejected_then_readmitted_others_unaffected(repo_root, kind):
    """gate raises on a marked input (-1): three failures in a row eject it (UNAVAILABLE at once, with
    the reason; not ready), mlp keeps serving; after the back-off (a fake clock) one probe goes through
    and its success re-admits gate.  The statistics count every request exactly."""
    cfg = ServerConfig(repo=repo_root, models=("mlp", "gate"), torch_threads=1,
                       ejection=EjectionConfig(consecutive_failures=3, base_ejection_s=5.0))
    s = ServerThread(cfg, kind)
    clock = FakeClock()
    s.server.clock = clock
    try:
        with Client(s.port) as c:
            bad = np.full((1, 4), -1.0, np.float32)
            good = np.ones((1, 4), np.float32)
            for _ in range(3):
                h, _ = c.infer("gate", {"x": bad})
                error_of(h, "MODEL_ERROR", "gate refuses -1")
            h, _ = c.infer("gate", {"x": good})
            error_of(h, "UNAVAILABLE", "gate", "eject")
            health = c.call("health")
            assert health["ready"] is False and health["models"]["gate"]["state"] == "EJECTED"
            assert any("gate" in r for r in health["reasons"])
            h, out = c.infer("mlp", {"x": np.ones((1, 64), np.float32)})  # the other model is unaffected
            assert h["ok"]
            clock.t += 6.0  # past the back-off: the next request is the probe
            h, out = c.infer("gate", {"x": good})
            assert h["ok"], h
            health = c.call("health")
            assert health["ready"] is True and health["models"]["gate"]["state"] == "READY"
            st = c.call("stats", model="gate")
            assert st["requests"] == 5 and st["successes"] == 1
            assert st["errors"] == {"MODEL_ERROR": 3, "UNAVAILABLE": 1}
    finally:
        s.stop()


def test_metrics_endpoint_counts_match_requests_sent(repo_root, kind):
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1, metrics_port=0), kind)
    try:
        port = s.server.metrics_port
        with Client(s.port) as c:
            for i in range(7):
                assert c.infer("mlp", {"x": np.full((1, 64), i, np.float32)})[0]["ok"]
            error_of(c.infer("mlp", {"x": np.zeros((1, 3), np.float32)})[0], "INVALID_INPUT")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                samples.setdefault(smp.name, []).append(smp)
        req = [x for x in samples["tinyserve_requests_total"] if x.labels.get("model") == "mlp"]
        assert sum(x.value for x in req) == 8
        ok = [x for x in samples["tinyserve_request_successes_total"] if x.labels.get("model") == "mlp"]
        assert sum(x.value for x in ok) == 7
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
    finally:
        s.stop()


def test_device_fault_marks_its_models_not_ready(repo_root, kind):
    from tinyserve.health import DeviceReading

    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1), kind)
    try:
        s.run(lambda: s.server.models._devices_changed((DeviceReading("cpu", "host", False, "the device is lost"),)))
        with Client(s.port) as c:
            error_of(c.infer("mlp", {"x": np.ones((1, 64), np.float32)})[0], "UNAVAILABLE", "device cpu")
            h = c.call("health")
            assert h["ready"] is False and any("mlp" in r for r in h["reasons"])
            deadline = time.monotonic() + 30  # the failed version's unload finishes (loading it meanwhile is UNAVAILABLE)
            while s.run(lambda: ("mlp", 5) in s.server._instances) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert c.call("load", model="mlp")["ok"]  # an operator loads it again
            h, _ = c.infer("mlp", {"x": np.ones((1, 64), np.float32)})
            assert h["ok"], h
    finally:
        s.stop()


def test_statistics_add_up_exactly_under_concurrent_load(repo_root, kind):
    """8 clients, 40 requests each, every fifth one invalid: the server's counts equal what was sent."""
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp",), torch_threads=1), kind)
    errors_seen = []

    def client(seed):
        try:
            with Client(s.port) as c:
                rids = []
                for i in range(40):
                    x = np.full((1, 64 if i % 5 else 63), seed, np.float32)
                    rids.append(c.infer_send("mlp", {"x": x}))
                for _ in rids:
                    c.recv()
        except BaseException as exc:
            errors_seen.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors_seen, errors_seen[0]
        with Client(s.port) as c:
            st = c.call("stats", model="mlp")
        assert st["requests"] == 320 and st["successes"] == 256
        assert st["errors"] == {"INVALID_INPUT": 64}
        m = st["models"]["mlp"]  # (the top-level in_flight is the server's, this stats request included)
        assert m["batch_size"]["batches"] == 256 and m["in_flight"] == 0 and m["queue_depth"] == 0
    finally:
        s.stop()


def test_a_failed_version_is_reported_and_an_older_ready_one_serves_meanwhile(repo_root, kind):
    """The ejection policy fails mlp version 5 (unloaded): version 1 serves the requests that name no
    version, `models` and `health` report 5 as FAILED with the reason and say that 1 serves."""
    s = ServerThread(ServerConfig(repo=repo_root, models=("mlp:1", "mlp:5"), torch_threads=1), kind)
    try:
        with Client(s.port) as c:
            x = np.ones((1, 64), np.float32)
            assert c.infer("mlp", {"x": x})[0]["version"] == 5
            s.run(lambda: s.server.models._transition(s.server.policy.mark_failed(("mlp", 5), "too many errors", 0.0)))
            deadline = time.monotonic() + 30
            while s.run(lambda: ("mlp", 5) in s.server._instances) and time.monotonic() < deadline:
                time.sleep(0.01)
            h, _ = c.infer("mlp", {"x": x})
            assert h["ok"] and h["version"] == 1, h
            loaded = {e["version"]: e for e in next(m for m in c.call("models")["models"] if m["name"] == "mlp")["loaded"]}
            assert loaded[1]["state"] == "READY" and loaded[5]["state"] == "FAILED"
            assert "too many errors" in loaded[5]["reason"]
            m = c.call("health")["models"]["mlp"]
            assert m["version"] == 1 and m["serving"] and "version 1 serves" in m["fallback"]
            assert c.call("load", model="mlp", version=5)["ok"]  # an operator loads it again
            assert c.infer("mlp", {"x": x})[0]["version"] == 5
    finally:
        s.stop()
