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
    # issue 12 item 10: padding MUST be zero and every open checks it (it was only verify_file's check)
    for verify in W.VERIFY_MODES:
        with pytest.raises(errors.LayoutError, match=r"padding bytes \[%d, %d\)" % (gap, b.data_offset)):
            W.load_file(path, verify=verify)
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


@pytest.mark.parametrize("name", ["", "a\0b"])
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


# ------------------------------------------------------------------------------------------------
# issue 12 item 9: the writer refuses exactly what the reader refuses, with the same limit and message

FORBIDDEN = {
    "ndim": lambda: {"t": torch.zeros([1] * 9)},
    "numel": lambda: {"t": torch.empty(1 << 30, 1 << 30, 0)},  # extent 2^60, numel 0
    "shape": lambda: {"t": torch.empty(0, (1 << 48) + 1)},
}


@pytest.mark.parametrize("field", sorted(FORBIDDEN))
def test_writer_refuses_what_the_reader_refuses(tmp_path, monkeypatch, field):
    limit = {"ndim": 8, "numel": 1 << 48, "shape": 1 << 48}[field]
    with pytest.raises(errors.LimitError) as refused:
        W.write_weights(tmp_path / "w.tsw", FORBIDDEN[field](), compression="none")
    assert f"tensor 't': {field} " in str(refused.value) and f"exceeds the limit {limit}" in str(refused.value)
    assert not (tmp_path / "w.tsw").exists()
    # the same file written with the writer's check switched off (what the writer did before): every
    # reader refuses it, naming the same field and limit; the pure-Python reader in the same words
    monkeypatch.setattr(W, "shape_problem", lambda shape: None)
    W.write_weights(tmp_path / "w.tsw", FORBIDDEN[field](), compression="none")
    for name, core in BACKENDS.items():
        with pytest.raises(errors.LimitError) as read:
            W.WeightsFile(tmp_path / "w.tsw", core=core)
        assert field in str(read.value) and str(limit) in str(read.value), name
        if name == "fallback":
            assert str(read.value).endswith(str(refused.value)), (str(read.value), str(refused.value))


def test_writer_refuses_too_many_tensors(tmp_path, monkeypatch):
    many = {f"t{i}": torch.empty(0) for i in range(65537)}
    with pytest.raises(errors.LimitError, match="tensor_count 65537 exceeds the limit 65536"):
        W.write_weights(tmp_path / "w.tsw", many, compression="none")
    assert not (tmp_path / "w.tsw").exists()
    del many["t65536"]
    W.write_weights(tmp_path / "w.tsw", many, compression="none", threads=1)  # exactly the limit: fine
    with W.WeightsFile(tmp_path / "w.tsw") as wf:
        assert len(wf.tensors) == 65536


def test_writer_refuses_long_names_and_big_indexes(tmp_path, monkeypatch):
    with pytest.raises(errors.LimitError, match="name_len 1025 exceeds the limit 1024"):
        W.write_weights(tmp_path / "w.tsw", {"x" * 1025: torch.ones(1)})
    # an index over 64 MiB (the reader's index_size limit): refused before anything is written
    monkeypatch.setattr(W, "MAX_INDEX_SIZE", 4000)
    ts = {f"{i:0>1000}": torch.ones(1) for i in range(4)}
    with pytest.raises(errors.LimitError, match="index_size 4[0-9]{3} exceeds the limit 4000"):
        W.write_weights(tmp_path / "w.tsw", ts)
    assert not (tmp_path / "w.tsw").exists()


