"""weights.py: the writer and the mapped reader, on both codec backends."""

import gc
import os
import struct

import numpy as np
import pytest
import torch

from tinyserve import _backend, errors
from tinyserve import weights as W
from tinyserve.spec import HEADER_SIZE, PAGE

BACKENDS = _backend.available()


@pytest.fixture(params=sorted(BACKENDS))
def core(request):
    return BACKENDS[request.param]


def sample_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(120, 70, generator=g) * 0.05,
        "bf16": (torch.randn(300, 50, generator=g) * 0.02).to(torch.bfloat16),
        "f16": torch.randn(513, generator=g).to(torch.float16),
        "f64": torch.randn(40, generator=g, dtype=torch.float64),
        "i64": torch.arange(1000),
        "i32": torch.randint(-3, 3, (4000,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-30000, 30000, (77,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (900,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (900,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(333, generator=g) > 0.3,
        "f8": torch.randn(400, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(400, generator=g).to(torch.float8_e5m2),
        "zeros": torch.zeros(2048),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 5),
        "big_raw": torch.randint(0, 255, (70_000,), generator=g, dtype=torch.uint8),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            == b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("compression", W.COMPRESSIONS)
def test_round_trip_every_dtype_bit_exact(tmp_path, core, compression):
    ts = sample_tensors()
    path = tmp_path / "w.tsw"
    summary = W.write_weights(path, ts, compression=compression, core=core, chunk_bytes=4096)
    assert summary.file_bytes == os.path.getsize(path)
    with W.WeightsFile(path, core=core) as wf:
        assert list(wf.tensors) == list(ts)  # file order is insertion order
        out = wf.load(verify="all")
    for name, t in ts.items():
        assert same_bits(out[name], t), name


def test_compression_modes_choose_encodings(tmp_path):
    ts = sample_tensors()
    s = W.write_weights(tmp_path / "a.tsw", ts, compression="none")
    assert {t.encoding for t in s.tensors} == {"raw"}
    s = W.write_weights(tmp_path / "b.tsw", ts, compression="auto")
    enc = {t.name: t.encoding for t in s.tensors}
    assert enc["bf16"] == "planes" and enc["f32"] == "planes" and enc["zeros"] == "planes"
    # random bytes don't compress: auto keeps them raw (mapped, no decode cost)
    assert enc["big_raw"] == "raw" and enc["u8"] == "raw"
    assert s.ratio > 1.1


def test_native_and_fallback_write_identical_files(tmp_path):
    if len(BACKENDS) < 2:
        pytest.fail("the native extension is not built; both backends must be tested")
    ts = sample_tensors(1)
    for compression in ("planes", "none", "auto"):
        a = W.write_weights(tmp_path / "n.tsw", ts, compression=compression, core=BACKENDS["native"])
        b = W.write_weights(tmp_path / "f.tsw", ts, compression=compression, core=BACKENDS["fallback"])
        if compression == "auto":  # auto sends integers through zstd: library versions may differ
            assert [t.encoding for t in a.tensors] == [t.encoding for t in b.tensors]
            continue
        assert (tmp_path / "n.tsw").read_bytes() == (tmp_path / "f.tsw").read_bytes(), compression


def test_big_raw_tensors_are_page_aligned_and_zero_copy(tmp_path):
    t = torch.randn(64, 1024)  # 256 KiB
    W.write_weights(tmp_path / "w.tsw", {"small": torch.ones(3), "t": t}, compression="none")
    wf = W.WeightsFile(tmp_path / "w.tsw")
    info = wf.tensors["t"]
    assert info.data_offset % PAGE == 0 and wf.tensors["small"].data_offset % 64 == 0
    out = wf.load()
    base = np.frombuffer(wf.mapping, dtype=np.uint8).ctypes.data
    assert out["t"].data_ptr() == base + info.data_offset  # a view of the mapping, not a copy
    assert torch.equal(out["t"], t)


def test_mapping_is_copy_on_write_and_outlives_the_file_object(tmp_path):
    path = tmp_path / "w.tsw"
    t = torch.arange(20000, dtype=torch.float32)
    W.write_weights(path, {"t": t}, compression="none")
    before = path.read_bytes()
    wf = W.WeightsFile(path)
    out = wf.load()["t"]
    wf.close()
    del wf
    gc.collect()
    out.add_(1.0)  # a model writing to its weights in place: no SIGSEGV, and the file is untouched
    assert torch.equal(out, t + 1)
    assert path.read_bytes() == before


def test_replacing_a_file_never_disturbs_a_live_mapping(tmp_path):
    path = tmp_path / "w.tsw"
    old = torch.arange(30000, dtype=torch.float32)
    W.write_weights(path, {"t": old}, compression="none")
    live = W.load_file(path)["t"]
    W.write_weights(path, {"t": old * 2}, compression="none")  # temp + rename, not in place
    assert torch.equal(live, old)
    assert torch.equal(W.load_file(path)["t"], old * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["w.tsw"]  # no temp file left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"t": torch.ones(10)})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(W.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="simulated"):
        W.write_weights(path, {"t": torch.zeros(10)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.tsw"]


def flip(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_verification_settings(tmp_path, core):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"raw": torch.randint(0, 255, (5000,), dtype=torch.uint8),
                           "packed": torch.randn(5000) * 0.01}, compression="auto", core=core)
    wf = W.WeightsFile(path, core=core)
    raw, packed = wf.tensors["raw"], wf.tensors["packed"]
    assert raw.encoding == "raw" and packed.encoding == "planes"
    wf.load(verify="all")
    assert wf.last_load.verified_raw and wf.last_load.raw_bytes == 5000
    flip(path, raw.data_offset + 100)
    # raw chunks are only hashed on request (a full pass); the mapped bytes are what they are
    W.WeightsFile(path, core=core).load(verify="compressed")
    with pytest.raises(errors.ChecksumError, match="'raw' chunk 0"):
        W.WeightsFile(path, core=core).load(verify="all")
    with pytest.raises(errors.ChecksumError, match="'raw' chunk 0"):
        W.verify_file(path, core=core)
    flip(path, raw.data_offset + 100)  # repair
    flip(path, packed.data_offset + 7)
    with pytest.raises(errors.ChecksumError, match="'packed' chunk 0"):
        W.WeightsFile(path, core=core).load(verify="compressed")
    # with verification off a damaged compressed chunk may decode to garbage or fail to decode,
    # but never crashes or writes out of bounds
    try:
        W.WeightsFile(path, core=core).load(verify="none")
    except errors.FormatError:
        pass


def test_padding_must_be_zero(tmp_path):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"a": torch.ones(3), "b": torch.ones(100_000)}, compression="none")
    wf = W.WeightsFile(path)
    a, b = wf.tensors["a"], wf.tensors["b"]
    gap = a.data_offset + a.data_size
    assert b.data_offset > gap  # b is page-aligned: there is padding to damage
    flip(path, gap + 1)
    W.load_file(path)  # loading doesn't read padding
    with pytest.raises(errors.LayoutError, match="padding"):
        W.verify_file(path)


def test_file_size_must_match_header(tmp_path):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"a": torch.ones(1000)})
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(errors.TruncatedError, match="declares"):
        W.WeightsFile(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(errors.LayoutError, match="declares"):
        W.WeightsFile(path)


def test_empty_file(tmp_path, core):
    path = tmp_path / "w.tsw"
    s = W.write_weights(path, {}, core=core)
    assert s.file_bytes == PAGE == os.path.getsize(path)
    assert W.load_file(path, core=core) == {}
    W.verify_file(path, core=core)


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 1025])
def test_bad_tensor_names_are_refused(tmp_path, name):
    with pytest.raises(errors.FormatError, match="tensor name"):
        W.write_weights(tmp_path / "w.tsw", {name: torch.ones(1)})


def test_options_are_validated(tmp_path):
    with pytest.raises(errors.ConfigError, match="compression"):
        W.write_weights(tmp_path / "w.tsw", {"a": torch.ones(1)}, compression="lz4")
    with pytest.raises(errors.ConfigError, match="level"):
        W.write_weights(tmp_path / "w.tsw", {"a": torch.ones(1000)}, level=30)
    W.write_weights(tmp_path / "w.tsw", {"a": torch.ones(1000)})
    with pytest.raises(errors.ConfigError, match="verify"):
        W.WeightsFile(tmp_path / "w.tsw").load(verify="sometimes")
    with pytest.raises(KeyError, match="nope"):
        W.WeightsFile(tmp_path / "w.tsw").load(["nope"])


def test_wrong_destination_is_refused(tmp_path, core):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"a": torch.randn(1000) * 0.1}, compression="planes", core=core)
    wf = W.WeightsFile(path, core=core)
    info = wf.tensors["a"]
    with pytest.raises(errors.DestinationError, match="'a'"):
        core.decode_into(wf.mapping, [(info, np.empty(info.nbytes - 4, np.uint8))], True, 1)
    with pytest.raises(errors.DestinationError):
        core.decode_into(wf.mapping, [(info, bytes(info.nbytes))], True, 1)  # read-only


