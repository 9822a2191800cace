"""The HTTP/REST front end (tinyserve/frontends/http.py; docs/http-grpc.md, "HTTP/REST") against the fake
core (tests/oip_fakecore.py): every endpoint through the stock `tritonclient.http` client, and raw
HTTP for malformed input, limits, pipelining, flow control and timeouts (injected `now`, no sleeps)."""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import socket
import ssl as _ssl
import struct
import subprocess
import time
from collections import deque

import httptools
import numpy as np
import pytest

from oip_fakecore import FakeCore, LoopThread, ParkingCore
from tinyserve import wire
from tinyserve.frontends import oip
from tinyserve.frontends.http import HttpFrontEnd

th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")


# --- harness -------------------------------------------------------------------------------------------
class Served:
    def __init__(self, *, uvloop: bool = True, core: dict | None = None, **fe) -> None:
        self.core = FakeCore(**(core or {}))
        self.lt = LoopThread(uvloop=uvloop)
        fe.setdefault("sweep_interval_s", 0)  # the tests sweep themselves, with an injected `now`
        self.fe = HttpFrontEnd(self.core, **fe)
        self.lt.call(self.fe.start)
        self.port = self.fe.port
        self.url = f"127.0.0.1:{self.port}"

    def client(self, **kw):
        return th.InferenceServerClient(self.url, **kw)

    def now(self) -> float:
        return self.lt.call(lambda: self.fe._loop.time())

    def sweep(self, now: float) -> None:
        self.lt.call(self.fe.sweep, now)

    def close(self) -> None:
        try:
            self.lt.call(self.fe.stop, 2.0)
        finally:
            self.core.close()
            self.lt.stop()


@contextlib.contextmanager
def served(**kw):
    s = Served(**kw)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def srv():
    s = Served(max_body_bytes=1 << 20, max_json_bytes=64 << 10, max_header_bytes=8192)
    yield s
    s.close()


class Raw:
    """A blocking HTTP/1.1 client on one socket: send bytes, read parsed responses."""

    def __init__(self, port: int, timeout: float = 10.0, tls: _ssl.SSLContext | None = None) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s = tls.wrap_socket(s, server_hostname="localhost") if tls is not None else s
        self.parser = httptools.HttpResponseParser(self)
        self.done: deque = deque()
        self.cur = None
        self.eof = False

    def on_message_begin(self):
        self.cur = {"headers": {}, "body": bytearray()}

    def on_header(self, name, value):
        self.cur["headers"][name.lower().decode()] = value.decode()

    def on_body(self, body):
        self.cur["body"] += body

    def on_message_complete(self):
        self.cur["status"] = self.parser.get_status_code()
        self.cur["body"] = bytes(self.cur["body"])
        self.done.append(self.cur)

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def read(self, n: int = 1) -> list:
        while len(self.done) < n and not self.eof:
            try:
                data = self.s.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                break
            self.parser.feed_data(data)
        assert len(self.done) >= n, f"connection ended after {len(self.done)} of {n} responses"
        return [self.done.popleft() for _ in range(n)]

    def one(self) -> dict:
        return self.read(1)[0]

    def closed_by_server(self) -> bool:
        """True once the server closed the connection (EOF or reset), reading whatever is left."""
        while not self.eof:
            try:
                data = self.s.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except socket.timeout:
                return False
            if not data:
                self.eof = True
            else:
                self.parser.feed_data(data)
        return True

    def close(self) -> None:
        self.s.close()


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None, *, length: bool = True) -> bytes:
    h = {"Host": "localhost"}
    if length and (body or method == "POST"):
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def infer_req(model: str, doc, binary: bytes = b"", headers: dict | None = None) -> bytes:
    j = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    h = dict(headers or {})
    if binary:
        h.setdefault("Inference-Header-Content-Length", str(len(j)))
    return request("POST", f"/v2/models/{model}/infer", j + binary, h)


def good_infer(raw: Raw) -> None:
    """A well-formed request on `raw` is answered correctly (the server keeps serving)."""
    raw.send(infer_req("addone", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
                                  "outputs": [{"name": "y"}]}))
    r = raw.one()
    assert r["status"] == 200, r
    assert json.loads(r["body"])["outputs"][0]["data"] == [2.0, 3.0, 4.0]


def error_of(r: dict) -> str:
    assert r["headers"].get("content-type") == "application/json", r
    return json.loads(r["body"])["error"]


