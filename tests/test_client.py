"""tinyserve.Client and tinyserve.AsyncClient against a fake server written here (asyncio, loopback,
speaking docs/protocol.md through tinyserve.wire) that can be told to misbehave: hold replies until
released, reorder them, answer with any error code, close in the middle of a reply, send garbage,
stop and restart on the same port.  No test sleeps to synchronise; every wait is bounded (a few
sleep to make a connection idle: the client polls a connection before a send only after
`_IDLE_CHECK` without a reply).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time

import numpy as np
import pytest
import torch

import tinyserve
import tinyserve.client as client_mod
from tinyserve import errors, wire
from tinyserve.client import (AsyncClient, Client, ClientConnectionError, ConnectFailed, ConnectionLost,
                              RequestTimeout, _advance, _FrameReader)

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio", "uvloop"]


# --- the fake server ------------------------------------------------------------------------------
class FakeServer:
    """A tinyserve look-alike on 127.0.0.1 in a thread of its own.

    Models: `echo` (outputs = inputs, honours `outputs`), `add1` (y = x + 1), `slow` (echo, held
    until `release()`), `fail-<CODE>` (an error reply with that code), `cut` (half a reply, then
    close), `garbage` (a frame whose length is not a multiple of 8), `conn-error` (an id-0 BAD_FRAME
    reply, then close).  `reorder = n` holds infer replies until n are ready and sends them reversed.
    """

    def __init__(self, token: str | None = None, max_frame_bytes: int = wire.Limits().max_frame_bytes,
                 max_header_bytes: int = 1 << 20, max_tensors: int = 256):
        self.token = token
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = max_header_bytes
        self.max_tensors = max_tensors
        self.port = 0
        self.reorder = 0
        self.ready = True
        self.headers: list[dict] = []
        self.connections_made = 0
        self.conns: set = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._gate: asyncio.Event | None = None
        self._held: list = []

    # control (from the test thread)
    def start(self, port: int | None = None) -> FakeServer:
        started = threading.Event()
        failure: list = []

        def main():
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                self._gate = asyncio.Event()
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _FakeProto(self), "127.0.0.1", self.port if port is None else port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            for p in list(self.conns):
                p.transport.abort()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        assert started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            assert not self._thread.is_alive()
            self._thread = None

    def restart(self) -> None:
        self.stop()
        self.start(self.port)

    def run(self, fn):
        """Run fn() on the server's loop and return its result."""
        fut = concurrent.futures.Future()

        def call():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return fut.result(10)

    def release(self) -> None:
        self.run(lambda: self._gate.set())

    def drop_connections(self) -> None:
        self.run(lambda: [p.transport.abort() for p in list(self.conns)])


