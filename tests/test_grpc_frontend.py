"""The gRPC front end (tinyserve/frontends/grpc.py) driven by the stock tritonclient.grpc client against
the fake core (tests/oip_fakecore.py), plus raw protocol messages (tritonclient's own generated stub
and messages) for malformed input.  Loopback only, every wait bounded."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
FRONTENDS = HERE.parent / "tinyserve" / "frontends"

# the edits made to protoc's output (each must apply exactly once): a private descriptor pool (another
# copy of the protocol, tritonclient's, registers the same full names in the default pool) and
# package-qualified module names
_SUBS = {
    "_kserve_v2_pb2.py": [
        ("DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
         "# tinyserve: a private pool, so that another copy of this protocol (tritonclient's) can be\n"
         "# imported in the same process (the default pool refuses the same full names twice)\n"
         "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile("),
        ("_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'kserve_v2_pb2', _globals)",
         "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'tinyserve.frontends._kserve_v2_pb2', _globals)"),
    ],
    "_kserve_v2_pb2_grpc.py": [
        ("import kserve_v2_pb2 as kserve__v2__pb2",
         "from tinyserve.frontends import _kserve_v2_pb2 as kserve__v2__pb2"),
    ],
}


def generate(dest: pathlib.Path) -> None:
    """protoc (grpcio-tools) on tinyserve/frontends/kserve_v2.proto -> dest/_kserve_v2_pb2*.py."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(FRONTENDS / "kserve_v2.proto", tmp)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                        "--grpc_python_out=.", "kserve_v2.proto"], cwd=tmp, check=True)
        for src, dst in (("kserve_v2_pb2.py", "_kserve_v2_pb2.py"), ("kserve_v2_pb2_grpc.py", "_kserve_v2_pb2_grpc.py")):
            text = (pathlib.Path(tmp) / src).read_text()
            for old, new in _SUBS[dst]:
                assert text.count(old) == 1, (dst, old)
                text = text.replace(old, new)
            (dest / dst).write_text(text)


if __name__ == "__main__" and sys.argv[1:] == ["regenerate"]:
    generate(FRONTENDS)
    sys.exit(0)


# ------------------------------------------------------------------------------------------------------
import threading  # noqa: E402

import grpc  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tritonclient.grpc as tc  # noqa: E402
from tritonclient.grpc import service_pb2 as tpb  # noqa: E402  (the client's own generated messages)
from tritonclient.grpc import service_pb2_grpc as tpb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tinyserve import wire  # noqa: E402
from tinyserve.frontends import _kserve_v2_pb2 as pb  # noqa: E402
from tinyserve.frontends.grpc import GrpcFrontEnd  # noqa: E402

sys.path.insert(0, str(HERE))
from oip_fakecore import FakeCore, LoopThread, ParkingCore  # noqa: E402

TIMEOUT = 20.0  # every client call's deadline (seconds)


class Served:
    """A fake core and a gRPC front end on a loop thread, a tritonclient connected to it."""

    def __init__(self, *, uvloop: bool = True, core_kw=None, fe_kw=None, ssl=None) -> None:
        self.lt = LoopThread(uvloop=uvloop)
        self.core = FakeCore(**(core_kw or {}))
        self.fe = GrpcFrontEnd(self.core, host="127.0.0.1", port=0, ssl=ssl, **(fe_kw or {}))
        self.lt.call(self.fe.start)
        self.url = f"127.0.0.1:{self.fe.port}"
        self.client = tc.InferenceServerClient(self.url) if ssl is None else None
        self._channels = []

    def stub(self, headers=()):
        ch = grpc.insecure_channel(self.url, options=[("grpc.max_send_message_length", 64 << 20)])
        self._channels.append(ch)
        return tpb_grpc.GRPCInferenceServiceStub(ch)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for ch in self._channels:
            ch.close()
        self.core.gate.set()
        self.lt.call(self.fe.stop, 0)
        self.core.close()
        self.lt.stop()


@pytest.fixture
def srv():
    s = Served()
    yield s
    s.close()


def refused(fn, *args, **kwargs) -> tuple[str, str]:
    """(status name, message) of a call that must fail."""
    with pytest.raises((InferenceServerException, grpc.RpcError)) as ei:
        fn(*args, **kwargs)
    e = ei.value
    if isinstance(e, grpc.RpcError):
        return e.code().name, e.details()
    return e.status().removeprefix("StatusCode."), e.message()


def infer_input(name, arr, datatype=None):
    datatype = datatype or tc.np_to_triton_dtype(arr.dtype)
    i = tc.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr)
    return i