def wait_for(cond, what: str, limit: float = 10.0) -> None:
    """Poll a condition the server reaches by itself (bounded)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- health, metadata, readiness (tritonclient) -----------------------------------------------------------
def test_health_metadata_ready_with_tritonclient(srv):
    c = srv.client()
    assert c.is_server_live() and c.is_server_ready()
    md = c.get_server_metadata()
    assert md["name"] == "tinyserve"
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(md["extensions"])
    assert c.is_model_ready("addone") and c.is_model_ready("addone", "1")
    assert not c.is_model_ready("addone", "2")  # in the repository, not loaded
    m = c.get_model_metadata("addone")
    assert m == {"name": "addone", "versions": ["1", "2"], "platform": "pytorch",
                 "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                             {"name": "z", "datatype": "FP32", "shape": [-1, 3]}]}
    assert c.get_model_metadata("addone", "2")["name"] == "addone"
    assert c.get_model_metadata("upper")["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert c.get_model_metadata("identity_BF16")["inputs"][0]["datatype"] == "BF16"
    with pytest.raises(InferenceServerException, match="not in the repository") as ei:
        c.get_model_metadata("nope")
    assert ei.value.status() == "404"
    with pytest.raises(InferenceServerException, match="has no version 9"):
        c.get_model_metadata("addone", "9")
    srv.core.is_ready = False
    try:
        assert c.is_server_live() and not c.is_server_ready()
        raw = Raw(srv.port)
        raw.send(request("GET", "/readyz") + request("GET", "/healthz") + request("GET", "/v2/health/ready"))
        ready, healthz, v2ready = raw.read(3)
        assert (ready["status"], healthz["status"], v2ready["status"]) == (503, 200, 400)
        assert healthz["body"] == b"ok\n"
        raw.close()
    finally:
        srv.core.is_ready = True
    c.close()


def test_model_config_with_tritonclient(srv):
    """GET /v2/models/{m}[/versions/{v}]/config: Triton's model configuration fields, derived from the
    model's metadata (batch dimension left out of dims when the model batches)."""
    c = srv.client()
    cfg = c.get_model_config("addone")
    assert cfg == {
        "name": "addone", "platform": "pytorch", "backend": "tinyserve", "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [3],
                   "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}],
        "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [3], "label_filename": "", "is_shape_tensor": False}
                   for n in ("y", "z")],
        "model_transaction_policy": {"decoupled": False}, "dynamic_batching": {}}
    assert c.get_model_config("addone", "2")["name"] == "addone"
    # not batching: full shapes (-1 for any size), no dynamic_batching
    up = c.get_model_config("upper")
    assert up["max_batch_size"] == 0 and "dynamic_batching" not in up and up["platform"] == "python"
    assert [(t["name"], t["data_type"], t["dims"]) for t in up["input"] + up["output"]] == [
        ("text", "TYPE_STRING", [-1]), ("upper", "TYPE_STRING", [-1])]
    for dt in oip.DTYPE_OF:
        if dt != "BYTES":
            m = c.get_model_config(f"identity_{dt}")
            assert m["input"][0]["data_type"] == m["output"][0]["data_type"] == f"TYPE_{dt}"
            assert m["input"][0]["dims"] == [-1, -1]
    with pytest.raises(InferenceServerException, match="not in the repository") as ei:
        c.get_model_config("nope")
    assert ei.value.status() == "404"
    with pytest.raises(InferenceServerException, match="has no version 9") as ei:
        c.get_model_config("addone", "9")
    assert ei.value.status() == "404"
    raw = Raw(srv.port)
    raw.send(request("POST", "/v2/models/addone/config", b"{}") + request("GET", "/v2/models/addone/versions/x/config")
             + request("GET", "/v2/models/addone/config/"))
    post, bad, slash = raw.read(3)
    assert (post["status"], post["headers"]["allow"]) == (405, "GET")
    assert bad["status"] == 400 and "model version 'x'" in json.loads(bad["body"])["error"]
    assert slash["status"] == 200 and json.loads(slash["body"]) == cfg
    raw.close()
    c.close()


def test_served_on_the_asyncio_loop_too():
    with served(uvloop=False) as s:
        c = s.client()
        assert c.is_server_live()
        i = th.InferInput("x", [1, 3], "FP32")
        i.set_data_from_numpy(np.ones((1, 3), np.float32))
        assert c.infer("addone", [i]).as_numpy("y").tolist() == [[2, 2, 2]]
        c.close()


# --- infer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_fp32_json_and_binary(srv, binary_in, binary_out):
    c = srv.client()
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    i = th.InferInput("x", [2, 3], "FP32")
    i.set_data_from_numpy(x, binary_data=binary_in)
    r = c.infer("addone", [i], request_id="req-7", outputs=[th.InferRequestedOutput("z", binary_data=binary_out)])
    resp = r.get_response()
    assert resp["model_name"] == "addone" and resp["model_version"] == "1" and resp["id"] == "req-7"
    assert [o["name"] for o in resp["outputs"]] == ["z"]  # the outputs asked for, only
    assert ("parameters" in resp["outputs"][0]) == binary_out
    z = r.as_numpy("z")
    assert z.dtype == np.float32 and z.shape == (2, 3)
    np.testing.assert_array_equal(z, x * 2)
    # no outputs named: all of them, binary (tritonclient sets binary_data_output)
    r = c.infer("addone", [i])
    np.testing.assert_array_equal(r.as_numpy("y"), x + 1)
    np.testing.assert_array_equal(r.as_numpy("z"), x * 2)
    assert all("parameters" in o for o in r.get_response()["outputs"])
    c.close()


