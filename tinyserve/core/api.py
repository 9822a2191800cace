"""The server core's one in-process API, as the front ends (tcp, http, grpc) see it.

A front end translates its wire into calls of `CoreAPI` and the results back into its wire; it knows
nothing else of the server (an `ast` test enforces that front ends import only `tinyserve.core.api`,
`tinyserve.errors`, `tinyserve.wire` helpers for tensors and limits, and their own wire libraries).

Everything here runs on the event loop thread unless a docstring says otherwise.

Requests
    `CoreAPI.infer(...)` checks and queues one inference request, or raises a `TinyserveError` at
    once (unknown model: `ModelNotFoundError`; malformed or mismatched tensors: `wire.InvalidInput`;
    queue full, draining, ejected: `wire.QueueFull`, `wire.ShuttingDown`, `wire.Unavailable`...;
    `wire.wire_code(exc)` names the error class in one table every front end maps from).
    A request that was queued completes exactly once through its `Responder`:

    1. in the worker thread that ran it, `responder.finish(req)`: the front end encodes its reply
       from `req.result` ({output name: torch.Tensor on the host, or list[bytes] for `bytes`}) or
       `req.error` (a TinyserveError) into `req.reply` (anything; opaque to the core), so encoding
       costs the loop nothing.  Should `finish` raise, the core sets `req.reply = None` and
       `req.error` to an INTERNAL error.  `finish` is skipped when `responder.closed` is true.
       `req.code` is the wire code of `req.error` ("OK" without one) when `finish` runs;
       `req.instance.name` / `req.instance.version` name the model version that ran it.
    2. the core counts the request in its statistics (before the client can see the reply), then
       either `responder.reply_threadsafe(tags, reply_parts, nbytes)` from the worker (an optional
       fast path: return False to decline, e.g. when replies must go out in request order; it is
       offered only to a responder with `wire_frames = True`, whose `req.reply` is one tinyserve wire
       frame (`wire.encode_frame`'s buffers): the core then joins the replies one worker batch owes
       one responder into one call, `reply_parts` the frames back to back, `nbytes` their size), or, on
       the loop, `responder.send_reply(req)` with `req.reply` set (or None: then send an error
       built from `req.code` / `req.error`), or `responder.discard(req.tag)` when the responder
       closed in between (its slot is released, nothing is sent).  A request that waited for an
       on-demand load that then failed is answered with `responder.send_error(tag, code, message)`.

    Tensors in: {name: (dtype, shape, view)} with tinyserve dtype names (docs/protocol.md section 3:
    `float32 float16 bfloat16 float64 int8 uint8 int16 int32 int64 bool bytes`), the shape as a tuple
    of ints, the raw little-endian C-order bytes as a memoryview that stays valid until the request
    completes (`bytes`: n items, each u32 little-endian length + bytes).  `CoreAPI.limits` (a
    `wire.Limits`) caps tensor counts, dimensions and sizes; check them before allocating anything.
    `inputs` may instead be a callable `inputs(limits) -> {name: (dtype, shape, view)}`, called once
    the request is routed (a wire whose tensor descriptors come with the routing header decodes
    them only then, so an unknown model is reported before a malformed tensor).  `outputs`,
    `timeout_s` or `priority` given as a TinyserveError instance: the core raises it when its checks
    reach that field (a front end keeps its own wire's message for its own field's check).

    Requests `infer` queues during one turn of the loop go to the model workers together, in one
    callback after the turn's reads (`read_done()` is the hook a front end may call after a read; it
    only schedules that callback, which `infer` also does).

Front-end hooks
    `draining` (refuse new connections and requests), `add_flush(fn)` (a front end that coalesces
    replies: `fn()` after each batch of replies the core sends on the loop), `count_op(code=None)`
    (a request no model version counts: another op, a protocol error), `count_refused(model,
    version, code, message)` (an infer the front end refused before it was queued: that version's
    statistics when it is loaded, else the server-wide ones).  The TCP protocol's reports are plain
    dicts too: `models_report()`, `stats_report(name)`, `health(repository=True)`,
    `metadata_config(name, version)` -> (version, config or None: read it with `read_config`),
    `start_load(name, version)` -> a future of the READY instance (`.name`, `.version`, `.state`),
    `start_unload(name, version)` -> (versions, a future or None).

Models
    `model_metadata`, `model_ready`, `repository_index`, `load`, `unload`, `statistics`, `health` are
    plain data in, plain data out (the dataclasses below and JSON-safe dicts), wire-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["CoreAPI", "IndexEntry", "ModelMetadata", "Responder", "TensorMeta"]


@dataclass(frozen=True)
class TensorMeta:
    """One input or output as a request sends or receives it.  -1 in `shape`: any size (the batch
    dimension of a batching model is -1)."""

    name: str
    dtype: str  # a tinyserve dtype name (docs/protocol.md section 3)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: int  # the version that metadata describes (the default one when none was asked for)
    versions: tuple[int, ...]  # every version the repository holds
    platform: str
    inputs: tuple[TensorMeta, ...]  # what a request must send (after any preprocess hook's declaration)
    outputs: tuple[TensorMeta, ...]
    max_batch_size: int = 0  # 0: no batching


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: int | None  # None: no version of the model is known yet
    state: str  # READY, LOADING, UNLOADING, UNLOADED, FAILED
    reason: str = ""


class Responder(Protocol):
    """What a front end hands `CoreAPI.infer` for each request (one object per connection or per
    request, as the front end likes)."""

    closed: bool  # read from worker threads: True -> no reply is built or sent

    def finish(self, req: Any) -> None:
        """Worker thread: build `req.reply` from `req.result` or `req.error`."""

    def reply_threadsafe(self, tags: Sequence, reply: Any, nbytes: int) -> bool:
        """Worker thread, optional fast path: send the replies of `tags` now; False: decline."""

    def send_reply(self, req: Any) -> None:
        """Loop thread: send `req.reply` (None: an error reply from `req.code` and `req.error`)."""

    def discard(self, tag: Any) -> None:
        """Loop thread: the request completed after the responder closed; release its slot."""

    def send_error(self, tag: Any, code: str, message: str) -> None:
        """Loop thread: a request the core refused after `infer` returned (e.g. it waited for an
        on-demand load that failed): answer it with that wire code and message."""


class CoreAPI(Protocol):
    limits: Any  # wire.Limits: caps on tensor counts, dimensions, sizes (every front end applies them)
    # the server-wide budget of bytes held by large request bodies being received, shared by every
    # front end: try_acquire(n) -> bool (False: it does not fit; refuse), release(n); `limit` its size
    body_memory: Any
    token: bytes | None  # the server's auth token (None: none), which every front end enforces

    # --- the server -----------------------------------------------------------------------------------
    def live(self) -> bool:
        """The process is up and its loop turns (false only while stopping)."""

    def ready(self) -> bool:
        """Start-up models loaded and not draining (the same rule as /readyz and the `health` op)."""

    def server_metadata(self) -> dict:
        """{"name": "tinyserve", "version": str, "extensions": [str, ...]}."""

    def health(self) -> dict:
        """The health report (docs/health.md), JSON-safe."""

    # --- models ---------------------------------------------------------------------------------------
    def model_ready(self, name: str, version: int | None = None) -> bool:
        """True when that version (None: the version unversioned requests go to) answers requests.
        Raises ModelNotFoundError for an unknown model or version."""

    async def model_metadata(self, name: str, version: int | None = None) -> ModelMetadata:
        """Raises ModelNotFoundError for an unknown model or version."""

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model and version the repository holds and every loaded one, with its state."""

    async def load(self, name: str, version: int | None = None) -> int:
        """Load and warm up a version (None: the default one); returns the version loaded."""

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        """Unload one version or (None) every loaded version; returns the versions unloaded."""

    def statistics(self, name: str | None = None, version: int | None = None) -> list[dict]:
        """Per model version, one dict: {"name", "version"} plus the fields of the `stats` op's version
        entry (docs/health.md section 2: "requests", "successes", "errors": {code: n}, "latency_us",
        "queue_us", "compute_us" percentiles, "batch_size", ...) plus the sums a cumulative-statistics
        protocol needs: "success_count", "total_sum_ns", "queue_sum_ns", "compute_sum_ns" (exact sums
        over answered requests) and "batches" ({batch size: model calls}).  The time of the last
        inference is not recorded (a front end that must report one reports 0).
        Unknown name: ModelNotFoundError."""

    # --- requests -------------------------------------------------------------------------------------
    def infer(self, name: str, version: int | None, inputs: Mapping[str, tuple], *,
              outputs: Sequence[str] | None = None, timeout_s: float | None = None, priority: int = 0,
              responder: Responder, tag: Any) -> None:
        """Queue one request (see the module docstring) or raise a TinyserveError at once."""