# --- the generated code and the protocol ----------------------------------------------------------------
def test_generated_code_is_what_the_proto_generates(tmp_path):
    generate(tmp_path)
    for name in ("_kserve_v2_pb2.py", "_kserve_v2_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (FRONTENDS / name).read_text(), \
            f"{name} is stale: run `python tests/test_grpc_frontend.py regenerate`"


def _messages(desc):
    for m in desc.message_types_by_name.values() if hasattr(desc, "message_types_by_name") else desc.nested_types:
        yield m
        yield from _messages(m)


def test_messages_and_service_match_the_stock_client():
    """Every message and field of kserve_v2.proto has the number, type and label tritonclient's own
    generated protocol gives it (so the two interoperate field by field), and every RPC the same
    request / response types and streaming."""
    from google.protobuf import descriptor_pool

    theirs = descriptor_pool.Default()
    checked = 0
    for m in _messages(pb.DESCRIPTOR):
        t = theirs.FindMessageTypeByName(m.full_name)
        for f in m.fields:
            tf = t.fields_by_name.get(f.name)
            assert tf is not None, f"{m.full_name}.{f.name} is not in the stock protocol"
            assert (f.number, f.type, f.is_repeated) == (tf.number, tf.type, tf.is_repeated), f"{m.full_name}.{f.name}"
            assert (f.message_type and f.message_type.full_name) == (tf.message_type and tf.message_type.full_name)
            assert f.containing_oneof is None or f.containing_oneof.name == tf.containing_oneof.name
            checked += 1
    assert checked > 100
    for e in pb.DESCRIPTOR.enum_types_by_name.values():  # ModelConfig's enums: the same names and numbers
        assert [(v.name, v.number) for v in e.values] == \
            [(v.name, v.number) for v in theirs.FindEnumTypeByName(e.full_name).values]
    fmt = pb.ModelInput.DESCRIPTOR.enum_types_by_name["Format"]
    assert [(v.name, v.number) for v in fmt.values] == \
        [(v.name, v.number) for v in theirs.FindEnumTypeByName(fmt.full_name).values]
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    stock = theirs.FindServiceByName("inference.GRPCInferenceService")
    for meth in ours.methods:
        sm = stock.methods_by_name[meth.name]
        assert (meth.input_type.full_name, meth.output_type.full_name) == (sm.input_type.full_name, sm.output_type.full_name)
        assert (meth.client_streaming, meth.server_streaming) == (sm.client_streaming, sm.server_streaming)
    # ours live in a private pool: the default one holds tritonclient's, both in this process
    assert pb.POOL is not theirs and pb.DESCRIPTOR.pool is pb.POOL


def test_the_default_pool_refuses_a_second_copy_of_the_protocol():
    """Why the generated module uses a private pool: the same full names from another file clash."""
    from google.protobuf import descriptor_pool

    with pytest.raises(TypeError, match="duplicate symbol"):
        descriptor_pool.Default().AddSerializedFile(pb.DESCRIPTOR.serialized_pb)


# --- health and metadata ----------------------------------------------------------------------------------
@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_health_metadata_and_an_infer(uvloop):
    s = Served(uvloop=uvloop)
    try:
        c = s.client
        assert c.is_server_live() and c.is_server_ready()
        s.core.is_ready = False
        assert not c.is_server_ready()
        assert c.is_model_ready("addone") and c.is_model_ready("addone", "1")
        assert not c.is_model_ready("addone", "2")
        md = c.get_server_metadata(as_json=True)
        assert md["name"] == "tinyserve" and md["extensions"] == ["model_repository", "statistics"]
        mm = c.get_model_metadata("addone", as_json=True)
        assert mm["name"] == "addone" and mm["versions"] == ["1", "2"] and mm["platform"] == "pytorch"
        assert mm["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
        assert [o["name"] for o in mm["outputs"]] == ["y", "z"]
        assert c.get_model_metadata("upper", as_json=True)["inputs"][0]["datatype"] == "BYTES"
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        r = c.infer("addone", [infer_input("x", x)], client_timeout=TIMEOUT)
        np.testing.assert_array_equal(r.as_numpy("y"), x + 1)
        np.testing.assert_array_equal(r.as_numpy("z"), x * 2)
        resp = r.get_response()
        assert resp.model_name == "addone" and len(resp.raw_output_contents) == 2
    finally:
        s.close()


def test_model_config(srv):
    """ModelConfig: Triton's ModelConfig message (the subset tinyserve sets), read by the stock client."""
    c = srv.client
    cfg = c.get_model_config("addone", as_json=True)["config"]
    assert cfg == {"name": "addone", "platform": "pytorch", "backend": "tinyserve", "max_batch_size": 8,
                   "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["3"]}],
                   "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["3"]},
                              {"name": "z", "data_type": "TYPE_FP32", "dims": ["3"]}],
                   "dynamic_batching": {}, "model_transaction_policy": {}}
    m = c.get_model_config("addone", "2").config  # tritonclient's own ModelConfig message
    assert m.HasField("dynamic_batching") and m.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert not m.model_transaction_policy.decoupled and m.max_batch_size == 8
    up = c.get_model_config("upper").config
    assert up.max_batch_size == 0 and up.WhichOneof("scheduling_choice") is None
    assert [(t.name, t.data_type, list(t.dims)) for t in list(up.input) + list(up.output)] == [
        ("text", 13, [-1]), ("upper", 13, [-1])]  # TYPE_STRING
    for dt in ("BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16"):
        got = c.get_model_config(f"identity_{dt}", as_json=True)["config"]["input"][0]
        assert got == {"name": "x", "data_type": f"TYPE_{dt}", "dims": ["-1", "-1"]}
    assert refused(c.get_model_config, "nope") == ("NOT_FOUND", "model 'nope' is not in the repository")
    code, msg = refused(c.get_model_config, "addone", "9")
    assert code == "NOT_FOUND" and "has no version 9" in msg
    code, msg = refused(c.get_model_config, "addone", "x")
    assert code == "INVALID_ARGUMENT" and "model version 'x'" in msg


def test_unknown_models_and_versions(srv):
    c = srv.client
    assert refused(c.is_model_ready, "nope") == ("NOT_FOUND", "model 'nope' is not in the repository")
    code, msg = refused(c.get_model_metadata, "addone", "7")
    assert code == "NOT_FOUND" and "has no version 7" in msg
    code, msg = refused(c.get_model_metadata, "addone", "v1")
    assert code == "INVALID_ARGUMENT" and "model version 'v1' is not a non-negative integer" in msg
    x = np.zeros((1, 3), np.float32)
    assert refused(c.infer, "nope", [infer_input("x", x)])[0] == "NOT_FOUND"
    code, msg = refused(c.infer, "addone", [infer_input("x", x)], model_version="9")
    assert code == "NOT_FOUND" and "has no version 9" in msg
    code, msg = refused(c.infer, "addone", [infer_input("x", x)], model_version="2")
    assert code == "UNAVAILABLE" and "version 2 is not loaded" in msg


# --- infer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16"])
def test_infer_raw_contents_every_datatype(srv, datatype):
    rng = np.random.default_rng(7)
    np_dt = ml_dtypes.bfloat16 if datatype == "BF16" else tc.triton_to_np_dtype(datatype)
    x = (rng.integers(0, 2, (2, 5)) if datatype == "BOOL" else rng.integers(-50, 100, (2, 5))).astype(np_dt)
    if datatype == "UINT8":
        x = np.abs(x.astype(np.int64)).astype(np.uint8)
    r = srv.client.infer(f"identity_{datatype}", [infer_input("x", x, datatype)], client_timeout=TIMEOUT)
    y = r.as_numpy("y")
    assert r.get_output("y").datatype == datatype and list(r.get_output("y").shape) == [2, 5]
    np.testing.assert_array_equal(y.astype(np.float64), x.astype(np.float64))
    name, ver, inputs, *_ = srv.core.infer_calls[-1]
    assert inputs["x"][:2] == (srv.core.models[f"identity_{datatype}"].inputs[0].dtype, (2, 5))


def _typed_request(model, datatype, shape, field, values):
    req = tpb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return req


def _raw_outputs(resp):
    return {o.name: (o.datatype, list(o.shape), raw) for o, raw in zip(resp.outputs, resp.raw_output_contents)}


@pytest.mark.parametrize("datatype,field,values,np_dt", [
    ("BOOL", "bool_contents", [True, False, True, True], np.bool_),
    ("UINT8", "uint_contents", [0, 7, 200, 255], np.uint8),
    ("INT8", "int_contents", [-128, -1, 0, 127], np.int8),
    ("INT16", "int_contents", [-300, 2, 3, 32767], np.int16),
    ("INT32", "int_contents", [-(1 << 31), 0, 5, (1 << 31) - 1], np.int32),
    ("INT64", "int64_contents", [-(1 << 62), 1, 2, 1 << 40], np.int64),
    ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 1e30], np.float32),
    ("FP64", "fp64_contents", [0.1, -2.5, 1e300, 0.0], np.float64),
])
def test_infer_typed_contents(srv, datatype, field, values, np_dt):
    resp = srv.stub().ModelInfer(_typed_request(f"identity_{datatype}", datatype, [2, 2], field, values), timeout=TIMEOUT)
    dt, shape, raw = _raw_outputs(resp)["y"]
    assert (dt, shape) == (datatype, [2, 2])
    np.testing.assert_array_equal(np.frombuffer(raw, np_dt), np.array(values, np_dt))


