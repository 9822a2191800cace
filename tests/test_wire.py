"""wire.py: frames and tensors encode/decode (hypothesis round trips) and every frame-level bad input."""

import struct

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tinyserve import errors, wire

pytestmark = pytest.mark.timeout(60)

LIM = wire.Limits()
NUMERIC = [d for d in wire.WIRE_DTYPES if d != "bytes" and d not in wire.TORCH_ONLY_DTYPES]
TORCH_ONLY = sorted(wire.TORCH_ONLY_DTYPES)


def frames_of(data: bytes, limits=LIM):
    return list(wire.iter_frames(data, limits))


def raw_frame(header_bytes: bytes, payload: bytes = b"", body_len: int | None = None, header_len: int | None = None) -> bytes:
    """A frame built by hand (so tests can break any field)."""
    off = wire.align8(8 + len(header_bytes))
    body = header_bytes + bytes(off - 8 - len(header_bytes)) + payload
    body += bytes(wire.align8(8 + len(body)) - 8 - len(body))
    bl = 4 + len(body) if body_len is None else body_len
    hl = len(header_bytes) if header_len is None else header_len
    return struct.pack("<II", bl, hl) + body


# --- the worked example of docs/protocol.md section 7 ------------------------------------------------
def test_worked_example_ping_bytes():
    data = wire.encode_bytes({"id": 1, "op": "ping"})
    assert data.hex(" ") == "14 00 00 00 0d 00 00 00 82 a2 69 64 01 a2 6f 70 a4 70 69 6e 67 00 00 00"
    [(header, payload)] = frames_of(data)
    assert header == {"id": 1, "op": "ping"} and payload.nbytes == 0


# --- round trips ------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=20)
headers = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def tensors(draw):
    out = {}
    for i in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(NUMERIC + ["bytes"] + TORCH_ONLY))
        if kind == "bytes":
            out[f"t{i}"] = draw(st.lists(st.binary(max_size=20), max_size=5))
        elif kind in TORCH_ONLY:
            shape = draw(shapes)
            out[f"t{i}"] = torch.randn(shape).to(getattr(torch, kind))
        else:
            shape = draw(shapes)
            n = int(np.prod(shape)) if shape else 1
            raw = draw(st.binary(min_size=n * np.dtype(wire.NUMPY_DTYPES[kind]).itemsize,
                                 max_size=n * np.dtype(wire.NUMPY_DTYPES[kind]).itemsize))
            arr = np.frombuffer(raw, dtype=wire.NUMPY_DTYPES[kind]).reshape(shape)
            if kind == "bool":
                arr = arr.astype(bool)
            out[f"t{i}"] = arr
    return out


@given(headers, tensors())
def test_frame_round_trip(header, named):
    descs, views = wire.tensor_parts(named)
    header = dict(header, tensors=descs)
    parts = wire.encode_frame(header, views)
    data = b"".join(bytes(p) for p in parts)
    assert len(data) % 8 == 0
    [(got, payload)] = frames_of(data)
    assert got == header
    split = wire.split_tensors(got["tensors"], payload, LIM)
    assert list(split) == list(named)
    for name, value in named.items():
        dtype, shape, view = split[name]
        arr = wire.to_array(dtype, shape, view)
        if isinstance(value, list):
            assert arr == value
        elif isinstance(value, torch.Tensor):
            bits = torch.int16 if value.element_size() == 2 else torch.uint8
            assert arr.dtype == value.dtype and torch.equal(arr.view(bits), value.view(bits))
        else:
            assert arr.dtype == value.dtype and arr.shape == value.shape
            assert arr.tobytes() == np.ascontiguousarray(value).tobytes()