class _FakeProto(asyncio.Protocol):
    def __init__(self, server: FakeServer):
        self.server = server
        self.buf = bytearray()
        self.authed = server.token is None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.conns.add(self)
        self.server.connections_made += 1
        transport.set_write_buffer_limits(high=256 << 10)

    def connection_lost(self, exc):
        self.server.conns.discard(self)

    # flow control like the real server: stop reading while replies cannot be written
    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()

    def data_received(self, data):  # noqa: C901
        self.buf += data
        limits = wire.Limits(max_frame_bytes=self.server.max_frame_bytes,
                             max_header_bytes=self.server.max_header_bytes)
        while len(self.buf) >= wire.PREFIX_SIZE and not self.transport.is_closing():
            total, hlen = wire.frame_size(bytes(self.buf[:wire.PREFIX_SIZE]), limits)
            if len(self.buf) < total:
                return
            frame = memoryview(bytearray(self.buf[:total]))
            del self.buf[:total]
            self.handle(wire.decode_header(frame, hlen), wire.payload_view(frame, hlen))

    def send(self, header, views=()):
        if not self.transport.is_closing():
            self.transport.writelines(wire.encode_frame(header, views))

    def error(self, rid, code, message, close=False):
        self.send({"id": rid, "ok": False, "error": {"code": code, "message": message}})
        if close:
            self.transport.close()

    def handle(self, h, payload):
        srv = self.server
        srv.headers.append(h)
        rid, op = h.get("id"), h.get("op")
        if not self.authed:
            if op != "hello" or h.get("token") != srv.token:
                return self.error(rid, "UNAUTHENTICATED", "send hello with the right token first", close=True)
            self.authed = True
        if op == "hello":
            return self.send({"id": rid, "ok": True, "server": "fake", "version": "0", "protocol": 1,
                              "limits": {"max_frame_bytes": srv.max_frame_bytes,
                                         "max_header_bytes": srv.max_header_bytes,
                                         "max_in_flight_per_connection": 128, "max_tensors": srv.max_tensors}})
        if op == "ping":
            return self.send({"id": rid, "ok": True})
        if op == "models":
            return self.send({"id": rid, "ok": True, "models": [
                {"name": "echo", "versions": [1], "loaded": [{"version": 1, "state": "READY", "bytes": 0}]}]})
        if op == "metadata":
            if h.get("model") != "echo":
                return self.error(rid, "NOT_FOUND", f"no model {h.get('model')!r}")
            return self.send({"id": rid, "ok": True, "model": "echo", "version": h.get("version", 1),
                              "platform": "python", "inputs": [], "outputs": [], "batching": None})
        if op == "load":
            return self.send({"id": rid, "ok": True, "model": h["model"], "version": h.get("version", 1),
                              "state": "READY"})
        if op == "unload":
            return self.send({"id": rid, "ok": True, "model": h["model"], "versions": [1]})
        if op == "health":
            return self.send({"id": rid, "ok": True, "live": True, "ready": srv.ready, "models": {}})
        if op == "stats":
            return self.send({"id": rid, "ok": True, "requests": len(srv.headers), "errors": {},
                              "latency_us": {"p50": 1, "p90": 1, "p99": 1, "max": 1}, "models": {}})
        if op != "infer":
            return self.error(rid, "BAD_REQUEST", f"unknown op {op!r}")
        try:
            tensors = wire.split_tensors(h.get("inputs"), payload, wire.Limits())
        except wire.WireError as exc:
            return self.error(rid, exc.code, str(exc))
        inputs = {k: wire.to_array(*v) for k, v in tensors.items()}
        model = h.get("model")
        if model.startswith("fail-"):
            return self.error(rid, model[5:], f"fake failure {model[5:]} for request {rid}")
        if model == "cut":
            data = b"".join(bytes(p) for p in wire.encode_frame({"id": rid, "ok": True, "outputs": []}))
            self.transport.write(data[: len(data) // 2])
            return self.transport.close()
        if model == "garbage":
            self.transport.write(wire.PREFIX.pack(13, 4) + b"\x80" * 16)
            return None
        if model == "conn-error":
            return self.error(0, "BAD_FRAME", "fake: the stream cannot be trusted", close=True)
        if model == "add1":
            outputs = {"y": inputs["x"] + 1}
        else:
            outputs = inputs
        if h.get("outputs") is not None:
            outputs = {k: v for k, v in outputs.items() if k in h["outputs"]}
        descs, views = wire.tensor_parts(outputs)
        reply = ({"id": rid, "ok": True, "model": model, "version": 1, "outputs": descs}, views)
        if model == "slow":
            async def later():
                await srv._gate.wait()
                self.send(*reply)

            asyncio.get_running_loop().create_task(later())
        elif srv.reorder:
            srv._held.append((self, reply))
            if len(srv._held) >= srv.reorder:
                held, srv._held = srv._held, []
                for proto, r in reversed(held):
                    proto.send(*r)
        else:
            self.send(*reply)


@pytest.fixture
def fake():
    srv = FakeServer().start()
    yield srv
    srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_async(coro_fn, loop_kind: str):
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


SAMPLES = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f16": np.linspace(-1, 1, 7, dtype=np.float16),
    "f64": np.array([[1.5, -2.25]]),
    "i8": np.array([-128, 127], dtype=np.int8),
    "u8": np.arange(5, dtype=np.uint8),
    "i16": np.array([1, -2, 3], dtype=np.int16),
    "i32": np.array([7], dtype=np.int32),
    "i64": np.arange(6, dtype=np.int64).reshape(2, 1, 3),
    "b": np.array([True, False, True]),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
    "bigend": np.arange(4, dtype=">i4"),
}


def check_echo(inputs, got):
    assert set(got) == set(inputs)
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16:  # numpy has no bfloat16
            assert isinstance(got[k], torch.Tensor) and got[k].dtype == v.dtype and torch.equal(got[k], v)
        elif isinstance(v, torch.Tensor):
            assert isinstance(got[k], np.ndarray) and np.array_equal(got[k], v.numpy())
        elif isinstance(v, list):
            assert got[k] == [x.encode() if isinstance(x, str) else x for x in v]
        else:
            want = np.asarray(v)
            assert got[k].shape == want.shape and np.array_equal(got[k], want)
            assert got[k].dtype == want.dtype.newbyteorder("=")


# --- pieces ---------------------------------------------------------------------------------------
def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, tinyserve; assert 'tinyserve.client' not in sys.modules; "
            "assert 'torch' not in sys.modules; c = tinyserve.Client; a = tinyserve.AsyncClient; "
            "assert 'torch' not in sys.modules, 'the client must not import torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert tinyserve.Client is Client and tinyserve.AsyncClient is AsyncClient


def test_frame_reader_any_split():
    """Replies split at every byte boundary, small and big, come out whole and in order."""
    frames = []
    for i in range(5):
        arr = np.arange(i * 40000, dtype=np.float32)  # 0 .. 640 KB: both the copy and the own-buffer path
        descs, views = wire.tensor_parts({"x": arr})
        frames.append((i, arr, wire.encode_bytes({"id": i + 1, "ok": True, "outputs": descs}, views)))
    stream = b"".join(f for _, _, f in frames)
    for step in (1, 7, 8, 4096, 65536 + 3, len(stream)):
        reader = _FrameReader(wire.Limits(), size=128 << 10, big_frame=32 << 10)
        got = []
        pos = 0
        while pos < len(stream):
            buf = reader.get_buffer()
            n = min(step, len(buf), len(stream) - pos)
            buf[:n] = stream[pos:pos + n]
            pos += n
            got += reader.feed(n)
        assert [h["id"] for h, _ in got] == [1, 2, 3, 4, 5]
        for (h, payload), (_, arr, _) in zip(got, frames):
            t = wire.split_tensors(h["outputs"], payload, wire.Limits())
            assert np.array_equal(wire.to_array(*t["x"]), arr)


def test_frame_reader_rejects_bad_lengths():
    reader = _FrameReader(wire.Limits(max_frame_bytes=1 << 20))
    buf = reader.get_buffer()
    buf[:8] = wire.PREFIX.pack(13, 4)
    with pytest.raises(wire.BadFrame):
        reader.feed(8)
    reader = _FrameReader(wire.Limits(max_frame_bytes=1 << 20))
    reader.get_buffer()[:8] = wire.PREFIX.pack(0xFFFFFFF4, 4)
    with pytest.raises(wire.FrameTooLarge):
        reader.feed(8)


def test_advance_partial_sends():
    parts = [bytearray(b"abcd"), memoryview(b"efgh"), b"ij"]
    for n in range(11):
        rest = _advance(list(parts), n)
        assert b"".join(bytes(p) for p in rest) == b"abcdefghij"[n:]


# --- blocking client ------------------------------------------------------------------------------
def test_infer_every_dtype(fake):
    with Client("127.0.0.1", fake.port) as c:
        check_echo(SAMPLES, c.infer("echo", SAMPLES))
        inputs = {"t": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
                  "bf": torch.randn(3, 5).to(torch.bfloat16),
                  "words": ["héllo", "", "world"], "blobs": [b"\x00\x01", b"xyz"]}
        check_echo(inputs, c.infer("echo", inputs))
        got = c.infer("add1", {"x": np.ones(4, dtype=np.float32)})
        assert np.array_equal(got["y"], np.full(4, 2, dtype=np.float32))
        got["y"][0] = 9  # outputs are writable arrays that the caller owns
        got = c.infer("echo", {"a": np.zeros(2), "b": np.ones(2)}, outputs=["b"])
        assert list(got) == ["b"]
        assert fake.headers[-1]["outputs"] == ["b"]


def test_scalars_keep_their_shape(fake):
    with Client("127.0.0.1", fake.port) as c:
        got = c.infer("echo", {"s": np.float32(3.5), "a": np.array(7, dtype=np.int64)})
        assert got["s"].shape == () and got["s"] == 3.5 and got["a"].shape == () and got["a"] == 7


def test_big_tensors_and_partial_io(fake):
    """Frames of several MB: partial sends, own-buffer receives, zero-copy outputs."""
    with Client("127.0.0.1", fake.port) as c:
        x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
        y = np.arange(3, dtype=np.int64)
        got = c.infer("echo", {"x": x, "y": y})
        assert np.array_equal(got["x"], x) and np.array_equal(got["y"], y)
        many = c.infer_many("echo", [{"x": x[i * 64:(i + 1) * 64]} for i in range(16)], depth=8)
        for i, out in enumerate(many):
            assert np.array_equal(out["x"], x[i * 64:(i + 1) * 64])


def test_pipeline_does_not_deadlock_when_server_pauses_reading(fake):
    """64 x 1 MiB pipelined 32 deep: the fake stops reading while its replies back up, so the client
    must read replies while its own sends are blocked."""
    blob = np.arange(1 << 18, dtype=np.float32)
    with Client("127.0.0.1", fake.port) as c:
        outs = c.infer_many("echo", [{"x": blob + i} for i in range(64)], depth=32)
        assert all(np.array_equal(o["x"], blob + i) for i, o in enumerate(outs))


def test_other_operations(fake):
    with Client("127.0.0.1", fake.port) as c:
        assert c.server_info["server"] == "fake" and c.server_info["limits"]["max_tensors"] == 256
        assert 0 < c.ping() < 5
        assert c.models()[0]["name"] == "echo"
        md = c.metadata("echo:3")
        assert md["model"] == "echo" and md["version"] == 3
        assert fake.headers[-1] == {"id": fake.headers[-1]["id"], "op": "metadata", "model": "echo", "version": 3}
        with pytest.raises(errors.ModelNotFoundError, match="no model 'nope'"):
            c.metadata("nope")
        assert c.load("echo")["state"] == "READY"
        assert c.unload("echo", 1)["versions"] == [1]
        assert c.health() == {"live": True, "ready": True, "models": {}}
        assert c.stats()["requests"] > 0
        c.stats("echo")
        assert fake.headers[-1]["model"] == "echo"
    hello = fake.headers[0]
    assert hello["op"] == "hello" and hello["protocol"] == 1 and "token" not in hello


def test_request_fields_on_the_wire(fake):
    with Client("127.0.0.1", fake.port) as c:
        c.infer("echo:4", {"x": np.zeros(1)}, timeout=2.5, priority=7)
        h = fake.headers[-1]
        assert (h["model"], h["version"], h["timeout_ms"], h["priority"]) == ("echo", 4, 2500, 7)
        c.infer("echo", {"x": np.zeros(1)}, version=2)
        h = fake.headers[-1]
        assert h["version"] == 2 and "timeout_ms" not in h and "priority" not in h
        ids = [h["id"] for h in fake.headers]
        assert len(set(ids)) == len(ids) and 0 not in ids


@pytest.mark.parametrize("code", sorted(wire.WIRE_ERRORS) + ["SOMETHING_NEW"])
def test_error_codes_become_exception_classes(fake, code):
    want = wire.WIRE_ERRORS.get(code, errors.TinyserveError)
    with Client("127.0.0.1", fake.port) as c:
        with pytest.raises(want) as info:
            c.infer(f"fail-{code}", {"x": np.zeros(1)})
        assert type(info.value) is want and f"fake failure {code}" in str(info.value)
        if getattr(want, "fatal", False):
            return  # the real server closes after these; the fake keeps going
        assert c.infer("echo", {"x": np.ones(1)})["x"][0] == 1  # the connection is still usable


def test_invalid_arguments_fail_before_sending(fake):
    with Client("127.0.0.1", fake.port) as c:
        n = len(fake.headers)
        with pytest.raises(wire.InvalidInput, match="complex64"):
            c.infer("echo", {"x": np.zeros(2, dtype=np.complex64)})
        with pytest.raises(TypeError):
            c.infer("echo", [np.zeros(2)])
        with pytest.raises(wire.BadRequest, match="priority"):
            c.infer("echo", {"x": np.zeros(2)}, priority=16)
        with pytest.raises(wire.BadRequest, match="timeout"):
            c.infer("echo", {"x": np.zeros(2)}, timeout=0)
        assert len(fake.headers) == n
        assert c.infer("echo", {"x": np.zeros(2)})["x"].shape == (2,)


def test_frame_limit_of_the_server_is_checked_locally():
    srv = FakeServer(max_frame_bytes=4096).start()
    try:
        with Client("127.0.0.1", srv.port) as c:
            with pytest.raises(wire.FrameTooLarge, match="max_frame_bytes 4096"):
                c.infer("echo", {"x": np.zeros(1024, dtype=np.float32)})
            assert c.infer("echo", {"x": np.zeros(16, dtype=np.float32)})["x"].shape == (16,)
    finally:
        srv.stop()


def test_pipelining_with_reordered_replies(fake):
    fake.reorder = 8
    with Client("127.0.0.1", fake.port) as c:
        outs = c.infer_many("echo", [{"x": np.array([i])} for i in range(64)], depth=32)
        assert [int(o["x"][0]) for o in outs] == list(range(64))
        futs = [c.submit("echo", {"x": np.array([i])}) for i in range(16)]
        assert [int(f.result(10)["x"][0]) for f in futs] == list(range(16))
        fake.reorder = 0


def test_infer_many_return_exceptions(fake):
    with Client("127.0.0.1", fake.port) as c:
        batch = [{"x": np.array([1])}] * 3
        with pytest.raises(wire.Unavailable):
            c.infer_many("fail-UNAVAILABLE", batch)
        outs = c.infer_many("fail-TOO_MANY_REQUESTS", batch, return_exceptions=True)
        assert all(isinstance(o, wire.TooManyRequests) for o in outs)
        assert c.infer_many("echo", []) == []
        assert len(c.infer_many("echo", iter(batch), depth=1)) == 3


def test_timeout_forgets_the_request_and_drops_the_late_reply(fake):
    with Client("127.0.0.1", fake.port) as c:
        with pytest.raises(RequestTimeout) as info:
            c.infer("slow", {"x": np.zeros(1)}, timeout=0.2)
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, wire.DeadlineExceeded)
        assert fake.headers[-1]["timeout_ms"] == 200
        fake.release()  # the late reply now arrives and must be dropped
        assert c.infer("echo", {"x": np.array([5])})["x"][0] == 5
        conn = c._conns[0]
        assert conn.late_replies == 1 and not conn._pending
        # a future times out too
        fake.run(lambda: fake._gate.clear())
        fut = c.submit("slow", {"x": np.zeros(1)}, timeout=0.2)
        with pytest.raises(RequestTimeout):
            fut.result(10)
        fake.release()
        assert c.infer("echo", {"x": np.array([6])})["x"][0] == 6


