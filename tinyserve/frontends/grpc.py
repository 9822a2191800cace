"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` on grpcio's
server, translated to the core's API (`tinyserve.core.api`) and nothing else.

grpcio's synchronous server: each call runs in one of its threads (at most `max_concurrent_calls`).
The core is called on its own event loop only: an infer request is parsed and checked in the call's
thread, queued on the loop (`call_soon_threadsafe`), and the call's thread waits for the reply, which
the worker that ran the request has already serialized; every other RPC runs its coroutine on the
loop (`run_coroutine_threadsafe`).  Measured against grpc.aio on the same loop (bench/bench_oip.py
--baseline, bench/results/oip-latest.md), this costs less CPU per call with many calls in flight
(c=32: about 15-20% less; grpc.aio's per-call tasks, futures and handler checks outweigh the thread
hand-offs) and somewhat more with one (c=1: about 10% more, one more thread hop per call).  Messages are the ones `kserve_v2.proto`
declares, generated into `_kserve_v2_pb2` with a private descriptor pool: another copy of the same
protocol in the process (tritonclient's generated `inference` package) registers the same full names
in the default pool, which protobuf refuses.

Infer: the request's tensors become the core's (dtype, shape, memoryview) form with every count, shape
and size checked against `core.limits` before anything is allocated (gRPC itself refuses a message over
`max_message_bytes` before parsing it).  Replies are encoded in the worker thread that ran the request
(`finish`) into the serialized response, so the loop only hands bytes over.  docs/http-grpc.md
section "gRPC" is the normative description.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import queue
import struct
import threading
from collections.abc import Mapping

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from tinyserve import errors, wire
from tinyserve.frontends import _kserve_v2_pb2 as pb
from tinyserve.frontends import oip

__all__ = ["GrpcFrontEnd", "SERVICE"]

SERVICE = "inference.GRPCInferenceService"
_U32 = struct.Struct("<I")
_ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2,
             "bfloat16": 2, "float32": 4, "float64": 8}
# datatype -> (the InferTensorContents field its typed elements go in, numpy dtype, (min, max) or None)
_TYPED = {
    "BOOL": ("bool_contents", np.bool_, None),
    "UINT8": ("uint_contents", np.uint8, (0, 255)),
    "INT8": ("int_contents", np.int8, (-128, 127)),
    "INT16": ("int_contents", np.int16, (-32768, 32767)),
    "INT32": ("int_contents", np.int32, None),
    "INT64": ("int64_contents", np.int64, None),
    "FP32": ("fp32_contents", np.float32, None),
    "FP64": ("fp64_contents", np.float64, None),
    "BYTES": ("bytes_contents", None, None),
}
_REFUSED_PARAMS = ("sequence_id", "sequence_start", "sequence_end")
_FINAL = "triton_enable_empty_final_response"
STREAM_WINDOW = 256  # a stream's requests read and not yet answered
_NO_DEADLINE_S = 1e9  # a call without a deadline reports about 2^63 ns remaining
WAIT_S = 0.5  # how often a call's thread waiting for the core checks that the call is still active
_READ_ALL = "read all"  # the stream reader's last queue item: (_READ_ALL, requests read)
log = logging.getLogger("tinyserve.grpc")


def _status(exc: BaseException) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, oip.grpc_status(exc))