def test_limits_have_one_home():
    """The writer and the pure-Python reader take the limits from tinyserve.spec; the C reader's macros
    must hold the same values."""
    from tinyserve import spec

    h = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "ts_weights.h")).read()
    for macro, value in [("TS_MAX_TENSORS", spec.MAX_TENSORS), ("TS_MAX_INDEX_SIZE", spec.MAX_INDEX_SIZE),
                         ("TS_MAX_NAME_LEN", spec.MAX_NAME_LEN), ("TS_MAX_NDIM", spec.MAX_NDIM),
                         ("TS_MAX_DIM", spec.MAX_DIM), ("TS_MAX_CHUNK_BYTES", spec.MAX_CHUNK_BYTES),
                         ("TS_MAX_FILE_SIZE", spec.MAX_FILE_SIZE), ("TS_KNOWN_FEATURES", spec.KNOWN_FEATURES)]:
        line = next(ln for ln in h.splitlines() if ln.startswith(f"#define {macro} "))
        expr = line.split(None, 2)[2].split("/*")[0]
        for feat in ("TS_FEAT_DECODED_CHECKSUMS", "TS_FEAT_EXTENSIONS", "TS_FEAT_FLOAT16_PLANES"):
            expr = expr.replace(feat, str(getattr(spec, feat.replace("TS_", ""))))
        assert eval(expr.replace("ull", "").replace("u", "")) == value, macro  # noqa: S307 - our own header


# ------------------------------------------------------------------------------------------------
# format 1.1 (issue 12 items 11 and 13): features, decoded checksums, extension records


def _header_fields(path):
    return struct.unpack_from("<8sHHIQQQQQQ", path.read_bytes())


def test_format_11_is_written_only_where_needed(tmp_path, core):
    from tinyserve import spec

    W.write_weights(tmp_path / "raw.tsw", {"a": torch.ones(10)}, compression="none", core=core)
    assert _header_fields(tmp_path / "raw.tsw")[2] == 0 and _header_fields(tmp_path / "raw.tsw")[9] == 0  # 1.0
    ts = sample_tensors(3)
    W.write_weights(tmp_path / "p.tsw", ts, compression="planes", core=core, chunk_bytes=4096)
    fields = _header_fields(tmp_path / "p.tsw")
    assert fields[2] == 1 and fields[9] & spec.FEAT_DECODED_CHECKSUMS
    with W.WeightsFile(tmp_path / "p.tsw", core=core) as wf:
        assert wf.header.features & spec.FEAT_DECODED_CHECKSUMS
        for name, info in wf.tensors.items():
            for k, c in enumerate(info.chunks):
                if info.encoding == "planes":  # XXH3_64 of the chunk's decoded element bytes
                    isz = info.nbytes // max(1, info.numel)
                    src = ts[name].reshape(-1).view(torch.uint8).numpy()
                    lo = k * info.chunk_elems * isz
                    assert c.decoded_checksum == core.xxh3_64(src[lo:lo + info.chunk_elems * isz].tobytes())
                else:
                    assert c.decoded_checksum is None
        out = wf.load(verify="all")
    assert all(same_bits(out[n], t) for n, t in ts.items())
    W.write_weights(tmp_path / "old.tsw", ts, compression="planes", core=core, format="1.0")
    assert _header_fields(tmp_path / "old.tsw")[2] == 0 and _header_fields(tmp_path / "old.tsw")[9] == 0
    assert all(c.decoded_checksum is None for t in W.WeightsFile(tmp_path / "old.tsw", core=core).tensors.values()
               for c in t.chunks)


def test_native_and_fallback_write_identical_11_files(tmp_path):
    if len(BACKENDS) < 2:
        pytest.fail("the native extension is not built; both backends must be tested")
    ts = sample_tensors(4)
    for name, core in BACKENDS.items():
        W.write_weights(tmp_path / f"{name}.tsw", ts, compression="planes", core=core, threads=2,
                        extensions={9: b"nine"})
    assert (tmp_path / "native.tsw").read_bytes() == (tmp_path / "fallback.tsw").read_bytes()