def test_reconnect_after_server_restart(fake):
    with Client("127.0.0.1", fake.port, connect_attempts=5, backoff=0.01) as c:
        assert c.infer("echo", {"x": np.array([1])})["x"][0] == 1
        fake.restart()
        time.sleep(2 * client_mod._IDLE_CHECK)  # idle: polled before the send (a restart takes longer)
        assert c.infer("echo", {"x": np.array([2])})["x"][0] == 2  # the call reconnects transparently
        assert c.reconnects == 1 and fake.connections_made == 2
        assert c.ping() > 0


def test_inflight_requests_fail_when_the_connection_drops(fake):
    with Client("127.0.0.1", fake.port, backoff=0.01) as c:
        futs = [c.submit("slow", {"x": np.array([i])}) for i in range(4)]
        waiter = concurrent.futures.ThreadPoolExecutor(1).submit(c.infer, "slow", {"x": np.zeros(1)})
        assert wait_for(lambda: sum(h.get("model") == "slow" for h in fake.headers) == 5)
        fake.drop_connections()
        for f in futs + [waiter]:
            with pytest.raises(ConnectionLost) as info:
                f.result(10)
            assert isinstance(info.value, ConnectionError) and isinstance(info.value, ClientConnectionError)
            assert "closed the connection" in str(info.value)
        assert c.infer("echo", {"x": np.array([3])})["x"][0] == 3


