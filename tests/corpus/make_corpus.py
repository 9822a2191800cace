#!/usr/bin/env python3
"""Deterministic generator of the hostile weights-file corpus.

    PYTHONPATH=. python tests/corpus/make_corpus.py            # rewrites tests/corpus/{files,findings}/*.tsw
    PYTHONPATH=. python tests/corpus/make_corpus.py --out DIR  #   and expected.json (or under DIR)

Every file starts from valid files written by `tinyserve.weights.write_weights` (pure-Python core, one
thread: deterministic, and byte-identical to the native writer for the stored/fill/huffman codecs). Each
file is parsed into a small editable model (`WFile` / `WTensor`), one rule of docs/format.md is broken,
and the model is serialized again: sizes, offsets, chunk checksums, the index checksum and the header
checksum are recomputed unless the case overrides them, so each case reaches the check it is named for
instead of stopping at a checksum.  Header-level cases patch the serialized bytes with `struct` and then
recompute the header checksum.

Compressed planes that are not produced by the writer are built here from the spec alone: zstd frames
from RLE and raw blocks (RFC 8878; no dependence on the zstd library's encoder) and Huffman streams by
a small canonical encoder (docs/format.md section 6).

expected.json maps each file name to
    error:  the exception class name (from tinyserve.errors) that opening (WeightsFile), load(verify='all')
            and verify() must raise, or "ok"
    match:  substrings the message must contain (a str or a list of str)
    stage:  where the error must surface: "open", "load" or "verify"
    known:  {backend: "finding ..."} where a backend is known to deviate (see tests/test_corpus.py)
    tensors (ok only): name -> [dtype, shape, xxh3 of the decoded bytes as hex]
    note:   free text (spec ambiguities)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import xxhash  # noqa: E402

from tinyserve import spec  # noqa: E402
from tinyserve._fallback import core as _fallback_core  # noqa: E402
from tinyserve.weights import write_weights  # noqa: E402

U64 = (1 << 64) - 1
MAX_FILE_BYTES = 64 << 10  # per file (see OVERSIZE for the two that cannot fit)
MAX_CORPUS_BYTES = 2 << 20  # every file is at least one 4096-byte page (data_offset); was 1 MiB before format 1.1
# A raw tensor is page-aligned only from 65536 bytes of data on, so a file holding one is > 64 KiB.
OVERSIZE = {"raw_big_tensor_misaligned.tsw"}


def xxh3(b) -> int:
    return xxhash.xxh3_64_intdigest(bytes(b))


# ---------------------------------------------------------------------------------------------------
# the editable model of a weights file


@dataclass
class WTensor:
    name: bytes
    dtype: int                     # dtype code (may be invalid)
    enc: int                       # 0 raw, 1 planes (may be invalid)
    shape: list
    chunk_elems: int
    data: bytes = b""              # raw: the stored bytes
    chunks: list | None = None     # planes: per chunk a list of [codec, plane bytes]
    flags: int = 0
    ndim: int | None = None        # override of the record's ndim field
    name_len: int | None = None    # override of the record's name_len field
    data_offset: int | None = None  # override (the payload is also written there)
    data_size: int | None = None   # override of the field only
    chunk_count: int | None = None  # override of the field only
    sums: list | None = None       # per-chunk checksum overrides (None entries are computed)
    sizes: dict = field(default_factory=dict)  # {(chunk, plane): stored size field override}
    tail: bytes = b""              # extra bytes after the record's chunk records
    extra: bytes = b""             # stray bytes stored after the tensor's chunks (counted in data_size)
    keep_records: int | None = None  # emit only the first keep_records chunk records
    logical: bytes | None = None   # the decoded element bytes (for ok files)
    dsums: list | None = None      # format 1.1: per-chunk decoded checksum overrides (None: from logical)

    @property
    def itemsize(self) -> int:
        return spec.DTYPE_BY_CODE.get(self.dtype, ("?", 1))[1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def payload(self) -> bytes:
        if self.chunks is None:
            return bytes(self.data) + self.extra
        return b"".join(bytes(b) for ch in self.chunks for _, b in ch) + self.extra

    def decoded_sum(self, k: int) -> int:
        """XXH3_64 of chunk k's decoded element bytes (format 1.1, feature bit 0)."""
        if self.dsums is not None and k < len(self.dsums) and self.dsums[k] is not None:
            return self.dsums[k]
        step = self.chunk_elems * self.itemsize
        return xxh3((self.logical or b"")[k * step:(k + 1) * step])

    def chunk_records(self, decoded: bool = False) -> list[bytes]:
        recs = []
        if self.chunks is None:
            step = self.chunk_elems * self.itemsize
            count = -(-self.numel // self.chunk_elems) if self.chunk_elems else 0
            count = min(count, -(-len(self.data) // step) if step else 0)  # huge declared shapes: data only
            for k in range(count):
                cs = xxh3(self.data[k * step:(k + 1) * step])
                if self.sums is not None and k < len(self.sums) and self.sums[k] is not None:
                    cs = self.sums[k]
                recs.append(struct.pack("<Q", cs))
            return recs
        for k, ch in enumerate(self.chunks):
            parts = []
            for p, (codec, blob) in enumerate(ch):
                parts.append(struct.pack("<BI", codec, self.sizes.get((k, p), len(blob))))
            cs = xxh3(b"".join(bytes(b) for _, b in ch))
            if self.sums is not None and k < len(self.sums) and self.sums[k] is not None:
                cs = self.sums[k]
            parts.append(struct.pack("<Q", cs))
            if decoded:
                parts.append(struct.pack("<Q", self.decoded_sum(k)))
            recs.append(b"".join(parts))
        return recs

    def freeze_sums(self) -> None:
        """Pin the current (correct) chunk checksums, so later data edits break them."""
        self.sums = [struct.unpack_from("<Q", r, len(r) - 8)[0] for r in self.chunk_records()]

    def record(self, data_offset: int, data_size: int, decoded: bool = False) -> bytes:
        recs = self.chunk_records(decoded)
        if self.keep_records is not None:
            recs = recs[:self.keep_records]
        out = struct.pack("<H", len(self.name) if self.name_len is None else self.name_len) + self.name
        ndim = len(self.shape) if self.ndim is None else self.ndim
        out += struct.pack("<BBBB", self.dtype, self.enc, ndim, self.flags)
        out += struct.pack(f"<{len(self.shape)}Q", *self.shape)
        out += struct.pack("<QQII", data_offset, data_size, self.chunk_elems,
                           len(recs) if self.chunk_count is None else self.chunk_count)
        return out + b"".join(recs) + self.tail


@dataclass
class WFile:
    tensors: list
    magic: bytes = spec.MAGIC
    major: int = spec.MAJOR
    minor: int = 0
    reserved: int = 0              # bytes 56..63: the 1.0 reserved field, the 1.1 features bitmask
    tensor_count: int | None = None
    index_size: int | None = None
    data_offset: int | None = None
    file_size: int | None = None
    index_checksum: int | None = None
    header_checksum: int | None = None
    index_tail: bytes = b""

    def t(self, name: str) -> WTensor:
        for t in self.tensors:
            if t.name == name.encode():
                return t
        raise KeyError(name)

    def serialize(self) -> bytes:
        def placement(index_len):
            """Each tensor's offset: the writer's placement (section 4) unless overridden."""
            offsets = []
            end = spec.align_up(spec.HEADER_SIZE + index_len, spec.PAGE)
            for t in self.tensors:
                size = len(t.payload())
                off = spec.align_up(end, spec.tensor_alignment(t.enc, size)) if t.data_offset is None else t.data_offset
                offsets.append(off)
                end = off + size
            return offsets

        # the record sizes do not depend on the offsets: lay out once with zeros to learn the index size
        dec = bool(self.reserved & spec.FEAT_DECODED_CHECKSUMS)
        dummy = b"".join(t.record(0, 0, dec) for t in self.tensors) + self.index_tail
        offsets = placement(len(dummy))
        self.offsets = offsets
        index = b"".join(t.record(off, len(t.payload()) if t.data_size is None else t.data_size, dec)
                         for t, off in zip(self.tensors, offsets)) + self.index_tail
        assert len(index) == len(dummy)
        data_offset = spec.align_up(spec.HEADER_SIZE + len(index), spec.PAGE)
        buf = bytearray(spec.HEADER_SIZE) + index
        buf += bytes(max(0, data_offset - len(buf)))
        for t, off in zip(self.tensors, offsets):
            pl = t.payload()
            if off > len(buf):
                buf += bytes(off - len(buf))
            if off + len(pl) > len(buf):
                buf += bytes(off + len(pl) - len(buf))
            buf[off:off + len(pl)] = pl
        head = self.magic + struct.pack(
            "<HHIQQQQ", self.major, self.minor,
            len(self.tensors) if self.tensor_count is None else self.tensor_count,
            len(index) if self.index_size is None else self.index_size,
            data_offset if self.data_offset is None else self.data_offset,
            len(buf) if self.file_size is None else self.file_size,
            0)
        buf[0:48] = head
        buf[56:64] = struct.pack("<Q", self.reserved)
        fix_checksums(buf, index=self.index_checksum is None, header=False)
        if self.index_checksum is not None:
            struct.pack_into("<Q", buf, 40, self.index_checksum)
        fix_checksums(buf, index=False, header=self.header_checksum is None)
        if self.header_checksum is not None:
            struct.pack_into("<Q", buf, 48, self.header_checksum)
        return bytes(buf)


def fix_checksums(buf: bytearray, *, index: bool = True, header: bool = True) -> bytearray:
    """Recompute the index checksum (over the index_size bytes the header declares, where the file holds
    them) and then the header checksum, in place."""
    if index:
        isz = struct.unpack_from("<Q", buf, 16)[0]
        if spec.HEADER_SIZE + isz <= len(buf):
            struct.pack_into("<Q", buf, 40, xxh3(buf[spec.HEADER_SIZE:spec.HEADER_SIZE + isz]))
    if header:
        struct.pack_into("<Q", buf, 48, xxh3(buf[:48]))
    return buf


def patch(data: bytes, offset: int, fmt: str, value, *, fix_header: bool = True, fix_index: bool = False) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, offset, value)
    return bytes(fix_checksums(buf, index=fix_index, header=fix_header))


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= 1 << bit
    return bytes(buf)


def parse(data: bytes) -> WFile:
    """The model of a valid file (only what the writer produces; no validation beyond asserts)."""
    magic, major, minor, count, isz, doff, fsize, _ic, _hc, reserved = struct.unpack_from("<8sHHIQQQQQQ", data)
    f = WFile([], magic=magic, major=major, minor=minor, reserved=reserved)
    dec = bool(reserved & spec.FEAT_DECODED_CHECKSUMS)
    pos = spec.HEADER_SIZE
    for _ in range(count):
        (nlen,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2:pos + 2 + nlen]
        pos += 2 + nlen
        dtype, enc, ndim, flags = struct.unpack_from("<BBBB", data, pos)
        pos += 4
        shape = list(struct.unpack_from(f"<{ndim}Q", data, pos))
        pos += 8 * ndim
        off, size, chunk_elems, chunk_count = struct.unpack_from("<QQII", data, pos)
        pos += 24
        t = WTensor(name, dtype, enc, shape, chunk_elems, flags=flags)
        if enc == spec.ENC_RAW:
            pos += 8 * chunk_count
            t.data = data[off:off + size]
        else:
            isz_ = t.itemsize
            t.chunks = []
            at = off
            for _k in range(chunk_count):
                planes = []
                for p in range(isz_):
                    codec, psize = struct.unpack_from("<BI", data, pos + 5 * p)
                    planes.append([codec, data[at:at + psize]])
                    at += psize
                pos += 5 * isz_ + 8 + (8 if dec else 0)
                t.chunks.append(planes)
        f.tensors.append(t)
    if reserved & spec.FEAT_EXTENSIONS:
        f.index_tail = data[pos:spec.HEADER_SIZE + isz]
        pos = spec.HEADER_SIZE + isz
    assert pos == spec.HEADER_SIZE + isz and fsize == len(data)
    return f


# ---------------------------------------------------------------------------------------------------
# codec streams built from the spec


def zstd_frame(blocks: list, *, fcs: int | None, fcs_bytes: int | None = None, single_segment: bool = True,
               window_byte: int | None = None, checksum: int | None = None, dict_id: int | None = None,
               magic: bytes = b"\x28\xb5\x2f\xfd") -> bytes:
    """A Zstandard frame (RFC 8878) from ("rle", byte, count) / ("raw", bytes) / ("bad", block_type, bytes)
    blocks; fcs None = no Frame_Content_Size field; checksum = the 4-byte content checksum to append."""
    if fcs is None:
        fcs_flag, fcs_field = 0, b""
        assert not single_segment
    else:
        if fcs_bytes is None:
            fcs_bytes = 1 if (single_segment and fcs < 256) else 2 if 256 <= fcs < 65792 else 4 if fcs < 1 << 32 else 8
        fcs_flag = {1: 0, 2: 1, 4: 2, 8: 3}[fcs_bytes]
        assert fcs_bytes != 1 or single_segment
        value = fcs - 256 if fcs_bytes == 2 else fcs
        fcs_field = value.to_bytes(fcs_bytes, "little")
    did_flag, did_field = 0, b""
    if dict_id is not None:
        did_flag, did_field = 3, struct.pack("<I", dict_id)
    fhd = (fcs_flag << 6) | (int(single_segment) << 5) | (int(checksum is not None) << 2) | did_flag
    out = bytearray(magic) + bytes([fhd])
    if not single_segment:
        out.append(0x00 if window_byte is None else window_byte)  # 0x00: a 1 KiB window
    out += did_field + fcs_field
    for i, b in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        if b[0] == "rle":
            out += (last | (1 << 1) | (b[2] << 3)).to_bytes(3, "little") + bytes([b[1]])
        elif b[0] == "raw":
            out += (last | (0 << 1) | (len(b[1]) << 3)).to_bytes(3, "little") + b[1]
        else:  # ("bad", block type, content)
            out += (last | (b[1] << 1) | (len(b[2]) << 3)).to_bytes(3, "little") + b[2]
    if checksum is not None:
        out += struct.pack("<I", checksum)
    return bytes(out)


def zstd_content_checksum(content: bytes) -> int:
    return xxhash.xxh64_intdigest(content) & 0xFFFFFFFF


def huff_codes(lens: dict) -> dict:
    """symbol -> (code, length): canonical codes of docs/format.md section 6."""
    codes, code, prev = {}, -1, 0
    for ln, s in sorted((ln, s) for s, ln in lens.items() if ln):
        code = 0 if code < 0 else (code + 1) << (ln - prev)
        codes[s] = (code & ((1 << ln) - 1), ln)
        prev = ln
    return codes


def pack_lsb(bits: list) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        out[i >> 3] |= b << (i & 7)
    return bytes(out)


def huff_substream_bits(symbols: bytes, codes: dict) -> list:
    bits = []
    for s in symbols:
        code, ln = codes[s]
        bits.extend((code >> (ln - 1 - j)) & 1 for j in range(ln))
    return bits


def huff_stream(symbols: bytes, lens: dict, *, subs=None, sizes=None) -> bytes:
    """A Huffman stream (docs/format.md section 6) coding `symbols` with code lengths `lens`
    (symbol -> length, 0..15 as stored in the nibble); `subs` replaces the 4 sub-stream byte strings,
    `sizes` the 3 stored sub-stream sizes."""
    n = len(symbols)
    q = -(-n // 4)
    codes = huff_codes(lens)
    if subs is None:
        subs = [pack_lsb(huff_substream_bits(symbols[min(j * q, n):min((j + 1) * q, n)], codes)) for j in range(4)]
    table = bytearray(128)
    for s, ln in lens.items():
        table[s >> 1] |= (ln & 15) << (4 * (s & 1))
    if sizes is None:
        sizes = [len(s) for s in subs[:3]]
    return bytes(table) + struct.pack("<III", *sizes) + b"".join(subs)


def huff_sub_bits(symbols: bytes, lens: dict) -> list:
    """The 4 sub-streams' bit lists."""
    n = len(symbols)
    q = -(-n // 4)
    codes = huff_codes(lens)
    return [huff_substream_bits(symbols[min(j * q, n):min((j + 1) * q, n)], codes) for j in range(4)]


def rans_table(freq: dict) -> bytes:
    """The 256 LEB128 varints of docs/format.md section 7 (minimal encoding)."""
    out = bytearray()
    for s in range(256):
        v = freq.get(s, 0)
        out += bytes([v]) if v < 128 else bytes([0x80 | (v & 0x7F), v >> 7])
    return bytes(out)


def rans_encode(symbols: bytes, freq: dict) -> tuple[list, list]:
    """(initial decoder states, words in stream order) per the informative encoder of section 7."""
    cum, c = {}, 0
    for s in range(256):
        cum[s] = c
        c += freq.get(s, 0)
    assert c == 4096
    x = [1 << 16] * 8
    words = []
    for i in range(len(symbols) - 1, -1, -1):
        j, s = i % 8, symbols[i]
        f = freq[s]
        while x[j] >= f << 20:
            words.append(x[j] & 0xFFFF)
            x[j] >>= 16
        x[j] = ((x[j] // f) << 12) + (x[j] % f) + cum[s]
    words.reverse()
    return x, words


def rans_stream(symbols: bytes, freq: dict, *, table: bytes | None = None, states=None, words=None) -> bytes:
    x, w = rans_encode(symbols, freq)
    x = x if states is None else states
    w = w if words is None else words
    return ((rans_table(freq) if table is None else table) + struct.pack("<8I", *x)
            + struct.pack(f"<{len(w)}H", *w))


# ---------------------------------------------------------------------------------------------------
# base files (valid, from write_weights)


def _written(tensors: dict, **kw) -> WFile:
    """The writer's file as a model: format 1.0 unless kw says format='1.1' (the 1.0 corpus is what
    repositories already hold, and MUST keep loading)."""
    kw.setdefault("format", "1.0")
    tmp = tempfile.mkdtemp(prefix="tsw-corpus-")
    try:
        path = os.path.join(tmp, "w.tsw")
        write_weights(path, tensors, core=_fallback_core, threads=1, **kw)
        with open(path, "rb") as fh:
            data = fh.read()
    finally:
        shutil.rmtree(tmp)
    f = parse(data)
    for t, src in zip(f.tensors, tensors.values()):
        t.logical = src.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert f.serialize() == data, "the model does not reproduce the writer's bytes"
    return f


def _merge(*files: WFile) -> WFile:
    return WFile([t for f in files for t in f.tensors])


def _emb() -> torch.Tensor:
    i = torch.arange(320, dtype=torch.float64)
    mag = torch.pow(2.0, -(i % 3))
    frac = ((i * 37) % 101) / 101.0
    sign = torch.where((i * 7) % 5 < 2, -1.0, 1.0)
    return (sign * mag * (1.0 + frac)).to(torch.float32).reshape(2, 160)


def _bias() -> torch.Tensor:
    i = torch.arange(200, dtype=torch.float64)
    return (1.0 + ((i * 13) % 64) / 128.0).to(torch.bfloat16)


def _u8_symbols(n: int) -> bytes:
    """Skewed 3-symbol data (65 'A' : 25 'B' : 10 'C'), so Huffman beats stored."""
    out = bytearray()
    for i in range(n):
        r = (i * 73 + 11) % 100
        out.append(0x41 if r < 65 else 0x42 if r < 90 else 0x43)
    return bytes(out)


def base_basic() -> WFile:
    planes = _written({"emb.weight": _emb(), "norm.bias": _bias()}, compression="planes", chunk_bytes=1024)
    raw = _written({
        "ids": torch.tensor([[(i * 29) % 256 - 128 for i in range(5 * j, 5 * j + 5)] for j in range(3)],
                            dtype=torch.int8),
        "mask": torch.tensor([True, False, True, True, False, False, True]),
        "scale": torch.tensor(0.125, dtype=torch.float32),
        "empty": torch.empty(0, 3, dtype=torch.float32),
        "counts": torch.tensor([(i * 2654435761) % (1 << 40) - (1 << 39) for i in range(20)], dtype=torch.int64),
    }, compression="none", chunk_bytes=64)
    return _merge(planes, raw)


def base_u8() -> WFile:
    """'u': uint8, 400 elements, one planes chunk coded by the writer's Huffman coder; 'tail': raw after it."""
    u = torch.frombuffer(bytearray(_u8_symbols(400)), dtype=torch.uint8)
    f = _merge(_written({"u": u}, compression="planes"),
               _written({"tail": torch.arange(16, dtype=torch.int16)}, compression="none"))
    assert f.t("u").chunks[0][0][0] == spec.CODEC_HUFFMAN
    # the spec-only encoder agrees with the writer on the writer's own code lengths
    stream = f.t("u").chunks[0][0][1]
    lens = {s: (stream[s >> 1] >> (4 * (s & 1))) & 15 for s in range(256)}
    lens = {s: ln for s, ln in lens.items() if ln}
    assert huff_stream(_u8_symbols(400), lens) == stream
    return f


Z_N = 300
Z_CONTENT = bytes([7]) * 250 + bytes((i * 89 + 3) % 256 for i in range(50))
Z_BLOCKS = [("rle", 7, 250), ("raw", Z_CONTENT[250:])]


def base_zstd() -> WFile:
    """'z': uint8, 300 elements, one planes chunk holding a hand-made zstd frame; 'tail': raw after it."""
    f = base_u8()
    z = f.t("u")
    z.name = b"z"
    z.shape = [Z_N]
    z.chunks = [[[spec.CODEC_ZSTD, zstd_frame(Z_BLOCKS, fcs=Z_N)]]]
    z.logical = Z_CONTENT
    return f


def set_huff(f: WFile, stream: bytes) -> WFile:
    f.t("u").chunks[0][0] = [spec.CODEC_HUFFMAN, stream]
    return f


# ---------------------------------------------------------------------------------------------------
# the cases

CASES: list = []

NATIVE_ORDER = ("finding F-D: the spec orders no checks; with two rules broken the backends report different ones "
                "(the fallback follows the table order of docs/format.md, native does not)")


def case(name: str, error: str, match, stage: str, *, note: str = "", known: dict | None = None):
    def deco(fn):
        CASES.append((name, fn, {"error": error, "match": match, "stage": stage, "note": note,
                                 "known": known or {}}))
        return fn
    return deco


def ok(name: str, note: str = "", known: dict | None = None):
    return case(name, "ok", [], "", note=note, known=known)


def _valid_bytes() -> bytes:
    return base_basic().serialize()


def _small_bytes() -> bytes:
    """A valid file with one 15-byte raw tensor (4111 bytes): the base of header-only cases."""
    return _written({"ids": torch.arange(-7, 8, dtype=torch.int8)}, compression="none").serialize()


H = {"magic": 0, "major": 8, "minor": 10, "tensor_count": 12, "index_size": 16, "data_offset": 24,
     "file_size": 32, "index_checksum": 40, "header_checksum": 48, "reserved": 56}
DECLARES = "its header declares"  # WeightsFile's own message for file length != header file_size

# --- valid seeds ----------------------------------------------------------------------------------


@ok("ok_basic.tsw")
def _():
    return base_basic()


@ok("ok_empty.tsw")
def _():
    tmp = tempfile.mkdtemp(prefix="tsw-corpus-")
    try:
        path = os.path.join(tmp, "e.tsw")
        write_weights(path, {}, core=_fallback_core, threads=1)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        shutil.rmtree(tmp)


@ok("ok_huffman_u8.tsw")
def _():
    return base_u8()


@ok("ok_zstd.tsw", note="zstd planes built by hand from RLE + raw blocks (RFC 8878), one with a content checksum")
def _():
    f = base_zstd()
    # a second zstd tensor: float16 planes, plane 0 zstd with a content checksum, plane 1 stored
    n = 280
    hi = bytes([0x3C]) * 200 + bytes([0x3D]) * 80
    lo = bytes((i * 131 + 7) % 256 for i in range(n))
    frame = zstd_frame([("rle", 0x3C, 200), ("rle", 0x3D, 80)], fcs=n,
                       checksum=zstd_content_checksum(hi))
    t = WTensor(b"h16", spec.DTYPES["float16"][0], spec.ENC_PLANES, [n], 512,
                chunks=[[[spec.CODEC_ZSTD, frame], [spec.CODEC_STORED, lo]]])
    t.logical = b"".join(bytes([lo[i], hi[i]]) for i in range(n))  # generic planes: plane 0 = high byte
    f.tensors.insert(1, t)
    return f


@ok("ok_minor_7.tsw", note="a 1.0 reader accepts any minor version")
def _():
    return patch(_valid_bytes(), H["minor"], "H", 7), base_basic()


@ok("ok_minor_65535.tsw")
def _():
    return patch(_valid_bytes(), H["minor"], "H", 0xFFFF), base_basic()


@ok("ok_name_1024_bytes.tsw", note="name_len at its limit, multi-byte UTF-8")
def _():
    f = base_basic()
    f.t("ids").name = ("\u00e9" * 511 + "ab").encode()
    assert len(f.tensors[2].name) == 1024
    return f


@ok("ok_names_nfc_nfd.tsw", note="'\u00e9' and 'e\u0301' are distinct byte strings: both accepted as distinct names "
                                 "(spec: unique names; no normalization is specified)")
def _():
    f = base_basic()
    f.t("ids").name = "caf\u00e9".encode()
    f.t("mask").name = "cafe\u0301".encode()
    return f


@ok("ok_ndim_8.tsw")
def _():
    f = base_basic()
    f.t("counts").shape = [1, 2, 1, 1, 5, 1, 2, 1]
    return f


@ok("ok_chunk_elems_at_limit.tsw", note="chunk_elems x itemsize == 16 MiB exactly")
def _():
    f = base_basic()
    f.t("counts").chunk_elems = (16 << 20) // 8
    return f


@ok("ok_chunk_elems_1.tsw", note="one element per chunk: 20 raw chunks")
def _():
    f = base_basic()
    f.t("counts").chunk_elems = 1
    return f


@ok("ok_dim_2p48_times_0.tsw", note="a dimension of exactly 2^48 with numel 0")
def _():
    f = base_basic()
    f.t("empty").shape = [1 << 48, 0]
    return f


@case("zero_dim_first_then_huge.tsw", "LimitError", "numel", "open",
      note="shape (0, 2^40, 2^20): numel 0, but the extent (zero dimensions counted as 1) is 2^60 > 2^48; "
           "torch could not even build its strides (tests/corpus/findings/ F-A)")
def _():
    f = base_basic()
    f.t("empty").shape = [0, 1 << 40, 1 << 20]
    return f


@case("numel_0_partial_product_2p60.tsw", "LimitError", "numel", "open",
      note="shape (2^40, 2^20, 0): numel is 0, but the extent (zero dimensions counted as 1) 2^60 exceeds "
           "2^48; zero_dim_first_then_huge.tsw holds the same dimensions in another order (also invalid)")
def _():
    f = base_basic()
    f.t("empty").shape = [1 << 40, 1 << 20, 0]
    return f


@case("bool_byte_2.tsw", "CorruptDataError", ["'mask'", "bool element 2", "0x02"], "load",
      note="issue 12 item 13: a bool element MUST be the byte 0 or 1 (was ok_bool_byte_2.tsw: loaded as a "
           "non-canonical torch bool)")
def _():
    f = base_basic()
    m = f.t("mask")
    m.data = bytes([1, 0, 2, 1, 0, 0xFF, 1])
    m.logical = m.data
    return f


@ok("ok_fill_amplification.tsw",
    note="4 chunks of 16 MiB, each plane a 1-byte fill: a ~4.2 KiB file decodes to 64 MiB (valid; the spec caps "
         "no total decoded size: a 64 MiB index can declare ~86 TB)")
def _():
    f = base_u8()
    u = f.t("u")
    ce = 16 << 20
    u.shape = [4 * ce]
    u.chunk_elems = ce
    u.chunks = [[[spec.CODEC_FILL, bytes([k + 1])]] for k in range(4)]
    u.logical = None  # hashed below without materializing 64 MiB here
    return f


@ok("ok_fill_single_element.tsw", note="fill codec for a plane of n = 1 (size 1 == n)")
def _():
    f = base_u8()
    u = f.t("u")
    u.shape = [1]
    u.chunks = [[[spec.CODEC_FILL, b"\x09"]]]
    u.logical = b"\x09"
    return f


@ok("ok_huffman_nonzero_pad_bits.tsw",
    note="the padding bits of a Huffman sub-stream's last byte set to 1: the writer pads with zeros but no rule "
         "says a reader MUST reject other padding, and both readers accept it")
def _():
    f = base_u8()
    syms = _u8_symbols(400)
    lens = {0x41: 1, 0x42: 2, 0x43: 2}
    bits = huff_sub_bits(syms, lens)
    subs = []
    for b in bits:
        nb = len(b)
        s = bytearray(pack_lsb(b))
        if nb % 8:
            s[-1] |= (0xFF << (nb % 8)) & 0xFF
        subs.append(bytes(s))
    assert any(len(b) % 8 for b in bits)
    set_huff(f, huff_stream(syms, lens, subs=subs))
    return f


@ok("ok_zstd_window_1GiB.tsw",
    note="zstd frame without Single_Segment, window descriptor 1 GiB, content size declared = n: valid per the spec "
         "(declares n, decodes to n, fills size)")
def _():
    f = base_zstd()
    f.t("z").chunks[0][0][1] = zstd_frame(Z_BLOCKS, fcs=Z_N, single_segment=False, window_byte=(20 << 3))
    return f


# --- truncation / file length ---------------------------------------------------------------------

@case("trunc_empty_file.tsw", "TruncatedError", "header", "open")
def _():
    return b""


@case("trunc_in_header_10.tsw", "TruncatedError", "header", "open")
def _():
    return _small_bytes()[:10]


@case("trunc_in_header_63.tsw", "TruncatedError", "header", "open")
def _():
    return _small_bytes()[:63]


@case("trunc_after_header.tsw", "TruncatedError", DECLARES, "open")
def _():
    return _small_bytes()[:64]


@case("trunc_in_index.tsw", "TruncatedError", DECLARES, "open")
def _():
    b = _valid_bytes()
    return b[:64 + struct.unpack_from("<Q", b, 16)[0] // 2]


@case("trunc_in_index_padding.tsw", "TruncatedError", DECLARES, "open")
def _():
    return _valid_bytes()[:4000]


@case("trunc_at_data_offset.tsw", "TruncatedError", DECLARES, "open")
def _():
    return _valid_bytes()[:4096]


@case("trunc_in_data.tsw", "TruncatedError", DECLARES, "open")
def _():
    b = _valid_bytes()
    return b[:4096 + 300]


@case("trunc_one_byte_short.tsw", "TruncatedError", DECLARES, "open")
def _():
    return _valid_bytes()[:-1]


@case("trailing_junk_1.tsw", "LayoutError", DECLARES, "open")
def _():
    return _small_bytes() + b"\x00"


@case("trailing_junk_100.tsw", "LayoutError", DECLARES, "open")
def _():
    return _small_bytes() + b"JUNK" * 25


@case("file_size_field_plus_1.tsw", "TruncatedError", DECLARES, "open")
def _():
    b = _small_bytes()
    return patch(b, H["file_size"], "Q", len(b) + 1)


@case("file_size_field_minus_1.tsw", "LayoutError", DECLARES, "open")
def _():
    b = _small_bytes()
    return patch(b, H["file_size"], "Q", len(b) - 1)


@case("file_size_longer_than_last_tensor.tsw", "LayoutError", "file_size", "open",
      note="header file_size == file length, but 64 zero bytes follow the last tensor")
def _():
    b = _valid_bytes() + bytes(64)
    return patch(b, H["file_size"], "Q", len(b))


@case("file_size_cuts_last_tensor.tsw", "LayoutError", "'counts'", "open",
      note="header file_size == file length, but the last tensor's data runs 8 bytes past it")
def _():
    b = _valid_bytes()[:-8]
    return patch(b, H["file_size"], "Q", len(b))


@case("file_size_below_data_offset.tsw", "LayoutError", "file_size", "open")
def _():
    b = _small_bytes()[:4000]
    return patch(b, H["file_size"], "Q", 4000)


@case("file_size_2p56_plus_1.tsw", "LimitError", "file_size", "open")
def _():
    return patch(_small_bytes(), H["file_size"], "Q", (1 << 56) + 1)


@case("file_size_2p64_minus_1.tsw", "LimitError", "file_size", "open")
def _():
    return patch(_small_bytes(), H["file_size"], "Q", U64)


# --- header fields --------------------------------------------------------------------------------

@case("bad_magic.tsw", "FormatError", "magic", "open")
def _():
    return patch(_small_bytes(), 0, "8s", b"TSWEIGHX")


@case("bad_magic_safetensors_like.tsw", "FormatError", "magic", "open")
def _():
    return b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{}}' + bytes(45)


@case("major_2.tsw", "UnsupportedError", "major", "open")
def _():
    return patch(_small_bytes(), H["major"], "H", 2)


@case("major_0.tsw", "UnsupportedError", "major", "open")
def _():
    return patch(_small_bytes(), H["major"], "H", 0)


@case("major_65535_bad_header_checksum.tsw", "UnsupportedError", "major", "open",
      note="major is checked before the header checksum (both readers); the checksum is left stale")
def _():
    return patch(_small_bytes(), H["major"], "H", 0xFFFF, fix_header=False)


@case("reserved_nonzero.tsw", "UnsupportedError", ["features", "reserved", "[3]"], "open",
      note="format 1.1: the 1.0 reserved field is the features bitmask; bit 3 is not assigned")
def _():
    return patch(_small_bytes(), H["reserved"], "Q", 1 << 3)


@case("reserved_high_bit.tsw", "UnsupportedError", ["features", "reserved", "[63]"], "open")
def _():
    return patch(_small_bytes(), H["reserved"], "Q", 1 << 63)


@case("tensor_count_65537.tsw", "LimitError", "tensor_count", "open")
def _():
    return patch(_small_bytes(), H["tensor_count"], "I", 65537)


@case("tensor_count_2p32_minus_1.tsw", "LimitError", "tensor_count", "open")
def _():
    return patch(_small_bytes(), H["tensor_count"], "I", 0xFFFFFFFF)


@case("tensor_count_65536_short_index.tsw", "TruncatedError", "name_len", "open",
      note="65536 passes the header limit; record #7 then runs past the end of the index")
def _():
    return patch(_valid_bytes(), H["tensor_count"], "I", 65536, fix_index=True)


@case("tensor_count_plus_1.tsw", "TruncatedError", "name_len", "open")
def _():
    f = base_basic()
    f.tensor_count = len(f.tensors) + 1
    return f


@case("tensor_count_minus_1.tsw", "LayoutError", "index_size", "open",
      note="the last record is left over after tensor_count records")
def _():
    f = base_basic()
    f.tensor_count = len(f.tensors) - 1
    return f


def _index_size(value, consistent_offset: bool):
    b = bytearray(_small_bytes())
    struct.pack_into("<Q", b, H["index_size"], value)
    if consistent_offset:
        struct.pack_into("<Q", b, H["data_offset"], spec.align_up(64 + value, 4096))
    return bytes(fix_checksums(b, index=False))


@case("index_size_2p32.tsw", "LimitError", "index_size", "open")
def _():
    return _index_size(1 << 32, True)


@case("index_size_2p64_minus_1.tsw", "LimitError", "index_size", "open")
def _():
    return _index_size(U64, False)


@case("index_size_64MiB_plus_1.tsw", "LimitError", "index_size", "open")
def _():
    return _index_size((64 << 20) + 1, True)


@case("index_size_64MiB_exactly.tsw", "TruncatedError", DECLARES, "open",
      note="index_size at its limit passes the header checks; the file is then shorter than file_size")
def _():
    b = bytearray(_index_size(64 << 20, True))
    struct.pack_into("<Q", b, H["file_size"], spec.align_up(64 + (64 << 20), 4096))
    return bytes(fix_checksums(b, index=False))


@case("index_size_minus_8.tsw", "TruncatedError", "chunks", "open",
      note="index_size (and its checksum) 8 bytes short: the last raw chunk record runs past the index")
def _():
    b = _valid_bytes()
    isz = struct.unpack_from("<Q", b, 16)[0]
    return patch(b, H["index_size"], "Q", isz - 8, fix_index=True)


@case("index_size_plus_8.tsw", "LayoutError", "index_size", "open",
      note="index_size (and its checksum) 8 bytes longer: 8 zero padding bytes become left-over index bytes")
def _():
    b = _valid_bytes()
    isz = struct.unpack_from("<Q", b, 16)[0]
    return patch(b, H["index_size"], "Q", isz + 8, fix_index=True)


@case("index_tail_bytes.tsw", "LayoutError", "index_size", "open")
def _():
    f = base_basic()
    f.index_tail = b"\x01\x00x"
    return f


@case("data_offset_plus_4096.tsw", "LayoutError", "data_offset", "open")
def _():
    return patch(_small_bytes(), H["data_offset"], "Q", 8192)


@case("data_offset_minus_4096.tsw", "LayoutError", "data_offset", "open")
def _():
    return patch(_small_bytes(), H["data_offset"], "Q", 0)


@case("data_offset_unaligned.tsw", "LayoutError", "data_offset", "open")
def _():
    b = _small_bytes()
    return patch(b, H["data_offset"], "Q", 64 + struct.unpack_from("<Q", b, 16)[0])


@case("header_checksum_bit_flip_minor.tsw", "ChecksumError", "header_checksum", "open",
      note="a flipped bit in minor (a field no other rule constrains): only the header checksum catches it")
def _():
    return flip(_small_bytes(), H["minor"], 3)


@case("header_checksum_field_flip.tsw", "ChecksumError", "header_checksum", "open")
def _():
    return flip(_small_bytes(), H["header_checksum"] + 5, 6)


@case("index_checksum_field_flip.tsw", "ChecksumError", "index_checksum", "open")
def _():
    return bytes(fix_checksums(bytearray(flip(_small_bytes(), H["index_checksum"], 0)), index=False))


@case("index_bit_flip_in_name.tsw", "ChecksumError", "index_checksum", "open",
      note="'emb.weight' -> 'emb/weight': a still-valid index that only the index checksum catches")
def _():
    b = _valid_bytes()
    i = b.index(b"emb.weight")
    return flip(b, i + 3, 0)


@case("index_bit_flip_in_shape.tsw", "ChecksumError", "index_checksum", "open")
def _():
    b = _valid_bytes()
    i = b.index(b"emb.weight") + len(b"emb.weight") + 4
    return flip(b, i, 2)


# --- index records --------------------------------------------------------------------------------

@case("name_len_0.tsw", "FormatError", "name_len", "open",
      note="an empty name is a bad name (FormatError); name_len > 1024 breaks a limit (LimitError)")
def _():
    f = base_basic()
    f.t("ids").name = b""
    return f


@case("name_len_1025.tsw", "LimitError", ["name_len", "1025"], "open")
def _():
    f = base_basic()
    f.t("ids").name = b"n" * 1025
    return f


@case("name_len_65535_past_index.tsw", "LimitError", "name_len", "open",
      note="name_len 65535 breaks the limit before the name could run past the index")
def _():
    f = base_basic()
    f.t("counts").name_len = 0xFFFF
    return f


@case("name_runs_past_index.tsw", "TruncatedError", "name", "open",
      note="one more record: name_len 10 with 3 name bytes left in the index")
def _():
    f = base_basic()
    f.index_tail = struct.pack("<H", 10) + b"abc"
    f.tensor_count = len(f.tensors) + 1
    return f


@case("name_with_nul.tsw", "FormatError", "name", "open")
def _():
    f = base_basic()
    f.t("ids").name = b"id\x00s"
    return f


@case("name_invalid_utf8_ff.tsw", "FormatError", "UTF-8", "open")
def _():
    f = base_basic()
    f.t("ids").name = b"ids\xff"
    return f


@case("name_invalid_utf8_overlong_nul.tsw", "FormatError", "UTF-8", "open",
      note="C0 80 (an overlong NUL) is not UTF-8")
def _():
    f = base_basic()
    f.t("ids").name = b"id\xc0\x80s"
    return f


@case("name_invalid_utf8_surrogate.tsw", "FormatError", "UTF-8", "open")
def _():
    f = base_basic()
    f.t("ids").name = b"id\xed\xa0\x80s"
    return f


@case("name_invalid_utf8_truncated_seq.tsw", "FormatError", "UTF-8", "open")
def _():
    f = base_basic()
    f.t("counts").name = b"counts\xe2\x82"
    return f


@case("name_duplicate.tsw", "FormatError", "duplicate", "open")
def _():
    f = base_basic()
    f.t("mask").name = b"ids"
    return f


def _dtype(code):
    f = base_basic()
    f.t("ids").dtype = code
    return f


@case("dtype_0.tsw", "UnsupportedError", "dtype", "open")
def _():
    return _dtype(0)


@case("dtype_13.tsw", "UnsupportedError", "dtype", "open")
def _():
    return _dtype(13)


@case("dtype_255.tsw", "UnsupportedError", "dtype", "open")
def _():
    return _dtype(255)


@case("encoding_2.tsw", "UnsupportedError", "encoding", "open")
def _():
    f = base_basic()
    f.t("ids").enc = 2
    return f


@case("encoding_255_planes_tensor.tsw", "UnsupportedError", "encoding", "open")
def _():
    f = base_basic()
    f.t("norm.bias").enc = 255
    return f


@case("flags_1.tsw", "UnsupportedError", "flags", "open",
      note="both readers: UnsupportedError ('meaning from a later version'); errors.py lists 'version, dtype, "
           "encoding or codec' for UnsupportedError, and a 1.x writer cannot set a MUST-be-0 field, so "
           "FormatError is also defensible")
def _():
    f = base_basic()
    f.t("ids").flags = 1
    return f


@case("flags_0x80.tsw", "UnsupportedError", "flags", "open")
def _():
    f = base_basic()
    f.t("norm.bias").flags = 0x80
    return f


@case("ndim_9.tsw", "LimitError", "ndim", "open")
def _():
    f = base_basic()
    f.t("counts").shape = [1, 1, 1, 1, 20, 1, 1, 1, 1]
    return f


@case("ndim_255.tsw", "LimitError", "ndim", "open")
def _():
    f = base_basic()
    f.t("counts").ndim = 255
    return f


@case("shape_runs_past_index.tsw", "TruncatedError", "shape", "open",
      note="the last record claims ndim 8 but the index ends inside its shape")
def _():
    f = base_basic()
    f.index_tail = struct.pack("<H", 1) + b"q" + struct.pack("<BBBB", 1, 0, 8, 0) + bytes(16)
    f.tensor_count = len(f.tensors) + 1
    return f


@case("dtype_field_runs_past_index.tsw", "TruncatedError", "dtype", "open")
def _():
    f = base_basic()
    f.index_tail = struct.pack("<H", 1) + b"q" + b"\x01"
    f.tensor_count = len(f.tensors) + 1
    return f


@case("data_offset_field_runs_past_index.tsw", "TruncatedError", "data_offset", "open")
def _():
    f = base_basic()
    f.index_tail = struct.pack("<H", 1) + b"q" + struct.pack("<BBBBQ", 1, 0, 1, 0, 1) + bytes(10)
    f.tensor_count = len(f.tensors) + 1
    return f


@case("dim_2p48_plus_1.tsw", "LimitError", "281474976710657", "open")
def _():
    f = base_basic()
    f.t("empty").shape = [(1 << 48) + 1, 0]
    return f


@case("dim_2p64_minus_1.tsw", "LimitError", "18446744073709551615", "open")
def _():
    f = base_basic()
    f.t("empty").shape = [0, U64]
    return f


@case("numel_2p48_plus_2p24.tsw", "LimitError", "numel", "open")
def _():
    f = base_basic()
    f.t("counts").shape = [(1 << 24) + 1, 1 << 24]
    return f


@case("dims_product_overflows_2p64.tsw", "LimitError", "numel", "open")
def _():
    f = base_basic()
    f.t("counts").shape = [1 << 48, 1 << 48]
    return f


@case("dims_partial_product_overflows_then_0.tsw", "LimitError", "numel", "open",
      note="shape (2^40, 2^40, 0): numel is 0 but the extent exceeds 2^48 (and 2^64)")
def _():
    f = base_basic()
    f.t("empty").shape = [1 << 40, 1 << 40, 0]
    return f


@case("chunk_elems_0.tsw", "LayoutError", "chunk_elems", "open",
      note="both readers: LayoutError (chunk_elems above the 16 MiB limit is LimitError)")
def _():
    f = base_basic()
    f.t("counts").chunk_elems = 0
    return f


@case("chunk_elems_too_large_f32.tsw", "LimitError", "chunk_elems", "open",
      note="chunk_elems 4194305 x 4 bytes = 16 MiB + 4")
def _():
    f = base_basic()
    f.t("scale").chunk_elems = (4 << 20) + 1
    return f


@case("chunk_elems_too_large_u8.tsw", "LimitError", "chunk_elems", "open")
def _():
    f = base_basic()
    f.t("ids").chunk_elems = (16 << 20) + 1
    return f


@case("chunk_elems_2p32_minus_1.tsw", "LimitError", "chunk_elems", "open")
def _():
    f = base_basic()
    f.t("counts").chunk_elems = 0xFFFFFFFF
    return f


@case("chunk_count_plus_1_raw.tsw", "LayoutError", "chunk_count", "open")
def _():
    f = base_basic()
    t = f.t("counts")
    t.chunk_count = 4
    t.tail = struct.pack("<Q", 0)
    return f


@case("chunk_count_minus_1_raw.tsw", "LayoutError", "chunk_count", "open",
      note="'counts' has 3 raw chunks; its record says 2 and holds 2 chunk records")
def _():
    f = base_basic()
    t = f.t("counts")
    t.chunk_count = 2
    t.keep_records = 2
    return f


@case("chunk_count_plus_1_planes.tsw", "LayoutError", "chunk_count", "open")
def _():
    f = base_basic()
    t = f.t("emb.weight")
    t.chunk_count = 3
    t.tail = bytes(5 * 4 + 8)
    return f


@case("chunk_count_0_planes.tsw", "LayoutError", "chunk_count", "open")
def _():
    f = base_basic()
    t = f.t("norm.bias")
    t.chunk_count = 0
    return f


@case("raw_data_size_plus_1.tsw", "LayoutError", "data_size", "open")
def _():
    f = base_basic()
    f.t("ids").extra = b"\x00"
    return f


@case("raw_data_size_minus_1.tsw", "LayoutError", "data_size", "open")
def _():
    f = base_basic()
    t = f.t("counts")
    t.freeze_sums()
    t.data = t.data[:-1]
    return f


@case("raw_data_size_2p64_minus_1.tsw", "LayoutError", "data_size", "open")
def _():
    f = base_basic()
    f.t("counts").data_size = U64
    return f


@case("planes_data_size_plus_1.tsw", "LayoutError", "data_size", "open",
      note="one stray byte stored after the chunks and counted in data_size: data_size = sum of chunk sizes + 1")
def _():
    f = base_basic()
    f.t("norm.bias").extra = b"\x00"
    return f


@case("planes_data_size_minus_1.tsw", "LayoutError", "data_size", "open")
def _():
    f = base_basic()
    t = f.t("norm.bias")
    t.data_size = len(t.payload()) - 1
    return f


@case("offset_overlap.tsw", "LayoutError", ["'ids'", "data_offset"], "open",
      note="'ids' starts where 'norm.bias' starts (an overlap)")
def _():
    f = base_basic()
    f.t("ids").data_offset = _offsets(f)[f.tensors.index(f.t("norm.bias"))]
    return f


def _offsets(f: WFile) -> list:
    """Each tensor's data offset as serialize() places it."""
    f.serialize()
    return list(f.offsets)


@case("offset_overlap_by_one_byte.tsw", "LayoutError", ["'mask'", "data_offset"], "open")
def _():
    f = base_basic()
    offs = _offsets(f)
    f.t("mask").data_offset = offs[f.tensors.index(f.t("ids"))] + 14  # 'ids' holds 15 bytes
    return f


@case("offset_hole_64.tsw", "LayoutError", ["'mask'", "data_offset"], "open",
      note="64 zero bytes more than the alignment needs before 'mask' (file_size and later offsets follow)")
def _():
    f = base_basic()
    offs = _offsets(f)
    i = f.tensors.index(f.t("mask"))
    f.t("mask").data_offset = offs[i] + 64
    for t, o in zip(f.tensors[i + 1:], _shifted(f, i)):
        t.data_offset = o
    return f


def _shifted(f: WFile, i: int) -> list:
    """Offsets of tensors after #i when #i is placed at its data_offset override."""
    end = f.tensors[i].data_offset + len(f.tensors[i].payload())
    out = []
    for t in f.tensors[i + 1:]:
        size = len(t.payload())
        end = spec.align_up(end, spec.tensor_alignment(t.enc, size))
        out.append(end)
        end += size
    return out


@case("offset_first_tensor_inside_index_padding.tsw", "LayoutError", ["'emb.weight'", "data_offset"], "open")
def _():
    f = base_basic()
    f.t("emb.weight").data_offset = 2048
    return f


@case("raw_big_tensor_misaligned.tsw", "LayoutError", ["'big'", "data_offset"], "open",
      note="> 64 KiB: a 65536-byte raw tensor placed at 64-byte alignment instead of 4096")
def _():
    f = _merge(_written({"small": torch.arange(16, dtype=torch.int32)}, compression="none"),
               _written({"big": torch.frombuffer(bytearray(bytes((i * 7) % 251 for i in range(65536))),
                                                 dtype=torch.uint8)}, compression="none"))
    f.t("big").data_offset = 4096 + 64
    return f


@case("planes_tensor_page_aligned.tsw", "LayoutError", ["'norm.bias'", "data_offset"], "open",
      note="a planes tensor takes 64-byte alignment whatever its size: 4096 is a hole")
def _():
    f = base_basic()
    offs = _offsets(f)
    i = f.tensors.index(f.t("norm.bias"))
    f.t("norm.bias").data_offset = spec.align_up(offs[i] + 1, 4096)
    for t, o in zip(f.tensors[i + 1:], _shifted(f, i)):
        t.data_offset = o
    return f


@case("data_beyond_file_end.tsw", "LayoutError", "'counts'", "open",
      note="the last tensor's data_size reaches 8 bytes past file_size (= file length)")
def _():
    b = bytearray(base_basic().serialize()[:-8])
    struct.pack_into("<Q", b, H["file_size"], len(b))
    return bytes(fix_checksums(b, index=False))


@case("planes_data_size_2p64_minus_64.tsw", "LimitError", ["'norm.bias'", "data_size"], "open",
      note="data_offset + data_size overflows 2^64 (spec: LimitError); it also differs from the sum of the "
           "chunk sizes, which native checks first (LayoutError)",
      known={"native": NATIVE_ORDER})
def _():
    f = base_basic()
    f.t("norm.bias").data_size = U64 - 63
    return f


@case("multi_fault_data_offset_and_file_size.tsw", "LayoutError", "header", "open",
      note="header data_offset + 4096 and file_size 2^56 + 1: two broken rules; the fallback reports data_offset "
           "(table order), native the file_size limit",
      known={"native": NATIVE_ORDER})
def _():
    b = bytearray(_valid_bytes())
    struct.pack_into("<Q", b, H["data_offset"], 8192)
    struct.pack_into("<Q", b, H["file_size"], (1 << 56) + 1)
    return bytes(fix_checksums(b, index=False))


@case("data_offset_field_2p64_minus_64.tsw", "LayoutError", ["'counts'", "data_offset"], "open")
def _():
    f = base_basic()
    t = f.t("counts")
    t.data_offset = U64 - 63
    # do not try to write there: serialize with the override dropped, then patch the field
    t.data_offset = None
    b = bytearray(f.serialize())
    pos = b.index(b"counts") + len(b"counts") + 4 + 8
    struct.pack_into("<Q", b, pos, U64 - 63)
    return bytes(fix_checksums(b))


# --- planes: codecs and plane sizes ---------------------------------------------------------------

@case("codec_5.tsw", "UnsupportedError", ["'emb.weight' chunk 0", "codec"], "open",
      note="codec 4 is rans (docs/format.md section 7); 5 is the first unknown code")
def _():
    f = base_basic()
    f.t("emb.weight").chunks[0][2][0] = 5
    return f


@case("codec_255.tsw", "UnsupportedError", ["'emb.weight' chunk 1", "codec"], "open")
def _():
    f = base_basic()
    f.t("emb.weight").chunks[1][3][0] = 255
    return f


@case("plane_size_gt_n.tsw", "LimitError", ["'u' chunk 0"], "open",
      note="a Huffman plane of n + 1 = 401 stored bytes (the stream has trailing bytes)")
def _():
    f = base_u8()
    s = f.t("u").chunks[0][0][1]
    f.t("u").chunks[0][0][1] = s + bytes(401 - len(s))
    return f


@case("plane_size_field_2p32_minus_1.tsw", "LimitError", ["'u' chunk 0"], "open")
def _():
    f = base_u8()
    f.t("u").sizes[(0, 0)] = 0xFFFFFFFF
    return f


@case("fill_plane_size_2.tsw", "LayoutError", ["'norm.bias' chunk 0"], "open")
def _():
    f = base_basic()
    ch = f.t("norm.bias").chunks[0]
    assert ch[0][0] == spec.CODEC_FILL
    ch[0][1] = bytes(ch[0][1]) * 2
    return f


@case("fill_plane_size_0.tsw", "LayoutError", ["'norm.bias' chunk 0"], "open")
def _():
    f = base_basic()
    ch = f.t("norm.bias").chunks[0]
    ch[0][1] = b""
    return f


@case("stored_plane_size_n_minus_1.tsw", "LayoutError", ["'norm.bias' chunk 0"], "open")
def _():
    f = base_basic()
    ch = f.t("norm.bias").chunks[0]
    assert ch[1][0] == spec.CODEC_STORED
    ch[1][1] = bytes(ch[1][1])[:-1]
    return f


@case("stored_plane_size_n_plus_1.tsw", "LimitError", ["'norm.bias' chunk 0"], "open")
def _():
    f = base_basic()
    ch = f.t("norm.bias").chunks[0]
    ch[1][1] = bytes(ch[1][1]) + b"\x00"
    return f


@case("zstd_plane_size_0.tsw", "LayoutError", ["'z' chunk 0"], "open",
      note="docs/format.md section 5: every plane's size MUST be >= 1 (an index rule: LayoutError at open, while "
           "size > n is LimitError)")
def _():
    f = base_zstd()
    f.t("z").chunks[0][0][1] = b""
    return f


@case("huffman_plane_size_0.tsw", "LayoutError", ["'u' chunk 0"], "open")
def _():
    f = base_u8()
    f.t("u").chunks[0][0][1] = b""
    return f


# --- zstd planes ----------------------------------------------------------------------------------

def _zstd(frame: bytes) -> WFile:
    f = base_zstd()
    f.t("z").chunks[0][0][1] = frame
    return f


ZM = ["'z' chunk 0"]


@case("zstd_bomb_declares_2p40.tsw", "CorruptDataError", ZM, "load",
      note="the frame header declares 2^40 bytes of content in a 300-byte plane")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=1 << 40))


@case("zstd_bomb_declares_2p64_minus_1.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=U64 - 1, fcs_bytes=8))


@case("zstd_declares_n_plus_1.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS[:1] + [("raw", Z_CONTENT[250:] + b"\x00")], fcs=Z_N + 1))


@case("zstd_declares_n_minus_1.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS[:1] + [("raw", Z_CONTENT[250:-1])], fcs=Z_N - 1))


@case("zstd_no_content_size.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=None, single_segment=False))


@case("zstd_decodes_more_than_declared.tsw", "CorruptDataError", ZM, "load",
      note="declares n = 300, its blocks regenerate 300 + 100000 bytes (a bomb against the destination)")
def _():
    return _zstd(zstd_frame(Z_BLOCKS + [("rle", 0, 100000)], fcs=Z_N, single_segment=False, window_byte=(7 << 3)))


@case("zstd_decodes_less_than_declared.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame([("rle", 7, 250), ("raw", Z_CONTENT[250:290])], fcs=Z_N))


@case("zstd_trailing_byte.tsw", "CorruptDataError", ZM, "load",
      note="a valid frame then one byte: the frame must fill size exactly")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N) + b"\x00")


@case("zstd_trailing_skippable_frame.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N) + struct.pack("<II", 0x184D2A50, 0))


@case("zstd_two_frames.tsw", "CorruptDataError", ZM, "load",
      note="two frames of 150 bytes each: content size of the first is not n")
def _():
    return _zstd(zstd_frame([("rle", 7, 150)], fcs=150) + zstd_frame([("rle", 7, 100), ("raw", Z_CONTENT[250:])],
                                                                      fcs=150))


@case("zstd_skippable_frame_only.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(struct.pack("<II", 0x184D2A50, 8) + bytes(8))


@case("zstd_bad_magic.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N, magic=b"\x28\xb5\x2f\xfe"))


@case("zstd_reserved_block_type.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame([("rle", 7, 250), ("bad", 3, Z_CONTENT[250:])], fcs=Z_N))


@case("zstd_truncated_block.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N)[:-10])


@case("zstd_header_only.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(b"\x28\xb5\x2f")


@case("zstd_dictionary_id.tsw", "CorruptDataError", ZM, "load",
      note="the frame needs dictionary 12345, which no reader has")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N, dict_id=12345))


@case("zstd_bad_content_checksum.tsw", "CorruptDataError", ZM, "load")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N, checksum=zstd_content_checksum(Z_CONTENT) ^ 1))


@case("zstd_window_2p41.tsw", "CorruptDataError", ZM, "load",
      note="Window_Descriptor exponent 31 (window 2^41, beyond what libzstd decodes)")
def _():
    return _zstd(zstd_frame(Z_BLOCKS, fcs=Z_N, single_segment=False, window_byte=(31 << 3)))


@case("zstd_plane_larger_than_n.tsw", "LimitError", ZM, "open",
      note="a valid frame padded with a skippable frame to 301 > n bytes")
def _():
    fr = zstd_frame(Z_BLOCKS, fcs=Z_N)
    pad = Z_N + 1 - len(fr) - 8
    return _zstd(fr + struct.pack("<II", 0x184D2A50, pad) + bytes(pad))


# --- Huffman planes -------------------------------------------------------------------------------

SYMS = _u8_symbols(400)
LENS = {0x41: 1, 0x42: 2, 0x43: 2}
HM = ["'u' chunk 0"]


def _huff(**kw) -> WFile:
    return set_huff(base_u8(), huff_stream(SYMS, LENS, **kw))


def _subs() -> list:
    return [pack_lsb(b) for b in huff_sub_bits(SYMS, LENS)]




@ok("ok_huffman_handmade.tsw", note="the same data as ok_huffman_u8.tsw with hand-picked lengths A=1 B=2 C=2")
def _():
    return _huff()


@case("huffman_incomplete_code.tsw", "CorruptDataError", HM, "load",
      note="lengths A=1 B=2 (Kraft sum 1536 < 2048); the data uses only A and B")
def _():
    syms = bytes(0x41 if s == 0x43 else s for s in SYMS)
    return set_huff(base_u8(), huff_stream(syms, {0x41: 1, 0x42: 2}))


@case("huffman_oversubscribed_code.tsw", "CorruptDataError", HM, "load",
      note="lengths A=1 B=1 C=2 (Kraft sum 2560 > 2048)")
def _():
    syms = bytes(0x41 if s == 0x43 else s for s in SYMS)
    return set_huff(base_u8(), huff_stream(syms, {0x41: 1, 0x42: 1, 0x43: 2}))


@case("huffman_one_symbol.tsw", "CorruptDataError", HM, "load",
      note="only A has a length (1): fewer than 2 symbols")
def _():
    syms = bytes([0x41]) * 400
    return set_huff(base_u8(), huff_stream(syms, {0x41: 1}))


@case("huffman_no_symbol.tsw", "CorruptDataError", HM, "load")
def _():
    return set_huff(base_u8(), bytes(128) + struct.pack("<III", 0, 0, 0) + bytes(60))


@case("huffman_length_12.tsw", "CorruptDataError", HM, "load",
      note="A=1 B=2 C=2 is complete; D=12 is present with a length above 11")
def _():
    return _huff_lens({0x41: 1, 0x42: 2, 0x43: 2, 0x44: 12})


@case("huffman_length_15.tsw", "CorruptDataError", HM, "load")
def _():
    return _huff_lens({0x41: 1, 0x42: 2, 0x43: 2, 0xFF: 15})


def _huff_lens(lens: dict) -> WFile:
    subs = _subs()
    stream = bytearray(huff_stream(SYMS, LENS, subs=subs))
    for s, ln in lens.items():
        stream[s >> 1] = (stream[s >> 1] & (0xF0 if s & 1 == 0 else 0x0F)) | (ln << (4 * (s & 1)))
    return set_huff(base_u8(), bytes(stream))


@case("huffman_truncated_substream3.tsw", "CorruptDataError", HM, "load",
      note="the last byte of sub-stream 3 removed: it ends before its 100 symbols")
def _():
    subs = _subs()
    subs[3] = subs[3][:-1]
    return _huff(subs=subs)


@case("huffman_truncated_substream0.tsw", "CorruptDataError", HM, "load",
      note="sub-stream 0 one byte short (size0 - 1)")
def _():
    subs = _subs()
    subs[0] = subs[0][:-1]
    return _huff(subs=subs)


@case("huffman_last_code_past_end.tsw", "CorruptDataError", HM, "load",
      note="sub-stream 1 codes 8k + 1 bits whose last symbol is B = '10'; the stream stores only k bytes, so B's "
           "'1' is its last bit and B's '0' is past the end. A decoder that reads ahead sees that bit as 0 and "
           "decodes B, but the sub-stream ends before its last symbol and MUST be rejected")
def _():
    syms = bytearray(SYMS)
    seg = syms[100:200]  # sub-stream 1 (q = 100)
    seg[-1] = 0x42
    codes = huff_codes(LENS)
    i = 0
    while sum(codes[s][1] for s in seg) % 8 != 1:
        if seg[i] == 0x42:
            seg[i] = 0x41  # one bit less
        elif seg[i] == 0x41:
            seg[i] = 0x42  # one bit more
        i += 1
    syms[100:200] = seg
    syms = bytes(syms)
    sb = huff_sub_bits(syms, LENS)
    assert len(sb[1]) % 8 == 1 and sb[1][-2:] == [1, 0]
    subs = [pack_lsb(b) for b in sb]
    subs[1] = subs[1][:-1]
    f = set_huff(base_u8(), huff_stream(syms, LENS, subs=subs))
    f.t("u").logical = syms
    return f


@case("huffman_trailing_byte_substream3.tsw", "CorruptDataError", HM, "load")
def _():
    subs = _subs()
    subs[3] = subs[3] + b"\x00"
    return _huff(subs=subs)


@case("huffman_trailing_byte_substream1.tsw", "CorruptDataError", HM, "load")
def _():
    subs = _subs()
    subs[1] = subs[1] + b"\x00"
    return _huff(subs=subs)


@case("huffman_substream_sizes_beyond_stream.tsw", "CorruptDataError", HM, "load",
      note="size0 = 2^32 - 1")
def _():
    subs = _subs()
    return _huff(sizes=[0xFFFFFFFF, len(subs[1]), len(subs[2])])


@case("huffman_substream_sizes_sum_beyond_stream.tsw", "CorruptDataError", HM, "load",
      note="each size fits alone, size0 + size1 + size2 exceed the bytes after the header")
def _():
    subs = _subs()
    total = sum(len(s) for s in subs)
    return _huff(sizes=[total - 1, total - 1, total - 1])


@case("huffman_substream_sizes_wrap_u32.tsw", "CorruptDataError", HM, "load",
      note="size0 + size1 + size2 wraps to the right total modulo 2^32")
def _():
    subs = _subs()
    s0, s1, s2 = (len(s) for s in subs[:3])
    return _huff(sizes=[s0 + (1 << 31), s1 + (1 << 31), s2])


@case("huffman_stream_shorter_than_header.tsw", "CorruptDataError", HM, "load",
      note="a 100-byte Huffman plane (the header alone is 140)")
def _():
    return set_huff(base_u8(), huff_stream(SYMS, LENS)[:100])


@case("huffman_bits_flipped_same_checksum.tsw", "CorruptDataError", HM, "load",
      note="sub-stream 2 shortened by its last byte and sub-stream 3 given one more: sizes still add up")
def _():
    subs = _subs()
    moved = subs[2][-1:]
    subs[2] = subs[2][:-1]
    subs[3] = moved + subs[3]
    return _huff(subs=subs)


# Huffman planes of n >= 65536 symbols: the native decoder switches to a multi-symbol table there
NBIG = 65539  # q = 16385: sub-stream 3 is one symbol shorter


def _big_syms() -> bytes:
    out = bytearray()
    for i in range(NBIG):
        r = (i * 7919 + 13) % 100
        out.append(0x41 if r < 90 else 0x42 if r < 96 else 0x43)
    return bytes(out)


def _huff_big(syms: bytes, subs=None, sizes=None) -> WFile:
    f = base_u8()
    u = f.t("u")
    u.shape = [len(syms)]
    u.chunks = [[[spec.CODEC_HUFFMAN, huff_stream(syms, LENS, subs=subs, sizes=sizes)]]]
    u.logical = syms
    return f


@ok("ok_huffman_multi_symbol.tsw", note="65539 symbols in one Huffman plane (native multi-symbol fast path)")
def _():
    return _huff_big(_big_syms())


@case("huffman_multi_truncated_substream2.tsw", "CorruptDataError", HM, "load",
      note="65539 symbols; sub-stream 2 lacks its last byte")
def _():
    syms = _big_syms()
    subs = [pack_lsb(b) for b in huff_sub_bits(syms, LENS)]
    subs[2] = subs[2][:-1]
    return _huff_big(syms, subs=subs)


@case("huffman_multi_trailing_byte_substream0.tsw", "CorruptDataError", HM, "load")
def _():
    syms = _big_syms()
    subs = [pack_lsb(b) for b in huff_sub_bits(syms, LENS)]
    subs[0] = subs[0] + b"\xff"
    return _huff_big(syms, subs=subs)


@case("huffman_multi_last_code_past_end.tsw", "CorruptDataError", HM, "load",
      note="65539 symbols; sub-stream 3 ends with the first bit of its last code (see huffman_last_code_past_end)")
def _():
    syms = bytearray(_big_syms())
    q = -(-NBIG // 4)
    seg = syms[3 * q:]
    seg[-1] = 0x42
    codes = huff_codes(LENS)
    i = 0
    while sum(codes[s][1] for s in seg) % 8 != 1:
        seg[i] = 0x41 if seg[i] == 0x42 else 0x42 if seg[i] == 0x41 else seg[i]
        i += 1
    syms[3 * q:] = seg
    syms = bytes(syms)
    sb = huff_sub_bits(syms, LENS)
    assert len(sb[3]) % 8 == 1 and sb[3][-2:] == [1, 0]
    subs = [pack_lsb(b) for b in sb]
    subs[3] = subs[3][:-1]
    return _huff_big(syms, subs=subs)


# --- rANS planes ----------------------------------------------------------------------------------

RFREQ = {0x41: 2662, 0x42: 1024, 0x43: 410}
RM = ["'u' chunk 0"]


def _rans(stream: bytes) -> WFile:
    f = base_u8()
    f.t("u").chunks[0][0] = [spec.CODEC_RANS, stream]
    return f


@ok("ok_rans.tsw", note="a rans plane (codec 4) built from docs/format.md section 7")
def _():
    stream = rans_stream(SYMS, RFREQ)
    assert len(stream) <= 400
    return _rans(stream)


@ok("ok_rans_single_symbol.tsw", note="one symbol with frequency 4096: the states never move and no word is "
                                      "stored (valid: section 7 asks for no second symbol)")
def _():
    f = _rans(rans_stream(bytes([0x41]) * 400, {0x41: 4096}))
    f.t("u").logical = bytes([0x41]) * 400
    return f


@case("rans_freq_sum_4095.tsw", "CorruptDataError", RM, "load")
def _():
    return _rans(rans_stream(SYMS, RFREQ, table=rans_table({0x41: 2661, 0x42: 1024, 0x43: 410})))


@case("rans_freq_sum_4097.tsw", "CorruptDataError", RM, "load")
def _():
    return _rans(rans_stream(SYMS, RFREQ, table=rans_table({0x41: 2663, 0x42: 1024, 0x43: 410})))


@case("rans_freq_4097_single.tsw", "CorruptDataError", RM, "load", note="a frequency above 4096 (varint 0x81 0x20)")
def _():
    return _rans(rans_stream(SYMS, RFREQ, table=rans_table({0x41: 4097})))


@case("rans_varint_non_minimal.tsw", "CorruptDataError", RM, "load", note="symbol 0's frequency 0 written as the two bytes 0x80 0x00")
def _():
    return _rans(rans_stream(SYMS, RFREQ, table=b"\x80\x00" + rans_table(RFREQ)[1:]))


@case("rans_varint_second_byte_33.tsw", "CorruptDataError", RM, "load", note="a second varint byte of 33 (> 4096 / 128)")
def _():
    t = bytearray(rans_table(RFREQ))
    i = 0x41  # symbols 0..0x40 are one zero byte each: symbol 0x41's varint starts at 0x41
    assert t[i] & 0x80
    t[i + 1] = 33
    return _rans(rans_stream(SYMS, RFREQ, table=bytes(t)))


@case("rans_table_truncated.tsw", "CorruptDataError", RM, "load", note="the plane ends inside the frequency table")
def _():
    return _rans(rans_table(RFREQ)[:200])


@case("rans_states_truncated.tsw", "CorruptDataError", RM, "load")
def _():
    return _rans(rans_stream(SYMS, RFREQ)[:len(rans_table(RFREQ)) + 30])


@case("rans_state_below_2p16.tsw", "CorruptDataError", RM, "load")
def _():
    x, w = rans_encode(SYMS, RFREQ)
    x[3] = 0xFFFF
    return _rans(rans_stream(SYMS, RFREQ, states=x))


@case("rans_odd_word_bytes.tsw", "CorruptDataError", RM, "load")
def _():
    return _rans(rans_stream(SYMS, RFREQ) + b"\x00")


@case("rans_runs_out_of_words.tsw", "CorruptDataError", RM, "load", note="the last word removed")
def _():
    x, w = rans_encode(SYMS, RFREQ)
    return _rans(rans_stream(SYMS, RFREQ, words=w[:-1]))


@case("rans_no_words.tsw", "CorruptDataError", RM, "load")
def _():
    return _rans(rans_stream(SYMS, RFREQ, words=[]))


@case("rans_word_left_over.tsw", "CorruptDataError", RM, "load", note="one word more than the decoder reads")
def _():
    x, w = rans_encode(SYMS, RFREQ)
    return _rans(rans_stream(SYMS, RFREQ, words=w + [0x1234]))


@case("rans_final_state_not_2p16.tsw", "CorruptDataError", RM, "load", note="the encoder started state 5 at 2^16 + 1: every word is consumed but state 5 ends at 2^16 + 1")
def _():
    cum = {0x41: 0, 0x42: 2662, 0x43: 3686}
    x = [1 << 16] * 8
    x[5] += 1
    words = []
    for i in range(len(SYMS) - 1, -1, -1):
        j, s = i % 8, SYMS[i]
        f = RFREQ[s]
        while x[j] >= f << 20:
            words.append(x[j] & 0xFFFF)
            x[j] >>= 16
        x[j] = ((x[j] // f) << 12) + (x[j] % f) + cum[s]
    words.reverse()
    return _rans(rans_stream(SYMS, RFREQ, states=x, words=words))


@case("rans_plane_size_0.tsw", "LayoutError", RM, "open")
def _():
    return _rans(b"")


# --- checksums of chunks --------------------------------------------------------------------------

@case("compressed_chunk_data_bit_flip.tsw", "ChecksumError", "'emb.weight' chunk 1", "load")
def _():
    f = base_basic()
    t = f.t("emb.weight")
    t.freeze_sums()
    codec, blob = t.chunks[1][3]
    t.chunks[1][3][1] = flip(blob, len(blob) // 2, 4)
    return f


@case("compressed_chunk_checksum_field_flip.tsw", "ChecksumError", "'emb.weight' chunk 0", "load",
      note="the chunk record's checksum has one bit flipped (index checksum recomputed)")
def _():
    f = base_basic()
    t = f.t("emb.weight")
    t.freeze_sums()
    t.sums[0] ^= 1 << 33
    return f


@case("compressed_huffman_bit_flip.tsw", "ChecksumError", "'u' chunk 0", "load",
      note="a flipped bit inside a Huffman stream: the chunk checksum catches it before the decoder")
def _():
    f = base_u8()
    t = f.t("u")
    t.freeze_sums()
    t.chunks[0][0][1] = flip(t.chunks[0][0][1], 150, 1)
    return f


@case("raw_chunk_bit_flip.tsw", "ChecksumError", "'counts' chunk 1", "load",
      note="raw chunks are hashed only by load(verify='all') and verify(); load('compressed') succeeds")
def _():
    f = base_basic()
    t = f.t("counts")
    t.freeze_sums()
    d = bytearray(t.data)
    d[70] ^= 0x10
    t.data = bytes(d)
    return f


@case("raw_chunk_checksum_field_flip.tsw", "ChecksumError", "'ids' chunk 0", "load")
def _():
    f = base_basic()
    t = f.t("ids")
    t.freeze_sums()
    t.sums[0] ^= 1
    return f


@case("raw_scalar_bit_flip.tsw", "ChecksumError", "'scale' chunk 0", "load")
def _():
    f = base_basic()
    t = f.t("scale")
    t.freeze_sums()
    t.data = flip(t.data, 3, 7)
    return f


# --- padding (checked at every open: issue 12 item 10) ----------------------------------------------

@case("padding_after_index_nonzero.tsw", "LayoutError", "padding", "open",
      note="one non-zero byte between the end of the index and data_offset")
def _():
    return flip(_small_bytes(), 4095, 0)


@case("padding_between_tensors_nonzero.tsw", "LayoutError", "padding", "open",
      note="one non-zero byte in the alignment padding before 'mask'")
def _():
    f = base_basic()
    b = bytearray(f.serialize())
    offs = _offsets(f)
    i = f.tensors.index(f.t("mask"))
    b[offs[i] - 1] = 0x5A
    return bytes(b)


# --- format 1.1: features, decoded checksums, extension records, bool bytes (issue 12 items 10, 11, 13) ---


def _v11(f: WFile, features: int = spec.FEAT_DECODED_CHECKSUMS) -> WFile:
    """The same model as a format 1.1 file: 'planes' chunk records carry decoded checksums (from logical)."""
    f.minor = 1
    f.reserved = features
    return f


def _small() -> WFile:
    """One 15-byte raw tensor (the model of _small_bytes())."""
    return _written({"ids": torch.arange(-7, 8, dtype=torch.int8)}, compression="none")


def _ext(*records) -> bytes:
    return b"".join(struct.pack("<HI", tag, len(body)) + body for tag, body in records)


def format_11_cases() -> None:
    @ok("ok_v11_basic.tsw", note="format 1.1 as the writer writes it: planes chunks carry decoded checksums")
    def _():
        return _merge(_written({"emb.weight": _emb(), "norm.bias": _bias()}, compression="planes",
                               chunk_bytes=1024, format="1.1"),
                      _written({"ids": torch.arange(-7, 8, dtype=torch.int8)}, compression="none", format="1.1"))

    @ok("ok_v11_unknown_extension_tags.tsw",
        note="feature bit 1: extension records after the tensor records; a reader skips tags it does not know")
    def _():
        f = _v11(_small(), spec.FEAT_DECODED_CHECKSUMS | spec.FEAT_EXTENSIONS)
        f.index_tail = _ext((7, b"a later minor's optional data"), (300, b""), (0xFFFF, bytes(range(40))))
        return f

    @case("v11_feature_bit_3.tsw", "UnsupportedError", ["features", "[3]"], "open",
          note="an unknown REQUIRED feature bit: a reader refuses the file instead of misreading it")
    def _():
        return _v11(_small(), spec.FEAT_DECODED_CHECKSUMS | 1 << 3)

    @case("v11_decoded_checksum_flipped.tsw", "ChecksumError", ["'u' chunk 0", "decoded checksum mismatch"],
          "load")
    def _():
        f = _v11(base_u8())
        f.t("u").dsums = [f.t("u").decoded_sum(0) ^ 1]
        return f

    @case("v11_huffman_resealed_other_values.tsw", "ChecksumError", ["'u' chunk 0", "decoded checksum mismatch"],
          "load", note="issue 12 item 11: a valid Huffman stream of other values with a resealed stored checksum; "
                       "the decoded checksum pins the values")
    def _():
        f = _v11(base_u8())
        u = f.t("u")
        stream = u.chunks[0][0][1]
        lens = {s: (stream[s >> 1] >> (4 * (s & 1))) & 15 for s in range(256)}
        other = bytes(reversed(_u8_symbols(400)))
        assert other != u.logical
        u.chunks[0][0][1] = huff_stream(other, {s: ln for s, ln in lens.items() if ln})
        return f

    @case("v11_zstd_resealed_other_content.tsw", "ChecksumError", ["'z' chunk 0", "decoded checksum mismatch"],
          "load", note="issue 12 item 11: a valid zstd frame of other content (resealed stored checksum): whatever "
                       "a zstd library makes of a damaged frame, the decoded checksum decides, in both backends")
    def _():
        f = _v11(base_zstd())
        z = f.t("z")
        other = bytes([9]) * 250 + Z_CONTENT[250:]
        z.chunks[0][0][1] = zstd_frame([("rle", 9, 250), ("raw", other[250:])], fcs=Z_N)
        return f

    @case("v11_bool_planes_byte_2.tsw", "CorruptDataError", ["'flags'", "bool element 5", "0x02"], "load",
          note="issue 12 item 13: bool elements MUST be 0 or 1, in 'planes' tensors too")
    def _():
        data = bytes([0, 1] * 200)
        data = data[:5] + b"\x02" + data[6:]
        f = _v11(_written({"flags": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, compression="planes",
                          format="1.1"))
        t = f.t("flags")
        t.name, t.dtype = b"flags", spec.DTYPES["bool"][0]
        return f

    @case("v11_extension_tag_0.tsw", "LayoutError", "extension tag", "open")
    def _():
        f = _v11(_small(), spec.FEAT_DECODED_CHECKSUMS | spec.FEAT_EXTENSIONS)
        f.index_tail = _ext((0, b"x"))
        return f

    @case("v11_extension_tags_not_ascending.tsw", "LayoutError", "extension tag", "open")
    def _():
        f = _v11(_small(), spec.FEAT_DECODED_CHECKSUMS | spec.FEAT_EXTENSIONS)
        f.index_tail = _ext((9, b"x"), (9, b"y"))
        return f

    @case("v11_extension_length_past_index.tsw", "TruncatedError", "extension length", "open")
    def _():
        f = _v11(_small(), spec.FEAT_DECODED_CHECKSUMS | spec.FEAT_EXTENSIONS)
        f.index_tail = struct.pack("<HI", 5, 11) + b"0123456789"
        return f

    @case("v11_extension_record_truncated.tsw", "TruncatedError", "extension record", "open")
    def _():
        f = _v11(_small(), spec.FEAT_DECODED_CHECKSUMS | spec.FEAT_EXTENSIONS)
        f.index_tail = _ext((5, b"ok")) + b"\x06\x00\x01"
        return f

    @case("v11_extension_bytes_without_bit.tsw", "LayoutError", "index", "open",
          note="extension records in a file whose features lack bit 1 are bytes left over in the index")
    def _():
        f = _v11(_small())
        f.index_tail = _ext((5, b"ok"))
        return f

    @case("v11_decoded_bit_on_1_0_records.tsw", "UnsupportedError", "dtype", "open",
          note="a 1.0 index (no decoded checksums) under feature bit 0: the second record is read 8 bytes early "
               "and fails (no reader can mistake one layout for the other and go on)")
    def _():
        data = bytearray(base_u8().serialize())
        struct.pack_into("<H", data, 10, 1)
        struct.pack_into("<Q", data, 56, spec.FEAT_DECODED_CHECKSUMS)
        return fix_checksums(data, index=False)


format_11_cases()


# --- reproducers of reported findings (tests/corpus/findings/, see README.md there) ------------------

FINDINGS: list = []


def finding(name: str):
    def deco(fn):
        FINDINGS.append((name, fn))
        return fn
    return deco


@finding("zero_numel_stride_overflow.tsw")
def _():
    """Was valid under the first numel rule (numel 0, every partial product 0), and load() raised torch's
    RuntimeError 'Stride calculation overflowed' for shape (0, 2^31, 2^32). Fixed: the extent rule
    (zero dimensions counted as 1, <= 2^48) rejects it at open with LimitError."""
    f = base_basic()
    f.t("empty").shape = [0, 1 << 31, 1 << 32]
    return f


@finding("fill_bomb_67GiB.tsw")
def _():
    """Valid per docs/format.md: 4300 fill chunks of 16 MiB (61.7 KB file, 67.2 GiB decoded). load() asks
    torch for 72142028800 bytes: RuntimeError 'DefaultCPUAllocator: can't allocate memory' where memory
    is short, an attempt to decode 67 GiB where it is not."""
    f = base_u8()
    u = f.t("u")
    ce, k = 16 << 20, 4300
    u.shape = [k * ce]
    u.chunk_elems = ce
    u.chunks = [[[spec.CODEC_FILL, bytes([i % 251 + 1])]] for i in range(k)]
    return f


# ---------------------------------------------------------------------------------------------------


def _tensor_digest(t: WTensor) -> list:
    name = spec.DTYPE_BY_CODE[t.dtype][0]
    if t.logical is None:  # ok_fill_amplification: 4 fill chunks of 16 MiB
        h = xxhash.xxh3_64()
        for _, b in (ch[0] for ch in t.chunks):
            h.update(bytes(b) * t.chunk_elems)
        digest = h.intdigest()
    else:
        digest = xxh3(t.logical)
    return [name, list(t.shape), f"{digest:016x}"]


def generate(out_dir: str) -> dict:
    """Write out_dir/files/*.tsw and out_dir/expected.json; returns the expected mapping."""
    files_dir = os.path.join(out_dir, "files")
    if os.path.isdir(files_dir):
        for name in os.listdir(files_dir):
            if name.endswith(".tsw"):
                os.unlink(os.path.join(files_dir, name))
    os.makedirs(files_dir, exist_ok=True)
    expected: dict = {}
    total = 0
    for name, fn, exp in CASES:
        assert name not in expected, name
        model = fn()
        if isinstance(model, tuple):  # (patched bytes, the model of the tensors they hold)
            data, model = model
        else:
            data = model.serialize() if isinstance(model, WFile) else model
        assert name in OVERSIZE or len(data) < MAX_FILE_BYTES, (name, len(data))
        total += len(data)
        entry = {"error": exp["error"], "match": exp["match"], "stage": exp["stage"]}
        if exp["known"]:
            entry["known"] = exp["known"]
        if exp["note"]:
            entry["note"] = exp["note"]
        if exp["error"] == "ok":
            entry["match"] = []
            entry.pop("stage")
            entry["tensors"] = {t.name.decode(): _tensor_digest(t) for t in model.tensors} \
                if isinstance(model, WFile) else {}
        expected[name] = entry
        with open(os.path.join(files_dir, name), "wb") as fh:
            fh.write(data)
    assert total < MAX_CORPUS_BYTES, total
    findings_dir = os.path.join(out_dir, "findings")
    os.makedirs(findings_dir, exist_ok=True)
    for name in os.listdir(findings_dir):
        if name.endswith(".tsw"):
            os.unlink(os.path.join(findings_dir, name))
    for name, fn in FINDINGS:
        data = fn().serialize()
        assert len(data) < MAX_FILE_BYTES, (name, len(data))
        with open(os.path.join(findings_dir, name), "wb") as fh:
            fh.write(data)
    with open(os.path.join(out_dir, "expected.json"), "w", encoding="utf-8") as fh:
        json.dump(expected, fh, indent=1, sort_keys=True, ensure_ascii=True)
        fh.write("\n")
    return expected


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="directory for files/ and expected.json (default: %(default)s)")
    args = ap.parse_args(argv)
    expected = generate(args.out)
    print(f"wrote {len(expected)} files to {os.path.join(args.out, 'files')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