def test_stream_decoding_as_bytes_arrive(tmp_path, core):
    """The index comes first and chunks are in ascending order: a reader that has only a prefix of
    the file can decode every chunk that prefix holds (what remote loading relies on)."""
    path = tmp_path / "w.tsw"
    ts = {"a": torch.randn(40_000) * 0.02, "b": (torch.randn(30_000) * 0.02).to(torch.bfloat16)}
    W.write_weights(path, ts, compression="planes", chunk_bytes=16384, core=core)
    data = path.read_bytes()
    header = core.parse_header(data[:HEADER_SIZE])
    infos = core.parse_index(header, data[HEADER_SIZE:HEADER_SIZE + header.index_size])
    out = {t.name: np.zeros(t.nbytes, np.uint8) for t in infos}
    decoded = set()
    for arrived in [*range(header.data_offset, len(data), 10_000), len(data)]:
        window_start = header.data_offset
        window = data[window_start:arrived]
        for t in infos:
            for k, c in enumerate(t.chunks):
                if (t.name, k) in decoded or c.offset + c.size > arrived:
                    continue
                one = t._replace(chunks=(c,), shape=(min(t.chunk_elems, t.numel - k * t.chunk_elems),))
                isz = t.nbytes // t.numel
                dst = out[t.name][k * t.chunk_elems * isz:][:one.nbytes]
                core.decode_into(window, [(one, dst)], True, 1, base=window_start)
                decoded.add((t.name, k))
    assert len(decoded) == sum(len(t.chunks) for t in infos)
    for t in infos:
        assert out[t.name].tobytes() == ts[t.name].reshape(-1).view(torch.uint8).numpy().tobytes()