def test_bytes_raw_and_typed(srv):
    words = np.array([b"hello", b"", "ünï".encode(), b"x" * 1000], dtype=np.object_)
    r = srv.client.infer("upper", [infer_input("text", words, "BYTES")], client_timeout=TIMEOUT)
    assert r.as_numpy("upper").tolist() == [w.upper() for w in words]
    assert r.get_output("upper").datatype == "BYTES"
    req = tpb.ModelInferRequest(model_name="upper")
    req.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"ab", b"cd"])
    dt, shape, raw = _raw_outputs(srv.stub().ModelInfer(req, timeout=TIMEOUT))["upper"]
    assert (dt, shape, raw) == ("BYTES", [2], b"\x02\x00\x00\x00AB\x02\x00\x00\x00CD")


def test_output_selection_id_and_parameters(srv):
    x = np.ones((1, 3), np.float32)
    r = srv.client.infer("addone", [infer_input("x", x)], outputs=[tc.InferRequestedOutput("z")],
                         request_id="req-7", priority=3, timeout=250_000, client_timeout=TIMEOUT)
    assert r.get_response().id == "req-7" and [o.name for o in r.get_response().outputs] == ["z"]
    np.testing.assert_array_equal(r.as_numpy("z"), x * 2)
    assert r.as_numpy("y") is None
    name, version, inputs, outputs, timeout_s, priority = srv.core.infer_calls[-1]
    assert (name, version, outputs, priority) == ("addone", 1, ["z"], 3)
    assert timeout_s == pytest.approx(0.25)  # the timeout parameter (us) is below the call's deadline
    srv.client.infer("addone", [infer_input("x", x)])  # no deadline, no timeout parameter: none
    assert srv.core.infer_calls[-1][4] is None
    srv.client.infer("addone", [infer_input("x", x)], client_timeout=7.0)  # the call's deadline bounds it
    assert 0 < srv.core.infer_calls[-1][4] <= 7.5  # (gRPC computes what remains: a few ms of slack)
    code, msg = refused(srv.client.infer, "addone", [infer_input("x", x)], outputs=[tc.InferRequestedOutput("w")])
    assert code == "INVALID_ARGUMENT" and "output 'w' is not an output of model 'addone'" in msg
    code, msg = refused(srv.client.infer, "addone", [infer_input("x", x)], sequence_id=4)
    assert code == "INVALID_ARGUMENT" and "sequence batching is not supported" in msg