@given(st.lists(st.tuples(headers, tensors()), min_size=1, max_size=4))
def test_back_to_back_frames_keep_payloads_aligned(items):
    data = b""
    for header, named in items:
        descs, views = wire.tensor_parts(named)
        data += wire.encode_bytes(dict(header, tensors=descs), views)
    buf = bytearray(len(data) + 8)
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    off = -addr % 8
    buf[off:off + len(data)] = data
    mv = memoryview(buf)[off:off + len(data)]
    got = list(wire.iter_frames(mv))
    assert len(got) == len(items)
    for (header, named), (h, payload) in zip(items, got):
        split = wire.split_tensors(h["tensors"], payload, LIM)
        for dtype, shape, view in split.values():
            if view.nbytes:
                assert np.frombuffer(view, np.uint8).ctypes.data % 8 == 0


def test_tensor_parts_accepts_numpy_torch_and_strings():
    descs, views = wire.tensor_parts({
        "a": np.arange(6, dtype=np.int64).reshape(2, 3),
        "b": torch.arange(4, dtype=torch.float32)[::2],  # non-contiguous
        "c": ["héllo", b"\x00\xff"],
        "d": np.arange(3, dtype=">i4"),  # big-endian numpy -> little-endian on the wire
        "e": torch.ones(2, 2, dtype=torch.bfloat16),
    })
    assert [d["dtype"] for d in descs] == ["int64", "float32", "bytes", "int32", "bfloat16"]
    assert descs[1]["shape"] == [2] and bytes(views[1]) == np.array([0, 2], np.float32).tobytes()
    assert bytes(views[3]) == np.arange(3, dtype="<i4").tobytes()
    assert wire.split_bytes(views[2], 2) == ["héllo".encode(), b"\x00\xff"]


def test_unsendable_dtypes():
    with pytest.raises(wire.InvalidInput, match="complex"):
        wire.tensor_parts({"z": np.zeros(2, np.complex64)})
    with pytest.raises(wire.InvalidInput, match="complex"):
        wire.tensor_parts({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_travels_as_its_raw_codes(dtype):
    """Issue 12.6: float8 (allowed by the format and the config) is carried on the wire as the raw
    1-byte codes; the receiver gets a torch tensor with the same bits."""
    t = torch.tensor([[1.0, -2.0, 0.5], [448.0 if dtype.endswith("fn") else 57344.0, 0.0, -0.0]]).to(getattr(torch, dtype))
    [d], [view] = wire.tensor_parts({"q": t})
    assert d == {"name": "q", "dtype": dtype, "shape": [2, 3], "nbytes": 6}
    assert bytes(view) == t.view(torch.uint8).numpy().tobytes()
    [(h, payload)] = frames_of(wire.encode_bytes({"outputs": [d]}, [view]))
    got = wire.to_array(*wire.split_tensors(h["outputs"], payload, LIM)["q"])
    assert isinstance(got, torch.Tensor) and got.dtype == t.dtype
    assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def test_frame_size_with_offset():
    data = bytes(8) + wire.encode_bytes({"id": 3, "op": "ping"})
    total, hlen = wire.frame_size(data, LIM, 8)
    assert total == len(data) - 8 and hlen == 13


def test_encode_frame_first_part_holds_prefix_and_header():
    parts = wire.encode_frame({"id": 1}, [memoryview(b"abc")])
    assert len(parts) == 3 and len(parts[0]) % 8 == 0 and bytes(parts[1]) == b"abc" and parts[2] == bytes(5)


# --- frame-level bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("body_len, header_len, error, match", [
    (0xFFFFFFFF, 8, wire.FrameTooLarge, "max_frame_bytes"),  # near 2^32
    ((256 << 20) - 3, 8, wire.FrameTooLarge, "max_frame_bytes"),  # one byte (after 4) over the limit
    (20, (1 << 20) + 1, wire.FrameTooLarge, "max_header_bytes"),
    (20, 0xFFFFFFFF, wire.FrameTooLarge, "max_header_bytes"),
    (21, 13, wire.BadFrame, "multiple of 8"),
    (19, 13, wire.BadFrame, "multiple of 8"),
    (12, 13, wire.BadFrame, "does not fit"),
    (4, 1, wire.BadFrame, "does not fit"),
    (0, 0, wire.BadFrame, "multiple of 8"),
])
def test_bad_lengths_are_refused_before_allocation(body_len, header_len, error, match):
    prefix = struct.pack("<II", body_len, header_len)
    with pytest.raises(error, match=match):
        wire.frame_size(prefix, LIM)
    assert error.fatal