def _version(text: str, what: str = "model version") -> int | None:
    """The protocol's version string: "" -> None (the server's choice), else a non-negative integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise wire.BadRequest(f"{what} {wire.shown(text)} is not a non-negative integer")
    return int(text)


def _int_param(p, key: str) -> int:
    which = p.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise wire.BadRequest(f"parameter {key!r} must be an integer (int64_param or uint64_param), got {which}")
    return getattr(p, which)


# --- requests ---------------------------------------------------------------------------------------
def _shape(t, limits) -> tuple[tuple[int, ...], int]:
    shape = tuple(t.shape)
    if len(shape) > limits.max_ndim:
        raise wire.InvalidInput(f"input {t.name!r}: {len(shape)} dimensions exceed max_ndim {limits.max_ndim}")
    numel = 1
    for d in shape:
        if d < 0 or d > wire.MAX_DIM:
            raise wire.InvalidInput(f"input {t.name!r}: shape {list(shape)} has a dimension outside 0..2^48")
        numel *= d
        if numel > wire.MAX_DIM:
            raise wire.InvalidInput(f"input {t.name!r}: shape {list(shape)} holds more than 2^48 elements")
    return shape, numel


def _check_bytes_items(name: str, raw: bytes, numel: int) -> None:
    """`raw` holds exactly `numel` items, each a u32 little-endian length and its bytes."""
    n = len(raw)
    if numel * 4 > n:  # bounds the scan below by the message size
        raise wire.InvalidInput(f"input {name!r}: {numel} BYTES elements need at least {numel * 4} bytes of "
                                f"length prefixes, raw contents hold {n}")
    off = 0
    for k in range(numel):
        if off + 4 > n:
            raise wire.InvalidInput(f"input {name!r}: BYTES element {k}'s length prefix runs past the end ({n} bytes)")
        (ln,) = _U32.unpack_from(raw, off)
        off += 4 + ln
        if off > n:
            raise wire.InvalidInput(f"input {name!r}: BYTES element {k} declares {ln} bytes, "
                                    f"only {n - off + ln} remain")
    if off != n:
        raise wire.InvalidInput(f"input {name!r}: {n - off} bytes left after {numel} BYTES elements")


def _typed(t, datatype: str, numel: int) -> bytes:
    """The little-endian bytes of a tensor sent as typed `contents` (element count checked first)."""
    spec = _TYPED.get(datatype)
    set_fields = [f.name for f, _ in t.contents.ListFields()]
    if spec is None:
        raise wire.InvalidInput(f"input {t.name!r}: {datatype} has no typed contents field; send it in "
                                f"raw_input_contents")
    field, npdt, bounds = spec
    other = [f for f in set_fields if f != field]
    if other:
        raise wire.InvalidInput(f"input {t.name!r}: {datatype} elements go in contents.{field}, got "
                                f"contents.{', contents.'.join(other)}")
    values = getattr(t.contents, field)
    if len(values) != numel:
        raise wire.InvalidInput(f"input {t.name!r}: shape {list(t.shape)} needs {numel} elements, "
                                f"contents.{field} holds {len(values)}")
    if npdt is None:  # BYTES
        return b"".join(_U32.pack(len(v)) + v for v in values)
    if bounds is not None:
        wide = np.asarray(values, dtype=np.int64)
        if wide.size and (wide.min() < bounds[0] or wide.max() > bounds[1]):
            bad = wide[(wide < bounds[0]) | (wide > bounds[1])][0]
            raise wire.InvalidInput(f"input {t.name!r}: element {int(bad)} is outside {datatype}'s range "
                                    f"{bounds[0]}..{bounds[1]}")
        return wide.astype(np.dtype(npdt).newbyteorder("<")).tobytes()
    return np.asarray(values, dtype=np.dtype(npdt).newbyteorder("<")).tobytes()


def request_inputs(request, limits) -> dict[str, tuple[str, tuple, memoryview]]:
    """{name: (tinyserve dtype, shape, byte view)} of a ModelInferRequest, or InvalidInput / BadRequest
    naming the offending input and the limit it broke.  Counts and sizes are checked before any
    tensor bytes are built."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if len(inputs) > limits.max_tensors:
        raise wire.InvalidInput(f"{len(inputs)} inputs exceed max_tensors {limits.max_tensors}")
    if len(raw) and len(raw) != len(inputs):
        raise wire.InvalidInput(f"raw_input_contents holds {len(raw)} entries for {len(inputs)} inputs "
                                f"(one per input, in input order)")
    out: dict[str, tuple[str, tuple, memoryview]] = {}
    for i, t in enumerate(inputs):
        name = t.name
        if not name:
            raise wire.BadRequest(f"input #{i}: name must be a non-empty string")
        if name in out:
            raise wire.BadRequest(f"input {name!r}: named twice")
        dtype = oip.dtype_of(t.datatype, name)
        shape, numel = _shape(t, limits)
        if raw:
            if t.HasField("contents"):
                raise wire.InvalidInput(f"input {name!r}: has typed contents while the request uses "
                                        f"raw_input_contents (one or the other for all inputs)")
            data = raw[i]
            if dtype == wire.BYTES_DTYPE:
                _check_bytes_items(name, data, numel)
            elif len(data) != numel * _ITEMSIZE[dtype]:
                raise wire.InvalidInput(f"input {name!r}: {t.datatype} {list(shape)} needs "
                                        f"{numel * _ITEMSIZE[dtype]} bytes, raw_input_contents[{i}] holds {len(data)}")
        else:
            data = _typed(t, t.datatype, numel)
        out[name] = (dtype, shape, memoryview(data))
    return out


