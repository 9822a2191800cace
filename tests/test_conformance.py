"""Server-level conformance to docs/protocol.md (issue 12, items 2-8): a client written from the spec
alone, over loopback, on asyncio and on uvloop.

Models (packed into a temporary repository): `f8` takes and gives float8 tensors; `hook` is a python
model whose preprocess takes a `bytes` input and refuses some requests (wire.InvalidInput for the
client's content, ValueError for its own fault), with request_inputs / request_outputs declared;
`gate` (tests/test_server.py) holds a request in flight; `idle` is in the repository, never loaded."""

import socket
import struct

import msgpack
import numpy as np
import pytest
import torch

from tinyserve import protocol, wire
from tinyserve.health import EjectionConfig
from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.server import ServerConfig

from test_server import GATE_MODEL, LOOPS, Client, Gate, ServerThread, error_of

pytestmark = pytest.mark.timeout(180)

F8_MODEL = '''
import torch

class F8(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, c):
        return (x * self.scale).to(torch.float8_e4m3fn), c.clone()

def build(params):
    return F8()
'''

HOOK_MODEL = '''
import torch
from tinyserve.wire import InvalidInput

class Lengths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale

def build(params):
    return Lengths()

def preprocess(inputs):
    text = inputs["text"]
    if b"bad" in text:
        raise InvalidInput("model hook: input 'text': the word 'bad' is refused")
    if b"boom" in text:
        raise ValueError("the hook itself broke")
    return {"x": torch.tensor([float(len(t)) for t in text])}

def postprocess(outputs):
    n = outputs["y"].shape[0]
    return {"y": outputs["y"], "upper": [b"OK"] * n}
'''

F32 = {"dtype": "float32"}