# --- malformed input: a protocol error each, the server serving others meanwhile ---------------------------
def _raw_request(model="addone", datatype="FP32", shape=(1, 3), raw=None, name="x"):
    req = tpb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    req.raw_input_contents.append(np.zeros(shape, np.float32).tobytes() if raw is None else raw)
    return req


def _many_inputs(n):
    req = tpb.ModelInferRequest(model_name="addone")
    for i in range(n):
        req.inputs.add(name=f"x{i}", datatype="FP32", shape=[1])
        req.raw_input_contents.append(b"\0" * 4)
    return req


def _typed_and_raw():
    req = _raw_request()
    req.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    return req


def _two_inputs_one_raw():
    req = _raw_request()
    req.inputs.add(name="w", datatype="FP32", shape=[1])
    return req


def _with_param(key, **value):
    req = _raw_request()
    req.parameters[key].CopyFrom(tpb.InferParameter(**value))
    return req


MALFORMED = [  # (id, request, status, message fragment)
    ("unknown datatype", _raw_request(datatype="FP8"), "INVALID_ARGUMENT", "datatype 'FP8' is not a datatype"),
    ("unsupported datatype", _raw_request(datatype="UINT16", raw=b"\0" * 6), "INVALID_ARGUMENT",
     "datatype 'UINT16' is not supported by tinyserve"),
    ("datatype the model does not take", _raw_request(datatype="FP64", raw=b"\0" * 24), "INVALID_ARGUMENT",
     "dtype float64, model 'addone' expects float32"),
    ("raw size != shape", _raw_request(raw=b"\0" * 11), "INVALID_ARGUMENT",
     "FP32 [1, 3] needs 12 bytes, raw_input_contents[0] holds 11"),
    ("shape the model does not take", _raw_request(shape=(1, 4)), "INVALID_ARGUMENT",
     "shape [1, 4] does not match model 'addone'"),
    ("negative dimension", _raw_request(shape=(-1, 3), raw=b""), "INVALID_ARGUMENT", "dimension outside 0..2^48"),
    ("too many dimensions", _raw_request(shape=(1,) * 9, raw=b"\0" * 4), "INVALID_ARGUMENT",
     "9 dimensions exceed max_ndim 8"),
    ("huge extent", _raw_request(shape=(1 << 30, 1 << 30), raw=b""), "INVALID_ARGUMENT", "more than 2^48 elements"),
    ("too many inputs", _many_inputs(5), "INVALID_ARGUMENT", "5 inputs exceed max_tensors 4"),
    ("raw count != inputs", _two_inputs_one_raw(), "INVALID_ARGUMENT",
     "raw_input_contents holds 1 entries for 2 inputs"),
    ("raw and typed mixed", _typed_and_raw(), "INVALID_ARGUMENT", "has typed contents while the request uses raw"),
    ("typed in the wrong field", _typed_request("addone", "FP32", [1, 3], "int_contents", [1, 2, 3]),
     "INVALID_ARGUMENT", "FP32 elements go in contents.fp32_contents, got contents.int_contents"),
    ("typed count != shape", _typed_request("addone", "FP32", [1, 3], "fp32_contents", [1, 2]),
     "INVALID_ARGUMENT", "shape [1, 3] needs 3 elements, contents.fp32_contents holds 2"),
    ("typed FP16", _typed_request("identity_FP16", "FP16", [1, 1], "fp32_contents", [1]),
     "INVALID_ARGUMENT", "FP16 has no typed contents field"),
    ("INT8 out of range", _typed_request("identity_INT8", "INT8", [1, 2], "int_contents", [1, 300]),
     "INVALID_ARGUMENT", "element 300 is outside INT8's range -128..127"),
    ("BYTES prefix past the end", _raw_request("upper", "BYTES", (1,), b"\x09\0\0\0abc", name="text"),
     "INVALID_ARGUMENT", "BYTES element 0 declares 9 bytes, only 3 remain"),
    ("BYTES trailing bytes", _raw_request("upper", "BYTES", (1,), b"\x01\0\0\0abc", name="text"),
     "INVALID_ARGUMENT", "2 bytes left after 1 BYTES elements"),
    ("BYTES count > prefixes", _raw_request("upper", "BYTES", (1 << 40,), b"\0" * 8, name="text"),
     "INVALID_ARGUMENT", "1099511627776 BYTES elements need at least"),
    ("input named twice", _raw_request(name="x").__class__(model_name="addone", inputs=[
        tpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 3])] * 2,
        raw_input_contents=[b"\0" * 12] * 2), "INVALID_ARGUMENT", "input 'x': named twice"),
    ("missing input", tpb.ModelInferRequest(model_name="addone"), "INVALID_ARGUMENT", "input 'x' is missing"),
    ("bad version", tpb.ModelInferRequest(model_name="addone", model_version="1.0"), "INVALID_ARGUMENT",
     "model version '1.0' is not a non-negative integer"),
    ("unknown model", _raw_request(model="nope"), "NOT_FOUND", "model 'nope' is not in the repository"),
    ("model error", _raw_request(model="fail", shape=(3,)), "INTERNAL", "raised RuntimeError: this model always fails"),
    ("priority out of range", _with_param("priority", uint64_param=99), "INVALID_ARGUMENT",
     "field 'priority' must be an integer 0..15, got 99"),
    ("string timeout", _with_param("timeout", string_param="5"), "INVALID_ARGUMENT",
     "parameter 'timeout' must be an integer (int64_param or uint64_param), got string_param"),
    ("zero timeout", _with_param("timeout", int64_param=0), "INVALID_ARGUMENT",
     "parameter 'timeout' must be > 0 microseconds, got 0"),
]