def test_connection_dropped_mid_reply(fake):
    with Client("127.0.0.1", fake.port, backoff=0.01) as c:
        with pytest.raises(ConnectionLost):
            c.infer("cut", {"x": np.zeros(1)})
        assert c.infer("echo", {"x": np.array([4])})["x"][0] == 4


def test_garbage_and_connection_level_errors(fake):
    with Client("127.0.0.1", fake.port, backoff=0.01) as c:
        with pytest.raises(ConnectionLost, match="bad frame"):
            c.infer("garbage", {"x": np.zeros(1)})
        assert c.infer("echo", {"x": np.array([1])})["x"][0] == 1
        with pytest.raises(wire.BadFrame, match="cannot be trusted"):
            c.infer("conn-error", {"x": np.zeros(1)})
        assert c.infer("echo", {"x": np.array([2])})["x"][0] == 2


def test_connect_and_reconnect_attempts_are_bounded(fake):
    port = free_port()
    with pytest.raises(ConnectFailed, match=f"127.0.0.1:{port} after 3 attempts") as info:
        Client("127.0.0.1", port, connect_attempts=3, backoff=0.001)
    assert isinstance(info.value, ConnectionError)
    c = Client("127.0.0.1", fake.port, connect_attempts=2, backoff=0.001)
    fake.stop()
    with pytest.raises(ClientConnectionError):
        c.infer("echo", {"x": np.zeros(1)})
    with pytest.raises(ConnectFailed, match="after 2 attempts"):
        c.infer("echo", {"x": np.zeros(1)})
    fake.start(fake.port)
    assert c.infer("echo", {"x": np.array([7])})["x"][0] == 7
    c.close()
    with pytest.raises(ConnectionLost, match="closed"):
        c.ping()


def test_token():
    srv = FakeServer(token="s3cret").start()
    try:
        with Client("127.0.0.1", srv.port, token="s3cret") as c:
            assert c.ping() > 0
        assert srv.headers[0]["token"] == "s3cret"
        with pytest.raises(wire.Unauthenticated):
            Client("127.0.0.1", srv.port, token="wrong", connect_attempts=3)
        assert srv.connections_made == 2  # no retries with a wrong token
    finally:
        srv.stop()


