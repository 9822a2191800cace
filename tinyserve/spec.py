"""Constants of the weights format (docs/format.md).  Pure data, shared by both codec backends."""

from __future__ import annotations

MAGIC = b"TSWEIGHT"
MAJOR = 1
MINOR = 1  # what this writer writes when a file uses a feature bit; feature-free files are written as 1.0
HEADER_SIZE = 64
PAGE = 4096
SMALL_ALIGN = 64
BIG_RAW_MIN = 65536  # raw tensors this large or larger are page-aligned

MAX_TENSORS = 65536
MAX_INDEX_SIZE = 64 << 20
MAX_NAME_LEN = 1024
MAX_NDIM = 8
MAX_DIM = 1 << 48
MAX_NUMEL = 1 << 48
MAX_CHUNK_BYTES = 16 << 20
MAX_FILE_SIZE = 1 << 56
HUFFMAN_MAX_BITS = 11
MAX_CHUNK_COUNT = (1 << 32) - 1  # the chunk_count field is a u32

# --- header `features` (bytes 56..63, the 1.0 "reserved" field): REQUIRED features, docs/format.md 2.1.
# A reader MUST reject a file with a bit set that it does not know: the bit changes how the file decodes.
FEAT_DECODED_CHECKSUMS = 1 << 0  # 'planes' chunk records end with a u64 XXH3_64 of the decoded bytes
FEAT_EXTENSIONS = 1 << 1         # tagged extension records follow the tensor records in the index
FEAT_FLOAT16_PLANES = 1 << 2     # float16 'planes' tensors use the float16 exponent-plane mapping
FEATURES = {FEAT_DECODED_CHECKSUMS: "decoded checksums", FEAT_EXTENSIONS: "extension records",
            FEAT_FLOAT16_PLANES: "float16 exponent planes"}
KNOWN_FEATURES = FEAT_DECODED_CHECKSUMS | FEAT_EXTENSIONS | FEAT_FLOAT16_PLANES
EXT_RECORD_HEADER = 6  # u16 tag + u32 length
MAX_EXT_TAG = 0xFFFF
FORMAT_VERSIONS = ("1.0", "1.1")  # what write_weights(format=...) can write

ENC_RAW = 0
ENC_PLANES = 1
ENCODINGS = {ENC_RAW: "raw", ENC_PLANES: "planes"}

CODEC_STORED = 0
CODEC_FILL = 1
CODEC_ZSTD = 2
CODEC_HUFFMAN = 3
CODEC_RANS = 4
CODECS = {CODEC_STORED: "stored", CODEC_FILL: "fill", CODEC_ZSTD: "zstd", CODEC_HUFFMAN: "huffman",
          CODEC_RANS: "rans"}

# name -> (code, itemsize)
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (1, 4),
    "float16": (2, 2),
    "bfloat16": (3, 2),
    "float64": (4, 8),
    "int8": (5, 1),
    "uint8": (6, 1),
    "int16": (7, 2),
    "int32": (8, 4),
    "int64": (9, 8),
    "bool": (10, 1),
    "float8_e4m3fn": (11, 1),
    "float8_e5m2": (12, 1),
}
DTYPE_BY_CODE: dict[int, tuple[str, int]] = {code: (name, size) for name, (code, size) in DTYPES.items()}


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def tensor_alignment(encoding: int, data_size: int) -> int:
    """Alignment of a tensor's data_offset (docs/format.md section 4)."""
    return PAGE if encoding == ENC_RAW and data_size >= BIG_RAW_MIN else SMALL_ALIGN


# --- records returned by both codec backends (docs/native-api.md) ---------------------------------
from typing import NamedTuple  # noqa: E402


class Header(NamedTuple):
    major: int
    minor: int
    tensor_count: int
    index_size: int
    data_offset: int
    file_size: int
    index_checksum: int
    features: int = 0  # the header's features bitmask (0 in every 1.0 file)


class ChunkInfo(NamedTuple):
    offset: int
    size: int
    checksum: int
    codecs: tuple
    plane_sizes: tuple
    decoded_checksum: int | None = None  # XXH3_64 of the chunk's decoded element bytes (feature bit 0)


class TensorInfo(NamedTuple):
    name: str
    dtype: str
    encoding: str
    shape: tuple
    data_offset: int
    data_size: int
    chunk_elems: int
    chunks: tuple

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]


# --- limits shared by the writer and both readers: one message per rule ---------------------------
def shape_problem(shape) -> tuple[str, int, int] | None:
    """(field, value, limit) of the first rule of docs/format.md section 3 that `shape` breaks, else None.
    field is 'ndim', 'shape' (one dimension) or 'numel' (the extent: the product with zeros counted as 1)."""
    if len(shape) > MAX_NDIM:
        return "ndim", len(shape), MAX_NDIM
    extent = 1
    for dim in shape:
        if dim > MAX_DIM:
            return "shape", dim, MAX_DIM
        extent *= dim or 1
        if extent > MAX_NUMEL:
            return "numel", extent, MAX_NUMEL
    return None


def limit_message(where: str, field: str, value: int, limit: int) -> str:
    """The one wording of a broken limit, used by the writer and the pure-Python reader."""
    return f"{where}: {field} {value} exceeds the limit {limit}"


def features_problem(features: int) -> str | None:
    """A message naming the feature bits this reader does not know, else None."""
    unknown = features & ~KNOWN_FEATURES
    if not unknown:
        return None
    bits = [b for b in range(64) if unknown >> b & 1]
    return (f"header field features (the 1.0 reserved field): bit(s) {bits} ({unknown:#x}) are not known to "
            f"this reader (known "
            f"{KNOWN_FEATURES:#x}); the file needs a newer reader")
