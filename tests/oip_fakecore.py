"""A fake server core implementing `tinyserve.core.api.CoreAPI` faithfully, for front-end tests.

No HTTP or gRPC dependency: both Open Inference Protocol front ends test against it (and the real core
replaces it in the integration tests, so it behaves as the contract says, not as a test would like).

Models (`FakeCore.MODELS`; versions in brackets, * loaded at start):
    addone   [1*, 2]  x float32 [-1, 3] -> y = x + 1, z = x * 2 (float32 [-1, 3]); max_batch_size 8
    identity_<DT>     [1*] x <dtype> [-1, -1] -> y (the same tensor), one model per OIP datatype
    upper    [1*]     text bytes [-1] -> upper: the strings upper-cased (bytes [-1])
    fail     [1*]     x float32 [-1] -> raises in the worker (MODEL_ERROR)
    gate     [1*]     x float32 [-1] -> y = x, once `core.gate` is set (tests completing out of order)
    broken   [1]      its load fails (MODEL_ERROR; the version is then FAILED)

Requests run on a `concurrent.futures.ThreadPoolExecutor`; each completes exactly once through its
Responder as core/api.py says: `finish(req)` in the worker (skipped when `responder.closed`; should it
raise, `req.reply = None` and `req.error` INTERNAL), the statistics are counted, then the worker offers
`reply_threadsafe`; when that declines, `send_reply(req)` runs on the loop (`call_soon_threadsafe`), or
`discard(tag)` when the responder closed in between.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tinyserve import errors, wire
from tinyserve.core.api import IndexEntry, ModelMetadata, TensorMeta

__all__ = ["FakeCore", "FakeRequest", "LoopThread", "OIP_DTYPES", "ParkingCore"]

# the OIP datatypes tinyserve supports -> tinyserve dtype (kept here so the fake needs no front end)
OIP_DTYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
              "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16"}


class _Instance:
    """What `req.instance` is in the real core: the model version that serves the request."""

    __slots__ = ("name", "version")

    def __init__(self, name: str, version: int) -> None:
        self.name, self.version = name, version


class FakeRequest:
    """The fields of the real core's request (tinyserve.runtime.Request) a front end may read."""

    __slots__ = ("inputs", "outputs", "deadline", "priority", "owner", "tag", "t0", "t_run", "t_done",
                 "instance", "result", "error", "reply", "code", "counted")

    def __init__(self, inputs, outputs, deadline, priority, owner, tag, instance) -> None:
        self.inputs, self.outputs, self.deadline, self.priority = inputs, outputs, deadline, priority
        self.owner, self.tag, self.instance = owner, tag, instance
        self.t0 = time.perf_counter_ns()
        self.t_run = self.t_done = 0
        self.result = None
        self.error = None
        self.reply = None
        self.code = "OK"
        self.counted = False


class _Model:
    def __init__(self, name, versions, inputs, outputs, fn, *, max_batch_size=0, platform="pytorch",
                 load_error=None):
        self.name, self.versions, self.fn = name, tuple(versions), fn
        self.inputs = tuple(TensorMeta(*t) for t in inputs)
        self.outputs = tuple(TensorMeta(*t) for t in outputs)
        self.max_batch_size, self.platform, self.load_error = max_batch_size, platform, load_error


class _Stats:
    def __init__(self) -> None:
        self.requests = self.successes = 0
        self.errors: dict[str, int] = {}
        self.total_us = self.queue_us = self.compute_us = 0
        self.batches: dict[int, int] = {}
        self.last_ms = 0
        self.latencies: list[int] = []


