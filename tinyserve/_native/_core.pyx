# cython: language_level=3, boundscheck=False, wraparound=False
"""Native codec backend: the only Python code that touches csrc/.  API: docs/native-api.md.

Owns buffer lifetimes (every buffer is held by a typed memoryview for the duration of the C call),
releases the GIL around the C work, and turns C statuses into tinyserve.errors exceptions in one
place (_raise)."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from tinyserve import errors
from tinyserve._native import codec_rules
from tinyserve.spec import (DTYPES, DTYPE_BY_CODE, ENCODINGS, Header, ChunkInfo, TensorInfo,
                            MAX_CHUNK_BYTES, KNOWN_FEATURES, features_problem)

_MODES = {"huffman": 0, "zstd": 1, "max": 2, "rans": 3, "zstd_huffman": 4}
_ENC_CODES = {v: k for k, v in ENCODINGS.items()}

_CLASSES = {
    TS_E_TRUNCATED: errors.TruncatedError,
    TS_E_MAGIC: errors.FormatError,
    TS_E_VERSION: errors.UnsupportedError,
    TS_E_LIMIT: errors.LimitError,
    TS_E_OVERFLOW: errors.LimitError,
    TS_E_LAYOUT: errors.LayoutError,
    TS_E_DTYPE: errors.UnsupportedError,
    TS_E_ENCODING: errors.UnsupportedError,
    TS_E_CODEC: errors.UnsupportedError,
    TS_E_CHECKSUM: errors.ChecksumError,
    TS_E_CORRUPT: errors.CorruptDataError,
    TS_E_DST_SIZE: errors.DestinationError,
    TS_E_NOMEM: MemoryError,
    TS_E_ARG: ValueError,
    TS_E_NAME: errors.FormatError,
    TS_E_FIELD: errors.UnsupportedError,  # non-zero flags / unknown feature bit: meaning from a later version
    TS_E_DECODED_CHECKSUM: errors.ChecksumError,
}


cdef _raise(ts_status st, str where):
    cls = _CLASSES.get(st, errors.TinyserveError)
    raise cls(f"{where}: {ts_strstatus(st).decode()}")


cdef _raise_job(ts_status st, ts_codec_error *e, str name, long k):
    """A failed chunk job: the broken codec rule's message (tinyserve/_native/codec_rules.py), the same
    text the pure-Python twin raises; a status without a rule falls back to _raise."""
    if e != NULL and e.rule:
        raise codec_rules.error(e.rule, codec_rules.where(name, k, e.plane), e.a, e.b, e.c)
    _raise(st, f"tensor {name!r} chunk {k}")


def decode_stream(int codec, stream, size_t n, str where="stream"):
    """Decode one plane stream with `codec` into n bytes (tests and the differential test): the stream
    rules of docs/format.md sections 5-7, without the chunk record's 1 <= size <= n rule. A broken rule
    raises the codec_rules error at `where`."""
    cdef const uint8_t[::1] v = _bytes_view(stream)
    cdef size_t sz = v.shape[0]
    out = bytearray(n)
    cdef uint8_t[::1] o = out
    cdef ts_codec_error e
    cdef ts_status st
    memset(&e, 0, sizeof(e))
    if codec < 0 or codec > 255:
        raise codec_rules.error(codec_rules.PLANE_CODEC, where, codec)
    if sz == 0 and codec != 0:
        raise errors.LayoutError(f"{where}: an empty stream (every plane holds at least 1 byte)")
    with nogil:
        st = ts_decode_stream(<uint8_t>codec, &v[0] if sz else NULL, sz, &o[0] if n else NULL, n, &e)
    if st != TS_OK:
        if e.rule:
            raise codec_rules.error(e.rule, where, e.a, e.b, e.c)
        _raise(st, where)
    return bytes(out)


def zstd_version():
    """The libzstd version this extension runs on, as (major, minor, patch)."""
    cdef unsigned v = ts_zstd_version()
    return (v // 10000, v // 100 % 100, v % 100)


cdef const uint8_t[::1] _bytes_view(obj):
    """A read-only byte view of any buffer (C-contiguous)."""
    cdef memoryview mv = memoryview(obj)
    if not mv.c_contiguous:
        raise errors.DestinationError("buffer is not C-contiguous")
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


cdef uint8_t[::1] _writable_view(obj, uint64_t nbytes, str what):
    cdef memoryview mv = memoryview(obj)
    if mv.readonly:
        raise errors.DestinationError(f"{what}: destination is read-only")
    if not mv.c_contiguous:
        raise errors.DestinationError(f"{what}: destination is not C-contiguous")
    if mv.nbytes != nbytes:
        raise errors.DestinationError(f"{what}: destination holds {mv.nbytes} bytes, the tensor needs {nbytes}")
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


def xxh3_64(data):
    cdef const uint8_t[::1] v = _bytes_view(data)
    cdef size_t n = v.shape[0]
    cdef const uint8_t *p = &v[0] if n else NULL
    cdef uint64_t h
    with nogil:
        h = ts_xxh3(p, n)
    return h


cdef extern from "zstd.h":
    enum: ZSTD_VERSION_NUMBER


def zstd_build_version():
    """The libzstd version whose header this extension was compiled with, as (major, minor, patch);
    zstd_version() is the one it runs on (a test checks they are the same library)."""
    cdef unsigned v = ZSTD_VERSION_NUMBER
    return (v // 10000, v // 100 % 100, v % 100)


cdef str _describe(ts_parse_error *e, list names):
    where = ""
    if e.tensor != 0xFFFFFFFF:
        where = f"tensor #{e.tensor}"
        if e.tensor < len(names):
            where = f"tensor {names[e.tensor]!r}"
        if e.chunk != 0xFFFFFFFF:
            where += f" chunk {e.chunk}"
        where += ": "
    return f"{where}field {e.field.decode()} = {e.value} (limit/expected {e.limit})"


def parse_header(buf):
    cdef const uint8_t[::1] v = _bytes_view(buf)
    cdef ts_header h
    cdef ts_parse_error e
    cdef ts_status st = ts_parse_header(&v[0] if v.shape[0] else NULL, v.shape[0], &h, &e)
    if st != TS_OK:
        if st == TS_E_MAGIC:
            raise errors.FormatError("not a tinyserve weights file (bad magic)")
        if st == TS_E_FIELD and e.field == b"features":
            raise errors.UnsupportedError(features_problem(h.features))
        _raise(st, "header: " + _describe(&e, []))
    return Header(h.major, h.minor, h.tensor_count, h.index_size, h.data_offset, h.file_size,
                  h.index_checksum, h.features)


def parse_index(header, index_buf):
    cdef const uint8_t[::1] v = _bytes_view(index_buf)
    cdef ts_header h
    h.major, h.minor, h.tensor_count = header.major, header.minor, header.tensor_count
    h.index_size, h.data_offset, h.file_size = header.index_size, header.data_offset, header.file_size
    h.index_checksum, h.features = header.index_checksum, header.features
    if h.features & ~KNOWN_FEATURES:
        raise errors.UnsupportedError(features_problem(h.features))
    cdef size_t count = h.tensor_count
    cdef ts_tensor *ts = <ts_tensor *>malloc((count if count else 1) * sizeof(ts_tensor))
    cdef ts_parse_error e
    cdef ts_status st
    cdef const uint8_t *ix = &v[0] if v.shape[0] else NULL
    cdef ts_chunk c
    cdef uint64_t off
    cdef uint32_t k
    if ts == NULL:
        raise MemoryError()
    try:
        with nogil:
            st = ts_parse_index(&h, ix, v.shape[0], ts, &e)
        if st != TS_OK:
            names = []
            for i in range(min(e.tensor, count) if e.tensor != 0xFFFFFFFF else 0):
                names.append(bytes(v[ts[i].name_off:ts[i].name_off + ts[i].name_len]).decode("utf-8", "replace"))
            if e.tensor != 0xFFFFFFFF and e.tensor < count and ts[e.tensor].name_len and e.field != b"name_len":
                names.append(bytes(v[ts[e.tensor].name_off:ts[e.tensor].name_off + ts[e.tensor].name_len]).decode("utf-8", "replace"))
            _raise(st, "index: " + _describe(&e, names))
        out = []
        seen = set()
        for i in range(count):
            raw = bytes(v[ts[i].name_off:ts[i].name_off + ts[i].name_len])
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise errors.FormatError(f"index: tensor #{i}: name is not valid UTF-8: {raw[:64]!r}")
            if name in seen:
                raise errors.FormatError(f"index: tensor #{i}: duplicate tensor name {name!r}")
            seen.add(name)
            isz = ts[i].itemsize
            chunks = []
            off = ts[i].data_offset
            for k in range(ts[i].chunk_count):
                ts_get_chunk(ix, &ts[i], k, off, &c)
                if ts[i].encoding == 0:
                    chunks.append(ChunkInfo(c.offset, c.size, c.checksum, (), ()))
                else:
                    chunks.append(ChunkInfo(c.offset, c.size, c.checksum,
                                            tuple(c.codecs[p] for p in range(isz)),
                                            tuple(c.plane_sizes[p] for p in range(isz)),
                                            c.decoded_checksum if c.has_decoded else None))
                off += c.size
            out.append(TensorInfo(name, DTYPE_BY_CODE[ts[i].dtype][0], ENCODINGS[ts[i].encoding],
                                  tuple(ts[i].shape[d] for d in range(ts[i].ndim)),
                                  ts[i].data_offset, ts[i].data_size, ts[i].chunk_elems, tuple(chunks)))
        return out
    finally:
        free(ts)


def encode_planes(src, str dtype, uint64_t chunk_elems, str mode, int level, int threads, bint f16_planes=False):
    # argument errors are the caller's configuration (ConfigError), as in the fallback
    if dtype not in DTYPES:
        raise errors.ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if mode not in _MODES:
        raise errors.ConfigError(f"mode {mode!r} is not one of {list(_MODES)}")
    code, isz = DTYPES[dtype]
    cdef const uint8_t[::1] s = _bytes_view(src)
    cdef uint64_t nbytes = s.shape[0]
    if nbytes % isz:
        raise errors.ConfigError(f"src: {nbytes} bytes is not a multiple of the {dtype} itemsize {isz}")
    if chunk_elems < 1 or chunk_elems > MAX_CHUNK_BYTES // isz:
        raise errors.ConfigError(f"chunk_elems {chunk_elems} outside 1..{MAX_CHUNK_BYTES // isz} for {dtype}")
    cdef uint64_t numel = nbytes // isz
    cdef size_t nchunks = (numel + chunk_elems - 1) // chunk_elems
    out = bytearray(nbytes)
    cdef uint8_t[::1] o = out
    cdef ts_chunk_out *chunks = <ts_chunk_out *>malloc((nchunks if nchunks else 1) * sizeof(ts_chunk_out))
    cdef uint64_t out_size = 0
    cdef ts_status st
    cdef int c_mode = _MODES[mode]
    cdef unsigned c_dtype = code
    cdef unsigned c_flags = TS_JOB_F16_EXP if f16_planes else 0
    if chunks == NULL:
        raise MemoryError()
    try:
        with nogil:
            st = ts_encode_planes_ex(c_dtype, c_flags, &s[0] if nbytes else NULL, numel, chunk_elems, c_mode,
                                     level, threads, &o[0] if nbytes else NULL, &out_size, chunks)
        if st != TS_OK:
            _raise(st, f"encode {dtype}")
        recs = []
        for k in range(nchunks):
            recs.append((tuple(chunks[k].codecs[p] for p in range(isz)),
                         tuple(chunks[k].plane_sizes[p] for p in range(isz)),
                         chunks[k].checksum))
    finally:
        free(chunks)
    del o
    del out[out_size:]
    return bytes(out), recs


def checksum_chunks(src, uint64_t chunk_bytes, int threads):
    cdef const uint8_t[::1] s = _bytes_view(src)
    cdef uint64_t n = s.shape[0]
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    cdef size_t count = n // chunk_bytes + (n % chunk_bytes != 0)
    cdef uint64_t *out = <uint64_t *>malloc((count if count else 1) * sizeof(uint64_t))
    cdef ts_status st
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            st = ts_checksum_chunks(&s[0] if n else NULL, n, chunk_bytes, threads, out)
        if st != TS_OK:
            _raise(st, "checksum")
        return [out[k] for k in range(count)]
    finally:
        free(out)


cdef _run(file_buf, list tensors, list dsts, bint verify, int threads, uint64_t base, bint verify_only,
          bint validate=False, uint8_t flags=0):
    """Build one job per chunk and run them all; returns (status, failed job, job owners)."""
    cdef const uint8_t[::1] f = _bytes_view(file_buf)
    cdef uint64_t flen = f.shape[0]
    cdef size_t njobs = 0
    for t in tensors:
        njobs += len(t.chunks)
    cdef ts_status *statuses = NULL
    cdef ts_chunk_job *jobs = <ts_chunk_job *>malloc((njobs if njobs else 1) * sizeof(ts_chunk_job))
    cdef ts_codec_error *errs = <ts_codec_error *>malloc((njobs if njobs else 1) * sizeof(ts_codec_error))
    if jobs == NULL or errs == NULL:
        free(jobs)
        free(errs)
        raise MemoryError()
    cdef size_t j = 0
    cdef size_t failed = 0
    cdef ts_status st = TS_OK
    cdef uint8_t[::1] d
    cdef uint64_t first, isz, rel
    owners = []
    views = []  # keep every destination view alive until the C call returns
    try:
        for ti in range(len(tensors)):
            t = tensors[ti]
            code, isz = DTYPES[t.dtype]
            enc = _ENC_CODES[t.encoding]
            if not verify_only and not validate:
                d = _writable_view(dsts[ti], t.numel * isz, f"tensor {t.name!r}")
                views.append(d)
            for k, c in enumerate(t.chunks):
                if c.offset < base or c.offset - base > flen or c.size > flen - (c.offset - base):
                    raise errors.TruncatedError(
                        f"tensor {t.name!r} chunk {k}: bytes [{c.offset}, {c.offset + c.size}) are not in "
                        f"the buffer, which holds [{base}, {base + flen})")
                rel = c.offset - base
                first = <uint64_t>k * t.chunk_elems
                memset(&jobs[j], 0, sizeof(ts_chunk_job))
                jobs[j].src = &f[0] + rel if flen else NULL
                jobs[j].src_size = c.size
                jobs[j].n_elems = min(t.chunk_elems, t.numel - first)
                jobs[j].dst = NULL if verify_only or validate else &d[0] + first * isz
                jobs[j].flags = flags | (TS_JOB_VALIDATE if validate else 0)
                jobs[j].err = &errs[j]
                jobs[j].checksum = c.checksum
                jobs[j].dtype = code
                jobs[j].encoding = enc
                jobs[j].verify = verify
                if c.decoded_checksum is not None:
                    jobs[j].decoded_checksum = c.decoded_checksum
                    jobs[j].has_decoded = 1
                for p in range(len(c.codecs)):
                    jobs[j].codecs[p] = c.codecs[p]
                    jobs[j].plane_sizes[p] = c.plane_sizes[p]
                owners.append((t.name, k))
                j += 1
        if verify_only:
            # every chunk on its own, so all mismatches are reported
            statuses = <ts_status *>malloc((njobs if njobs else 1) * sizeof(ts_status))
            if statuses == NULL:
                raise MemoryError()
            try:
                with nogil:
                    ts_run_jobs(jobs, njobs, threads, &failed, statuses)
                bad = []
                for j in range(njobs):
                    if statuses[j] == TS_E_CHECKSUM:
                        bad.append(owners[j])
                    elif statuses[j] != TS_OK:
                        _raise_job(statuses[j], &errs[j], owners[j][0], owners[j][1])
                return bad
            finally:
                free(statuses)
        with nogil:
            st = ts_run_jobs(jobs, njobs, threads, &failed, NULL)
        if st != TS_OK:
            if failed < njobs:
                _raise_job(st, &errs[failed], owners[failed][0], owners[failed][1])
            _raise(st, "tensor '?' chunk -1")
        return None
    finally:
        free(jobs)
        free(errs)


def decode_into(file_buf, jobs, bint verify, int threads, uint64_t base=0, bint f16_planes=False):
    tensors = [t for t, _ in jobs]
    dsts = [dst for _, dst in jobs]
    _run(file_buf, tensors, dsts, verify, threads, base, False, False, TS_JOB_F16_EXP if f16_planes else 0)


def validate_chunks(file_buf, tensors, int threads, uint64_t base=0, bint f16_planes=False):
    """Check every codec rule of every chunk (docs/format.md sections 3, 5-7): structure, checksum of
    the stored bytes, a full decode into scratch memory (and the decoded checksum where the chunk has
    one). Raises the error of the first broken chunk (lowest tensor / chunk), as decode_into would."""
    _run(file_buf, list(tensors), [], True, threads, base, False, True, TS_JOB_F16_EXP if f16_planes else 0)


def verify_chunks(file_buf, tensors, int threads, uint64_t base=0):
    return _run(file_buf, list(tensors), [], True, threads, base, True)


def _planes_range(t, first, count):
    """(itemsize, first element, element count) of chunks [first, first + count) of a 'planes' tensor;
    ConfigError / LayoutError name what is wrong (shared rules: docs/native-api.md)."""
    if t.encoding != "planes":
        raise errors.ConfigError(f"tensor {t.name!r}: decode_planes_into takes 'planes' tensors, this one is "
                                 f"{t.encoding!r}")
    if t.dtype not in DTYPES:
        raise errors.UnsupportedError(f"tensor {t.name!r}: dtype {t.dtype!r} is not a known dtype")
    isz = DTYPES[t.dtype][1]
    nchunks = len(t.chunks)
    if not (0 <= first and 0 <= count and first + count <= nchunks):
        raise errors.ConfigError(f"tensor {t.name!r}: chunks [{first}, {first + count}) outside the tensor's "
                                 f"{nchunks} chunks")
    if t.chunk_elems < 1:
        raise errors.LimitError(f"tensor {t.name!r}: chunk_elems {t.chunk_elems} must be >= 1")
    numel = t.numel
    e0 = first * t.chunk_elems
    e1 = min((first + count) * t.chunk_elems, numel)
    if count and e0 >= numel:
        raise errors.LayoutError(f"tensor {t.name!r}: chunk {first + count - 1} starts at element "
                                 f"{(first + count - 1) * t.chunk_elems}, past numel {numel}")
    for c in t.chunks[first:first + count]:
        if len(c.codecs) != isz or len(c.plane_sizes) != isz:
            raise errors.LayoutError(f"tensor {t.name!r}: {len(c.codecs)} codecs / {len(c.plane_sizes)} plane "
                                     f"sizes, {isz} planes expected")
    return isz, e0, max(0, e1 - e0)


def decode_planes_into(file_buf, jobs, bint verify, int threads, uint64_t base=0, bint f16_planes=False):
    """Decode chunks of 'planes' tensors WITHOUT regrouping (docs/native-api.md): job = (TensorInfo,
    first_chunk, chunk_count, dst); dst holds n x itemsize bytes for the n elements those chunks cover and
    receives plane p of them at dst[p*n:(p+1)*n]."""
    cdef const uint8_t[::1] f = _bytes_view(file_buf)
    cdef uint64_t flen = f.shape[0]
    cdef size_t njobs = 0
    plan = []
    for job in jobs:
        t, first, count, dst = job
        isz, e0, n = _planes_range(t, first, count)
        plan.append((t, first, count, dst, isz, e0, n))
        njobs += count
    cdef ts_chunk_job *cj = <ts_chunk_job *>malloc((njobs if njobs else 1) * sizeof(ts_chunk_job))
    cdef ts_codec_error *errs = <ts_codec_error *>malloc((njobs if njobs else 1) * sizeof(ts_codec_error))
    cdef uint8_t flags = TS_JOB_F16_EXP if f16_planes else 0
    if cj == NULL or errs == NULL:
        free(cj)
        free(errs)
        raise MemoryError()
    cdef size_t j = 0
    cdef size_t failed = 0
    cdef ts_status st = TS_OK
    cdef uint8_t[::1] d
    cdef uint64_t rel, el
    owners = []
    views = []  # keep every destination view alive until the C call returns
    try:
        for t, first, count, dst, isz, e0, n in plan:
            code = DTYPES[t.dtype][0]
            d = _writable_view(dst, n * isz, f"tensor {t.name!r} chunks [{first}, {first + count})")
            views.append(d)
            for k in range(first, first + count):
                c = t.chunks[k]
                if c.offset < base or c.offset - base > flen or c.size > flen - (c.offset - base):
                    raise errors.TruncatedError(
                        f"tensor {t.name!r} chunk {k}: bytes [{c.offset}, {c.offset + c.size}) are not in "
                        f"the buffer, which holds [{base}, {base + flen})")
                rel = c.offset - base
                el = <uint64_t>(k - first) * t.chunk_elems
                memset(&cj[j], 0, sizeof(ts_chunk_job))
                cj[j].src = &f[0] + rel if flen else NULL
                cj[j].src_size = c.size
                cj[j].n_elems = min(t.chunk_elems, n - el)
                cj[j].dst = &d[0] + el
                cj[j].checksum = c.checksum
                cj[j].dtype = code
                cj[j].encoding = 1
                cj[j].verify = verify
                cj[j].plane_stride = n
                cj[j].flags = flags
                cj[j].err = &errs[j]
                if c.decoded_checksum is not None:
                    cj[j].decoded_checksum = c.decoded_checksum
                    cj[j].has_decoded = 1
                for p in range(isz):
                    cj[j].codecs[p] = c.codecs[p]
                    cj[j].plane_sizes[p] = c.plane_sizes[p]
                owners.append((t.name, k))
                j += 1
        with nogil:
            st = ts_run_jobs(cj, njobs, threads, &failed, NULL)
        if st != TS_OK:
            if failed < njobs:
                _raise_job(st, &errs[failed], owners[failed][0], owners[failed][1])
            _raise(st, "tensor '?' chunk -1")
    finally:
        free(cj)
        free(errs)