@pytest.fixture(scope="module")
def gate():
    g = Gate()
    yield g
    g.release()
    g.listener.close()


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("conformance")
    repo = Repository(tmp / "repo", create=True)

    def python_model(name, source, config, state):
        sd, py = tmp / f"{name}.pt", tmp / f"{name}.py"
        torch.save(state, sd)
        py.write_text(source)
        pack(repo, name, str(sd), program=str(py), config=config)

    one = {"scale": torch.ones(1)}
    python_model("f8", F8_MODEL, {
        "inputs": [{"name": "x", **F32, "shape": [-1, 3]}, {"name": "c", "dtype": "float8_e5m2", "shape": [-1, 3]}],
        "outputs": [{"name": "q", "dtype": "float8_e4m3fn", "shape": [-1, 3]},
                    {"name": "r", "dtype": "float8_e5m2", "shape": [-1, 3]}]}, one)
    hook_cfg = {"inputs": [{"name": "x", **F32, "shape": [-1]}], "outputs": [{"name": "y", **F32, "shape": [-1]}],
                "request_inputs": [{"name": "text", "dtype": "bytes", "shape": [-1]}],
                "request_outputs": [{"name": "y", **F32, "shape": [-1]}, {"name": "upper", "dtype": "bytes", "shape": [-1]}]}
    python_model("hook", HOOK_MODEL, hook_cfg, one)
    lin = torch.nn.Linear(4, 4)
    gate_cfg = {"inputs": [{"name": "x", **F32, "shape": [-1, 4]}], "outputs": [{"name": "y", **F32, "shape": [-1, 4]}],
                "extra": {"port": gate.port}}
    state = {"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach()}
    python_model("gate", GATE_MODEL, gate_cfg, state)
    python_model("idle", GATE_MODEL, gate_cfg, state)
    return str(repo.root)


EJECT = EjectionConfig(consecutive_failures=3, error_rate=0.0, base_ejection_s=300.0, max_ejection_s=300.0)


@pytest.fixture(scope="module", params=LOOPS)
def st(request, repo_root):
    s = ServerThread(ServerConfig(repo=repo_root, models=("f8", "hook", "gate"), torch_threads=1, max_in_flight=2,
                                  ejection=EJECT), request.param)
    yield s
    s.stop()


def raw_header_frame(head: bytes, payload: bytes = b"") -> bytes:
    off = wire.align8(8 + len(head))
    body = head + bytes(off - 8 - len(head)) + payload
    body += bytes(-len(body) % 8)
    return struct.pack("<II", 4 + len(body), len(head)) + body


def texts(items):
    descs, views = wire.tensor_parts({"text": items})
    return descs, views


# --- 12.2 / 12.3: BAD_FRAME carries the id; string keys at every depth ------------------------------------
@pytest.mark.parametrize("head, rid", [
    ({"id": 9, "op": "infer", "model": "hook", "inputs": [{"name": "text", b"dtype": "bytes", "shape": [0],
                                                            "nbytes": 0}]}, 9),
    ({"id": 10, "op": "ping", 3: "x"}, 10),
    ({"op": "ping", 3: "x"}, 0),
])
def test_bad_keys_anywhere_are_bad_frame_with_the_id(st, head, rid):
    with Client(st.port) as c:
        c.send_raw(raw_header_frame(msgpack.packb(head, use_bin_type=True)))
        h, _ = c.recv()
        assert h["id"] == rid
        error_of(h, "BAD_FRAME", "map key")
        assert c.closed_by_server()


def test_bad_frame_from_extra_bytes_after_the_header_map_carries_the_id(st):
    with Client(st.port) as c:
        c.send_raw(raw_header_frame(msgpack.packb({"id": 31, "op": "ping"}) + b"\x00"))
        h, _ = c.recv()
        assert h["id"] == 31
        error_of(h, "BAD_FRAME", "not valid msgpack")
        assert c.closed_by_server()


# --- 12.4: a hook's refusal of the request's content is INVALID_INPUT and never ejects ---------------------
def test_hook_refusal_is_invalid_input_and_does_not_eject(st):
    with Client(st.port) as c:
        descs, views = texts([b"fine", b"bad"])
        for _ in range(EJECT.consecutive_failures + 2):  # more than the ejection threshold
            rid = c.next_id()
            c.send({"id": rid, "op": "infer", "model": "hook", "inputs": descs}, views)
            h, _ = c.recv()
            error_of(h, "INVALID_INPUT", "'text'", "'bad' is refused")
        h, out = c.infer("hook", {"text": [b"abc", b"hello"]})
        assert h["ok"], h
        np.testing.assert_array_equal(out["y"], [3.0, 5.0])
        assert out["upper"] == [b"OK", b"OK"]
        health = c.call("health")
        assert health["models"]["hook"]["state"] == "READY" and health["models"]["hook"]["serving"]


# --- 12.5: metadata describes the request -------------------------------------------------------------------
def test_metadata_of_a_hook_model_describes_what_a_request_sends(st):
    with Client(st.port) as c:
        for version in (None, 1):  # the routed version, and the version named
            fields = {} if version is None else {"version": version}
            md = c.call("metadata", model="hook", **fields)
            assert md["inputs"] == [{"name": "text", "dtype": "bytes", "shape": [-1]}], md
            assert md["outputs"] == [{"name": "y", "dtype": "float32", "shape": [-1]},
                                     {"name": "upper", "dtype": "bytes", "shape": [-1]}]
        # a client that follows metadata is answered
        spec = md["inputs"][0]
        h, out = c.infer("hook", {spec["name"]: ["from", "metadata"]})
        assert h["ok"], h
        assert [d["name"] for d in h["outputs"]] == [o["name"] for o in md["outputs"]]
        # a model without hooks still gives its module's inputs
        md = c.call("metadata", model="f8")
        assert [i["name"] for i in md["inputs"]] == ["x", "c"]


# --- 12.6: float8 on the wire -----------------------------------------------------------------------------
def test_a_ready_float8_model_answers(st):
    x = np.array([[1.0, -2.0, 0.5], [448.0, 0.0, 3.0]], np.float32)
    c8 = torch.tensor([[1.0, 2.0, 4.0], [-8.0, 0.25, 0.0]]).to(torch.float8_e5m2)
    with Client(st.port) as c:
        h, payload = None, None
        rid = c.infer_send("f8", {"x": x, "c": c8})
        h, payload = c.recv()
        assert h["id"] == rid and h["ok"], h
        assert [(d["name"], d["dtype"], d["nbytes"]) for d in h["outputs"]] == [
            ("q", "float8_e4m3fn", 6), ("r", "float8_e5m2", 6)]
        out = {n: wire.to_array(*t) for n, t in wire.split_tensors(h["outputs"], payload, wire.Limits()).items()}
        want = torch.from_numpy(x).to(torch.float8_e4m3fn)
        assert out["q"].dtype == torch.float8_e4m3fn
        assert torch.equal(out["q"].view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(out["r"].view(torch.uint8), c8.view(torch.uint8))
        assert c.call("health")["models"]["f8"]["state"] == "READY"


def test_the_python_client_gets_float8_as_torch(st):
    from tinyserve.client import Client as TsClient

    c8 = torch.tensor([[1.0, 2.0, 4.0]]).to(torch.float8_e5m2)
    with TsClient("127.0.0.1", st.port) as c:
        out = c.infer("f8", {"x": np.ones((1, 3), np.float32), "c": c8})
    assert out["r"].dtype == torch.float8_e5m2 and torch.equal(out["r"].view(torch.uint8), c8.view(torch.uint8))
    assert torch.equal(out["q"].float(), torch.ones(1, 3))


# --- 12.7: stats for one model, health of never-loaded models, bytes errors, monitoring at the cap ----------
def test_stats_for_one_model_has_only_that_models_fields(st):
    with Client(st.port) as c:
        c.infer("hook", {"text": [b"a"]})
        one = c.call("stats", model="hook")
        assert not {"connections", "uptime_s", "placement", "storage"} & set(one), one
        assert set(one["models"]) == {"hook"}
        top = {k: v for k, v in one.items() if k not in ("id", "ok", "models")}
        assert top == {k: v for k, v in one["models"]["hook"].items()}  # the model's own in_flight, not the server's
        assert one["requests"] == one["models"]["hook"]["requests"] >= 1
        everything = c.call("stats")
        assert {"in_flight", "connections", "uptime_s"} <= set(everything)


def test_health_lists_every_repository_model(st):
    with Client(st.port) as c:
        models = c.call("health")["models"]
    assert {"f8", "hook", "gate", "idle"} <= set(models)
    assert models["idle"] == {"state": "UNLOADED", "reason": "not loaded", "version": 1, "device": None,
                              "serving": False, "versions": []}


@pytest.mark.parametrize("payload, fragments", [
    (b"\x09\x00\x00\x00abcd", ["tensor 'text'", "item 0 declares 9 bytes"]),
    (b"\x01\x00\x00\x00a\x00\x00\x00", ["tensor 'text'", "item 1: its u32 length runs past"]),
])
def test_bytes_item_errors_name_the_tensor_and_the_item(st, payload, fragments):
    with Client(st.port) as c:
        desc = {"name": "text", "dtype": "bytes", "shape": [2 if "item 1" in fragments[1] else 1], "nbytes": len(payload)}
        c.send({"id": 5, "op": "infer", "model": "hook", "inputs": [desc]}, [memoryview(payload)])
        h, _ = c.recv()
        assert h["id"] == 5
        error_of(h, "INVALID_INPUT", *fragments)


def test_monitoring_ops_pass_the_in_flight_cap(st, gate):
    """max_in_flight 2: two gated requests fill it; infer is refused, monitoring ops are answered."""
    x = np.full((1, 4), 42.0, np.float32)
    with Client(st.port) as busy, Client(st.port) as mon:
        a = busy.infer_send("gate", {"x": x})
        gate.wait()
        b = busy.infer_send("gate", {"x": x})  # (waits behind the first in the gate's queue)
        for _ in range(100000):  # until the server has read it (bounded; each step is a loop round trip)
            if st.run(lambda: st.server.in_flight) == 2:
                break
        assert st.run(lambda: st.server.in_flight) == 2
        try:
            h = mon.call("hello", protocol=1)
            assert h["ok"], h
            for op, fields in (("ping", {}), ("health", {}), ("stats", {}), ("stats", {"model": "gate"}),
                               ("models", {}), ("metadata", {"model": "gate"}), ("metadata", {"model": "idle"})):
                h = mon.call(op, **fields)
                assert h["ok"], (op, h)
            assert mon.call("stats")["in_flight"] == 3  # the two gated requests and this stats request
            rid = mon.infer_send("hook", {"text": [b"x"]})
            h, _ = mon.recv()
            assert h["id"] == rid
            error_of(h, "TOO_MANY_REQUESTS", "max_in_flight 2")
            h = mon.call("load", model="idle")
            error_of(h, "TOO_MANY_REQUESTS")
        finally:
            gate.release()
            gate.wait()
            gate.release()
        got = {busy.recv()[0]["id"] for _ in range(2)}
        assert got == {a, b}


def test_monitoring_ops_are_the_spec_list():
    assert protocol.MONITORING_OPS == {"hello", "ping", "health", "stats", "models", "metadata"}


# --- 12.8: behaviour the spec states --------------------------------------------------------------------------
def test_repeated_hello_is_answered_again(st):
    with Client(st.port) as c:
        first = c.call("hello", protocol=1)
        second = c.call("hello", protocol=1, client="again")
        assert first["ok"] and {k: v for k, v in first.items() if k != "id"} == {
            k: v for k, v in second.items() if k != "id"}
        error_of(c.call("hello", protocol=2), "BAD_REQUEST", "protocol 2")
        assert c.call("ping")["ok"]


@pytest.mark.parametrize("op, fields", [("ping", {}), ("health", {}), ("metadata", {"model": "hook"})])
def test_a_payload_on_an_op_that_takes_none_is_bad_request(st, op, fields):
    with Client(st.port) as c:
        c.send({"id": 3, "op": op, **fields}, [memoryview(b"12345678")])
        h, _ = c.recv()
        assert h["id"] == 3
        error_of(h, "BAD_REQUEST", f"{op}: this op takes no payload", "8 payload bytes")
        assert c.call("ping")["ok"]  # the connection stays open


def test_a_huge_empty_shape_is_bad_request_not_a_model_error(st):
    """shape [0, 2^31, 2^32]: every dimension <= 2^48 but the extent is 2^63.  It reached the hook as a
    tensor torch cannot make (MODEL_ERROR, counted against the model); now BAD_REQUEST before queuing."""
    with Client(st.port) as c:
        for _ in range(EJECT.consecutive_failures + 1):
            rid = c.next_id()
            c.send({"id": rid, "op": "infer", "model": "hook",
                    "inputs": [{"name": "text", "dtype": "float32", "shape": [0, 2**31, 2**32], "nbytes": 0}]})
            h, _ = c.recv()
            error_of(h, "BAD_REQUEST", "extent", "2^48")
        assert c.call("health")["models"]["hook"]["serving"]


def test_bounds_and_byte_orders_are_in_the_spec():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    for fragment in ("**little-endian** `u32` length", "extent", "`2^48`", "### 3.1 Malformed descriptors",
                     "A repeated `hello`", "takes no payload", "float8_e4m3fn", "pass the `max_in_flight` cap"):
        assert fragment in text, fragment


# --- the config's request-side declaration (docs/repository.md section 3) ------------------------------------
BASE = {"name": "t", "platform": "python", "inputs": [{"name": "x", **F32, "shape": [-1]}],
        "outputs": [{"name": "y", **F32, "shape": [-1]}]}


def test_request_tensors_round_trip_and_are_validated():
    from tinyserve import errors
    from tinyserve.config import ModelConfig

    cfg = ModelConfig.from_dict({**BASE, "request_inputs": [{"name": "text", "dtype": "bytes", "shape": [-1]}],
                                 "request_outputs": [{"name": "n", "dtype": "int64", "shape": [-1, 2]}]})
    assert [(s.name, s.dtype, s.shape) for s in cfg.request_inputs] == [("text", "bytes", (-1,))]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "request_inputs" not in ModelConfig.from_dict(BASE).to_dict()  # written only when declared
    for bad, fragment in (
            ({"request_inputs": [{"name": "t", "dtype": "bytes", "shape": [-1, 2]}]}, "bytes tensor is 1-D"),
            ({"request_inputs": [{"name": "t", "dtype": "str", "shape": [-1]}]}, "float8_e5m2, bytes"),
            ({"request_inputs": "text"}, "request_inputs must be a list"),
            ({"request_outputs": [{"name": "t", "dtype": "bytes", "shape": [-1]}] * 2}, "used twice"),
            ({"request_inputs": [{"name": "t", "dtype": "bytes"}]}, "shape"),
            ({"platform": "torch_export", "request_inputs": [{"name": "t", "dtype": "bytes", "shape": [-1]}]},
             "platform is 'torch_export'")):
        with pytest.raises(errors.ConfigError, match=fragment):
            ModelConfig.from_dict({**BASE, **bad})