# --- replies (worker thread) ------------------------------------------------------------------------
class _Tag:
    __slots__ = ("model", "version", "id", "final")

    def __init__(self, model: str, version: str, rid: str, final: bool) -> None:
        self.model, self.version, self.id, self.final = model, version, rid, final


def _response(req, limit: int) -> bytes:
    """The serialized ModelInferResponse of a finished request (outputs as raw_output_contents)."""
    tag = req.tag
    resp = pb.ModelInferResponse(model_name=tag.model, model_version=tag.version, id=tag.id)
    if tag.final:
        resp.parameters["triton_final_response"].bool_param = True
    total = 0
    for name, value in req.result.items():
        out = resp.outputs.add()
        out.name = name
        if isinstance(value, (list, tuple)):
            out.datatype = "BYTES"
            out.shape.append(len(value))
            data = b"".join(_U32.pack(len(v)) + bytes(v) for v in value)
        elif isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            dt = oip.DATATYPE_OF.get(wire.DTYPE_OF_NUMPY.get(arr.dtype.newbyteorder("=")) or "")
            if dt is None:
                raise wire.InvalidInput(f"output {name!r}: numpy dtype {arr.dtype} has no protocol datatype")
            out.datatype = dt
            out.shape.extend(arr.shape)
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        else:  # a torch tensor on the host
            import torch

            t = value.detach().contiguous()
            dt = oip.DATATYPE_OF.get(str(t.dtype).removeprefix("torch."))
            if dt is None:
                raise wire.InvalidInput(f"output {name!r}: dtype {t.dtype} has no protocol datatype")
            out.datatype = dt
            out.shape.extend(t.shape)
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        total += len(data)
        if total > limit:
            raise wire.ResourceExhausted(f"reply outputs of at least {total} bytes exceed max_message_bytes {limit}")
        resp.raw_output_contents.append(data)
    return resp.SerializeToString()


def _finish(req, limit: int) -> None:
    if req.error is not None or req.result is None:
        req.reply = None
        return
    try:
        req.reply = _response(req, limit)
    except errors.TinyserveError as exc:
        req.reply, req.error, req.code = None, exc, wire.wire_code(exc)
    req.result = None


def _error_of(req) -> errors.TinyserveError:
    if req.error is not None:
        return req.error
    return wire.error_from_reply(req.code, f"request failed ({req.code})")


class _Unary:
    """The responder of one ModelInfer call.  The handler's thread waits on `done` (a lock held from
    the start) until the loop has set `reply` or `error` and released it."""

    __slots__ = ("closed", "done", "reply", "error", "limit", "owner")

    def __init__(self, owner: GrpcFrontEnd) -> None:
        self.closed = False
        self.done = threading.Lock()
        self.done.acquire()
        self.reply = None
        self.error: errors.TinyserveError | None = None
        self.limit = owner.max_message_bytes
        self.owner = owner

    def finish(self, req) -> None:
        _finish(req, self.limit)

    def reply_threadsafe(self, tags, reply, nbytes) -> bool:
        return False

    def send_reply(self, req) -> None:
        self.owner.in_flight -= 1
        if req.reply is None:
            self.error = _error_of(req)
        else:
            self.reply = req.reply
        self.done.release()

    def discard(self, tag) -> None:
        self.owner.in_flight -= 1
        self.error = wire.error_from_reply("UNAVAILABLE", "the call ended before its reply")
        self.done.release()

    def send_error(self, tag, code: str, message: str, close: bool = False) -> None:
        self.owner.in_flight -= 1
        self.error = wire.error_from_reply(code, message)
        self.done.release()

    def refused(self, tag, exc: errors.TinyserveError) -> None:
        """The loop could not queue the request (nothing was counted in flight)."""
        self.error = exc
        self.done.release()