def test_malformed_requests_each_get_their_status_while_others_are_served():
    s = Served(core_kw={"limits": wire.Limits(max_tensors=4)})
    try:
        stub = s.stub()
        done: list = []
        s.client.async_infer("gate", [infer_input("x", np.array([5.0], np.float32))],
                             lambda result, error: done.append((result, error)), client_timeout=TIMEOUT)
        for what, req, status, fragment in MALFORMED:
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelInfer(req, timeout=TIMEOUT)
            assert ei.value.code().name == status, (what, ei.value.details())
            assert fragment in ei.value.details(), (what, ei.value.details())
            # another client is served after each refusal
            r = s.client.infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))], client_timeout=TIMEOUT)
            np.testing.assert_array_equal(r.as_numpy("y"), np.ones((1, 3), np.float32))
        assert not done  # the gated request is still in flight, unharmed
        s.core.gate.set()
        result, error = _wait_for(done)
        assert error is None and result.as_numpy("y").tolist() == [5.0]
    finally:
        s.close()


def _wait_for(box: list, timeout: float = TIMEOUT):
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if box:
            return box[0]
        ev.wait(0.01)
    raise AssertionError("no completion")


def test_oversized_messages_are_refused():
    s = Served(fe_kw={"max_message_bytes": 160})
    try:
        ok = s.client.infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))], client_timeout=TIMEOUT)
        assert ok.as_numpy("y").shape == (1, 3)
        # a request over the limit: gRPC refuses it before reading it; the core never sees it
        req = _raw_request(model="identity_UINT8", datatype="UINT8", shape=(1, 5000), raw=b"\0" * 5000)
        code, msg = refused(s.stub().ModelInfer, req, timeout=TIMEOUT)
        assert code == "RESOURCE_EXHAUSTED" and "larger than max" in msg and "160" in msg, msg
        assert not [c for c in s.core.infer_calls if c[0] == "identity_UINT8"]
        # a request that fits whose reply does not (y and z: 192 bytes of outputs)
        code, msg = refused(s.client.infer, "addone", [infer_input("x", np.zeros((8, 3), np.float32))],
                            client_timeout=TIMEOUT)
        assert (code, msg) == ("RESOURCE_EXHAUSTED", "reply outputs of at least 192 bytes exceed max_message_bytes 160")
        ok = s.client.infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))], client_timeout=TIMEOUT)
        assert ok.as_numpy("z").shape == (1, 3)
    finally:
        s.close()


