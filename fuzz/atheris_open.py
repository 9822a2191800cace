#!/usr/bin/env python3
"""Atheris fuzz target: open a weights file from bytes, load(verify='all'), verify().

Every exception that is not a tinyserve.errors.TinyserveError is a finding (MemoryError included), and so is
a crash or a hang.  The only input this target declines to decode is one whose index passed validation and
declares more than DECODE_BUDGET bytes of 'planes' tensors (docs/format.md caps no total decoded size, so a
valid file of a few KiB can declare terabytes); such inputs are still opened and verified.

    python fuzz/atheris_open.py [libFuzzer flags] [CORPUS_DIR ...]     # fuzz (default seeds: tests/corpus/files)
    python fuzz/atheris_open.py -atheris_runs=100000 /tmp/work tests/corpus/files
    python fuzz/atheris_open.py --replay [FILE_OR_DIR ...]            # run every input once, no atheris needed
    --keep-going: inputs reproducing an already reported finding (KNOWN_FINDINGS) do not stop the run

Defaults added unless given: -max_len=16384 -timeout=10 -rss_limit_mb=4096.  A custom mutator follows
libFuzzer's byte mutations with interesting values in header/index fields and recomputes the header,
index and (often) chunk checksums, so mutations reach the checks behind them.

The backend is tinyserve._backend.core (the native extension; TINYSERVE_PUREPYTHON=1 picks the fallback).
--differential (or TSFUZZ_DIFFERENTIAL=1) runs both backends on every input and reports inputs that one
accepts and the other rejects, or that decode to different bytes; =classes also reports different error
classes.  New inputs found by libFuzzer go to the first corpus directory, so when that is the committed
corpus a temporary directory is put in front of it.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import sys
import tempfile
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SEEDS = os.path.join(ROOT, "tests", "corpus", "files")
DECODE_BUDGET = 64 << 20
REPLAY_TIMEOUT_S = 20

try:  # instrument tinyserve's Python code (the fallback codec, the wrappers) when fuzzing under atheris
    import atheris

    _FUZZING = __name__ == "__main__" and "--replay" not in sys.argv
except ImportError:  # --replay and the in-process smoke test need no atheris
    atheris = None
    _FUZZING = False

if _FUZZING:
    with atheris.instrument_imports(include=["tinyserve"]):
        from tinyserve import _backend, errors
        from tinyserve._fallback import core as _fallback_core  # noqa: F401 - instrumented for coverage
        from tinyserve.weights import WeightsFile
else:
    from tinyserve import _backend, errors
    from tinyserve.weights import WeightsFile

import torch  # noqa: E402
import xxhash  # noqa: E402

from tinyserve.spec import DTYPES  # noqa: E402

TinyserveError = errors.TinyserveError
_IN_FUZZ = False  # set by fuzz(): atheris.Mutate exits the process unless atheris.Fuzz() is running


class Finding(Exception):
    """A differential finding (the backends disagree)."""


# Reported findings (tests/corpus/findings/README.md). With --keep-going (or TSFUZZ_KEEP_GOING=1) an input
# that reproduces one of them counts as an outcome instead of stopping the run, so fuzzing can go deeper.
KNOWN_FINDINGS = [
    ("RuntimeError", "Stride calculation overflowed", "F-A zero-numel shape whose trailing product overflows"),
    ("RuntimeError", "DefaultCPUAllocator", "F-B valid file declaring more decoded bytes than memory"),
]
KEEP_GOING = "--keep-going" in sys.argv or os.environ.get("TSFUZZ_KEEP_GOING", "") not in ("", "0")


def _known(exc: BaseException) -> str | None:
    for cls, text, label in KNOWN_FINDINGS:
        if type(exc).__name__ == cls and text in str(exc):
            return label
    return None


# ------------------------------------------------------------------------------------------------
# the target


def _memfd_path(data: bytes) -> tuple[int, str]:
    fd = os.memfd_create("tsw-fuzz", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return fd, f"/proc/self/fd/{fd}"


def run_once(data: bytes, core, want_bytes: bool = False) -> tuple[str, dict | None]:
    """(outcome, tensor bytes if want_bytes) for one backend: outcome is 'ok', 'ok-over-budget' or an error
    class name. Any exception that is not a TinyserveError propagates: that is the finding."""
    fd, path = _memfd_path(data)
    try:
        try:
            wf = WeightsFile(path, core=core)
        except TinyserveError as exc:
            _feedback_for("open", exc)
            return type(exc).__name__, None
        try:
            planned = sum(t.numel * DTYPES[t.dtype][1] for t in wf.tensors.values() if t.encoding != "raw")
            out = None
            if planned <= DECODE_BUDGET:
                loaded = wf.load(verify="all")
                if want_bytes:
                    out = {k: v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in loaded.items()}
                del loaded
            wf.verify()
            _feedback_for("ok", None, wf)
            return ("ok" if planned <= DECODE_BUDGET else "ok-over-budget"), out
        except TinyserveError as exc:
            _feedback_for("load", exc, wf)
            return type(exc).__name__, None
        finally:
            wf.close()
    finally:
        os.close(fd)


def one_input(data: bytes, backends: dict | None = None, differential: str = "") -> dict:
    """Run every backend in `backends` (default: the selected one) over `data`; returns {backend: outcome}.
    Raises whatever non-TinyserveError a backend raised, or Finding when `differential` ('accept' or
    'classes') is set and the backends disagree."""
    if backends is None:
        backends = {_backend.NAME: _backend.core}
    outcomes, decoded = {}, {}
    for name, core in backends.items():
        try:
            outcomes[name], decoded[name] = run_once(data, core, want_bytes=bool(differential))
        except Exception as exc:  # noqa: BLE001
            label = _known(exc) if KEEP_GOING else None
            if label is None:
                raise
            outcomes[name], decoded[name] = f"known-finding {label}", None
    if differential and len(backends) > 1:
        accepted = {n: o.startswith("ok") for n, o in outcomes.items()}
        if len(set(accepted.values())) > 1:
            raise Finding(f"one backend accepts, another rejects: {outcomes}")
        full = [d for d in decoded.values() if d is not None]
        if len(full) > 1 and any(d != full[0] for d in full[1:]):
            raise Finding(f"backends decode different bytes: {sorted(full[0])}")
        if differential == "classes" and len(set(outcomes.values())) > 1:
            raise Finding(f"backends raise different classes: {outcomes}")
    return outcomes


# ------------------------------------------------------------------------------------------------
# coverage feedback for code atheris cannot see (the native extension): each distinct kind of outcome (the
# error class, the stage and the rule words its message names, or the set of dtype/encoding/codec
# combinations of a valid file) reaches its own leaf of an instrumented decision tree, so libFuzzer keeps
# inputs that reach a new check even when no Python line is new.  (Messages quote tensor names, which are
# fuzzed bytes: only known words are kept.)

_FEEDBACK_BITS = 11
_RULE_WORDS = (
    "magic", "major", "reserved", "header_checksum", "tensor_count", "index_size", "data_offset", "file_size",
    "index_checksum", "name_len", "name", "UTF-8", "NUL", "duplicate", "dtype", "encoding", "ndim", "flags",
    "shape", "numel", "overflow", "chunk_elems", "chunk_count", "data_size", "chunks", "codec", "plane_size",
    "stored", "fill", "zstd", "huffman", "rans", "frame", "content size", "Kraft", "length", "sub-stream",
    "left over", "trailing", "varint", "frequenc", "state", "word", "padding", "checksum", "declares", "truncated",
    "corrupt", "header", "index", "limit", "layout", "plane", "hole", "overlap", "past",
)
_NORMALIZE = re.compile(r"'[^']*'|\"[^\"]*\"|/[^\s:]*|0x[0-9a-fA-F]+|\d+")  # for reports


def _build_tree(lo: int, hi: int, depth: int) -> str:
    pad = "    " * depth
    if hi - lo == 1:
        return f"{pad}return {lo}\n"
    mid = (lo + hi) // 2
    return (f"{pad}if k < {mid}:\n" + _build_tree(lo, mid, depth + 1) + f"{pad}else:\n"
            + _build_tree(mid, hi, depth + 1))


def _make_feedback():
    ns: dict = {}
    exec("def _leaf(k):\n" + _build_tree(0, 1 << _FEEDBACK_BITS, 1), ns)  # noqa: S102 - generated locally
    return ns["_leaf"]


_leaf = _make_feedback()


def _feedback_for(stage: str, exc: BaseException | None, wf=None) -> None:
    if not _IN_FUZZ:
        return
    # the size class of the largest compressed chunk: decoders take other paths on long planes
    big = max((min(t.chunk_elems, t.numel) for t in wf.tensors.values() if t.encoding != "raw"), default=0) \
        if wf is not None else 0
    if exc is not None:
        msg = str(exc)
        key = f"{stage}:{big.bit_length()}:{type(exc).__name__}:" + ",".join(w for w in _RULE_WORDS if w in msg)
    else:
        key = f"ok:{big.bit_length()}:" + ",".join(sorted({f"{t.dtype}/{t.encoding}/" + "".join(
            str(c) for c in sorted({c for ch in t.chunks for c in ch.codecs})) for t in wf.tensors.values()}))
    _leaf(zlib.crc32(key.encode()) & ((1 << _FEEDBACK_BITS) - 1))


# ------------------------------------------------------------------------------------------------
# structure-aware mutation: libFuzzer's byte mutations, then (usually) an interesting value in a header or
# index field, then the checksums recomputed so the mutated field reaches its own check.

U64 = (1 << 64) - 1
INTERESTING = [0, 1, 2, 3, 7, 8, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536,
               65537, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, (4 << 20) + 1, (16 << 20) + 1, (1 << 31) - 1, 1 << 31,
               (1 << 32) - 1, 1 << 32, (64 << 20) + 1, 1 << 48, (1 << 48) + 1, (1 << 56) + 1, (1 << 63), U64 - 63,
               U64]
ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8, 5: 1, 6: 1, 7: 2, 8: 4, 9: 8, 10: 1, 11: 1, 12: 1}


def _xxh3(b) -> int:
    return xxhash.xxh3_64_intdigest(bytes(b))


def walk(data: bytes) -> tuple[list, list]:
    """Leniently walk header + index: (fields as (offset, size)), chunks as (checksum offset, data start,
    data length)). Stops quietly at the first inconsistency."""
    fields = [(8, 2), (10, 2), (12, 4), (16, 8), (24, 8), (32, 8), (56, 8)]
    chunks = []
    if len(data) < 64 or data[:8] != b"TSWEIGHT":
        return fields, chunks
    count, isz = struct.unpack_from("<IQ", data, 12)
    end = min(64 + isz, len(data))
    pos = 64

    def have(n):
        return pos + n <= end

    for _ in range(min(count, 4096)):
        if not have(2):
            break
        fields.append((pos, 2))
        (nlen,) = struct.unpack_from("<H", data, pos)
        pos += 2 + nlen
        if not have(4):
            break
        dtype, enc, ndim = data[pos], data[pos + 1], data[pos + 2]
        fields += [(pos, 1), (pos + 1, 1), (pos + 2, 1), (pos + 3, 1)]
        pos += 4
        if ndim > 8 or not have(8 * ndim + 24):
            break
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        fields += [(pos + 8 * d, 8) for d in range(ndim)]
        pos += 8 * ndim
        off, _size, ce, cc = struct.unpack_from("<QQII", data, pos)
        fields += [(pos, 8), (pos + 8, 8), (pos + 16, 4), (pos + 20, 4)]
        pos += 24
        it = ITEMSIZE.get(dtype)
        if it is None or enc > 1 or cc > 100000:
            break
        rec = 8 if enc == 0 else 8 + 5 * it
        if not have(rec * cc):
            break
        numel = 1
        for d in shape:
            numel *= d
        at = off
        for k in range(cc):
            r = pos + rec * k
            if enc == 0:
                n_k = max(0, min(ce, numel - k * ce))
                length = n_k * it
            else:
                length = 0
                for p in range(it):
                    fields += [(r + 5 * p, 1), (r + 5 * p + 1, 4)]
                    length += struct.unpack_from("<I", data, r + 5 * p + 1)[0]
            chunks.append((r + rec - 8, at, length))
            at += length
        pos += rec * cc
    return fields, chunks


def fix_checksums(buf: bytearray, chunks: list | None = None) -> bytearray:
    if len(buf) < 64:
        return buf
    if chunks:
        for cs_off, start, length in chunks:
            if start + length <= len(buf) and cs_off + 8 <= len(buf):
                struct.pack_into("<Q", buf, cs_off, _xxh3(buf[start:start + length]))
    isz = struct.unpack_from("<Q", buf, 16)[0]
    if 64 + isz <= len(buf):
        struct.pack_into("<Q", buf, 40, _xxh3(buf[64:64 + isz]))
    struct.pack_into("<Q", buf, 48, _xxh3(buf[:48]))
    return buf


def _byte_mutation(data: bytes, rng: random.Random) -> bytes:
    """A stand-in for libFuzzer's mutations outside atheris.Fuzz() (the smoke test)."""
    buf = bytearray(data)
    op = rng.randrange(4)
    if op == 0 and buf:
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif op == 1 and buf:
        del buf[rng.randrange(len(buf)):][:rng.randrange(1, 64)]
    elif op == 2:
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    elif buf:
        buf = buf[:rng.randrange(len(buf))]
    return bytes(buf)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.7:
        data = atheris.Mutate(data, max_size) if _IN_FUZZ else _byte_mutation(data, rng)
    buf = bytearray(data)
    fields, chunks = walk(bytes(buf))
    if len(buf) >= 64 and rng.random() < 0.6:
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            off, size = rng.choice(fields)
            if off + size > len(buf):
                continue
            old = int.from_bytes(buf[off:off + size], "little")
            v = rng.choice(INTERESTING + [old + 1, old - 1, old ^ (1 << rng.randrange(8 * size))])
            buf[off:off + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
    if rng.random() < 0.85:
        fields, chunks = walk(bytes(buf))
        fix_checksums(buf, chunks if rng.random() < 0.6 else None)
    return bytes(buf[:max_size])


# ------------------------------------------------------------------------------------------------
# drivers


def _differential_mode() -> str:
    for a in sys.argv:
        if a.startswith("--differential"):
            return a.partition("=")[2] or "accept"
    v = os.environ.get("TSFUZZ_DIFFERENTIAL", "")
    return "" if v in ("", "0") else ("accept" if v == "1" else v)


def _files(paths: list) -> list:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, n) for n in os.listdir(p)
                          if os.path.isfile(os.path.join(p, n)) and not n.endswith((".md", ".json")))
        else:
            out.append(p)
    return out