def _field2(inner: bytes) -> bytes:
    """`inner` as field 2 (length-delimited) of a message: ModelStreamInferResponse.infer_response."""
    n, head = len(inner), bytearray(b"\x12")
    while n >= 0x80:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head) + inner


def _stream_error(tag: _Tag, exc: BaseException) -> bytes:
    return pb.ModelStreamInferResponse(
        error_message=str(exc),
        infer_response=pb.ModelInferResponse(model_name=tag.model, model_version=tag.version, id=tag.id),
    ).SerializeToString()


class _Stream:
    """The responder of one ModelStreamInfer call: replies (serialized ModelStreamInferResponse, or
    None for a discarded one) go into a thread-safe queue in completion order; the call's response
    generator (a server thread) takes them out."""

    __slots__ = ("closed", "queue", "limit", "owner")

    def __init__(self, owner: GrpcFrontEnd) -> None:
        self.closed = False
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.limit = owner.max_message_bytes
        self.owner = owner

    def finish(self, req) -> None:
        _finish(req, self.limit)
        if req.reply is not None:
            req.reply = _field2(req.reply)

    def reply_threadsafe(self, tags, reply, nbytes) -> bool:
        return False

    def send_reply(self, req) -> None:
        self.owner.in_flight -= 1
        self.queue.put(req.reply if req.reply is not None else _stream_error(req.tag, _error_of(req)))

    def discard(self, tag) -> None:
        self.owner.in_flight -= 1
        self.queue.put(None)

    def send_error(self, tag, code: str, message: str, close: bool = False) -> None:
        self.owner.in_flight -= 1
        self.queue.put(_stream_error(tag, wire.error_from_reply(code, message)))

    def refused(self, tag, exc: errors.TinyserveError) -> None:
        self.queue.put(_stream_error(tag, exc))


