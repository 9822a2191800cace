"""Constants of the weights format (docs/format.md).  Pure data, shared by both codec backends."""

from __future__ import annotations

MAGIC = b"TSWEIGHT"
MAJOR = 1
MINOR = 0
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


class ChunkInfo(NamedTuple):
    offset: int
    size: int
    checksum: int
    codecs: tuple
    plane_sizes: tuple


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