def test_limit_boundaries():
    lim = wire.Limits(max_frame_bytes=64, max_header_bytes=16)
    assert wire.frame_size(struct.pack("<II", 60, 16), lim) == (64, 16)
    with pytest.raises(wire.FrameTooLarge):
        wire.frame_size(struct.pack("<II", 68, 16), lim)
    with pytest.raises(wire.FrameTooLarge):
        wire.frame_size(struct.pack("<II", 60, 17), lim)


@pytest.mark.parametrize("head, match", [
    (b"\xc1", "not valid msgpack"),  # a reserved msgpack byte
    (b"\x82\xa2id", "not valid msgpack"),  # truncated map
    (b"\x93\x01\x02\x03", "list, not a map"),
    (b"\x2a", "int, not a map"),
    (b"\xa3abc", "str, not a map"),
    (msgpack.packb({1: 2}), "map key is not a string"),  # non-string key
    (msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack"),  # trailing bytes inside header_len
    (b"", "not valid msgpack"),
])
def test_bad_headers(head, match):
    data = raw_frame(head)
    with pytest.raises(wire.BadFrame, match=match):
        frames_of(data)


def test_truncated_streams():
    data = wire.encode_bytes({"id": 1, "op": "ping"})
    for k in range(1, len(data)):
        with pytest.raises(wire.BadFrame, match="truncated"):
            frames_of(data[:k])


def desc(name="x", dtype="float32", shape=(2,), nbytes=8):
    return {"name": name, "dtype": dtype, "shape": list(shape), "nbytes": nbytes}


@pytest.mark.parametrize("descs, payload, error, match", [
    ("nope", b"", wire.BadRequest, "list of descriptors"),
    ([desc()] * 300, b"", wire.BadRequest, "max_tensors"),
    ([5], b"", wire.BadRequest, "not a map"),
    ([{"dtype": "float32", "shape": [], "nbytes": 4}], b"", wire.BadRequest, "name"),
    ([desc(name="")], bytes(8), wire.BadRequest, "name"),
    ([desc(), desc()], bytes(16), wire.BadRequest, "named twice"),
    ([desc(dtype="complex64")], bytes(8), wire.InvalidInput, "unknown dtype"),
    ([desc(dtype=None)], bytes(8), wire.BadRequest, "dtype must be a string"),
    ([{"name": "x", "shape": [2], "nbytes": 8}], bytes(8), wire.BadRequest, "dtype must be a string"),
    ([desc(dtype=b"float32")], bytes(8), wire.BadRequest, "dtype must be a string"),
    ([desc(dtype="float8_e4m3fn", nbytes=3)], bytes(8), wire.InvalidInput, "nbytes is 3 but float8_e4m3fn"),
    ([{"name": "x", "dtype": "float32", "nbytes": 8}], bytes(8), wire.BadRequest, "shape must be a list"),
    ([{"name": "x", "dtype": "float32", "shape": [2]}], bytes(8), wire.BadRequest, "nbytes must be"),
    ([desc(nbytes=-8)], bytes(8), wire.BadRequest, "nbytes"),
    ([desc(nbytes=True)], bytes(8), wire.BadRequest, "nbytes"),
    ([desc(nbytes="8")], bytes(8), wire.BadRequest, "nbytes"),
    ([dict(desc(), shape="2")], bytes(8), wire.BadRequest, "shape"),
    ([desc(shape=[1] * 9, nbytes=4)], bytes(8), wire.BadRequest, "shape"),
    ([desc(shape=[-1], nbytes=4)], bytes(8), wire.BadRequest, "outside"),
    ([desc(shape=[True], nbytes=4)], bytes(8), wire.BadRequest, "outside"),
    ([desc(shape=[2**49], nbytes=4)], bytes(8), wire.BadRequest, "outside"),
    ([desc(shape=[2, 384], nbytes=3000)], bytes(3000), wire.InvalidInput, "nbytes is 3000 but float32 \\[2, 384\\] needs 3072"),
    ([desc(shape=[2**40, 2**40], nbytes=0)], b"", wire.BadRequest, "extent"),
    ([desc(shape=[0, 2**31, 2**32], nbytes=0)], b"", wire.BadRequest, "extent .* over 2\\^48"),
    ([desc(shape=[2**48 + 1], nbytes=4)], bytes(8), wire.BadRequest, "outside 0..2\\^48"),
    ([desc(dtype="bytes", shape=[3], nbytes=8)], bytes(8), wire.InvalidInput, "tensor 'x': 3 bytes items need"),
    ([desc(dtype="bytes", shape=[1], nbytes=8)], b"\x09\x00\x00\x00abcd", wire.InvalidInput, "tensor 'x': item 0 declares 9"),
    ([desc(dtype="bytes", shape=[2], nbytes=8)], b"\x03\x00\x00\x00abcd", wire.InvalidInput, "tensor 'x': item 1: its u32"),
    ([desc(dtype="bytes", shape=[1], nbytes=8)], b"\x02\x00\x00\x00abcd", wire.InvalidInput, "tensor 'x': 2 bytes left after its 1 items"),
    ([desc()], bytes(4), wire.InvalidInput, "payload holds 4"),
    ([desc()], bytes(16), wire.InvalidInput, "descriptors account for 8"),
    ([desc(dtype="bytes", shape=[1, 1], nbytes=4)], bytes(8), wire.InvalidInput, "1-D"),
])
def test_bad_tensor_descriptors(descs, payload, error, match):
    with pytest.raises(error, match=match):
        wire.split_tensors(descs, memoryview(payload), LIM)


def test_extent_bound_allows_empty_tensors_with_huge_dimensions():
    [(dtype, shape, view)] = wire.split_tensors([desc(shape=[0, 2**48], nbytes=0)], memoryview(b""), LIM).values()
    assert wire.to_array(dtype, shape, view, torch=True).shape == (0, 2**48)


def test_bad_bytes_tensors():
    with pytest.raises(wire.InvalidInput, match="runs past"):
        wire.split_bytes(memoryview(b"\x01\x00"), 1)
    with pytest.raises(wire.InvalidInput, match="declares 9 bytes"):
        wire.split_bytes(memoryview(b"\x09\x00\x00\x00abc"), 1)
    with pytest.raises(wire.InvalidInput, match="left after"):
        wire.split_bytes(memoryview(b"\x01\x00\x00\x00ab"), 1)


def test_zero_size_tensors():
    descs, views = wire.tensor_parts({"e": np.zeros((0, 3), np.float32), "b": torch.zeros(0, dtype=torch.bfloat16)})
    data = wire.encode_bytes({"t": descs}, views)
    [(h, payload)] = frames_of(data)
    split = wire.split_tensors(h["t"], payload, LIM)
    assert wire.to_array(*split["e"]).shape == (0, 3)
    assert wire.to_array(*split["b"]).shape == (0,)


def test_error_codes_table():
    assert {c.code for c in (wire.BadFrame, wire.FrameTooLarge, wire.Unauthenticated)} == {
        "BAD_FRAME", "FRAME_TOO_LARGE", "UNAUTHENTICATED"}
    assert all(wire.WIRE_ERRORS[c].fatal for c in ("BAD_FRAME", "FRAME_TOO_LARGE", "UNAUTHENTICATED"))
    assert not any(getattr(wire.WIRE_ERRORS[c], "fatal", False) for c in
                   ("BAD_REQUEST", "DUPLICATE_ID", "INVALID_INPUT", "UNAVAILABLE", "TOO_MANY_REQUESTS",
                    "DEADLINE_EXCEEDED", "SHUTTING_DOWN", "QUEUE_FULL", "RESOURCE_EXHAUSTED"))
    assert set(wire.WIRE_ERRORS) == {"QUEUE_FULL", "RESOURCE_EXHAUSTED","BAD_FRAME", "FRAME_TOO_LARGE", "UNAUTHENTICATED", "BAD_REQUEST",
                                     "DUPLICATE_ID", "INVALID_INPUT", "NOT_FOUND", "UNAVAILABLE",
                                     "TOO_MANY_REQUESTS", "DEADLINE_EXCEEDED", "MODEL_ERROR", "SHUTTING_DOWN",
                                     "INTERNAL"}
    assert wire.wire_code(errors.ModelNotFoundError("x")) == "NOT_FOUND"
    assert wire.wire_code(errors.ModelError("x")) == "MODEL_ERROR"
    assert wire.wire_code(errors.InvalidNameError("x")) == "BAD_REQUEST"
    assert wire.wire_code(ValueError("x")) == "INTERNAL"
    assert isinstance(wire.error_from_reply("WHAT_IS_THIS", "m"), errors.TinyserveError)
    assert isinstance(wire.error_from_reply("DEADLINE_EXCEEDED", "m"), wire.DeadlineExceeded)
    [(h, _)] = frames_of(b"".join(wire.encode_error(7, "NOT_FOUND", "model 'x'")))
    assert h == {"id": 7, "ok": False, "error": {"code": "NOT_FOUND", "message": "model 'x'"}}


def test_shown_cuts_long_items():
    assert wire.shown("a" * 1000).endswith("...") and len(wire.shown("a" * 1000)) == 64
    assert wire.shown("op") == "'op'"


def test_protocol_md_worked_examples_are_exact():
    """docs/protocol.md section 7 shows these frames byte for byte."""
    import re
    from pathlib import Path

    import numpy as np

    from tinyserve import wire as W

    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"```\n([0-9a-f ]{2}[^`]*?)```", text.split("## 7. Worked example", 1)[1])
    def hexbytes(block):  # the hex of each line, without the annotation after 5 spaces
        return bytes.fromhex(" ".join(line.split("     ")[0] for line in block.strip().splitlines()))
    ping = W.encode_bytes({"id": 1, "op": "ping"})
    descs, views = W.tensor_parts({"x": np.array([[1.0, 2.0, 3.0]], dtype=np.float32)})
    infer = W.encode_bytes({"id": 2, "op": "infer", "model": "m", "inputs": descs}, views)
    assert [hexbytes(b) for b in blocks] == [ping, infer]