def test_unknown_extension_records_are_skipped(tmp_path, core):
    from tinyserve import spec

    ts = {"w": torch.randn(3000) * 0.01, "b": torch.arange(5)}
    W.write_weights(tmp_path / "x.tsw", ts, extensions={4000: b"\x00" * 9, 2: b"later meaning"}, core=core)
    fields = _header_fields(tmp_path / "x.tsw")
    assert fields[9] & spec.FEAT_EXTENSIONS and fields[2] == 1
    with W.WeightsFile(tmp_path / "x.tsw", core=core) as wf:
        assert wf.extensions == {2: b"later meaning", 4000: b"\x00" * 9}
        out = wf.load(verify="all")
        wf.verify()
    assert all(same_bits(out[n], t) for n, t in ts.items())
    for bad in ({0: b""}, {1 << 16: b""}, {"x": b""}, {3: "text"}):
        with pytest.raises(errors.ConfigError, match="extension"):
            W.write_weights(tmp_path / "y.tsw", ts, extensions=bad)
    with pytest.raises(errors.ConfigError, match="1.1"):
        W.write_weights(tmp_path / "y.tsw", ts, extensions={3: b""}, format="1.0")


def test_a_required_feature_bit_this_reader_does_not_know_is_refused(tmp_path, core):
    W.write_weights(tmp_path / "x.tsw", {"a": torch.ones(10)}, compression="none", core=core)
    data = bytearray((tmp_path / "x.tsw").read_bytes())
    struct.pack_into("<Q", data, 56, 1 << 17)
    struct.pack_into("<Q", data, 48, core.xxh3_64(bytes(data[:48])))
    (tmp_path / "x.tsw").write_bytes(bytes(data))
    with pytest.raises(errors.UnsupportedError, match=r"features.*\[17\].*newer reader"):
        W.WeightsFile(tmp_path / "x.tsw", core=core)


def _reseal_chunk(path, core, name, mutate):
    """Replace tensor `name`'s chunk 0 stored bytes by mutate(bytes) (same length), and reseal its stored
    checksum and the index and header checksums: damage only a decoded checksum can see."""
    wf = W.WeightsFile(path, core=core)
    info = wf.tensors[name]
    c = info.chunks[0]
    data = bytearray(path.read_bytes())
    new = mutate(bytes(data[c.offset:c.offset + c.size]))
    assert len(new) == c.size
    data[c.offset:c.offset + c.size] = new
    index = bytes(data[HEADER_SIZE:HEADER_SIZE + wf.header.index_size])
    pos = index.find(struct.pack("<Q", c.checksum))
    assert pos > 0
    struct.pack_into("<Q", data, HEADER_SIZE + pos, core.xxh3_64(new))
    struct.pack_into("<Q", data, 40, core.xxh3_64(bytes(data[HEADER_SIZE:HEADER_SIZE + wf.header.index_size])))
    struct.pack_into("<Q", data, 48, core.xxh3_64(bytes(data[:48])))
    wf.close()
    path.write_bytes(bytes(data))


def test_decoded_checksums_pin_the_decoded_values(tmp_path, core):
    """Issue 12 item 11: stored-byte checksums can be resealed over a stream that still decodes, to other
    values (here: a byte of a stored plane; tests/corpus has the Huffman and zstd cases); the decoded
    checksum catches it under verify='compressed' and 'all', in load, load_into and verify_file."""
    g = torch.Generator().manual_seed(7)
    ts = {"w": (torch.randn(4096, generator=g) * 0.02).to(torch.bfloat16)}
    path = tmp_path / "w.tsw"
    W.write_weights(path, ts, compression="planes", core=core)
    info = W.WeightsFile(path, core=core).tensors["w"]
    assert info.chunks[0].codecs[1] == 0  # the sign/mantissa plane is stored
    at = info.chunks[0].plane_sizes[0] + 100

    def other_value(stored):
        return stored[:at] + bytes([stored[at] ^ 0x11]) + stored[at + 1:]

    _reseal_chunk(path, core, "w", other_value)
    for verify in ("compressed", "all"):
        with pytest.raises(errors.ChecksumError, match="'w' chunk 0.*decoded checksum"):
            W.load_file(path, verify=verify, core=core)
        with pytest.raises(errors.ChecksumError, match="decoded checksum"):
            W.WeightsFile(path, core=core).load_into({"w": torch.empty_like(ts["w"])}, verify=verify)
    with pytest.raises(errors.ChecksumError, match="'w' chunk 0.*decoded checksum"):
        W.verify_file(path, core=core)
    out = W.load_file(path, verify="none", core=core)["w"]  # unverified: other values, as documented
    assert not same_bits(out, ts["w"])


