"""The plane-regrouping kernels (tinyserve.kernels.planes) against their torch reference and the
format's own regrouping (the fallback codec, docs/format.md section 5), and the codec entry point
that feeds them (decode_planes_into, docs/native-api.md) on both backends.  Triton runs under
TRITON_INTERPRET=1 (tests/conftest.py); CUDA variants are marked `gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tinyserve import errors
from tinyserve._backend import available
from tinyserve._fallback.core import _merge_planes, _split_planes
from tinyserve.kernels import planes as P
from tinyserve.spec import DTYPES
from tinyserve.weights import DTYPE_TO_TORCH, WeightsFile, write_weights

BACKENDS = available()
DTYPE_NAMES = sorted(DTYPES)
needs_triton = pytest.mark.skipif(not P.triton_usable("cpu"), reason="Triton interpreter not available")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_bytes(dtype: str, n: int, seed: int) -> torch.Tensor:
    """n elements of `dtype` as raw bytes: random bit patterns (NaN payloads, -0, subnormals,
    infinities included for floats) mixed with ordinary values."""
    isz = DTYPES[dtype][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, n * isz, dtype=np.uint8)
    if dtype in ("bfloat16", "float32", "float16", "float64") and n:
        t = torch.from_numpy(raw.copy()).view(DTYPE_TO_TORCH[dtype])
        t[: n // 2] = torch.from_numpy(rng.standard_normal(n // 2)).to(t.dtype)
        raw = t.view(torch.uint8).numpy()
    if dtype == "bool":
        raw = raw & 1
    return torch.from_numpy(np.ascontiguousarray(raw))


def spec_planes(raw: torch.Tensor, dtype: str, f16_planes: bool = False) -> torch.Tensor:
    isz = DTYPES[dtype][1]
    return torch.from_numpy(_split_planes(raw.numpy(), dtype, isz, f16_planes).reshape(-1).copy())


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_split_helper_matches_the_format(dtype):
    raw = random_bytes(dtype, 1001, 1)
    assert torch.equal(P.split_planes_torch(raw, dtype), spec_planes(raw, dtype))


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_torch_reference_inverts_the_format(dtype):
    raw = random_bytes(dtype, 777, 2)
    out = torch.full_like(raw, 0xCD)
    P.merge_planes_torch(spec_planes(raw, dtype), dtype, out)
    assert torch.equal(out, raw)
    # and agrees with the fallback codec's own merge
    fb = np.zeros(raw.numel(), np.uint8)
    _merge_planes(spec_planes(raw, dtype).numpy().reshape(DTYPES[dtype][1], -1), dtype, DTYPES[dtype][1], fb)
    assert np.array_equal(fb, raw.numpy())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("n", [0, 1, 5, P.BLOCK - 1, P.BLOCK + 3])
def test_triton_kernel_equals_reference(dtype, n):
    raw = random_bytes(dtype, n, n + 7)
    planes = spec_planes(raw, dtype)
    ref = torch.full_like(raw, 0x5A)
    got = torch.full_like(raw, 0xA5)
    P.merge_planes_torch(planes, dtype, ref)
    P.merge_planes_triton(planes, dtype, got)
    assert torch.equal(got, ref)
    assert torch.equal(got, raw)


@needs_triton
@given(dtype=st.sampled_from(["bfloat16", "float32", "float16", "int64", "int32"]),
       n=st.integers(1, 300), lead=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_triton_kernel_writes_exactly_its_slice(dtype, n, lead, seed):
    """The kernel writes into a slice of a larger destination (as the loader does, at an
    element-aligned offset) and touches no byte outside it."""
    isz = DTYPES[dtype][1]
    raw = random_bytes(dtype, n, seed)
    big = torch.full(((lead + n + 3) * isz,), 0x77, dtype=torch.uint8)
    target = big[lead * isz:(lead + n) * isz]
    P.merge_planes(spec_planes(raw, dtype), dtype, target, backend="triton")
    assert torch.equal(target, raw)
    assert bool((big[: lead * isz] == 0x77).all()) and bool((big[(lead + n) * isz:] == 0x77).all())


def test_bf16_bits_are_exact_for_every_pattern():
    """All 65536 bfloat16 bit patterns (every NaN payload, both zeros, subnormals) survive the
    reference and the kernel: the merge never does float arithmetic."""
    raw = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)
    planes = spec_planes(raw, "bfloat16")
    for backend in (["torch", "triton"] if P.triton_usable("cpu") else ["torch"]):
        out = torch.zeros_like(raw)
        P.merge_planes(planes, "bfloat16", out, backend=backend)
        assert torch.equal(out, raw), backend


def test_merge_rejects_bad_arguments():
    planes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(errors.DestinationError, match="same multiple"):
        P.merge_planes_torch(planes, "float32", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(errors.DestinationError, match="same multiple"):
        P.merge_planes_torch(torch.zeros(6, dtype=torch.uint8), "float32", torch.zeros(6, dtype=torch.uint8))
    with pytest.raises(errors.DestinationError, match="uint8"):
        P.merge_planes_torch(planes, "float32", torch.zeros(2, dtype=torch.float32))
    with pytest.raises(errors.DestinationError, match="strided"):
        P.merge_planes_torch(torch.zeros(16, dtype=torch.uint8)[::2], "float32", torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(errors.UnsupportedError, match="complex64"):
        P.merge_planes_torch(planes, "complex64", torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(errors.ConfigError, match="backend"):
        P.merge_planes(planes, "float32", torch.zeros(8, dtype=torch.uint8), backend="cuda")


# ------------------------------------------------------------------------------------------------
# decode_planes_into: both codec backends


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("planes")
    g = torch.Generator().manual_seed(3)
    tensors = {
        "bf": (torch.randn(5000, generator=g) * 0.02).to(torch.bfloat16),
        "f32": torch.randn(37, 41, generator=g),
        "i64": torch.randint(-3, 3, (1500,), generator=g),
        "u8": torch.randint(0, 4, (3000,), generator=g).to(torch.uint8),
        "f16": torch.randn(999, generator=g).to(torch.float16),
    }
    path = d / "w.tsw"
    write_weights(path, tensors, compression="planes", level="max", chunk_bytes=1024)
    return path, tensors


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_decode_planes_into_chunk_ranges(packed, backend):
    path, tensors = packed
    core = BACKENDS[backend]
    with WeightsFile(path, core=core) as wf:
        for name, info in wf.tensors.items():
            assert info.encoding == "planes"
            isz = DTYPES[info.dtype][1]
            raw = tensors[name].reshape(-1).view(torch.uint8)
            nch = len(info.chunks)
            for first, count in [(0, nch), (1, nch - 2), (nch - 1, 1), (nch // 2, 0)]:
                e0 = first * info.chunk_elems
                n = min((first + count) * info.chunk_elems, info.numel) - e0 if count else 0
                dst = np.full(n * isz, 0xEE, np.uint8)
                core.decode_planes_into(wf.mapping, [(info, first, count, dst)], True, 2, f16_planes=wf.f16_planes)
                want = spec_planes(raw[e0 * isz:(e0 + n) * isz], info.dtype, wf.f16_planes).numpy()
                assert np.array_equal(dst, want), (name, first, count)


def _errors(core, wf, job):
    try:
        core.decode_planes_into(wf.mapping, [job], True, 1, f16_planes=wf.f16_planes)
    except errors.TinyserveError as exc:
        return type(exc), str(exc)
    return None, ""


def test_decode_planes_into_errors_agree(packed, tmp_path):
    path, tensors = packed
    raw_path = tmp_path / "raw.tsw"
    write_weights(raw_path, {"r": torch.zeros(100)}, compression="none")
    cases = {}
    for name, core in BACKENDS.items():
        with WeightsFile(path, core=core) as wf, WeightsFile(raw_path, core=core) as rf:
            info = wf.tensors["f32"]
            n1 = info.chunk_elems
            got = {
                "raw": _errors(core, rf, (rf.tensors["r"], 0, 1, np.zeros(400, np.uint8))),
                "range": _errors(core, wf, (info, 1, len(info.chunks), np.zeros(4, np.uint8))),
                "negative": _errors(core, wf, (info, -1, 1, np.zeros(4, np.uint8))),
                "size": _errors(core, wf, (info, 0, 1, np.zeros(n1 * 4 - 1, np.uint8))),
                "readonly": _errors(core, wf, (info, 0, 1, bytes(n1 * 4))),
                "checksum": _errors(core, wf, (info._replace(chunks=(info.chunks[0]._replace(checksum=1),)
                                                             + info.chunks[1:]), 0, 1, np.zeros(n1 * 4, np.uint8))),
            }
            cases[name] = got
            assert got["raw"][0] is errors.ConfigError and "'raw'" in got["raw"][1]
            assert got["range"][0] is errors.ConfigError and "outside" in got["range"][1]
            assert got["negative"][0] is errors.ConfigError
            assert got["size"][0] is errors.DestinationError
            assert got["readonly"][0] is errors.DestinationError
            assert got["checksum"][0] is errors.ChecksumError and "'f32' chunk 0" in got["checksum"][1]
    # a chunk beyond the buffer: cut the mapping short
    for name, core in BACKENDS.items():
        with WeightsFile(path, core=core) as wf:
            info = wf.tensors["bf"]
            buf = bytes(wf.mapping[: info.chunks[-1].offset + 1])
            with pytest.raises(errors.TruncatedError, match="'bf' chunk"):
                core.decode_planes_into(buf, [(info, len(info.chunks) - 1, 1,
                                               np.zeros((info.numel - (len(info.chunks) - 1) * info.chunk_elems) * 2,
                                                        np.uint8))], False, 1)
    assert len({tuple(c[0] for c in v.values()) for v in cases.values()}) == 1  # same classes on both


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_triton_kernel_on_cuda_equals_reference(dtype):
    raw = random_bytes(dtype, 1 << 20, 11).cuda()
    planes = P.split_planes_torch(raw, dtype)
    ref = torch.empty_like(raw)
    got = torch.empty_like(raw)
    P.merge_planes_torch(planes, dtype, ref)
    P.merge_planes_triton(planes, dtype, got)
    torch.cuda.synchronize()
    assert torch.equal(got, ref) and torch.equal(got, raw)


# --------------------------------------------------------------------------------------------------
# float16 exponent planes (feature bit 2, docs/format.md section 5)

def test_f16_exponent_planes_every_pattern():
    """All 65536 float16 bit patterns: the exponent-planes order puts bits 14..7 in plane 0 and the sign
    with bits 6..0 in plane 1 (the spec's formula), and the torch reference, the Triton kernel and the
    fallback codec invert it exactly; the generic order stays the 1.0 one (high byte first)."""
    x = np.arange(65536, dtype=np.uint32)
    raw = torch.from_numpy(x.astype(np.uint16).view(np.uint8).copy())
    planes = torch.from_numpy(_split_planes(raw.numpy(), "float16", 2, True).reshape(-1).copy())
    want = np.concatenate([(x >> 7) & 0xFF, ((x >> 8) & 0x80) | (x & 0x7F)]).astype(np.uint8)
    assert np.array_equal(planes.numpy(), want)
    assert torch.equal(P.split_planes_torch(raw, "float16", f16_planes=True), planes)
    generic = _split_planes(raw.numpy(), "float16", 2).reshape(-1)
    assert np.array_equal(generic, np.concatenate([x >> 8, x & 0xFF]).astype(np.uint8))
    for backend in (["torch", "triton"] if P.triton_usable("cpu") else ["torch"]):
        out = torch.zeros_like(raw)
        P.merge_planes(planes, "float16", out, backend=backend, f16_planes=True)
        assert torch.equal(out, raw), backend
        out.zero_()
        P.merge_planes(torch.from_numpy(generic.copy()), "float16", out, backend=backend)
        assert torch.equal(out, raw), backend
    fb = np.zeros(raw.numel(), np.uint8)
    _merge_planes(planes.numpy().reshape(2, -1), "float16", 2, fb, True)
    assert np.array_equal(fb, raw.numpy())


@pytest.mark.parametrize("mode", ["huffman", "rans", "max", "zstd"])
def test_f16_planes_codec_backends_identical(mode):
    """Both backends encode float16 with f16_planes to the same bytes, decode them back exactly, and the
    flag matters: the same stream read in the generic order gives other values."""
    rng = np.random.default_rng(5)
    raw = (rng.standard_normal(40000) * 0.03).astype(np.float16).tobytes()
    encs = {name: be.encode_planes(raw, "float16", 16384, mode, 3, 1, f16_planes=True)
            for name, be in BACKENDS.items()}
    first = next(iter(encs.values()))
    for name, enc in encs.items():
        assert enc == first, name
    enc, meta = first
    generic = BACKENDS["fallback"].encode_planes(raw, "float16", 16384, mode, 3, 1)
    assert generic[0] != enc
    from tinyserve.spec import ChunkInfo, TensorInfo
    chunks, off = [], 0
    for codecs, sizes, cs in meta:
        chunks.append(ChunkInfo(off, sum(sizes), cs, codecs, sizes))
        off += sum(sizes)
    t = TensorInfo("h", "float16", "planes", (40000,), 0, len(enc), 16384, tuple(chunks))
    for name, be in BACKENDS.items():
        dst = bytearray(len(raw))
        be.decode_into(enc, [(t, dst)], True, 2, f16_planes=True)
        assert bytes(dst) == raw, name
        be.decode_into(enc, [(t, dst)], True, 2)  # a 1.0 reader's order
        assert bytes(dst) != raw, name
        be.validate_chunks(enc, [t], 2, f16_planes=True)
        planes = bytearray(len(raw))
        be.decode_planes_into(enc, [(t, 0, len(t.chunks), planes)], True, 1, f16_planes=True)
        out = torch.zeros(len(raw), dtype=torch.uint8)
        P.merge_planes(torch.frombuffer(planes, dtype=torch.uint8), "float16", out, f16_planes=True)
        assert out.numpy().tobytes() == raw, name