def _frame_of(head) -> tuple[memoryview, int]:
    body = head if isinstance(head, bytes) else msgpack.packb(head, use_bin_type=True)
    hlen = len(body)
    total = wire.align8(wire.PREFIX_SIZE + hlen)
    return memoryview(bytearray(struct.pack("<II", total - 4, hlen) + body + bytes(total - 8 - hlen))), hlen


X = {"name": "x", "dtype": "float32", "shape": [2], "nbytes": 8}


@pytest.mark.parametrize("head, match, rid", [
    ({b"id": 1}, "map key b'id' is not a string", 0),
    ({"id": 1, b"op": "x"}, "b'op'", 1),
    ({1: 2, "id": 1}, "map key", 1),
    ({"id": 9, "op": "infer", "inputs": [{**X, b"name": "y"}]}, "map key b'name'", 9),  # nested, issue 12.3
    ({"id": 9, "op": "infer", "inputs": [{**X, 7: 1}]}, "map key", 9),
    ({"id": 9, "op": "infer", "extra": {"a": {None: 1}}}, "map key", 9),
    ({"id": 9, "op": "infer", "extra": [[{1.5: 1}]]}, "map key", 9),
    # the id after the bad key: still read (the bytes up to it are well-formed msgpack)
    ({"op": "infer", "inputs": [{**X, b"name": "y"}], "id": 12}, "map key b'name'", 12),
    ({"id": 0, 5: 5}, "map key", 0),  # not a valid id
    ({"id": "3", 5: 5}, "map key", 0),
    ({"id": 2**64 - 1, 5: 5}, "map key", 2**64 - 1),
])
def test_header_keys_must_be_strings_at_every_depth(head, match, rid):
    frame, hlen = _frame_of(head)
    with pytest.raises(wire.BadFrame, match=match) as info:
        wire.decode_header(frame, hlen)
    assert info.value.rid == rid