def _sample(dt: str) -> np.ndarray:
    if dt == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dt == "BF16":
        return np.array([[1.5, -2.0, 3.25], [0.0, 1e30, -7.0]], dtype=ml_dtypes.bfloat16)
    npdt = {"UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
            "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[dt]
    if dt.startswith(("INT", "UINT")):
        info = np.iinfo(npdt)
        return np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=npdt)
    return np.array([[1.5, -2.25, 1e-3], [0.0, 7.0, -1e4]], dtype=npdt)


DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16"]


@pytest.mark.parametrize("dt", DATATYPES)
def test_infer_every_datatype(srv, dt):
    c = srv.client()
    x = _sample(dt)
    for binary_in in (True, False) if dt != "BF16" else (True,):  # tritonclient sends BF16 as binary only
        for binary_out in (True, False):
            i = th.InferInput("x", list(x.shape), dt)
            i.set_data_from_numpy(x, binary_data=binary_in)
            r = c.infer(f"identity_{dt}", [i], outputs=[th.InferRequestedOutput("y", binary_data=binary_out)])
            y = r.as_numpy("y")
            assert r.get_response()["outputs"][0]["datatype"] == dt
            assert y.shape == x.shape
            np.testing.assert_array_equal(y.astype(np.float64) if dt == "BF16" else y,
                                          x.astype(np.float64) if dt == "BF16" else x)
            name, version, ins, outs, *_ = srv.core.infer_calls[-1]
            assert ins["x"][0] == oip.DTYPE_OF[dt]
            assert ins["x"][1:] == (x.shape, x.size * x.itemsize)
    c.close()


def test_bf16_json_input_rounds_to_nearest_even(srv):
    raw = Raw(srv.port)
    # 1 + 2^-8 is halfway between two bfloat16 values: ties to even (1.0); 1 + 3*2^-8 rounds up
    raw.send(infer_req("identity_BF16", {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 3],
                                                     "data": [1 + 2 ** -8, 1 + 3 * 2 ** -8, float("nan")]}]}))
    r = raw.one()
    assert r["status"] == 200, r
    data = json.loads(r["body"])["outputs"][0]["data"]
    assert data[:2] == [1.0, 1 + 2 ** -6] and data[2] != data[2]
    raw.close()


def test_json_beyond_strict_json_is_read_and_written_as_before(srv):
    """The JSON fast path (orjson) hands what it refuses to the standard library: NaN / Infinity
    literals are read, an integer literal past 64 bits is refused by value (orjson reads it as a float),
    and non-finite outputs are written as NaN / Infinity (never as null)."""
    raw = Raw(srv.port)
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [NaN, Infinity, -Infinity, 1.5]}]}'
    raw.send(request("POST", "/v2/models/identity_FP32/infer", body))
    r = raw.one()
    assert r["status"] == 200, r
    assert b"[NaN,Infinity,-Infinity,1.5]" in r["body"]
    data = json.loads(r["body"])["outputs"][0]["data"]
    assert data[0] != data[0] and data[1:] == [float("inf"), float("-inf"), 1.5]
    raw.send(infer_req("identity_FP32", {"id": "null", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1],
                                                                  "data": [0.5]}]}))  # the text null: same reply
    r = raw.one()
    assert r["status"] == 200 and json.loads(r["body"])["id"] == "null" and b'"data":[0.5]' in r["body"]
    raw.send(infer_req("identity_INT64", {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1],
                                                      "data": [2 ** 64]}]}))
    r = raw.one()
    assert r["status"] == 400 and "INT64 data holds 1.8446744073709552e+19 (a JSON float), not a INT64" in error_of(r)
    raw.send(infer_req("identity_INT64", {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1],
                                                      "data": [2 ** 63]}]}))
    r = raw.one()
    assert r["status"] == 400 and "holds 9223372036854775808, outside" in error_of(r)
    raw.send(infer_req("identity_FP32", b'{"inputs": [1,]}'))  # refused by both parsers: the stdlib's message
    r = raw.one()
    assert r["status"] == 400 and "not valid JSON: Expecting value: line 1 column 15 (char 14)" in error_of(r)
    # the binary-header form (a memoryview slice of the body) takes the same fallback
    j = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [NaN]}]}'
    raw.send(request("POST", "/v2/models/identity_FP32/infer", j + b"\0" * 3,
                     {"Inference-Header-Content-Length": str(len(j))}))
    r = raw.one()
    assert r["status"] == 400 and "3 bytes of binary data" in error_of(r)
    raw.close()


def test_infer_bytes_json_and_binary(srv):
    c = srv.client()
    words = np.array([b"hello", b"", "grüße".encode(), b"x" * 1000], dtype=object)
    for binary_in in (True, False):
        for binary_out in (True, False):
            i = th.InferInput("text", [4], "BYTES")
            i.set_data_from_numpy(words, binary_data=binary_in)
            r = c.infer("upper", [i], outputs=[th.InferRequestedOutput("upper", binary_data=binary_out)])
            got = [v.encode() if isinstance(v, str) else v for v in r.as_numpy("upper").tolist()]  # JSON: str
            assert got == [w.upper() for w in words]  # (bytes.upper: ASCII only)
    name, version, ins, *_ = srv.core.infer_calls[-1]
    assert ins["text"][0] == "bytes" and ins["text"][1] == (4,)
    c.close()