def test_chunk_outside_the_buffer_is_truncated(tmp_path, core):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"a": torch.randn(5000) * 0.02}, compression="planes", core=core)
    wf = W.WeightsFile(path, core=core)
    info = wf.tensors["a"]
    short = bytes(wf.mapping)[:info.data_offset + info.data_size - 1]
    with pytest.raises(errors.TruncatedError, match="'a' chunk 0"):
        core.decode_into(short, [(info, np.empty(info.nbytes, np.uint8))], True, 1)


def test_header_fields_as_specified(tmp_path):
    path = tmp_path / "w.tsw"
    W.write_weights(path, {"a": torch.ones(10)}, compression="none")
    data = path.read_bytes()
    magic, major, minor, count, index_size, data_offset, file_size = struct.unpack_from("<8sHHIQQQ", data)
    assert (magic, major, minor, count) == (b"TSWEIGHT", 1, 0, 1)
    assert data_offset == PAGE and file_size == len(data) and data_offset >= HEADER_SIZE + index_size
    assert data[HEADER_SIZE + index_size:data_offset] == bytes(data_offset - HEADER_SIZE - index_size)


def test_level_max_is_at_least_as_small_as_default(tmp_path):
    ts = {"w": (torch.randn(200_000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)}
    a = W.write_weights(tmp_path / "a.tsw", ts)
    b = W.write_weights(tmp_path / "b.tsw", ts, level="max")
    assert b.file_bytes <= a.file_bytes * 1.001
    assert torch.equal(W.load_file(tmp_path / "b.tsw")["w"], ts["w"])


def test_load_into_existing_tensors(tmp_path, core):
    ts = sample_tensors(2)
    path = tmp_path / "w.tsw"
    W.write_weights(path, ts, core=core)
    wf = W.WeightsFile(path, core=core)
    dst = {k: torch.empty_like(v) for k, v in ts.items()}
    ptrs = {k: v.data_ptr() for k, v in dst.items()}
    stats = wf.load_into(dst, verify="all")
    for k, v in ts.items():
        assert same_bits(dst[k], v), k
        assert dst[k].data_ptr() == ptrs[k]  # filled in place, no new memory
    assert stats.decoded_bytes > 0 and stats.raw_bytes > 0
    with pytest.raises(errors.DestinationError, match="'f32'"):
        wf.load_into({"f32": torch.empty(70, 120)})
    with pytest.raises(errors.DestinationError, match="'f32'"):
        wf.load_into({"f32": torch.empty(120, 70, dtype=torch.float64)})
    with pytest.raises(errors.DestinationError, match="not contiguous"):
        wf.load_into({"f32": torch.empty(70, 120).t()})