@pytest.mark.parametrize("raw, rid", [
    (msgpack.packb({"id": 5, "op": "ping"}) + b"\x01", 5),  # a valid map, then extra bytes
    (msgpack.packb({"id": 5, "op": "ping"})[:-2], 5),  # truncated after the id
    (msgpack.packb({"op": "ping", "id": 5})[:-1], 0),  # truncated inside the id
    (msgpack.packb([5, "ping"]), 0),  # not a map
    (b"\xc1\xc1", 0),
    (msgpack.packb({"id": 5, "op": "ping"})[:1] + b"\xc1", 0),
])
def test_bad_frame_carries_the_id_when_the_header_yields_it(raw, rid):
    """docs/protocol.md section 1: BAD_FRAME carries the request id if it could be read (issue 12.2)."""
    frame, hlen = _frame_of(raw)
    with pytest.raises(wire.BadFrame) as info:
        wire.decode_header(frame, hlen)
    assert info.value.rid == rid


def test_header_decoding_errors_name_the_exception_when_its_message_is_empty(monkeypatch):
    def boom(*a, **k):
        raise ValueError()
    monkeypatch.setattr(wire.msgpack, "unpackb", boom)
    frame = memoryview(bytearray(wire.encode_bytes({"id": 1})))
    with pytest.raises(wire.BadFrame, match="not valid msgpack: ValueError"):
        wire.decode_header(frame, 4)