@pytest.mark.parametrize("pool_size", [1, 3])
def test_threads_share_the_client(fake, pool_size):
    fake.reorder = 0
    base = threading.active_count()
    with Client("127.0.0.1", fake.port, pool_size=pool_size) as c:
        def work(t):
            for i in range(150):
                x = np.array([t * 1000 + i], dtype=np.int64)
                if i % 3 == 0:
                    got = c.infer_many("add1", [{"x": x}, {"x": x + 1}], depth=2)
                    assert [int(g["y"][0]) for g in got] == [x[0] + 1, x[0] + 2]
                elif i % 3 == 1:
                    assert int(c.submit("add1", {"x": x}).result(10)["y"][0]) == x[0] + 1
                else:
                    assert int(c.infer("add1", {"x": x})["y"][0]) == x[0] + 1
            return t

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            assert sorted(ex.map(work, range(8))) == list(range(8))
        assert fake.connections_made == pool_size
        assert all(not conn._pending for conn in c._conns if conn is not None)
    assert wait_for(lambda: threading.active_count() <= base)  # the futures' helper threads ended


def test_submit_cancel_and_as_completed(fake):
    with Client("127.0.0.1", fake.port) as c:
        slow = c.submit("slow", {"x": np.zeros(1)})
        assert slow.cancel()
        futs = {c.submit("add1", {"x": np.array([i])}): i for i in range(50)}
        for f in concurrent.futures.as_completed(futs, timeout=10):
            assert int(f.result()["y"][0]) == futs[f] + 1
        fake.release()
        assert c.infer("echo", {"x": np.array([1])})["x"][0] == 1
        assert wait_for(lambda: c._conns[0].late_replies == 1)


def wait_for(pred, timeout: float = 10.0) -> bool:
    """Poll a condition with a bounded wait (for state owned by another thread)."""
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if pred():
            return True
        done.wait(0.005)
    return pred()