# --- statistics and the model repository ------------------------------------------------------------------
def test_statistics(srv):
    c = srv.client
    for n in (1, 2, 2):
        c.infer("addone", [infer_input("x", np.zeros((n, 3), np.float32))], client_timeout=TIMEOUT)
    refused(c.infer, "fail", [infer_input("x", np.zeros(2, np.float32))])
    st = c.get_inference_statistics("addone", as_json=True)["model_stats"]
    assert [(m["name"], m["version"]) for m in st] == [("addone", "1"), ("addone", "2")]
    one = srv.core.statistics("addone", 1)[0]
    m = st[0]
    assert m["inference_count"] == "3" and m["execution_count"] == "3"
    assert int(m["last_inference"]) == one["last_inference_ms"] > 0
    inf = m["inference_stats"]
    assert inf["success"] == {"count": "3", "ns": str(one["total_sum_us"] * 1000)}
    assert inf["queue"]["ns"] == str(one["queue_sum_us"] * 1000)
    assert inf["compute_infer"]["ns"] == str(one["compute_sum_us"] * 1000)
    # the three compute counts agree (perf_analyzer refuses statistics where they do not)
    assert inf["compute_input"] == inf["compute_output"] == {"count": "3"}
    assert [(b["batch_size"], b["compute_input"]["count"], b["compute_infer"]["count"], b["compute_output"]["count"])
            for b in m["batch_stats"]] == [("1", "1", "1", "1"), ("2", "2", "2", "2")]
    fail = c.get_inference_statistics("fail", "1", as_json=True)["model_stats"][0]
    assert fail["inference_stats"]["fail"] == {"count": "1"} and fail["inference_stats"]["success"] == {}
    every = c.get_inference_statistics(as_json=True)["model_stats"]
    assert {"addone", "fail", "upper"} <= {m["name"] for m in every}
    assert refused(c.get_inference_statistics, "nope")[0] == "NOT_FOUND"


def test_repository_index_load_unload(srv):
    c = srv.client
    index = c.get_model_repository_index(as_json=True)["models"]
    assert {"name": "addone", "version": "2", "state": "UNLOADED"} in index
    assert {"name": "addone", "version": "1", "state": "READY"} in index
    c.load_model("addone")
    assert c.is_model_ready("addone", "2")
    r = c.infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))], model_version="2", client_timeout=TIMEOUT)
    assert r.get_response().model_version == "2"
    c.unload_model("addone")
    assert not c.is_model_ready("addone")
    code, msg = refused(c.infer, "addone", [infer_input("x", np.zeros((1, 3), np.float32))])
    assert code == "UNAVAILABLE" and "has no READY version" in msg
    code, msg = refused(c.load_model, "broken")
    assert code == "INTERNAL" and "weights do not fit the program" in msg
    broken = [m for m in c.get_model_repository_index(as_json=True)["models"] if m["name"] == "broken"]
    assert broken == [{"name": "broken", "version": "1", "state": "FAILED",
                       "reason": "model 'broken' version 1: weights do not fit the program (fake)"}]
    ready = srv.stub().RepositoryIndex(tpb.RepositoryIndexRequest(ready=True), timeout=TIMEOUT).models
    assert ready and all(m.state == "READY" for m in ready) and "addone" not in {m.name for m in ready}
    code, msg = refused(c.load_model, "addone", config='{"max_batch_size": 2}')
    assert code == "INVALID_ARGUMENT" and "load parameter 'config' is not supported" in msg
    assert refused(c.load_model, "nope")[0] == "NOT_FOUND"
    code, msg = refused(srv.stub().RepositoryIndex, tpb.RepositoryIndexRequest(repository_name="other"))
    assert code == "INVALID_ARGUMENT" and "serves one repository" in msg
    c.unload_model("upper", unload_dependents=True)
    assert not c.is_model_ready("upper")


# --- auth, TLS, limits on requests in flight, cancellation ----------------------------------------------
def test_token_is_required_on_every_rpc():
    s = Served(core_kw={"token": b"s3cret"})
    try:
        c = s.client
        for fn, args in ((c.is_server_live, ()), (c.get_server_metadata, ()), (c.get_model_metadata, ("addone",)),
                         (c.get_model_repository_index, ()), (c.get_inference_statistics, ()),
                         (c.infer, ("addone", [infer_input("x", np.zeros((1, 3), np.float32))]))):
            code, msg = refused(fn, *args)
            assert code == "UNAUTHENTICATED" and "authorization: Bearer <token>" in msg
            assert refused(fn, *args, headers={"authorization": "Bearer wrong"})[0] == "UNAUTHENTICATED"
            fn(*args, headers={"authorization": "Bearer s3cret"})
        assert not s.core.infer_calls[:-1]  # only the authorized infer reached the core
        box: list = []
        c.start_stream(lambda result, error: box.append(error))
        try:  # the server ends the stream at once: the client may notice before this request is queued
            c.async_stream_infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))])
        except InferenceServerException as exc:
            assert "no longer in valid state" in exc.message()
        err = _wait_for(box)
        assert "UNAUTHENTICATED" in str(err.status()) and "authorization" in err.message()
        c.stop_stream()
    finally:
        s.close()