def test_bytes_output_that_is_not_utf8_asked_as_json():
    with served() as s:
        s.core.models["upper"].fn = lambda text: {"upper": [b"\xff\xfe"]}
        raw = Raw(s.port)
        raw.send(infer_req("upper", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}))
        r = raw.one()
        assert r["status"] == 500 and "not UTF-8" in error_of(r)
        raw.send(infer_req("upper", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                                     "parameters": {"binary_data_output": True}}))
        r = raw.one()
        assert r["status"] == 200
        hl = int(r["headers"]["inference-header-content-length"])
        assert r["body"][hl:] == struct.pack("<I", 2) + b"\xff\xfe"
        raw.close()


def test_timeout_and_priority_reach_the_core(srv):
    c = srv.client()
    i = th.InferInput("x", [1, 3], "FP32")
    i.set_data_from_numpy(np.zeros((1, 3), np.float32))
    c.infer("addone", [i], priority=3, timeout=250000)
    *_, timeout_s, priority = srv.core.infer_calls[-1]
    assert timeout_s == 0.25 and priority == 3
    c.close()


def test_a_parked_request_the_core_refuses_later_gets_its_error():
    """The core parks a request behind an on-demand load and, when the load fails, answers it with
    send_error: the client gets that error's status and message (in order), the slot is released;
    with close=True the connection closes after it."""
    s = Served()
    try:
        s.core.close()
        s.core = s.fe.core = core = ParkingCore()
        raw = Raw(s.port)
        body = {"inputs": [_fp32([1, 3], [1, 2, 3])]}
        raw.send(infer_req("addone", body) + request("GET", "/v2/health/live"))
        for _ in range(1000):
            if core.parked:
                break
            time.sleep(0.01)
        assert s.lt.call(lambda: s.fe.in_flight) == 1
        assert s.lt.call(core.fail_parked, "MODEL_ERROR", "model 'addone' version 1 failed to load: boom") == 1
        err, live = raw.read(2)
        assert (err["status"], error_of(err)) == (500, "model 'addone' version 1 failed to load: boom")
        assert live["status"] == 200 and s.lt.call(lambda: s.fe.in_flight) == 0
        raw.send(infer_req("addone", body))
        for _ in range(1000):
            if core.parked:
                break
            time.sleep(0.01)
        s.lt.call(core.fail_parked, "UNAVAILABLE", "model 'addone' was unloaded", True)
        r = raw.one()
        assert r["status"] == 503 and r["headers"].get("connection") == "close"
        raw.read(0)
        assert raw.s.recv(1) == b""  # closed after it
        raw.close()
    finally:
        s.close()


def test_model_errors_and_unavailable(srv):
    c = srv.client()
    i = th.InferInput("x", [2], "FP32")
    i.set_data_from_numpy(np.zeros(2, np.float32))
    with pytest.raises(InferenceServerException, match="model 'fail' version 1 raised RuntimeError") as ei:
        c.infer("fail", [i])
    assert ei.value.status() == "500"
    j = th.InferInput("x", [1, 3], "FP32")
    j.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match="version 2 is not loaded") as ei:
        c.infer("addone", [j], model_version="2")
    assert ei.value.status() == "503"
    with pytest.raises(InferenceServerException, match="not in the repository") as ei:
        c.infer("nope", [j])
    assert ei.value.status() == "404"
    c.close()


def test_gzip_and_deflate_bodies(srv):
    c = srv.client()
    x = np.arange(3, dtype=np.float32).reshape(1, 3)
    for algo in ("gzip", "deflate"):
        i = th.InferInput("x", [1, 3], "FP32")
        i.set_data_from_numpy(x)
        r = c.infer("addone", [i], request_compression_algorithm=algo)
        np.testing.assert_array_equal(r.as_numpy("y"), x + 1)
    c.close()
    raw = Raw(srv.port)  # a bomb is cut at max_body_bytes (1 MiB here)
    bomb = gzip.compress(b"[" + b" " * (4 << 20) + b"]")
    raw.send(request("POST", "/v2/models/addone/infer", bomb, {"Content-Encoding": "gzip"}))
    r = raw.one()
    assert r["status"] == 413 and "exceeds max_body_bytes 1048576" in error_of(r)
    good_infer(raw)
    raw.close()