# --- asyncio client -------------------------------------------------------------------------------
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_roundtrip_and_operations(fake, loop_kind):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            check_echo(SAMPLES, await c.infer("echo", SAMPLES))
            bf = torch.randn(2, 3).to(torch.bfloat16)
            check_echo({"bf": bf, "w": ["a", "bc"]}, await c.infer("echo", {"bf": bf, "w": ["a", "bc"]}))
            big = np.arange(1 << 20, dtype=np.float32)
            assert np.array_equal((await c.infer("echo", {"x": big}))["x"], big)
            assert await c.ping() > 0
            assert (await c.models())[0]["name"] == "echo"
            assert (await c.metadata("echo", 2))["version"] == 2
            assert (await c.load("echo"))["state"] == "READY"
            assert (await c.unload("echo"))["versions"] == [1]
            assert (await c.health())["ready"] is True
            assert "latency_us" in await c.stats()
            assert c.server_info["server"] == "fake"
            with pytest.raises(errors.ModelNotFoundError):
                await c.metadata("nope")

    run_async(main, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_many_in_flight_reordered(fake, loop_kind):
    fake.reorder = 10

    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            outs = await asyncio.gather(*(c.infer("add1", {"x": np.array([i])}) for i in range(200)))
            assert [int(o["y"][0]) for o in outs] == [i + 1 for i in range(200)]
            outs = await c.infer_many("add1", [{"x": np.array([i])} for i in range(100)], depth=20)
            assert [int(o["y"][0]) for o in outs] == [i + 1 for i in range(100)]

    run_async(main, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_errors_timeouts_and_cancellation(fake, loop_kind):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            for code, cls in wire.WIRE_ERRORS.items():
                if not getattr(cls, "fatal", False):
                    with pytest.raises(cls):
                        await c.infer(f"fail-{code}", {"x": np.zeros(1)})
            with pytest.raises(RequestTimeout):
                await c.infer("slow", {"x": np.zeros(1)}, timeout=0.2)
            task = asyncio.ensure_future(c.infer("slow", {"x": np.zeros(1)}))
            await asyncio.sleep(0)
            while len(c._conn.pending) != 1:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not c._conn.pending
            outs = await c.infer_many("fail-UNAVAILABLE", [{"x": np.zeros(1)}] * 3, return_exceptions=True)
            assert all(isinstance(o, wire.Unavailable) for o in outs)
            fake.release()
            assert (await c.infer("echo", {"x": np.array([3])}))["x"][0] == 3
            for _ in range(200):
                if c._conn.late_replies == 2:
                    break
                await asyncio.sleep(0.005)
            assert c._conn.late_replies == 2

    run_async(main, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_reconnect_and_dropped_connections(fake, loop_kind):
    async def main():
        c = await AsyncClient.connect("127.0.0.1", fake.port, backoff=0.01)
        assert (await c.infer("echo", {"x": np.array([1])}))["x"][0] == 1
        slow = asyncio.ensure_future(c.infer("slow", {"x": np.zeros(1)}))
        while not any(h.get("model") == "slow" for h in fake.headers):
            await asyncio.sleep(0.005)
        await asyncio.get_running_loop().run_in_executor(None, fake.restart)
        with pytest.raises(ConnectionLost):
            await slow
        assert (await c.infer("echo", {"x": np.array([2])}))["x"][0] == 2
        assert c.reconnects == 1
        with pytest.raises(ConnectionLost):
            await c.infer("cut", {"x": np.zeros(1)})
        with pytest.raises(ConnectionLost, match="bad frame"):
            await c.infer("garbage", {"x": np.zeros(1)})
        with pytest.raises(wire.BadFrame):
            await c.infer("conn-error", {"x": np.zeros(1)})
        assert (await c.infer("echo", {"x": np.array([3])}))["x"][0] == 3
        await asyncio.get_running_loop().run_in_executor(None, fake.stop)
        with pytest.raises(ClientConnectionError):
            await c.infer("echo", {"x": np.zeros(1)})
        with pytest.raises(ConnectFailed):
            await c.ping()
        await c.close()
        with pytest.raises(ConnectionLost):
            await c.ping()

    run_async(main, loop_kind)
    fake.start(fake.port)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_token(loop_kind):
    srv = FakeServer(token="tok").start()

    async def main():
        async with await AsyncClient.connect("127.0.0.1", srv.port, token="tok") as c:
            assert await c.ping() > 0
        with pytest.raises(wire.Unauthenticated):
            await AsyncClient.connect("127.0.0.1", srv.port, token="bad")
        with pytest.raises(ConnectFailed):
            await AsyncClient.connect("127.0.0.1", free_port(), connect_attempts=2, backoff=0.001)

    try:
        run_async(main, loop_kind)
    finally:
        srv.stop()


# --- end to end: the real server ------------------------------------------------------------------
class RealServer:
    """tinyserve.server.Server on its own event loop thread (the client under test is blocking)."""

    def __init__(self, **config):
        self.config = config
        self.port = 0
        self.server = None
        self._thread = None

    def start(self, port: int = 0) -> RealServer:
        from tinyserve.server import Server, ServerConfig

        started = threading.Event()
        failure: list = []

        def main():
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                self.server = Server(ServerConfig(port=port, **self.config))
                loop.run_until_complete(self.server.start())
                self.port = self.server.port
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.server.stop(5.0))
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        assert started.wait(120)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            assert not self._thread.is_alive()
            self._thread = None


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    pytest.importorskip("tinyserve.server")
    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    root = tmp_path_factory.mktemp("repo")
    repo = Repository(root, create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack(repo, "encoder-bf16", "tinyserve.examples:encoder_bf16")
    return root


@pytest.fixture(scope="module")
def served(model_repo):
    srv = RealServer(repo=model_repo, models=("mlp",), torch_threads=1).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mlp_module():
    from tinyserve import examples

    module, _ = examples.mlp()
    return module


def mlp_direct(module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def test_e2e_infer_equals_the_model_run_directly(served, mlp_module):
    rng = np.random.default_rng(1)
    with Client("127.0.0.1", served.port) as c:
        for rows in (1, 3, 1):
            x = rng.standard_normal((rows, 64), dtype=np.float32)
            (name, y), = c.infer("mlp", {"x": x}).items()
            assert y.dtype == np.float32 and y.shape == (rows, 10)
            assert np.array_equal(y, mlp_direct(mlp_module, x))
        xs = [rng.standard_normal((1, 64), dtype=np.float32) for _ in range(200)]
        outs = c.infer_many("mlp", [{"x": x} for x in xs], depth=32)
        for x, o in zip(xs, outs):  # batching may merge rows: allow an ulp or so
            np.testing.assert_allclose(o[name], mlp_direct(mlp_module, x), rtol=1e-5, atol=1e-6)
        futs = [c.submit("mlp", {"x": x}) for x in xs[:20]]
        for x, f in zip(xs, futs):
            np.testing.assert_allclose(f.result(30)[name], mlp_direct(mlp_module, x), rtol=1e-5, atol=1e-6)


def test_e2e_threads_and_pool(served, mlp_module):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, 64), dtype=np.float32) for _ in range(32)]
    want = [mlp_direct(mlp_module, x) for x in xs]
    with Client("127.0.0.1", served.port, pool_size=2) as c:
        def work(t):
            for i in range(60):
                k = (t * 7 + i) % 32
                (y,) = c.infer("mlp", {"x": xs[k]}).values()
                np.testing.assert_allclose(y, want[k], rtol=1e-5, atol=1e-6)
            return t

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            assert sorted(ex.map(work, range(4))) == [0, 1, 2, 3]


def test_e2e_operations_and_errors(served):
    from tinyserve import examples

    with Client("127.0.0.1", served.port) as c:
        info = c.server_info
        assert info["server"] == "tinyserve" and info["protocol"] == 1
        assert info["limits"]["max_in_flight_per_connection"] >= 1
        assert c.ping() > 0
        names = {m["name"]: m for m in c.models()}
        assert set(names) == {"encoder-bf16", "mlp"} and names["mlp"]["loaded"][0]["state"] == "READY"
        md = c.metadata("mlp")
        assert md["model"] == "mlp" and md["inputs"][0]["dtype"] == "float32" and md["inputs"][0]["shape"][-1] == 64
        health = c.health()
        assert health["live"] is True and health["ready"] is True
        with pytest.raises(errors.ModelNotFoundError):
            c.infer("no-such-model", {"x": np.zeros((1, 64), dtype=np.float32)})
        with pytest.raises(errors.ModelNotFoundError):
            c.infer("mlp", {"x": np.zeros((1, 64), dtype=np.float32)}, version=9)
        with pytest.raises(wire.InvalidInput):
            c.infer("mlp", {"x": np.zeros((1, 64), dtype=np.float64)})
        with pytest.raises(wire.InvalidInput):
            c.infer("mlp", {"x": np.zeros((1, 63), dtype=np.float32)})
        with pytest.raises(wire.InvalidInput):
            c.infer("mlp", {"wrong_name": np.zeros((1, 64), dtype=np.float32)})
        with pytest.raises(wire.Unavailable, match="not loaded"):
            c.infer("encoder-bf16", {"ids": np.zeros((1, 16), dtype=np.int64)})
        # load over the wire, infer (bfloat16 comes back as a torch tensor), unload
        assert c.load("encoder-bf16")["state"] == "READY"
        enc, (ids,) = examples.encoder_bf16()
        (out,) = c.infer("encoder-bf16", {"ids": ids}).values()
        with torch.inference_mode():
            assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and torch.equal(out, enc(ids))
        assert c.unload("encoder-bf16")["versions"] == [1]
        with pytest.raises(wire.Unavailable):
            c.infer("encoder-bf16", {"ids": ids})
        stats = c.stats()
        assert stats["requests"] > 0 and "INVALID_INPUT" in stats["errors"]
        assert c.stats("mlp")["requests"] > 0
        assert c.infer("mlp", {"x": np.zeros((1, 64), dtype=np.float32)})  # still serving


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_e2e_async_client(served, mlp_module, loop_kind):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 64), dtype=np.float32) for _ in range(100)]

    async def main():
        async with await AsyncClient.connect("127.0.0.1", served.port) as c:
            outs = await asyncio.gather(*(c.infer("mlp", {"x": x}) for x in xs))
            outs += await c.infer_many("mlp", [{"x": x} for x in xs], depth=16)
            assert (await c.health())["ready"] is True
            with pytest.raises(errors.ModelNotFoundError):
                await c.infer("nope", {"x": xs[0]})
            return outs

    outs = run_async(main, loop_kind)
    for x, o in zip(xs + xs, outs):
        np.testing.assert_allclose(next(iter(o.values())), mlp_direct(mlp_module, x), rtol=1e-5, atol=1e-6)