def test_decoded_checksum_of_unmerged_planes(tmp_path, core):
    """decode_planes_into (the device path: planes not regrouped) checks the decoded checksum too."""
    ts = {"w": (torch.randn(4096, generator=torch.Generator().manual_seed(8)) * 0.02).to(torch.bfloat16)}
    path = tmp_path / "w.tsw"
    W.write_weights(path, ts, compression="planes", core=core)
    wf = W.WeightsFile(path, core=core)
    info = wf.tensors["w"]
    dst = np.empty(info.nbytes, np.uint8)
    core.decode_planes_into(wf.mapping, [(info, 0, len(info.chunks), dst)], True, 1)
    bad = info._replace(chunks=(info.chunks[0]._replace(decoded_checksum=info.chunks[0].decoded_checksum ^ 1),))
    with pytest.raises(errors.ChecksumError, match="decoded checksum"):
        core.decode_planes_into(wf.mapping, [(bad, 0, 1, dst)], True, 1)
    core.decode_planes_into(wf.mapping, [(bad, 0, 1, dst)], False, 1)  # verify off: not checked


def test_backends_agree_on_resealed_damage(tmp_path):
    """Issue 12 item 11: damaged planes (every codec) with resealed stored checksums: both backends give
    the same outcome, and a successful load is always the original bytes."""
    if len(BACKENDS) < 2:
        pytest.fail("the native extension is not built; both backends must be tested")
    g = torch.Generator().manual_seed(11)
    src = {"w": (torch.randn(2000, generator=g) * 0.02).to(torch.bfloat16)}
    rng = np.random.default_rng(5)
    outcomes = set()
    for level, compression in (("max", "planes"), (3, "zstd"), (None, "planes")):
        base = tmp_path / f"base-{compression}-{level}.tsw"
        W.write_weights(base, src, compression=compression, level=level, core=BACKENDS["fallback"])
        size = W.WeightsFile(base).tensors["w"].chunks[0].size
        for trial in range(40):
            path = tmp_path / "d.tsw"
            path.write_bytes(base.read_bytes())
            pos, bit = int(rng.integers(0, size)), int(rng.integers(0, 8))

            def flip1(b, pos=pos, bit=bit):
                b = bytearray(b)
                b[pos] ^= 1 << bit
                return bytes(b)

            _reseal_chunk(path, BACKENDS["fallback"], "w", flip1)
            seen = {}
            for name, core in BACKENDS.items():
                try:
                    out = W.load_file(path, verify="compressed", core=core)["w"]
                    seen[name] = "ok"
                    assert same_bits(out, src["w"]), (name, compression, pos, bit)
                except errors.FormatError as exc:
                    seen[name] = type(exc).__name__
            assert len(set(seen.values())) == 1, (compression, level, pos, bit, seen)
            outcomes |= set(seen.values())
    assert "ChecksumError" in outcomes or "CorruptDataError" in outcomes


# ------------------------------------------------------------------------------------------------
# issue 12 item 10: one validation routine for verify_file, installs and loads