# --- repository and statistics ---------------------------------------------------------------------------
def test_repository_index_load_unload():
    with served() as s:
        c = s.client()
        idx = {(e["name"], e.get("version")): e for e in c.get_model_repository_index()}
        assert idx[("addone", "1")]["state"] == "READY" and idx[("addone", "2")]["state"] == "UNLOADED"
        c.load_model("addone")  # the default version: the latest
        assert c.is_model_ready("addone", "2")
        i = th.InferInput("x", [1, 3], "FP32")
        i.set_data_from_numpy(np.zeros((1, 3), np.float32))
        assert c.infer("addone", [i]).get_response()["model_version"] == "2"
        c.unload_model("addone")
        assert not c.is_model_ready("addone") and not c.is_model_ready("addone", "1")
        with pytest.raises(InferenceServerException, match="no READY version") as ei:
            c.infer("addone", [i])
        assert ei.value.status() == "503"
        with pytest.raises(InferenceServerException, match="weights do not fit") as ei:
            c.load_model("broken")
        assert ei.value.status() == "500"
        idx = {(e["name"], e.get("version")): e for e in c.get_model_repository_index()}
        assert idx[("broken", "1")]["state"] == "FAILED" and "weights do not fit" in idx[("broken", "1")]["reason"]
        with pytest.raises(InferenceServerException, match="not in the repository") as ei:
            c.load_model("nope")
        assert ei.value.status() == "404"
        with pytest.raises(InferenceServerException, match="parameter 'config' is not supported"):
            c.load_model("addone", config="{}")
        raw = Raw(s.port)
        raw.send(request("POST", "/v2/repository/index", b'{"ready": true}'))
        ready = json.loads(raw.one()["body"])
        assert ready and all(e["state"] == "READY" for e in ready) and "addone" not in {e["name"] for e in ready}
        raw.send(request("GET", "/v2/repository/index"))
        r = raw.one()
        assert r["status"] == 405 and r["headers"]["allow"] == "POST" and "takes POST" in error_of(r)
        raw.close()
        c.close()


def test_statistics():
    with served() as s:
        c = s.client()
        i = th.InferInput("x", [2, 3], "FP32")
        i.set_data_from_numpy(np.zeros((2, 3), np.float32))
        for _ in range(3):
            c.infer("addone", [i])
        f = th.InferInput("x", [1], "FP32")
        f.set_data_from_numpy(np.zeros(1, np.float32))
        with pytest.raises(InferenceServerException):
            c.infer("fail", [f])
        st = c.get_inference_statistics("addone")["model_stats"]
        v1 = next(m for m in st if m["version"] == "1")
        assert v1["name"] == "addone"
        assert v1["inference_stats"]["success"]["count"] == 3 and v1["inference_stats"]["fail"]["count"] == 0
        assert v1["inference_count"] == 6 and v1["execution_count"] == 3  # three batches of 2
        assert v1["batch_stats"] == [{"batch_size": 2, "compute_input": {"count": 3, "ns": 0},
                                      "compute_infer": {"count": 3, "ns": 0}, "compute_output": {"count": 3, "ns": 0}}]
        assert v1["last_inference"] > 0 and v1["inference_stats"]["success"]["ns"] > 0
        one = c.get_inference_statistics("addone", "1")["model_stats"]
        assert [m["version"] for m in one] == ["1"]
        allm = {(m["name"], m["version"]): m for m in c.get_inference_statistics()["model_stats"]}
        assert allm[("fail", "1")]["inference_stats"]["fail"]["count"] == 1
        with pytest.raises(InferenceServerException, match="not in the repository") as ei:
            c.get_inference_statistics("nope")
        assert ei.value.status() == "404"
        c.close()


# --- malformed requests: a clear protocol error each, the server serving others ----------------------------
def _fp32(shape, data=None, **params):
    t = {"name": "x", "datatype": "FP32", "shape": shape}
    if data is not None:
        t["data"] = data
    if params:
        t["parameters"] = params
    return t