def replay(paths: list, differential: str) -> int:
    backends = _backend.available() if differential else {_backend.NAME: _backend.core}

    def on_alarm(signum, frame):
        raise TimeoutError(f"input ran longer than {REPLAY_TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, on_alarm)
    findings = 0
    files = _files(paths or [SEEDS])
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read()
        signal.alarm(REPLAY_TIMEOUT_S)
        try:
            outcomes = one_input(data, backends, differential)
            print(f"{os.path.basename(path)}: {outcomes}")
        except Exception:  # noqa: BLE001 - every escape is reported
            findings += 1
            print(f"FINDING {path}:\n{traceback.format_exc()}", file=sys.stderr)
        finally:
            signal.alarm(0)
    print(f"replayed {len(files)} inputs on {sorted(backends)}: {findings} findings", file=sys.stderr)
    return 1 if findings else 0


def fuzz(argv: list, differential: str) -> None:
    backends = _backend.available() if differential else {_backend.NAME: _backend.core}
    print(f"fuzzing backends {sorted(backends)} differential={differential or 'off'}", file=sys.stderr)

    global _IN_FUZZ, _leaf
    _IN_FUZZ = True
    _leaf = atheris.instrument_func(_leaf)

    def test_one_input(data: bytes) -> None:
        one_input(data, backends, differential)

    args = [a for a in argv if not a.startswith("--differential") and a != "--keep-going"]
    dirs = [a for a in args[1:] if not a.startswith("-")]
    flags = [a for a in args[1:] if a.startswith("-")]
    if not dirs or os.path.realpath(dirs[0]) == os.path.realpath(SEEDS):
        dirs.insert(0, tempfile.mkdtemp(prefix="tsw-fuzz-"))  # libFuzzer writes new inputs to the first dir
        if len(dirs) == 1:
            dirs.append(SEEDS)
    for flag, default in (("-max_len=", "16384"), ("-timeout=", "10"), ("-rss_limit_mb=", "4096")):
        if not any(f.startswith(flag) for f in flags):
            flags.append(flag + default)
    print(f"corpus dirs: {dirs}", file=sys.stderr)
    atheris.Setup([args[0]] + flags + dirs, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


def main() -> int:
    differential = _differential_mode()
    if "--replay" in sys.argv:
        return replay([a for a in sys.argv[1:] if not a.startswith("-")], differential)
    if atheris is None:
        print("atheris is not installed; use --replay", file=sys.stderr)
        return 2
    fuzz(sys.argv, differential)
    return 0


if __name__ == "__main__":
    sys.exit(main())