def test_verify_file_checks_codec_rules_not_only_checksums(tmp_path, core):
    """A 1.0 file (no decoded checksums) whose zstd frame declares the wrong content size, stored checksum
    resealed: verify_file used to pass it (checksums only) and install it, and it could never load."""
    from tinyserve.repository import Repository

    ts = {"w": torch.arange(4000, dtype=torch.int32) % 7}
    path = tmp_path / "w.tsw"
    W.write_weights(path, ts, compression="zstd", core=core, format="1.0")
    info = W.WeightsFile(path, core=core).tensors["w"]
    p = next(i for i, c in enumerate(info.chunks[0].codecs) if c == 2)
    skip = sum(info.chunks[0].plane_sizes[:p])

    def bad_content_size(stored):
        frame = bytearray(stored[skip:skip + info.chunks[0].plane_sizes[p]])
        fhd = frame[4]
        assert fhd & 0x20 and (fhd >> 6) in (1, 2)  # single segment, 2- or 4-byte content size
        if fhd >> 6 == 1:
            struct.pack_into("<H", frame, 5, struct.unpack_from("<H", frame, 5)[0] + 1)
        else:
            struct.pack_into("<I", frame, 5, struct.unpack_from("<I", frame, 5)[0] + 1)
        return stored[:skip] + bytes(frame) + stored[skip + len(frame):]

    _reseal_chunk(path, core, "w", bad_content_size)
    assert core.verify_chunks(W.WeightsFile(path, core=core).mapping, [W.WeightsFile(path, core=core).tensors["w"]],
                              1) == []  # the stored checksums hold
    with pytest.raises(errors.CorruptDataError, match="'w' chunk 0"):
        W.load_file(path, core=core)
    with pytest.raises(errors.CorruptDataError, match="'w' chunk 0"):
        W.verify_file(path, core=core)
    repo = Repository(tmp_path / "repo", create=True)
    with repo.stage("m") as st:
        (st.path / "model.json").write_text(
            '{"name": "m", "platform": "torch_export", "inputs": [{"name": "x", "dtype": "float32", '
            '"shape": [-1, 4]}], "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}')
        (st.path / "program.pt2").write_bytes(b"program")
        (st.path / "weights.tsw").write_bytes(path.read_bytes())
        with pytest.raises(errors.CorruptDataError):
            repo.install(st, "m", verify=lambda p: W.verify_file(p, core=core))
    assert repo.versions("m") == []


def test_verify_decodes_in_bounded_scratch(tmp_path, core):
    """verify() decodes big tensors in runs of chunks (scratch_bytes at a time) and names the right chunk."""
    ts = {"w": (torch.randn(40_000, generator=torch.Generator().manual_seed(9)) * 0.02)}
    path = tmp_path / "w.tsw"
    W.write_weights(path, ts, compression="planes", chunk_bytes=4096, core=core)
    wf = W.WeightsFile(path, core=core)
    info = wf.tensors["w"]
    assert len(info.chunks) == 40
    wf.verify(scratch_bytes=3 * 4096)
    k = 31
    bad = info._replace(chunks=info.chunks[:k] + (info.chunks[k]._replace(
        decoded_checksum=info.chunks[k].decoded_checksum ^ 1),) + info.chunks[k + 1:])
    wf.tensors["w"] = bad
    with pytest.raises(errors.ChecksumError, match=f"'w' chunk {k}\\b"):
        wf.verify(scratch_bytes=3 * 4096)


# ------------------------------------------------------------------------------------------------
# issue 12 item 13: bool bytes other than 0 and 1 are invalid


@pytest.mark.parametrize("compression", ["none", "planes"])
def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path, core, compression):
    path = tmp_path / "b.tsw"
    ok = torch.tensor([True, False] * 300)
    W.write_weights(path, {"m": ok}, compression=compression, core=core)
    info = W.WeightsFile(path, core=core).tensors["m"]
    assert info.encoding == ("raw" if compression == "none" else "planes")
    assert same_bits(W.load_file(path, core=core)["m"], ok)
    # the same bytes with one element 2: written as uint8 and relabelled bool (dtype code 10)
    raw = ok.view(torch.uint8).clone()
    raw[77] = 2
    W.write_weights(path, {"m": raw}, compression=compression, core=core)
    data = bytearray(path.read_bytes())
    at = HEADER_SIZE + 2 + 1
    assert data[at] == 6  # uint8
    data[at] = 10
    struct.pack_into("<Q", data, 40, core.xxh3_64(bytes(data[HEADER_SIZE:HEADER_SIZE + info_index_size(data)])))
    struct.pack_into("<Q", data, 48, core.xxh3_64(bytes(data[:48])))
    path.write_bytes(bytes(data))
    for verify in W.VERIFY_MODES:
        with pytest.raises(errors.CorruptDataError, match="'m': bool element 77 is the byte 0x02"):
            W.load_file(path, verify=verify, core=core)
    with pytest.raises(errors.CorruptDataError, match="bool element 77"):
        W.WeightsFile(path, core=core).load_into({"m": torch.empty(600, dtype=torch.bool)})
    with pytest.raises(errors.CorruptDataError, match="bool element 77"):
        W.verify_file(path, core=core)