MALFORMED = {
    "bad json": (infer_req("addone", b'{"inputs": [}'), 400, "not valid JSON"),
    "json nested too deep to parse": (infer_req("addone", b"[" * 30000 + b"]" * 30000), 400, "not valid JSON"),
    "data nested too deep": (infer_req("addone", {"inputs": [_fp32([1, 3], [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]])]}), 400,
                             "nested more than 16 deep"),
    "json not an object": (infer_req("addone", b"[1, 2]"), 400, "must be a JSON object"),
    "inputs missing": (infer_req("addone", {"outputs": []}), 400, "'inputs' must be a JSON array"),
    "unsupported datatype": (infer_req("addone", {"inputs": [{"name": "x", "datatype": "UINT16", "shape": [1],
                                                              "data": [1]}]}), 400, "'UINT16' is not supported by tinyserve"),
    "unknown datatype": (infer_req("addone", {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1],
                                                          "data": [1]}]}), 400, "'FLOAT' is not a datatype"),
    "wrong shape": (infer_req("addone", {"inputs": [_fp32([2, 2], [1, 2, 3, 4])]}), 400, "does not match"),
    "wrong dtype for the model": (infer_req("addone", {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 3],
                                                                   "data": [1, 2, 3]}]}), 400, "expects float32"),
    "too few values": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, 2])]}), 400,
                       "'data' holds 2 values but shape [1, 3] holds 3"),
    "too many values": (infer_req("addone", {"inputs": [_fp32([1, 3], [[1, 2], [3, 4]])]}), 400,
                        "holds more than 3 values"),
    "string in FP32 data": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, "2", 3])]}), 400, "not a FP32 value"),
    "INT8 out of range": (infer_req("identity_INT8", {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 1],
                                                                  "data": [300]}]}), 400, "outside -128..127"),
    "no data": (infer_req("addone", {"inputs": [_fp32([1, 3])]}), 400, "neither 'data' nor"),
    "binary size wrong": (infer_req("addone", {"inputs": [_fp32([1, 3], binary_data_size=8)]}, bytes(8)), 400,
                          "binary_data_size is 8 but FP32 [1, 3] needs 12"),
    "binary past the end": (infer_req("addone", {"inputs": [_fp32([1, 3], binary_data_size=12)]}, bytes(4)), 400,
                            "needs binary bytes [0, 12) but the request holds 4"),
    "binary left over": (infer_req("addone", {"inputs": [_fp32([1, 3], binary_data_size=12)]}, bytes(16)), 400,
                         "account for 12"),
    "header length past the body": (request("POST", "/v2/models/addone/infer", b"{}",
                                            {"Inference-Header-Content-Length": "99"}), 400,
                                    "Inference-Header-Content-Length '99'"),
    "bad BYTES length prefix": (infer_req("upper", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                                "parameters": {"binary_data_size": 6}}]},
                                          struct.pack("<I", 50) + b"ab"), 400, "declares 50 bytes"),
    "too many inputs": (infer_req("addone", {"inputs": [_fp32([1], [1]) | {"name": f"x{i}"} for i in range(257)]}),
                        400, "257 inputs exceed max_tensors 256"),
    "too many dimensions": (infer_req("addone", {"inputs": [_fp32([1] * 9, [1])]}), 400, "at most 8 integers"),
    "negative dimension": (infer_req("addone", {"inputs": [_fp32([-1, 3], [1, 2, 3])]}), 400, "outside 0..2^48"),
    "duplicate input": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, 2, 3])] * 2}), 400, "given twice"),
    "unknown output": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, 2, 3])], "outputs": [{"name": "w"}]}), 400,
                       "'w' is not an output"),
    "classification": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, 2, 3])],
                                            "outputs": [{"name": "y", "parameters": {"classification": 2}}]}), 400,
                       "classification extension is not supported"),
    "sequence": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, 2, 3])], "parameters": {"sequence_id": 5}}), 400,
                 "sequence batching is not supported"),
    "json part too large": (infer_req("addone", {"inputs": [_fp32([1, 3], [1, 2, 3])], "pad": "x" * (70 << 10)}), 413,
                            "exceeds max_json_bytes 65536"),
    "unknown model": (infer_req("nope", {"inputs": []}), 404, "'nope' is not in the repository"),
    "unknown version": (request("POST", "/v2/models/addone/versions/7/infer",
                                json.dumps({"inputs": [_fp32([1, 3], [1, 2, 3])]}).encode()), 404, "has no version 7"),
    "version not a number": (request("GET", "/v2/models/addone/versions/abc"), 400, "'abc' is not an integer >= 1"),
    "model not loaded": (request("POST", "/v2/models/addone/versions/2/infer",
                                 json.dumps({"inputs": [_fp32([1, 3], [1, 2, 3])]}).encode()), 503, "not loaded"),
    "model raises": (infer_req("fail", {"inputs": [_fp32([1], [1])]}), 500, "raised RuntimeError"),
    "unknown path": (request("GET", "/v3/models"), 404, "unknown path '/v3/models'"),
    "wrong method": (request("GET", "/v2/models/addone/infer"), 405, "takes POST, not GET"),
    "unsupported encoding": (request("POST", "/v2/models/addone/infer", b"{}", {"Content-Encoding": "br"}), 415,
                             "Content-Encoding 'br' is not supported"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_its_error_and_others_are_served(srv, case):
    data, status, text = MALFORMED[case]
    bystander = Raw(srv.port)
    good_infer(bystander)
    raw = Raw(srv.port)
    raw.send(data)
    r = raw.one()
    assert r["status"] == status, r
    assert text in error_of(r)
    good_infer(raw)  # these leave the connection usable
    good_infer(bystander)
    raw.close()
    bystander.close()


FATAL = {
    "body over max_body_bytes": (b"POST /v2/models/addone/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n",
                                 413, "request body of 1048577 bytes exceeds max_body_bytes 1048576"),
    "chunked body over max_body_bytes": (b"POST /v2/models/addone/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                                         b"\r\n\r\n" + (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 17, 413,
                                         "exceeds max_body_bytes 1048576"),
    "headers over max_header_bytes": (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431,
                                      "exceed max_header_bytes 8192"),
    "url over max_header_bytes": (b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431, "exceed max_header_bytes 8192"),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n", 400, "malformed HTTP request"),
    "bad content-length": (b"POST /v2/models/addone/infer HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400,
                           "malformed HTTP request"),
}


@pytest.mark.parametrize("case", list(FATAL))
def test_broken_stream_is_answered_and_closed(srv, case):
    data, status, text = FATAL[case]
    bystander = Raw(srv.port)
    raw = Raw(srv.port)
    raw.send(request("GET", "/v2/health/live"))  # answered first, in order
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        raw.send(data)
    first, r = raw.read(2)
    assert first["status"] == 200
    assert r["status"] == status and r["headers"].get("connection") == "close"
    assert text in error_of(r)
    assert raw.closed_by_server()
    good_infer(bystander)
    raw.close()
    bystander.close()


def test_oversized_body_is_refused_before_it_is_sent(srv):
    """413 from the Content-Length alone: the client never sends the body."""
    raw = Raw(srv.port)
    raw.send(b"POST /v2/models/addone/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4294967296000\r\n\r\n")
    r = raw.one()
    assert r["status"] == 413 and "4294967296000 bytes exceeds max_body_bytes" in error_of(r)
    assert raw.closed_by_server()


# --- slowloris and idle connections (an injected `now`) -------------------------------------------------
@pytest.mark.parametrize("partial", [b"POST /v2/models/addone/infer HTTP/1.1\r\nHost: x\r\n",
                                     b"POST /v2/models/addone/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"in"])
def test_slowloris_gets_408_and_others_are_served(partial):
    with served(request_timeout_s=30.0) as s:
        bystander = Raw(s.port)
        slow = Raw(s.port, timeout=5)
        slow.send(partial)
        wait_for(lambda: s.lt.call(lambda: any(c.started is not None for c in s.fe._conns)), "the partial request")
        t = s.now()
        s.sweep(t + 29)  # not yet
        good_infer(bystander)
        s.sweep(t + 31)
        r = slow.one()
        assert r["status"] == 408 and "not received within request_timeout_s 30 s" in error_of(r)
        assert slow.closed_by_server()
        good_infer(bystander)
        bystander.close()


def test_idle_connection_is_closed_and_busy_one_is_not():
    with served(idle_timeout_s=60.0) as s:
        idle = Raw(s.port, timeout=5)
        good_infer(idle)
        busy = Raw(s.port, timeout=5)
        busy.send(infer_req("gate", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [5]}]}))
        wait_for(lambda: len(s.core.infer_calls) == 2, "the gated request")
        s.sweep(s.now() + 61)
        assert idle.closed_by_server()
        s.core.gate.set()
        r = busy.one()
        assert r["status"] == 200 and json.loads(r["body"])["outputs"][0]["data"] == [5.0]
        good_infer(busy)