def test_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    s = Served(ssl=(str(cert), str(key)))
    try:
        c = tc.InferenceServerClient(s.url, ssl=True, root_certificates=str(cert))
        r = c.infer("addone", [infer_input("x", np.ones((1, 3), np.float32))], client_timeout=TIMEOUT)
        assert r.as_numpy("y").tolist() == [[2, 2, 2]]
        c.close()
        plain = tc.InferenceServerClient(s.url)
        code, _ = refused(plain.is_server_live, client_timeout=5)
        assert code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        plain.close()
    finally:
        s.close()
    with pytest.raises(Exception, match="TLS certificate"):
        Served(ssl=(str(tmp_path / "missing.pem"), str(key)))


def test_in_flight_cap_and_a_cancelled_call():
    s = Served(core_kw={"workers": 1}, fe_kw={"max_in_flight": 1})
    try:
        c = s.client
        box: list = []
        call = c.async_infer("gate", [infer_input("x", np.array([1.0], np.float32))],
                             lambda result, error: box.append(error), client_timeout=TIMEOUT)
        _wait_for(s.core.infer_calls)  # queued in the core (held at the gate)
        call.cancel()
        assert "CANCELLED" in str(_wait_for(box).status())
        # the call is gone; its request still occupies the core (gated): the front end's cap holds
        code, msg = refused(c.infer, "addone", [infer_input("x", np.zeros((1, 3), np.float32))])
        assert (code, msg) == ("RESOURCE_EXHAUSTED", "1 infer requests in flight on the gRPC front end reach max_in_flight 1")
        s.core.gate.set()  # the abandoned request completes and is discarded; its slot is released
        for _ in range(int(TIMEOUT / 0.01)):
            if s.lt.call(lambda: s.fe.in_flight) == 0:
                break
            threading.Event().wait(0.01)
        r = c.infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))], client_timeout=TIMEOUT)
        assert r.as_numpy("y").tolist() == [[1, 1, 1]]
        assert s.lt.call(lambda: s.fe.in_flight) == 0
    finally:
        s.close()


def test_a_parked_request_the_core_refuses_later_gets_its_error():
    """send_error (the core refusing a request it had parked behind an on-demand load) ends the unary
    call with that error's status and a stream's request with an error response; slots released."""
    s = Served()
    try:
        s.core.close()
        s.core = s.fe.core = core = ParkingCore()
        box: list = []
        s.client.async_infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))],
                             lambda result, error: box.append(error), client_timeout=TIMEOUT)
        for _ in range(int(TIMEOUT / 0.01)):
            if core.parked:
                break
            threading.Event().wait(0.01)
        assert s.lt.call(core.fail_parked, "MODEL_ERROR", "model 'addone' version 1 failed to load: boom") == 1
        err = _wait_for(box)
        assert "INTERNAL" in str(err.status()) and err.message() == "model 'addone' version 1 failed to load: boom"
        got: list = []
        s.client.start_stream(lambda result, error: got.append(error))
        s.client.async_stream_infer("addone", [infer_input("x", np.zeros((1, 3), np.float32))], request_id="p")
        for _ in range(int(TIMEOUT / 0.01)):
            if core.parked:
                break
            threading.Event().wait(0.01)
        s.lt.call(core.fail_parked, "UNAVAILABLE", "model 'addone' was unloaded", True)
        assert _wait_for(got).message() == "model 'addone' was unloaded"
        s.client.stop_stream()
        assert s.lt.call(lambda: s.fe.in_flight) == 0
    finally:
        s.close()


def test_concurrent_calls_cap():
    """At most max_concurrent_calls calls run at once (each holds a server thread): the next is refused
    RESOURCE_EXHAUSTED by gRPC, and served again once a call has ended."""
    s = Served(fe_kw={"max_concurrent_calls": 1})
    try:
        c = s.client
        box: list = []
        c.async_infer("gate", [infer_input("x", np.array([1.0], np.float32))],
                      lambda result, error: box.append((result, error)), client_timeout=TIMEOUT)
        _wait_for(s.core.infer_calls)  # the one call is held in the core
        code, msg = refused(c.get_model_metadata, "addone")
        assert code == "RESOURCE_EXHAUSTED" and "Concurrent RPC limit exceeded" in msg
        s.core.gate.set()
        result, error = _wait_for(box)
        assert error is None and result.as_numpy("y").tolist() == [1.0]
        for _ in range(int(TIMEOUT / 0.01)):  # the thread is back once the call's status is sent
            try:
                assert c.get_model_metadata("addone").name == "addone"
                break
            except InferenceServerException:
                threading.Event().wait(0.01)
        else:
            raise AssertionError("no call was served after the held one ended")
        with pytest.raises(Exception, match="max_concurrent_calls 0 must be >= 1"):
            GrpcFrontEnd(s.core, max_concurrent_calls=0)
    finally:
        s.close()