def test_wire_code_is_the_one_mapping():
    assert wire.wire_code(errors.ConfigError("bad config")) == "MODEL_ERROR"
    assert wire.wire_code(errors.ModelError("m")) == "MODEL_ERROR"
    assert wire.wire_code(errors.InvalidNameError("n")) == "BAD_REQUEST"
    assert wire.wire_code(errors.ModelNotFoundError("n")) == "NOT_FOUND"
    assert wire.wire_code(wire.Unavailable("u")) == "UNAVAILABLE"
    assert wire.wire_code(errors.TinyserveError("t")) == "INTERNAL"


@pytest.mark.parametrize("dtype", [d for d in wire.WIRE_DTYPES if d != "bytes"])
def test_to_array_as_torch_views_the_bytes(dtype):
    t = torch.ones((2, 3), dtype=getattr(torch, dtype))
    [desc], [view] = wire.tensor_parts({"t": t})
    raw = bytearray(view.nbytes + wire.TENSOR_ALIGN)
    base = np.frombuffer(raw, np.uint8).ctypes.data
    start = -base % wire.TENSOR_ALIGN  # an aligned start: to_array views the bytes
    buf = memoryview(raw)[start:start + view.nbytes]
    buf[:] = view
    out = wire.to_array(dtype, (2, 3), buf, torch=True)
    assert isinstance(out, torch.Tensor) and out.dtype == t.dtype and torch.equal(out, t)
    assert out.data_ptr() == base + start  # no copy
    empty = wire.to_array(dtype, (0, 3), memoryview(b""), torch=True)
    assert empty.shape == (0, 3) and empty.dtype == t.dtype