# --- keep-alive, pipelining, flow control -------------------------------------------------------------------
def test_pipelined_responses_come_in_request_order():
    with served() as s:
        raw = Raw(s.port)
        gate = infer_req("gate", {"id": "first", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
        quick = infer_req("addone", {"id": "second", "inputs": [_fp32([1, 3], [1, 2, 3])]})
        raw.send(gate + quick + request("GET", "/v2/health/live") + request("GET", "/v2/models/upper"))
        # the addone request finishes while the gate request waits; its response must still come second
        wait_for(lambda: s.core.statistics("addone", 1)[0]["requests"] == 1, "the second request to finish")
        s.core.gate.set()
        a, b, c, d = raw.read(4)
        assert json.loads(a["body"])["id"] == "first" and json.loads(b["body"])["id"] == "second"
        assert c["status"] == 200 and c["body"] == b""
        assert json.loads(d["body"])["name"] == "upper"
        raw.close()


def test_connection_close_and_http10():
    with served() as s:
        raw = Raw(s.port)
        raw.send(request("GET", "/v2/health/live", headers={"Connection": "close"}) + request("GET", "/v2"))
        r = raw.one()
        assert r["status"] == 200 and r["headers"]["connection"] == "close"
        assert raw.closed_by_server() and not raw.done  # the request after it is not answered
        raw = Raw(s.port)
        raw.send(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        assert raw.one()["status"] == 200 and raw.closed_by_server()
        raw = Raw(s.port)  # half-close after the last request: answered, then closed
        raw.send(request("GET", "/v2/health/ready"))
        raw.s.shutdown(socket.SHUT_WR)
        assert raw.one()["status"] == 200 and raw.closed_by_server()


def test_expect_100_continue():
    with served() as s:
        raw = Raw(s.port)
        body = json.dumps({"inputs": [_fp32([1, 3], [1, 2, 3])]}).encode()
        raw.send(request("POST", "/v2/models/addone/infer", headers={"Content-Length": str(len(body)),
                                                                      "Expect": "100-continue"}))
        assert raw.s.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        raw.send(body)
        assert raw.one()["status"] == 200
        raw.close()


def test_in_flight_per_connection_holds_requests_without_error():
    with served(max_in_flight_per_connection=2) as s:
        raw = Raw(s.port)
        one = infer_req("gate", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
        raw.send(one * 5)
        wait_for(lambda: len(s.core.infer_calls) == 2, "two requests dispatched")
        assert s.lt.call(lambda: (len(s.core.infer_calls), next(iter(s.fe._conns))._read_paused)) == (2, True)
        s.core.gate.set()
        assert [r["status"] for r in raw.read(5)] == [200] * 5
        assert len(s.core.infer_calls) == 5
        raw.close()


def test_server_wide_in_flight_limit():
    with served(max_in_flight=1) as s:
        a, b = Raw(s.port), Raw(s.port)
        gate = infer_req("gate", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
        a.send(gate)
        wait_for(lambda: len(s.core.infer_calls) == 1, "the first request")
        b.send(gate)
        r = b.one()
        assert r["status"] == 429 and "max_in_flight 1" in error_of(r)
        s.core.gate.set()
        assert a.one()["status"] == 200
        wait_for(lambda: s.fe.in_flight == 0, "the count released")
        good_infer(b)


def test_client_gone_mid_request_releases_its_slot():
    with served() as s:
        raw = Raw(s.port)
        raw.send(infer_req("gate", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}))
        wait_for(lambda: s.fe.in_flight == 1, "the request in flight")
        raw.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # a reset: the connection is gone at once (a half-close would still be answered)
        wait_for(lambda: s.fe.connections == 0, "the connection gone")
        s.core.gate.set()
        wait_for(lambda: s.fe.in_flight == 0, "the core to discard it")
        good_infer(Raw(s.port))


def test_too_many_connections():
    with served(max_connections=2) as s:
        a, b = Raw(s.port), Raw(s.port)
        good_infer(a)
        good_infer(b)
        c = Raw(s.port)
        r = c.one()
        assert r["status"] == 503 and "max_connections 2" in error_of(r)
        assert c.closed_by_server()
        good_infer(a)


# --- auth and TLS --------------------------------------------------------------------------------------------
def test_token_is_required_everywhere_but_the_probes():
    with served(core={"token": b"s3cret"}) as s:
        c = s.client()
        with pytest.raises(InferenceServerException, match="requires a token") as ei:
            c.get_server_metadata()
        assert ei.value.status() == "401"
        assert not c.is_server_live()
        ok = s.client()
        hdr = {"Authorization": "Bearer s3cret"}
        assert ok.is_server_live(headers=hdr)
        i = th.InferInput("x", [1, 3], "FP32")
        i.set_data_from_numpy(np.zeros((1, 3), np.float32))
        assert ok.infer("addone", [i], headers=hdr).as_numpy("y").tolist() == [[1, 1, 1]]
        raw = Raw(s.port)
        body = json.dumps({"inputs": [_fp32([1, 3], [1, 2, 3])]}).encode()
        raw.send(request("POST", "/v2/models/addone/infer", body, {"Authorization": "Bearer s3creT"})
                 + request("GET", "/healthz") + request("GET", "/readyz"))
        bad, hz, rz = raw.read(3)
        assert bad["status"] == 401 and bad["headers"]["www-authenticate"] == "Bearer"
        assert (hz["status"], rz["status"]) == (200, 200)
        assert len(s.core.infer_calls) == 1  # the refused one never reached the core
        c.close()
        ok.close()


def _cert(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def test_tls(tmp_path):
    key, cert = _cert(tmp_path)
    ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with served(ssl=ctx) as s:
        cli = _ssl.create_default_context(cafile=str(cert))
        raw = Raw(s.port, tls=cli)
        good_infer(raw)
        raw.close()
        import gevent.ssl

        c = th.InferenceServerClient(f"localhost:{s.port}", ssl=True, ssl_context_factory=lambda **kw:
                                     gevent.ssl.create_default_context(cafile=str(cert)))
        assert c.is_server_live()
        i = th.InferInput("x", [1, 3], "FP32")
        i.set_data_from_numpy(np.zeros((1, 3), np.float32))
        assert c.infer("addone", [i]).as_numpy("y").tolist() == [[1, 1, 1]]
        c.close()
        plain = Raw(s.port, timeout=5)  # plain HTTP on the TLS port: no answer, closed
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            plain.send(request("GET", "/v2/health/live"))
        assert plain.closed_by_server() and not plain.done


def test_metrics_path():
    with served(metrics=lambda: "tinyserve_up 1\n") as s:
        raw = Raw(s.port)
        raw.send(request("GET", "/metrics"))
        r = raw.one()
        assert r["status"] == 200 and r["body"] == b"tinyserve_up 1\n"
        assert r["headers"]["content-type"].startswith("text/plain; version=0.0.4")
    with served() as s:  # none given: not a path
        raw = Raw(s.port)
        raw.send(request("GET", "/metrics"))
        assert raw.one()["status"] == 404


def test_front_end_imports_no_other_front_end():
    import ast
    import pathlib

    import tinyserve.frontends.http as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {n for n in names if n.startswith("tinyserve")} <= {"tinyserve", "tinyserve.frontends"}
    assert wire.Limits().max_tensors == 256  # the limit the malformed cases name


def test_upgrade_request_is_answered_as_http11_then_closed(srv):
    raw = Raw(srv.port)
    raw.send(request("GET", "/v2/health/live", headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                                                         "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}))
    r = raw.one()
    assert r["status"] == 200 and r["headers"]["connection"] == "close"
    assert raw.closed_by_server() and not raw.done