# --- the front end ----------------------------------------------------------------------------------
class GrpcFrontEnd:
    """`inference.GRPCInferenceService` for one core, on the loop `start()` is awaited on.

    ssl: None, or (certfile, keyfile) paths of PEM files (TLS for every RPC).  max_message_bytes: the
    largest request or reply message (default: the core's frame limit); gRPC refuses a larger request
    with RESOURCE_EXHAUSTED before reading it.  max_in_flight: infer requests queued at once over
    every connection of this front end (more: RESOURCE_EXHAUSTED, TOO_MANY_REQUESTS).
    max_concurrent_calls: calls served at once (each holds one of the server's threads while it
    runs; a stream holds two); gRPC answers a call beyond it RESOURCE_EXHAUSTED."""

    def __init__(self, core, *, host: str = "127.0.0.1", port: int = 0, ssl: tuple[str, str] | None = None,
                 max_message_bytes: int | None = None, max_in_flight: int = 4096,
                 max_concurrent_streams: int = 128, max_concurrent_calls: int = 256) -> None:
        self.core = core
        self.host = host
        self._port = port
        self._ssl = ssl
        self.max_message_bytes = int(max_message_bytes if max_message_bytes is not None
                                     else core.limits.max_frame_bytes)
        if self.max_message_bytes <= 0 or self.max_message_bytes > (1 << 31) - 1:
            raise errors.ConfigError(f"max_message_bytes {self.max_message_bytes} is outside 1..2^31-1 (gRPC's cap)")
        self.max_in_flight = max_in_flight
        self.max_concurrent_streams = max_concurrent_streams
        if max_concurrent_calls < 1:
            raise errors.ConfigError(f"max_concurrent_calls {max_concurrent_calls} must be >= 1")
        self.max_concurrent_calls = max_concurrent_calls
        self.in_flight = 0  # loop thread only
        self._server: grpc.Server | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        token = core.token
        self._auth = None if token is None else b"Bearer " + (token.encode() if isinstance(token, str) else token)

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        creds = None
        if self._ssl is not None:
            certfile, keyfile = self._ssl
            try:
                with open(certfile, "rb") as f:
                    cert = f.read()
                with open(keyfile, "rb") as f:
                    key = f.read()
            except OSError as exc:
                raise errors.ConfigError(f"TLS certificate {certfile!r} / key {keyfile!r}: {exc}") from None
            creds = grpc.ssl_server_credentials([(key, cert)])
        self._loop = asyncio.get_running_loop()
        n = self.max_message_bytes
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrent_calls,
                                                     thread_name_prefix="tinyserve-grpc")
        server = grpc.server(pool, handlers=(self._handlers(),), maximum_concurrent_rpcs=self.max_concurrent_calls,
                             options=[("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n),
                                      ("grpc.max_concurrent_streams", self.max_concurrent_streams),
                                      ("grpc.so_reuseport", 0)])
        address = f"{self.host}:{self._port}"
        try:
            port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            pool.shutdown(wait=False)
            raise errors.ConfigError(f"gRPC front end: cannot listen on {address}")
        server.start()
        self._server, self._pool, self._port = server, pool, port

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; calls in progress get `grace` seconds (None: none) to finish.  The loop keeps
        turning meanwhile (the calls' requests complete through it)."""
        server, pool = self._server, self._pool
        if server is not None:
            self._server = self._pool = None
            stopped = server.stop(grace)
            await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
            pool.shutdown(wait=False)

    # --- plumbing (see the module docstring: calls run in the server's threads) --------------------
    def _handlers(self):
        def guarded(call, request, context):
            try:
                self._check_auth(context)
                if type(request) is _Unparsed:
                    raise request.error
                return call(request, context)
            except errors.TinyserveError as exc:
                context.abort(_status(exc), str(exc))
            except (ValueError, TypeError, OverflowError, KeyError) as exc:  # a bug, not the client's fault
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

        def unary(fn, req_cls):
            loop = self._loop

            def handler(request, context):
                return guarded(lambda r, c: asyncio.run_coroutine_threadsafe(fn(r, c), loop).result(), request,
                               context)

            return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=_parser(req_cls),
                                                       response_serializer=_serialize)

        def infer(request, context):
            return guarded(self._model_infer, request, context)

        def stream(request_iterator, context):
            try:
                self._check_auth(context)
            except errors.TinyserveError as exc:
                context.abort(_status(exc), str(exc))
            return self._model_stream_infer(request_iterator, context)

        methods = {
            "ServerLive": unary(self._server_live, pb.ServerLiveRequest),
            "ServerReady": unary(self._server_ready, pb.ServerReadyRequest),
            "ModelReady": unary(self._model_ready, pb.ModelReadyRequest),
            "ServerMetadata": unary(self._server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": unary(self._model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": unary(self._model_config, pb.ModelConfigRequest),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer, request_deserializer=_parser(pb.ModelInferRequest), response_serializer=_identity),
            "ModelStatistics": unary(self._model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": unary(self._repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": unary(self._repository_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": unary(self._repository_unload, pb.RepositoryModelUnloadRequest),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=_parser(pb.ModelInferRequest), response_serializer=_identity),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _check_auth(self, context) -> None:
        if self._auth is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._auth):
                    return
                break
        raise wire.Unauthenticated("missing or wrong token: send metadata 'authorization: Bearer <token>'")

    # --- health and metadata ----------------------------------------------------------------------
    async def _server_live(self, request, context):
        return pb.ServerLiveResponse(live=bool(self.core.live()))

    async def _server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.core.ready()))

    async def _model_ready(self, request, context):
        return pb.ModelReadyResponse(ready=bool(self.core.model_ready(request.name, _version(request.version))))

    async def _server_metadata(self, request, context):
        md = self.core.server_metadata()
        return pb.ServerMetadataResponse(name=md.get("name", "tinyserve"), version=str(md.get("version", "")),
                                         extensions=list(md.get("extensions", ())))

    async def _model_metadata(self, request, context):
        md = await self.core.model_metadata(request.name, _version(request.version))
        resp = pb.ModelMetadataResponse(name=md.name, versions=[str(v) for v in md.versions], platform=md.platform)
        for src, dst in ((md.inputs, resp.inputs), (md.outputs, resp.outputs)):
            for t in src:
                dst.add(name=t.name, datatype=oip.DATATYPE_OF.get(t.dtype, t.dtype.upper()), shape=list(t.shape))
        return resp

    async def _model_config(self, request, context):
        md = await self.core.model_metadata(request.name, _version(request.version))
        return pb.ModelConfigResponse(config=json_format.ParseDict(oip.model_config(md), pb.ModelConfig()))

    # --- statistics and repository ----------------------------------------------------------------
    async def _model_statistics(self, request, context):
        rows = self.core.statistics(request.name or None, _version(request.version))
        resp = pb.ModelStatisticsResponse()
        for row in rows:
            ok = int(row.get("success_count", 0))
            failed = sum(int(n) for n in (row.get("errors") or {}).values())
            batches = {int(k): int(v) for k, v in (row.get("batches") or {}).items()}
            ms = resp.model_stats.add(name=row["name"], version=str(row["version"]),
                                      last_inference=int(row.get("last_inference_ms", 0)),
                                      inference_count=ok, execution_count=sum(batches.values()))
            st = ms.inference_stats
            st.success.count, st.success.ns = ok, int(row.get("total_sum_us", 0)) * 1000
            st.fail.count = failed
            st.queue.count, st.queue.ns = ok, int(row.get("queue_sum_us", 0)) * 1000
            st.compute_infer.count, st.compute_infer.ns = ok, int(row.get("compute_sum_us", 0)) * 1000
            # not measured apart from compute_infer: counted, 0 ns (perf_analyzer requires the three
            # compute counts to agree)
            st.compute_input.count = st.compute_output.count = ok
            for size in sorted(batches):
                b = ms.batch_stats.add(batch_size=size)
                b.compute_input.count = b.compute_infer.count = b.compute_output.count = batches[size]
        return resp

    async def _repository_index(self, request, context):
        _one_repository(request.repository_name)
        resp = pb.RepositoryIndexResponse()
        for e in await self.core.repository_index(ready_only=request.ready):
            resp.models.add(name=e.name, version="" if e.version is None else str(e.version), state=e.state,
                            reason=e.reason)
        return resp

    async def _repository_load(self, request, context):
        _one_repository(request.repository_name)
        _no_params(request.parameters, "load", ())
        await self.core.load(request.model_name, None)
        return pb.RepositoryModelLoadResponse()

    async def _repository_unload(self, request, context):
        _one_repository(request.repository_name)
        _no_params(request.parameters, "unload", ("unload_dependents",))
        await self.core.unload(request.model_name, None)
        return pb.RepositoryModelUnloadResponse()

    # --- inference --------------------------------------------------------------------------------
    def _prepare(self, request, context) -> tuple:
        """A server thread: check one ModelInferRequest and turn it into the core's arguments (or
        raise a TinyserveError).  Reads nothing but the request, the call's deadline and the limits."""
        version = _version(request.model_version)
        priority, timeout_s, final = 0, None, False
        for key, p in request.parameters.items():
            if key == "priority":
                priority = _int_param(p, key)
            elif key == "timeout":  # microseconds, as Triton's
                us = _int_param(p, key)
                if us <= 0:
                    raise wire.BadRequest(f"parameter 'timeout' must be > 0 microseconds, got {us}")
                timeout_s = us / 1e6
            elif key == _FINAL:
                final = p.WhichOneof("parameter_choice") == "bool_param" and p.bool_param
            elif key in _REFUSED_PARAMS:
                raise wire.BadRequest(f"parameter {key!r}: sequence batching is not supported by tinyserve")
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining > _NO_DEADLINE_S:  # the sync server's "infinite future"
            remaining = None
        if remaining is not None and (timeout_s is None or remaining < timeout_s):
            if remaining <= 0:
                raise wire.DeadlineExceeded("the call's deadline passed before the request was queued")
            timeout_s = remaining
        inputs = request_inputs(request, self.core.limits)
        outputs = None
        if len(request.outputs):
            outputs = []
            for o in request.outputs:
                if "classification" in o.parameters:
                    raise wire.BadRequest(f"output {o.name!r}: the classification extension is not supported")
                outputs.append(o.name)
        tag = _Tag(request.model_name, request.model_version, request.id, final)
        return request.model_name, version, inputs, outputs, timeout_s, priority, tag

    def _queue(self, job: tuple, responder) -> None:
        """The loop: queue a prepared request in the core; a refusal goes to the responder."""
        name, version, inputs, outputs, timeout_s, priority, tag = job
        try:
            if self.in_flight >= self.max_in_flight:
                raise wire.TooManyRequests(f"{self.in_flight} infer requests in flight on the gRPC front end "
                                           f"reach max_in_flight {self.max_in_flight}")
            self.in_flight += 1  # released by the responder's send_reply / discard / send_error
            try:
                self.core.infer(name, version, inputs, outputs=outputs, timeout_s=timeout_s, priority=priority,
                                responder=responder, tag=tag)
            except BaseException:
                self.in_flight -= 1
                raise
        except errors.TinyserveError as exc:
            responder.refused(tag, exc)
        except Exception as exc:  # a bug: the call still gets an answer
            responder.refused(tag, wire.error_from_reply("INTERNAL", f"internal error: {type(exc).__name__}: {exc}"))

    def _model_infer(self, request, context):
        """A server thread: one unary ModelInfer call."""
        job = self._prepare(request, context)
        responder = _Unary(self)
        self._loop.call_soon_threadsafe(self._queue, job, responder)
        done = responder.done
        while not done.acquire(timeout=WAIT_S):
            if not context.is_active():  # cancelled: the core discards the reply (and releases the slot)
                responder.closed = True
                return b""
        if responder.error is not None:
            raise responder.error
        return responder.reply

    def _model_stream_infer(self, request_iterator, context):
        """A server thread: one ModelStreamInfer call; a reader thread takes the requests in, this
        generator yields the responses in completion order."""
        responder = _Stream(self)
        replies = responder.queue
        # requests read but whose responses are not yielded yet: past this window the stream stops
        # reading, so a client that does not read its responses is held back by HTTP/2 flow control
        window = threading.Semaphore(STREAM_WINDOW)
        loop = self._loop

        def read() -> None:
            n = 0
            try:
                for request in request_iterator:
                    while not window.acquire(timeout=WAIT_S):
                        if not context.is_active():
                            return
                    n += 1
                    if type(request) is _Unparsed:
                        replies.put(_stream_error(_Tag("", "", "", False), request.error))
                        continue
                    try:
                        job = self._prepare(request, None)
                    except errors.TinyserveError as exc:
                        replies.put(_stream_error(_Tag(request.model_name, request.model_version, request.id, False),
                                                  exc))
                        continue
                    loop.call_soon_threadsafe(self._queue, job, responder)
            except grpc.RpcError:  # the client went away mid-stream
                pass
            except Exception as exc:  # noqa: BLE001 - a bug: logged, the stream ends
                log.error("tinyserve grpc: stream reader failed", exc_info=exc)
            finally:
                replies.put((_READ_ALL, n))

        def responses():
            threading.Thread(target=read, name="tinyserve-grpc-stream", daemon=True).start()
            got, total = 0, None
            try:
                while total is None or got < total:  # replies may still come after the last request
                    try:
                        item = replies.get(timeout=WAIT_S)
                    except queue.Empty:
                        if not context.is_active():
                            return
                        continue
                    if type(item) is tuple:
                        total = item[1]
                        continue
                    got += 1
                    window.release()
                    if item is not None:
                        yield item
            finally:
                responder.closed = True  # replies still to come are discarded by the core

        return responses()


class _Unparsed:
    """What a request message that does not parse becomes (gRPC would otherwise answer UNKNOWN)."""

    __slots__ = ("error",)

    def __init__(self, error: errors.TinyserveError) -> None:
        self.error = error


def _parser(cls):
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return _Unparsed(wire.BadRequest(f"the request is not a valid {name} message ({len(data)} bytes): {exc}"))

    return parse


def _identity(b: bytes) -> bytes:
    return b


def _serialize(msg) -> bytes:
    return msg.SerializeToString()


def _one_repository(name: str) -> None:
    if name:
        raise wire.BadRequest(f"repository_name {wire.shown(name)}: tinyserve serves one repository; leave it empty")


def _no_params(params: Mapping, what: str, ignored: tuple[str, ...]) -> None:
    for key in params:
        if key not in ignored:
            raise wire.BadRequest(f"{what} parameter {key!r} is not supported by tinyserve "
                                  f"(no configuration overrides or model files over the protocol)")