def test_e2e_reconnect_after_the_server_restarts(model_repo):
    srv = RealServer(repo=model_repo, models=("mlp",), torch_threads=1).start()
    x = np.ones((1, 64), dtype=np.float32)
    try:
        with Client("127.0.0.1", srv.port, backoff=0.05, connect_attempts=6) as c:
            y1 = c.infer("mlp", {"x": x})
            port = srv.port
            srv.stop()
            srv.start(port)
            y2 = c.infer("mlp", {"x": x})  # transparently reconnects
            assert c.reconnects == 1
            assert all(np.array_equal(y1[k], y2[k]) for k in y1)
    finally:
        srv.stop()


def test_e2e_token_and_tls(model_repo, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    srv = RealServer(repo=model_repo, models=("mlp",), token="e2e-secret", tls_certfile=str(cert),
                     tls_keyfile=str(key)).start()
    ctx = ssl.create_default_context(cafile=str(cert))
    x = np.ones((1, 64), dtype=np.float32)
    try:
        with Client("127.0.0.1", srv.port, token="e2e-secret", ssl=ctx) as c:
            assert next(iter(c.infer("mlp", {"x": x}).values())).shape == (1, 10)
            big = c.infer_many("mlp", [{"x": np.ones((64, 64), dtype=np.float32)}] * 50, depth=16)
            assert len(big) == 50
        with pytest.raises(wire.Unauthenticated):
            Client("127.0.0.1", srv.port, token="wrong", ssl=ctx)
        with pytest.raises(ConnectFailed):  # plain TCP against a TLS port, one attempt
            Client("127.0.0.1", srv.port, token="e2e-secret", connect_attempts=1, connect_timeout=2)
        with pytest.raises(ConnectFailed, match="certificate"):  # an unknown CA is not retried
            Client("127.0.0.1", srv.port, token="e2e-secret", ssl=ssl.create_default_context())

        async def main():
            async with await AsyncClient.connect("127.0.0.1", srv.port, token="e2e-secret", ssl=ctx) as c:
                return await c.infer("mlp", {"x": x})

        assert next(iter(asyncio.run(main()).values())).shape == (1, 10)
    finally:
        srv.stop()


def test_reply_without_an_integer_id_closes_the_connection(fake):
    """A server bug (a reply whose id is not an integer) fails what is in flight cleanly."""
    def bad_reply(proto_self, h, payload, orig=_FakeProto.handle):
        if h.get("model") == "bad-id":
            return proto_self.send({"id": [1], "ok": True})
        return orig(proto_self, h, payload)

    _FakeProto.handle, orig = bad_reply, _FakeProto.handle
    try:
        with Client("127.0.0.1", fake.port, backoff=0.01) as c:
            with pytest.raises(ConnectionLost, match="no integer id"):
                c.infer("bad-id", {"x": np.zeros(1)})
            assert c.infer("echo", {"x": np.array([1])})["x"][0] == 1

        async def main():
            async with await AsyncClient.connect("127.0.0.1", fake.port) as ac:
                with pytest.raises(ConnectionLost, match="no integer id"):
                    await ac.infer("bad-id", {"x": np.zeros(1)})
                assert (await ac.infer("echo", {"x": np.array([2])}))["x"][0] == 2

        run_async(main, "asyncio")
    finally:
        _FakeProto.handle = orig


@pytest.mark.parametrize("mutate, error", [
    (lambda d: d[0].update(nbytes=d[0]["nbytes"] - 4), wire.InvalidInput),
    (lambda d: d[0].update(dtype="float128"), wire.InvalidInput),
    (lambda d: d[0].update(shape=[-1, 4]), wire.BadRequest),
    (lambda d: d[0].update(shape=[1] * 9), wire.BadRequest),
    (lambda d: d[0].update(name=""), wire.BadRequest),
    (lambda d: d.append(dict(d[0])), wire.BadRequest),  # the same name twice
    (lambda d: d[0].update(shape=[3, 4, 1 << 40]), wire.InvalidInput),
    (lambda d: d.pop(), wire.InvalidInput),  # payload bytes that no descriptor accounts for
])
def test_reply_tensors_are_validated(mutate, error):
    """A reply whose descriptors disagree with its payload raises, never returns a wrong array."""
    from tinyserve.client import _INFER, _result

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    descs, views = wire.tensor_parts({"x": x, "y": np.arange(3, dtype=np.int16)})
    frame = memoryview(bytearray(wire.encode_bytes({"id": 1, "ok": True, "outputs": descs}, views)))
    total, hlen = wire.frame_size(frame[:8], wire.Limits())
    header = wire.decode_header(frame, hlen)
    payload = wire.payload_view(frame, hlen)
    ok = _result(_INFER, dict(header, outputs=[dict(d) for d in descs]), payload, wire.Limits())
    assert np.array_equal(ok["x"], x) and ok["y"].dtype == np.int16
    bad = [dict(d) for d in descs]
    mutate(bad)
    with pytest.raises(error):
        _result(_INFER, dict(header, outputs=bad), payload, wire.Limits())


def test_idle_connection_closed_by_the_server_is_replaced(fake):
    """The server drops an idle connection (idle timeout, restart): the next call of each kind goes
    out on a new connection, since nothing of it was sent on the dead one."""
    with Client("127.0.0.1", fake.port, backoff=0.01) as c:
        for call in (lambda: c.infer("echo", {"x": np.array([1])})["x"][0],
                     lambda: c.infer_many("echo", [{"x": np.array([1])}] * 3)[2]["x"][0],
                     lambda: c.submit("echo", {"x": np.array([1])}).result(10)["x"][0],
                     lambda: 1 if c.ping() > 0 else 0):
            before = c.reconnects
            fake.drop_connections()
            assert wait_for(lambda: not fake.conns)
            time.sleep(2 * client_mod._IDLE_CHECK)  # no reply for this long: the connection is idle
            assert call() == 1
            assert c.reconnects == before + 1


# --- review fixes ---------------------------------------------------------------------------------
def test_submit_timeout_is_honoured_while_the_helper_thread_reads(fake):
    """The helper thread reads with no deadline (a future without a timeout is in flight); a later
    submit with a timeout must still fail at its timeout, not when the first reply comes."""
    with Client("127.0.0.1", fake.port, timeout=None) as c:
        first = c.submit("slow", {"x": np.zeros(1)})
        conn = c._conns[0]
        assert wait_for(lambda: conn._reading and conn._pump_thread is not None)
        t0 = time.monotonic()
        second = c.submit("slow", {"x": np.zeros(1)}, timeout=0.3)
        with pytest.raises(RequestTimeout):
            second.result(5)
        assert time.monotonic() - t0 < 2.5
        assert not first.done()
        fake.release()
        assert first.result(10)["x"].shape == (1,)


def test_the_helper_thread_does_constant_work_per_reply(fake, monkeypatch):
    """Completing one future must not look at every other outstanding one (O(1) per reply)."""
    member = client_mod._Slot.__dict__["done"]
    reads = [0]

    def get(slot):
        reads[0] += 1
        return member.__get__(slot)

    monkeypatch.setattr(client_mod._Slot, "done", property(get, member.__set__))
    with Client("127.0.0.1", fake.port) as c:
        held = [c.submit("slow", {"x": np.zeros(1)}) for _ in range(400)]
        assert wait_for(lambda: sum(h.get("model") == "slow" for h in fake.headers) == 400)
        reads[0] = 0
        for i in range(50):
            assert int(c.submit("add1", {"x": np.array([i])}).result(10)["y"][0]) == i + 1
        assert reads[0] / 50 < 40, f"{reads[0] / 50:.0f} slot checks per reply with 400 outstanding"
        fake.release()
        assert all(f.result(10)["x"].shape == (1,) for f in held)


def test_header_and_tensor_limits_of_the_server_are_checked_locally():
    srv = FakeServer(max_header_bytes=512, max_tensors=4).start()
    try:
        with Client("127.0.0.1", srv.port) as c:
            held = c.submit("slow", {"x": np.zeros(1)})  # in flight: must survive the failures below
            with pytest.raises(wire.FrameTooLarge, match="max_header_bytes 512"):
                c.infer("echo", {f"x{i}" + "_" * 150: np.zeros(1) for i in range(4)})
            with pytest.raises(wire.BadRequest, match="max_tensors 4"):
                c.infer("echo", {f"x{i}": np.zeros(1) for i in range(5)})
            with pytest.raises(wire.FrameTooLarge, match="max_header_bytes 512"):
                c.load("m" * 600)
            assert c.infer("echo", {f"x{i}": np.zeros(1) for i in range(4)})["x3"].shape == (1,)
            srv.release()
            assert held.result(10)["x"].shape == (1,)
            assert c.reconnects == 0 and srv.connections_made == 1
    finally:
        srv.stop()


def test_no_idle_poll_between_back_to_back_requests(fake):
    with Client("127.0.0.1", fake.port) as c:
        conn = c._conns[0]
        polls = [0]

        class Counting:
            def __init__(self, inner):
                self.inner = inner

            def poll(self, *a):
                polls[0] += 1
                return self.inner.poll(*a)

        conn._spoll = Counting(conn._spoll)
        c.infer("echo", {"x": np.zeros(1)})
        polls[0] = 0
        for _ in range(50):
            c.infer("echo", {"x": np.zeros(1)})
        assert polls[0] <= 2  # only when the machine stalls for _IDLE_CHECK between two requests
        time.sleep(2 * client_mod._IDLE_CHECK)
        c.infer("echo", {"x": np.zeros(1)})
        assert polls[0] >= 1  # an idle connection is still checked before a send


def test_timeout_is_patched_into_the_cached_head(fake):
    with Client("127.0.0.1", fake.port) as c:
        conn = c._conns[0]
        for i in range(1, 40):
            assert c.infer("echo", {"x": np.zeros(2)}, timeout=i / 8)["x"].shape == (2,)
            assert fake.headers[-1]["timeout_ms"] == i * 125
        c.infer("echo", {"x": np.zeros(2)})
        assert "timeout_ms" not in fake.headers[-1]
        c.infer("echo", {"x": [b"ab", b"c"]}, timeout=7)  # the descriptor path too
        assert fake.headers[-1]["timeout_ms"] == 7000
        assert len(conn.encoder._cache) == 3  # timed, untimed, the bytes input


def test_one_function_for_each_shared_piece():
    import tinyserve.cli as cli

    assert cli._model_arg("m:3") == ("m", 3) and cli._model_arg("m") == ("m", None)
    assert client_mod._parse_model("m:\u00b2", None) == ("m:\u00b2", None)  # a unicode digit is no version
    with pytest.raises(Exception):
        cli._model_arg("m:abc")
    assert not hasattr(client_mod._Encoder, "_infer_slow")
    lost = client_mod._lost_error("h:1", RuntimeError("x"))
    assert isinstance(lost, ConnectionLost) and "h:1" in str(lost)