def info_index_size(data) -> int:
    return struct.unpack_from("<Q", data, 16)[0]


def test_each_backend_runs_on_a_known_zstd(record_property):
    """Issue 12 item 11: the native core runs on the libzstd it was compiled against (>= 1.5.0, setup.py);
    the pure-Python core on python-zstandard's bundled copy.  The versions are recorded; agreement on
    damaged frames comes from the decoded checksums (test_backends_agree_on_resealed_damage)."""
    fallback = BACKENDS["fallback"]
    assert fallback.zstd_version() >= (1, 5, 0)
    record_property("zstd_fallback", ".".join(map(str, fallback.zstd_version())))
    if "native" not in BACKENDS:
        pytest.fail("the native extension is not built; both backends must be tested")
    native = BACKENDS["native"]
    assert native.zstd_version() == native.zstd_build_version() >= (1, 5, 0)
    record_property("zstd_native", ".".join(map(str, native.zstd_version())))
    # one known libzstd under both: the system's (Debian bookworm's libzstd-dev 1.5.4) for the native
    # core, and python-zstandard 0.20.0 (constraints.txt), which bundles exactly that release, for the
    # pure-Python one; so damaged frames decode (or fail) the same way in both
    assert tuple(native.zstd_version()) == tuple(fallback.zstd_version()), (
        f"native libzstd {native.zstd_version()} != python-zstandard's {fallback.zstd_version()}: pin "
        "python-zstandard to the release that bundles the system's libzstd (constraints.txt)")


def test_float16_planes_set_feature_bit_2(tmp_path, core):
    """A float16 'planes' tensor is written in the float16 exponent plane order (helper F2's mapping) under
    feature bit 2; a reader that ignored the bit would regroup in the generic order: the decoded checksum
    refuses that instead of returning other values."""
    from tinyserve import spec

    t = {"h": (torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.float16)}
    W.write_weights(tmp_path / "h.tsw", t, compression="planes", core=core)
    features = _header_fields(tmp_path / "h.tsw")[9]
    assert features & spec.FEAT_FLOAT16_PLANES
    assert same_bits(W.load_file(tmp_path / "h.tsw", verify="all", core=core)["h"], t["h"])
    W.verify_file(tmp_path / "h.tsw", core=core)
    W.write_weights(tmp_path / "raw.tsw", t, compression="none", core=core)
    assert not _header_fields(tmp_path / "raw.tsw")[9] & spec.FEAT_FLOAT16_PLANES
    W.write_weights(tmp_path / "old.tsw", t, compression="planes", core=core, format="1.0")
    assert _header_fields(tmp_path / "old.tsw")[9] == 0
    assert same_bits(W.load_file(tmp_path / "old.tsw", core=core)["h"], t["h"])  # 1.0: generic order
    data = bytearray((tmp_path / "h.tsw").read_bytes())
    struct.pack_into("<Q", data, 56, features & ~spec.FEAT_FLOAT16_PLANES)
    struct.pack_into("<Q", data, 48, core.xxh3_64(bytes(data[:48])))
    (tmp_path / "h.tsw").write_bytes(bytes(data))
    with pytest.raises(errors.ChecksumError, match="'h' chunk 0.*decoded checksum"):
        W.load_file(tmp_path / "h.tsw", core=core)