def _pct(values: list[int]) -> dict:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = sorted(values)
    return {"p50": s[len(s) // 2], "p90": s[min(len(s) - 1, len(s) * 9 // 10)],
            "p99": s[min(len(s) - 1, len(s) * 99 // 100)], "max": s[-1]}


class FakeCore:
    """See the module docstring.  `loaded`: (name, version) pairs READY at start (default: the starred
    ones).  `max_in_flight`: requests queued or running at once before `infer` raises TOO_MANY_REQUESTS."""

    def __init__(self, *, limits: wire.Limits | None = None, token: bytes | None = None,
                 loaded: Sequence[tuple[str, int]] | None = None, workers: int = 4,
                 max_in_flight: int = 4096) -> None:
        self.limits = limits or wire.Limits()
        self.token = token
        self.gate = threading.Event()
        self.models: dict[str, _Model] = {m.name: m for m in self._models()}
        if loaded is None:
            loaded = [(n, m.versions[0]) for n, m in self.models.items() if n != "broken"]
        self.state: dict[tuple[str, int], str] = {k: "READY" for k in loaded}
        self.reasons: dict[tuple[str, int], str] = {}
        self.stats: dict[tuple[str, int], _Stats] = {}
        self.is_live = True
        self.is_ready = True
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fakecore")
        self.infer_calls: list[tuple] = []  # (name, version, {input: (dtype, shape, nbytes)}, outputs, timeout_s, priority)

    # --- the models --------------------------------------------------------------------------------
    def _models(self) -> list[_Model]:
        def addone(x):
            return {"y": x + 1, "z": x * 2}

        def upper(text):
            return {"upper": [t.upper() for t in text]}

        def fail(x):
            raise RuntimeError("this model always fails")

        def gate(x):
            if not self.gate.wait(30):
                raise RuntimeError("gate was never opened")
            return {"y": x}

        ms = [
            _Model("addone", (1, 2), [("x", "float32", (-1, 3))], [("y", "float32", (-1, 3)), ("z", "float32", (-1, 3))],
                   addone, max_batch_size=8),
            _Model("upper", (1,), [("text", "bytes", (-1,))], [("upper", "bytes", (-1,))], upper, platform="python"),
            _Model("fail", (1,), [("x", "float32", (-1,))], [("y", "float32", (-1,))], fail),
            _Model("gate", (1,), [("x", "float32", (-1,))], [("y", "float32", (-1,))], gate),
            _Model("broken", (1,), [("x", "float32", (-1,))], [("y", "float32", (-1,))], addone,
                   load_error="model 'broken' version 1: weights do not fit the program (fake)"),
        ]
        for dt, tdt in OIP_DTYPES.items():
            ms.append(_Model(f"identity_{dt}", (1,), [("x", tdt, (-1, -1))], [("y", tdt, (-1, -1))],
                             lambda x: {"y": x.clone()}))
        return ms

    def _model(self, name: str, version: int | None = None) -> _Model:
        m = self.models.get(name) if type(name) is str else None
        if m is None:
            raise errors.ModelNotFoundError(f"model {wire.shown(name)} is not in the repository")
        if version is not None and version not in m.versions:
            raise errors.ModelNotFoundError(f"model {name!r} has no version {version} "
                                            f"(versions: {', '.join(map(str, m.versions))})")
        return m

    def _serving(self, m: _Model) -> int | None:
        ready = [v for v in m.versions if self.state.get((m.name, v)) == "READY"]
        return max(ready) if ready else None

    # --- the server --------------------------------------------------------------------------------
    def live(self) -> bool:
        return self.is_live

    def ready(self) -> bool:
        return self.is_ready

    def server_metadata(self) -> dict:
        return {"name": "tinyserve", "version": "0.0-fake", "extensions": ["model_repository", "statistics"]}

    def health(self) -> dict:
        models = {}
        for n, m in self.models.items():
            v = self._serving(m)
            models[n] = {"state": "READY" if v else "UNLOADED", "reason": "", "version": v or m.versions[-1]}
        return {"live": self.is_live, "ready": self.is_ready, "reasons": [] if self.is_ready else ["not ready"],
                "models": models, "devices": {}}

    # --- models --------------------------------------------------------------------------------------
    def model_ready(self, name: str, version: int | None = None) -> bool:
        m = self._model(name, version)
        if version is None:
            return self._serving(m) is not None
        return self.state.get((name, version)) == "READY"

    async def model_metadata(self, name: str, version: int | None = None) -> ModelMetadata:
        m = self._model(name, version)
        if version is None:
            version = self._serving(m) or m.versions[-1]
        return ModelMetadata(name=m.name, version=version, versions=m.versions, platform=m.platform,
                             inputs=m.inputs, outputs=m.outputs, max_batch_size=m.max_batch_size)

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        out = []
        for n, m in self.models.items():
            for v in m.versions:
                state = self.state.get((n, v), "UNLOADED")
                if ready_only and state != "READY":
                    continue
                out.append(IndexEntry(n, v, state, self.reasons.get((n, v), "")))
        return out

    async def load(self, name: str, version: int | None = None) -> int:
        m = self._model(name, version)
        v = version if version is not None else m.versions[-1]
        await asyncio.sleep(0)
        if m.load_error:
            self.state[(name, v)] = "FAILED"
            self.reasons[(name, v)] = m.load_error
            raise errors.ModelError(m.load_error)
        self.state[(name, v)] = "READY"
        self.reasons.pop((name, v), None)
        return v

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        m = self._model(name, version)
        vs = [version] if version is not None else list(m.versions)
        done = [v for v in vs if self.state.pop((name, v), None) is not None]
        await asyncio.sleep(0)
        return done

    def statistics(self, name: str | None = None, version: int | None = None) -> list[dict]:
        if name is not None:
            self._model(name, version)
        out = []
        for n, m in self.models.items():
            if name is not None and n != name:
                continue
            for v in m.versions:
                if version is not None and v != version:
                    continue
                if name is None and (n, v) not in self.state and (n, v) not in self.stats:
                    continue
                with self._lock:
                    s = self.stats.get((n, v)) or _Stats()
                    out.append({
                        "name": n, "version": v, "requests": s.requests, "successes": s.successes,
                        "errors": dict(s.errors), "latency_us": _pct(s.latencies), "queue_us": _pct([]),
                        "compute_us": _pct([]), "batch_size": _pct(list(s.batches)),
                        "success_count": s.successes, "total_sum_us": s.total_us, "queue_sum_us": s.queue_us,
                        "compute_sum_us": s.compute_us, "batches": dict(s.batches),
                        "last_inference_ms": s.last_ms,
                    })
        return out

    # --- requests ------------------------------------------------------------------------------------
    def infer(self, name: str, version: int | None, inputs: Mapping[str, tuple], *,
              outputs: Sequence[str] | None = None, timeout_s: float | None = None, priority: int = 0,
              responder: Any, tag: Any) -> None:
        m = self._model(name, version)
        if version is None:
            version = self._serving(m)
            if version is None:
                raise wire.Unavailable(f"model {name!r} has no READY version")
        elif self.state.get((name, version)) != "READY":
            raise wire.Unavailable(f"model {name!r} version {version} is not loaded "
                                   f"(state {self.state.get((name, version), 'UNLOADED')})")
        self._check_inputs(m, inputs)
        names = [o.name for o in m.outputs]
        if outputs is not None:
            for o in outputs:
                if type(o) is not str:
                    raise wire.BadRequest(f"field 'outputs' must list output names (strings), got {wire.shown(o)}")
                if o not in names:
                    raise wire.InvalidInput(f"output {wire.shown(o)} is not an output of model {name!r} "
                                            f"(outputs: {', '.join(sorted(names))})")
            if len(set(outputs)) != len(outputs):
                raise wire.BadRequest("field 'outputs' names an output more than once")
        if timeout_s is not None and not (type(timeout_s) in (int, float) and timeout_s > 0):
            raise wire.BadRequest(f"timeout must be a number > 0, got {wire.shown(timeout_s)}")
        if type(priority) is not int or not 0 <= priority <= 15:
            raise wire.BadRequest(f"field 'priority' must be an integer 0..15, got {wire.shown(priority)}")
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                raise wire.TooManyRequests(f"the server has {self.in_flight} requests in flight "
                                           f"(max_in_flight {self.max_in_flight})")
            self.in_flight += 1
        self.infer_calls.append((name, version, {k: (d, s, v.nbytes) for k, (d, s, v) in inputs.items()},
                                 None if outputs is None else list(outputs), timeout_s, priority))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        req = FakeRequest(dict(inputs), None if outputs is None else list(outputs), deadline, priority,
                          responder, tag, _Instance(name, version))
        loop = asyncio.get_running_loop()
        self._pool.submit(self._run, m, req, loop)

    def _check_inputs(self, m: _Model, inputs: Mapping[str, tuple]) -> None:
        if len(inputs) > self.limits.max_tensors:
            raise wire.BadRequest(f"{len(inputs)} tensors exceed max_tensors {self.limits.max_tensors}")
        want = {t.name: t for t in m.inputs}
        for k in inputs:
            if k not in want:
                raise wire.InvalidInput(f"input {wire.shown(k)} is not an input of model {m.name!r} "
                                        f"(inputs: {', '.join(want)})")
        for k, t in want.items():
            if k not in inputs:
                raise wire.InvalidInput(f"model {m.name!r}: input {k!r} is missing")
            dtype, shape, view = inputs[k]
            if dtype != t.dtype:
                raise wire.InvalidInput(f"input {k!r}: dtype {dtype}, model {m.name!r} expects {t.dtype}")
            shape = tuple(shape)
            if len(shape) != len(t.shape) or any(w != -1 and w != s for w, s in zip(t.shape, shape)):
                raise wire.InvalidInput(f"input {k!r}: shape {list(shape)} does not match model {m.name!r}'s "
                                        f"{list(t.shape)}")
            if m.max_batch_size and shape and shape[0] > m.max_batch_size:
                raise wire.InvalidInput(f"input {k!r}: batch of {shape[0]} exceeds max_batch_size {m.max_batch_size}")
            numel = 1
            for s in shape:
                numel *= s
            if dtype == "bytes":
                wire.split_bytes(view, numel)  # the items must fill the view exactly
            elif view.nbytes != numel * np.dtype(wire.NUMPY_DTYPES.get(dtype, np.uint16)).itemsize:
                raise wire.InvalidInput(f"input {k!r}: {view.nbytes} bytes, {dtype} {list(shape)} needs "
                                        f"{numel * np.dtype(wire.NUMPY_DTYPES.get(dtype, np.uint16)).itemsize}")

    # --- the worker ----------------------------------------------------------------------------------
    def _run(self, m: _Model, req: FakeRequest, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._run1(m, req, loop)
        except BaseException:  # a bug in the fake or a front end's callback: never lose it silently
            import traceback

            traceback.print_exc()
            raise

    def _run1(self, m: _Model, req: FakeRequest, loop: asyncio.AbstractEventLoop) -> None:
        req.t_run = time.perf_counter_ns()
        try:
            if req.deadline is not None and time.monotonic() > req.deadline:
                raise wire.DeadlineExceeded(f"model {m.name!r}: the request's timeout passed before it ran")
            args = []
            for t in m.inputs:
                dtype, shape, view = req.inputs[t.name]
                if dtype == "bytes":
                    args.append(wire.split_bytes(view, _numel(shape)))
                else:
                    args.append(wire.to_array(dtype, tuple(shape), view, torch=True))
            try:
                out = m.fn(*args)
            except Exception as exc:
                raise errors.ModelError(f"model {m.name!r} version {req.instance.version} raised "
                                        f"{type(exc).__name__}: {exc}") from None
            if req.outputs is not None:
                out = {k: out[k] for k in req.outputs}
            req.result = out
        except errors.TinyserveError as exc:
            req.error = exc
            req.code = wire.wire_code(exc)
        req.t_done = time.perf_counter_ns()
        responder = req.owner
        if not responder.closed:
            try:
                responder.finish(req)
            except Exception as exc:  # noqa: BLE001 - the contract: the reply becomes an INTERNAL error
                req.reply = None
                req.error = errors.TinyserveError(f"the front end could not encode the reply: "
                                                  f"{type(exc).__name__}: {exc}")
                req.code = "INTERNAL"
        if req.error is not None and req.code == "OK":
            req.code = wire.wire_code(req.error)
        self._count(req, batch=_batch(req))
        with self._lock:
            self.in_flight -= 1
        if req.reply is not None and not responder.closed:
            reply = req.reply
            try:  # the reply is opaque to the core: its size when it is a list of buffers, else 0
                n = sum(memoryview(p).nbytes for p in reply) if isinstance(reply, (list, tuple)) else 0
            except TypeError:
                n = 0
            if responder.reply_threadsafe((req.tag,), reply, n):
                return
        try:
            loop.call_soon_threadsafe(self._deliver, req)
        except RuntimeError:  # the loop is closed
            pass

    def _deliver(self, req: FakeRequest) -> None:
        responder = req.owner
        if responder.closed:
            responder.discard(req.tag)
        else:
            responder.send_reply(req)

    def _count(self, req: FakeRequest, batch: int) -> None:
        key = (req.instance.name, req.instance.version)
        now = time.perf_counter_ns()
        with self._lock:
            s = self.stats.setdefault(key, _Stats())
            s.requests += 1
            total = (now - req.t0) // 1000
            s.latencies.append(total)
            if req.code == "OK":
                s.successes += 1
                s.total_us += total
                s.queue_us += (req.t_run - req.t0) // 1000
                s.compute_us += (req.t_done - req.t_run) // 1000
                s.batches[batch] = s.batches.get(batch, 0) + 1
                s.last_ms = int(time.time() * 1000)
            else:
                s.errors[req.code] = s.errors.get(req.code, 0) + 1
        req.counted = True

    def close(self) -> None:
        self.gate.set()
        self._pool.shutdown(wait=True, cancel_futures=False)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _batch(req: FakeRequest) -> int:
    for dtype, shape, view in req.inputs.values():
        return shape[0] if len(shape) else 1
    return 1


class ParkingCore(FakeCore):
    """A FakeCore whose `infer` of model `parked_model` queues nothing: the request is held, as the real
    core parks one behind an on-demand load, until `fail_parked(code, message, close)` (on the loop)
    answers every held request with `responder.send_error` (the load failed)."""

    def __init__(self, parked_model: str = "addone", **kw) -> None:
        super().__init__(**kw)
        self.parked_model = parked_model
        self.parked: list = []

    def infer(self, name, version, inputs, *, outputs=None, timeout_s=None, priority=0, responder, tag):
        if name == self.parked_model:
            self._model(name, version)
            self.parked.append((responder, tag))
            return
        super().infer(name, version, inputs, outputs=outputs, timeout_s=timeout_s, priority=priority,
                      responder=responder, tag=tag)

    def fail_parked(self, code: str, message: str, close: bool = False) -> int:
        held, self.parked = self.parked, []
        for responder, tag in held:
            if close:
                responder.send_error(tag, code, message, close=True)
            else:
                responder.send_error(tag, code, message)
        return len(held)


class LoopThread:
    """An event loop (uvloop when `uvloop=True` and installed, else asyncio's) running in a daemon
    thread, for tests that drive a front end with blocking clients.  `call(coro_or_fn, *args)` runs a
    coroutine function or a plain function on the loop and returns its result (bounded by `timeout`)."""

    def __init__(self, *, uvloop: bool = True) -> None:
        if uvloop:
            try:
                import uvloop as _uv

                self.loop = _uv.new_event_loop()
            except ImportError:
                self.loop = asyncio.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="loopthread", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn, *args, timeout: float = 30.0):
        async def run():
            r = fn(*args)
            if asyncio.iscoroutine(r):
                r = await r
            return r

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()