# --- streaming ---------------------------------------------------------------------------------------------
def test_stream_infer(srv):
    c = srv.client
    got: list = []
    c.start_stream(lambda result, error: got.append((result, error)))
    for i in range(5):
        c.async_stream_infer("addone", [infer_input("x", np.full((1, 3), i, np.float32))], request_id=f"r{i}",
                             enable_empty_final_response=(i == 4))
    c.async_stream_infer("nope", [infer_input("x", np.zeros((1, 3), np.float32))], request_id="bad")
    c.async_stream_infer("fail", [infer_input("x", np.zeros(2, np.float32))], request_id="f")
    for _ in range(int(TIMEOUT / 0.01)):
        if len(got) == 7:
            break
        threading.Event().wait(0.01)
    c.stop_stream()
    ok = {r.get_response().id: r for r, e in got if e is None}
    assert sorted(ok) == [f"r{i}" for i in range(5)]
    for i in range(5):
        assert ok[f"r{i}"].as_numpy("y").tolist() == [[i + 1] * 3]
    assert ok["r4"].get_response().parameters["triton_final_response"].bool_param
    assert "triton_final_response" not in ok["r0"].get_response().parameters
    errs = sorted(e.message() for r, e in got if e is not None)
    assert errs == ["model 'fail' version 1 raised RuntimeError: this model always fails",
                    "model 'nope' is not in the repository"]
    assert srv.lt.call(lambda: srv.fe.in_flight) == 0


def test_a_message_that_does_not_parse(srv):
    ch = grpc.insecure_channel(srv.url)
    try:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as ei:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=TIMEOUT)  # field 1 declaring 4 GiB of string
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("the request is not a valid inference.ModelInferRequest message (6 bytes)")
    finally:
        ch.close()
    assert srv.client.is_server_live()
    # an RPC tinyserve does not serve (shared memory): gRPC's UNIMPLEMENTED, the server serving on
    assert refused(srv.stub().SystemSharedMemoryStatus, tpb.SystemSharedMemoryStatusRequest())[0] == "UNIMPLEMENTED"
    assert srv.client.get_model_config("addone").config.name == "addone"


def test_stream_window_holds_back_a_client_that_sends_without_reading(srv, monkeypatch):
    import tinyserve.frontends.grpc as g

    monkeypatch.setattr(g, "STREAM_WINDOW", 2)
    sent: list = []

    def requests():
        for i in range(6):
            sent.append(i)
            r = tpb.ModelInferRequest(model_name="gate", id=str(i))
            r.inputs.add(name="x", datatype="FP32", shape=[1])
            r.raw_input_contents.append(np.float32(i).tobytes())
            yield r

    responses = srv.stub().ModelStreamInfer(requests(), timeout=TIMEOUT)
    _wait_for(srv.core.infer_calls)
    for _ in range(50):  # the server reads no further than its window while the first two are held
        threading.Event().wait(0.01)
    assert len(srv.core.infer_calls) == 2
    srv.core.gate.set()
    ids = sorted(r.infer_response.id for r in responses)
    assert ids == [str(i) for i in range(6)] and len(srv.core.infer_calls) == 6


class _HeldCore(FakeCore):
    """Runs requests in the worker but holds their deliveries until `release()` sends them all in one
    loop tick (as the real core's batched completions do)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.held: list = []
        self.ran = threading.Semaphore(0)

    def _run(self, m, req, loop) -> None:
        class _Loop:  # catches the fake's call_soon_threadsafe(self._deliver, req)
            def call_soon_threadsafe(_, fn, arg):
                self.held.append(arg)
                self.ran.release()

        super()._run(m, req, _Loop())

    def release(self) -> None:
        for req in self.held:
            self._deliver(req)
        self.held.clear()


def test_stream_replies_completing_in_one_tick_are_all_sent():
    s = Served()
    try:
        s.core.close()
        s.core = core = _HeldCore()
        s.fe.core = core
        n = 4

        def requests():
            for i in range(n):
                r = tpb.ModelInferRequest(model_name="addone", id=str(i))
                r.inputs.add(name="x", datatype="FP32", shape=[1, 3])
                r.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
                yield r

        responses = s.stub().ModelStreamInfer(requests(), timeout=TIMEOUT)
        for _ in range(n):
            assert core.ran.acquire(timeout=TIMEOUT)
        s.lt.call(core.release)  # every reply is queued before the stream's loop looks again
        assert sorted(r.infer_response.id for r in responses) == [str(i) for i in range(n)]
    finally:
        s.close()
