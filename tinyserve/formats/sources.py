"""Compressed sources (docs/repository.md section 4.7): gzip, bzip2, xz and zstd, recognised by their
magic bytes (never by a file name), decompressed as a stream into a private file with a limit on
the bytes they may produce; what comes out is identified again and packed like any other source."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from pathlib import Path

from tinyserve import errors

# codec -> magic bytes at offset 0 (gzip RFC 1952, bzip2 "BZh", xz, zstd frame)
MAGIC = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}
CHUNK = 1 << 20


def codec_of(path: str | os.PathLike) -> str | None:
    """The compression of a file, from its first bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    for codec, magic in MAGIC.items():
        if head.startswith(magic):
            return codec
    return None


def _reader(codec: str, f):
    if codec == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if codec == "bzip2":
        return bz2.BZ2File(f, mode="rb")
    if codec == "xz":
        return lzma.LZMAFile(f, mode="rb")
    import zstandard  # a dependency (the weights codec's fallback)

    return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)


def _zstd_complete(path: str) -> bool:
    """Every frame of a zstd file is whole and the last ends at the end of the file, by walking the
    frame and block headers (RFC 8878; python-zstandard's stream reader returns what it has of a
    truncated frame without an error)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            magic = int.from_bytes(f.read(4), "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                pos += 8 + int.from_bytes(f.read(4), "little")
                continue
            if magic != 0xFD2FB528:
                return False
            fhd = f.read(1)
            if not fhd:
                return False
            fhd = fhd[0]
            single = (fhd >> 5) & 1
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            while True:
                f.seek(pos)
                h = f.read(3)
                if len(h) < 3:
                    return False
                h = int.from_bytes(h, "little")
                kind = (h >> 1) & 3
                if kind == 3:
                    return False
                pos += 3 + (1 if kind == 1 else h >> 3)
                if h & 1:
                    break
            pos += 4 if (fhd >> 2) & 1 else 0
        return pos == size


def decompress(path: str | os.PathLike, codec: str, dest: str | os.PathLike, limit: int) -> Path:
    """Decompress `path` (compressed with `codec`) into the file `dest`, refusing (LimitError) output
    beyond `limit` bytes and (FormatError) truncated or corrupt input.  Returns `dest`."""
    path, dest = os.fspath(path), Path(dest)
    total = 0
    try:
        if codec == "zstd" and not _zstd_complete(path):
            raise errors.FormatError(f"{path}: truncated or corrupt zstd data (a frame is incomplete or does "
                                     "not end at the end of the file)")
        with open(path, "rb") as f, _reader(codec, f) as r, open(dest, "wb") as out:
            while True:
                block = r.read(min(CHUNK, limit - total + 1))
                if not block:
                    break
                total += len(block)
                if total > limit:
                    raise errors.LimitError(f"{path}: {codec}-compressed source decompresses to more than {limit} "
                                            "bytes, the source limit (--max-source-bytes)")
                out.write(block)
    except errors.TinyserveError:
        dest.unlink(missing_ok=True)
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:  # bz2 raises OSError
        dest.unlink(missing_ok=True)
        raise errors.FormatError(f"{path}: truncated or corrupt {codec} data ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from None
    except Exception as exc:  # zstandard.ZstdError
        dest.unlink(missing_ok=True)
        raise errors.FormatError(f"{path}: truncated or corrupt {codec} data ({str(exc)[:200]})") from None
    inner = codec_of(dest)
    if inner is not None:
        dest.unlink(missing_ok=True)
        raise errors.UnsupportedError(f"{path}: compressed twice ({codec}, then {inner}); tinyserve "
                                      "decompresses one layer")
    return dest