@pytest.mark.parametrize("dtype", [d for d in wire.WIRE_DTYPES if d != "bytes"])
@pytest.mark.parametrize("shape", [(), (0, 3), (2, 3)])
def test_tensor_parts_torch_round_trip(dtype, shape):
    dt = getattr(torch, dtype)
    t = {(): torch.tensor(5).to(dt), (0, 3): torch.zeros((0, 3), dtype=dt),
         (2, 3): torch.arange(6).reshape(3, 2).t().to(dt)}[shape]  # (a non-contiguous one)
    [desc], [view] = wire.tensor_parts({"t": t})
    assert desc == {"name": "t", "dtype": dtype, "shape": list(shape), "nbytes": t.numel() * t.element_size()}
    out = wire.to_array(dtype, shape, memoryview(bytearray(view)), torch=True)
    assert torch.equal(out, t)
    with pytest.raises(wire.InvalidInput, match="cannot be sent"):
        wire.tensor_parts({"c": torch.zeros(2, dtype=torch.complex64)})


def test_to_array_hands_models_aligned_inputs():
    """CPU kernels round differently by the data's alignment (a float32 matmul differed by an ulp
    between 8- and 64-aligned inputs), so misaligned request bytes are copied to aligned memory and
    the same input always gives the same answer, whichever front end or frame offset it came from."""
    import torch

    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    buf = bytearray(x.nbytes + 128)
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    start = (64 - base % 64) % 64 + 8  # 8 bytes past a 64-byte boundary
    buf[start:start + x.nbytes] = x.tobytes()
    t = wire.to_array("float32", (3, 64), memoryview(buf)[start:start + x.nbytes], torch=True)
    assert t.data_ptr() % wire.TENSOR_ALIGN == 0
    assert torch.equal(t, torch.from_numpy(x))
    start = (64 - base % 64) % 64  # aligned: a zero-copy view
    buf[start:start + x.nbytes] = x.tobytes()
    view = memoryview(buf)[start:start + x.nbytes]
    t = wire.to_array("float32", (3, 64), view, torch=True)
    assert t.data_ptr() == base + start


def test_reply_encoder_bytes_equal_the_generic_reply():
    """wire.ReplyEncoder (the per-model infer reply template, issue 14) writes exactly the bytes of
    encode_frame({"id", "ok", "model", "version", "outputs"}, tensor_parts(outputs)) for every kind of
    output, and its tensor views share the outputs' memory."""
    import torch

    enc = wire.ReplyEncoder("mlp-ü", 7)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    cases = [
        {"y": torch.randn(1, 10)},
        {"y": torch.randn(3, 10), "idx": torch.arange(3), "ok": torch.tensor([True, False])},
        {"half": torch.randn(2, 3).half(), "bf": torch.randn(2, 3).bfloat16(), "i8": torch.ones(5, dtype=torch.int8)},
        {"strided": base.t(), "empty": torch.empty(0, 10), "scalar": torch.tensor(3.5)},
        {"np": np.arange(5, dtype=np.int32), "text": [b"ab", "c\u00e9"], "u8": torch.arange(3, dtype=torch.uint8)},
    ]
    for rid in (1, 200, 70000, (1 << 64) - 1):
        for outputs in cases:
            descs, views = wire.tensor_parts(outputs)
            want = wire.encode_bytes({"id": rid, "ok": True, "model": "mlp-ü", "version": 7, "outputs": descs}, views)
            got = b"".join(bytes(p) for p in enc.encode(rid, outputs))
            assert got == want, (rid, list(outputs))
            header, payload = next(wire.iter_frames(got))
            assert header["id"] == rid and header["model"] == "mlp-ü" and header["version"] == 7
    y = torch.randn(2, 4)
    parts = enc.encode(5, {"y": y})
    assert np.frombuffer(parts[1], dtype=np.float32).ctypes.data == y.data_ptr()  # no copy
