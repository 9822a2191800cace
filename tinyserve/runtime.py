"""A loaded model version and the instance that serves it, on dedicated worker threads.

`load_version(dir)` maps/decodes the weights and binds the program (`LoadedModel`).

`ModelInstance` wraps a `LoadedModel` with worker threads fed by one `queue.SimpleQueue` (a hand-off
costs a lock release and a GIL switch, about 10-30 us, against 50-120 us for a ThreadPoolExecutor
round trip).  The first thread loads the version, warms it up (one run on the config's `warmup` inputs:
by default zeros with batch 1; none with `warmup: false`), then runs requests; model compute, pre- and post-processing never touch the event loop.
Finished requests are handed to the server's `respond` callable in the worker thread, which writes
the replies to their sockets directly when it can (protocol.Connection.reply_threadsafe); the rest go
back to the loop through `Completions`, which wakes the loop once for however many results are ready
(`loop.call_soon_threadsafe`).

Lifecycle states: LOADING -> READY -> UNLOADING -> UNLOADED, or LOADING -> FAILED (reason kept).
Requests are accepted only while READY; requests queued before `unload()` still run.

A model whose config has `batching` runs its requests in batches formed by a
`tinyserve.batching.Batcher` per worker (`_serve_batched`, docs/scheduler.md); with hooks, each
request's `preprocess` runs before the batcher sees it, the batch is one module call, and each
request's `postprocess` runs on its slice of the outputs.  The others run each request alone (`run`).  An instance may have several worker threads sharing the
queue (`workers`, `add_worker`, `remove_worker`; a batching model's workers take from it one at a
time, through a turnstile: `_serve_batched`); the last to end releases the model.  It may run on
several devices (`devices`): one loaded copy per device, the workers assigned to the copies
round-robin, all taking from the one queue; `stop_device` stops one copy after a device fault and
`device_stats` reports per device (docs/scheduler.md section 5).
An allocation failure while running calls the server's `on_oom` hook (evict idle models) and retries
once.

Inline runs (`inline_ok`, `run_inline`): the thread hand-off (a queue put, the worker woken, the reply
or a completion back) costs about 20 us of CPU and a second thread wake-up per request, as much as a
small model's whole call.  So the loop may run a request itself, but only when the worker could not
be doing anything else and the call is known to be short: a program with no user Python in it
(INLINE_PLATFORMS, no hooks: a Python model file or a hook could block on anything, so they always
run on the worker), one worker, one device (the host), no batching, nothing in flight (every request
submitted before this one is finished), its calls over the last ones (an exponential average of the
measured call time, at least INLINE_MIN_CALLS of them, the first ones on the worker) at most
`inline_max_ns` (the server's `inline_max_us`; 0: never), and the request no bigger (input elements)
than one already seen to run within it.  A call that turns out slow raises the average, and the next
requests go to the worker again.  (The server hands one request per turn of its loop to
`run_inline`, or all of a turn's when the process has one CPU: docs/scheduler.md section 1.1.)  An
allocation failure in an inline run sends the request to the worker, which makes room and retries as above.

Python model files (docs/repository.md section 4.2) may define, besides `build(params)`:

* `preprocess(inputs: dict) -> dict`: receives the request's tensors by name (numeric dtypes as torch
  tensors viewing the request frame, dtype `bytes` as a list of `bytes`), returns the module's inputs by
  the names of the config's `inputs`.  When a model defines it, the config's `inputs` describe what
  `preprocess` returns (the module's inputs, used for the warm-up), and requests are not checked
  against them: `preprocess` validates (raise `tinyserve.wire.InvalidInput` to refuse: INVALID_INPUT).
* `postprocess(outputs: dict) -> dict`: receives the module's outputs by the names of the config's
  `outputs` and returns the reply's tensors by name (torch tensors, numpy arrays, or lists of
  bytes/str for the `bytes` dtype).

Both run in the worker thread, per request.  A hook may refuse a request by raising
`tinyserve.wire.InvalidInput` (reply INVALID_INPUT, the client's mistake); any other exception from the
model or a hook is reported as `ModelError` naming the model and the exception; the instance keeps
serving.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Decoded weights and model workspaces on transparent huge pages (torch's CPU allocator: 2 MiB
# pages, madvise(MADV_HUGEPAGE), for allocations of 2 MiB or more).  Measured on the swap bench's
# 512 MiB model (bench/results/swap-latest.md): freeing an evicted compressed model's decoded
# weights went from 74-108 ms to 8-17 ms (512 times fewer pages to unmap), and the first run's
# 40 MiB workspace from 33-38 ms to 12-17 ms; a swap-back waits for both.  torch reads the variable
# once, at its first CPU allocation: this import must come before it (the server imports the
# runtime before it makes any tensor).  An explicit THP_MEM_ALLOC_ENABLE (0 turns it off) wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tinyserve import errors, wire
from tinyserve.batching import Batcher, assemble, split
from tinyserve.config import MAX_WARMUP_ELEMENTS, ModelConfig
from tinyserve import memory
from tinyserve.memory import health_name, rss_anon
from tinyserve.formats import FORMAT_LOADERS, load_format
from tinyserve.program import bind_attributes, import_guard, load_export_program, load_python_model
from tinyserve.repository import load_config_dir
from tinyserve.weights import DTYPE_TO_TORCH, TORCH_DTYPES, LoadStats, WeightsFile

__all__ = ["FAILED", "LOADING", "READY", "STATES", "UNLOADED", "UNLOADING", "Completions", "LoadedModel",
           "ModelInstance", "Request", "load_version"]

log = logging.getLogger("tinyserve.runtime")

LOADING, READY, UNLOADING, UNLOADED, FAILED = "LOADING", "READY", "UNLOADING", "UNLOADED", "FAILED"
STATES = (LOADING, READY, UNLOADING, UNLOADED, FAILED)


@dataclass
class LoadedModel:
    config: ModelConfig
    path: Path
    module: torch.nn.Module | None
    weights: dict[str, torch.Tensor]
    weights_stats: LoadStats
    timings: dict[str, float] = field(default_factory=dict)
    hooks: object | None = None  # the python model file's module (preprocess / postprocess)

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor):
        if self.module is None:
            raise errors.ModelError(f"model {self.config.name!r} holds weights only; it has no program to run")
        return self.module(*inputs)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights in memory (tied tensors once)."""
        seen, total = set(), 0
        for t in self.weights.values():
            key = t.data_ptr() if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total


def load_version(version_dir: str | os.PathLike, *, verify: str = "compressed", threads: int | None = None,
                 check_inputs: bool = True, device: str | torch.device = "cpu",
                 device_loader: bool | None = None, weights: dict | None = None) -> LoadedModel:
    """Load the model version in `version_dir` (a `<root>/<name>/<version>/` directory) onto `device`.

    Off the CPU the weights stream to the device through tinyserve.kernels.load_to_device (the CPU
    entropy-decodes into a pinned staging pool, the device copies and regroups the byte planes;
    docs/gpu.md), and the module is moved there.  `device_loader=True` takes that path on the CPU too
    (tests: the same code as on a GPU, with the CPU's copies and the kernel's CPU fallback).
    `weights`: the version's tensors already decoded (a remote repository streams and decodes them
    as they download): the weights file is not read again."""
    version_dir = Path(version_dir)
    device = torch.device(device)
    if device_loader is None:
        device_loader = device.type != "cpu"
    t0 = time.perf_counter()
    config = load_config_dir(version_dir)
    t1 = time.perf_counter()
    if weights is not None:
        if device.type != "cpu":
            weights = {k: v.to(device) for k, v in weights.items()}
        stats = LoadStats(decoded_bytes=sum(t.numel() * t.element_size() for t in weights.values()))
    else:
        with WeightsFile(version_dir / config.weights) as wf:
            t1 = time.perf_counter()
            if device_loader:
                with import_guard("importing the device loader"):  # triton, first imported here
                    from tinyserve.kernels import load_to_device

                weights = load_to_device(wf, device, verify=verify, threads=threads)
                stats = LoadStats(decoded_bytes=sum(t.numel() * t.element_size() for t in weights.values()))
            else:
                weights = wf.load(verify=verify, threads=threads)
                stats = wf.last_load
    t2 = time.perf_counter()
    module, hooks = None, None
    if config.platform == "torch_export":
        module = load_export_program(version_dir, weights, config.program, check_inputs=check_inputs,
                                     input_shapes=[s.shape for s in config.inputs])
    elif config.platform == "python":
        module, hooks = load_python_model(version_dir, weights, config.extra, config.program)
    elif config.platform in FORMAT_LOADERS:  # torchscript, onnx, hf: tinyserve/formats
        module, hooks = load_format(config, version_dir, weights, device)
    if module is not None and device.type != "cpu":
        module.to(device)  # what the program made itself (non-persistent buffers, constants); weights are there
    if config.platform == "torch_export" and module is not None:
        bind_attributes(module)  # the graph's weight reads as plain attributes (program.py)
    t3 = time.perf_counter()
    return LoadedModel(config, version_dir, module, weights, stats,
                       {"open_s": t1 - t0, "weights_s": t2 - t1, "program_s": t3 - t2, "total_s": t3 - t0},
                       hooks)


# --- requests and their way back to the loop -------------------------------------------------------
class Request:
    """One inference request travelling loop -> worker -> loop.

    inputs: {name: (wire dtype, shape, byte view)} as `wire.split_tensors` returns them (already checked).
    outputs: the names to return (None: all).  deadline: `time.monotonic()` value or None.
    owner, tag: opaque to the runtime (the server's connection and request id).
    After the worker: `result` ({name: tensor}) or `error` (a TinyserveError); `reply` is whatever the
    instance's `finish` callable made of it in the worker (the encoded reply frame).
    """

    __slots__ = ("inputs", "outputs", "deadline", "priority", "owner", "tag", "t0", "t_run", "t_done",
                 "instance", "result", "error", "reply", "code", "counted")

    def __init__(self, inputs: dict, outputs: list | None = None, deadline: float | None = None,
                 priority: int = 0, owner: object = None, tag: object = None, t0: int = 0) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.deadline = deadline
        self.priority = priority
        self.owner = owner
        self.tag = tag
        self.t0 = t0  # perf_counter_ns when the request was read
        self.t_run = 0  # ... when the worker started it (0: never ran)
        self.t_done = 0  # ... when it finished
        self.instance: ModelInstance | None = None
        self.result: dict | None = None
        self.error: errors.TinyserveError | None = None
        self.reply = None
        self.code = "OK"
        self.counted = False  # in the statistics already (the server counts before replying)


class Completions:
    """Hands items from worker threads to `deliver(list)` on the loop, one wakeup for many items."""

    __slots__ = ("_loop", "_deliver", "_items", "_pending")

    def __init__(self, loop, deliver: Callable[[list], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        self._items: collections.deque = collections.deque()
        self._pending = False

    def post_many(self, items: list) -> None:
        """From any thread: several items, one wakeup at most."""
        self._items.extend(items)
        self._wake()

    def _wake(self) -> None:
        if not self._pending:
            self._pending = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                self._pending = False

    def _drain(self) -> None:
        self._pending = False
        items = self._items
        batch = []
        while items:
            batch.append(items.popleft())
        if batch:
            self._deliver(batch)


def _is_oom(exc: BaseException) -> bool:
    """An allocation failure of the device or the host (torch raises OutOfMemoryError on a GPU and a
    RuntimeError naming the allocator on the CPU)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc))


def _direct_call(module):
    """What the per-request path calls for `module`: its `forward` for a torch.export program's graph
    module with no hooks (torch.fx.GraphModule's __call__ adds only nn.Module's hook dispatch and an
    error-context wrapper around forward: a few us per call), else the module itself."""
    if module is None:
        return None
    from torch.nn.modules import module as nn_module

    if (isinstance(module, torch.fx.GraphModule) and not module._forward_pre_hooks and not module._forward_hooks
            and not module._backward_hooks and not module._backward_pre_hooks
            and not nn_module._global_forward_pre_hooks and not nn_module._global_forward_hooks
            and not nn_module._global_backward_hooks and not nn_module._global_backward_pre_hooks):
        return module.forward
    return module


def _to_host(outputs: dict) -> dict:
    """A device model's outputs, copied to the CPU for the reply (one synchronisation)."""
    return {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in outputs.items()}


# --- the model instance ------------------------------------------------------------------------------
class _Marker:
    """A control item on the queue (one type test tells it from a hand-off of requests)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


_STOP = _Marker("stop")  # each worker takes one and ends (unload puts one per worker)
_RETIRE = _Marker("retire")  # one worker ends (an elastic scale-down); the others go on
_WAKE = _Marker("wake")  # a device fault: a worker of the faulted device ends, the others ignore it


class _Replica:
    """One loaded copy of the model on one device, and the workers assigned to it."""

    __slots__ = ("index", "device", "health", "torch_device", "on_host", "model", "module", "call", "workers", "cells",
                 "down")

    def __init__(self, index: int, device: str) -> None:
        self.index = index
        self.device = device  # the device's name ("cpu", "cuda:N")
        self.health = health_name(device)  # its name in health readings ("cpu", "gpuN")
        self.torch_device = torch.device(memory.resolver.torch_device(device))  # what runs it
        self.on_host = self.torch_device.type == "cpu"
        self.model: LoadedModel | None = None
        self.module = None  # model.module, for the hot path
        self.call = None  # what the hot path calls: the module, or its forward where that is the same (_direct_call)
        self.workers = 0  # worker threads assigned to it now
        self.cells: list[list[int]] = []  # its workers' taken counters (ended workers' too)
        self.down = ""  # why it stopped (a device fault); "" while it serves


class _Turnstile:
    """Which batching worker may take from a shared queue: one at a time (_serve_batched).  A
    Condition over a flag rather than a bare Lock so that a device fault (stop_device) can wake the
    faulted copy's workers waiting for it (a Lock's waiters only wake when it is released)."""

    __slots__ = ("_cond", "_held")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False

    def acquire(self, timeout: float | None, rep: _Replica) -> bool:
        """True once the caller holds it; False after ``timeout`` seconds (None: no limit, 0: only if
        free now) or, while it is held by another, once ``rep``'s device has faulted."""
        with self._cond:
            if self._held and not self._cond.wait_for(lambda: not self._held or rep.down, timeout):
                return False
            if self._held:  # woken by a fault of its device
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify()

    def wake(self) -> None:
        """Every waiter looks again (a device fault)."""
        with self._cond:
            self._cond.notify_all()


to_array = wire.to_array
COALESCE = 32  # most finished requests held back while the worker has a backlog
INLINE_MIN_CALLS = 16  # calls measured (on the worker) before the loop may run a request inline
# programs without user Python (no hooks): their call time follows the input size, and they cannot
# block on anything else (a Python model file or a hook may: those always run on the worker)
INLINE_PLATFORMS = frozenset(("torch_export", "torchscript", "onnx"))


def _elements(inputs: dict) -> int:
    """A request's input elements (items for `bytes`): what a program's call time grows with."""
    n = 0
    for t in inputs.values():
        k = 1
        for d in t[1]:
            k *= d
        n += k
    return n


class _Requeue(BaseException):
    """An inline run ran out of memory: the request goes to the worker, which may make room (a
    BaseException, so that the model-error handling of _run_request lets it through)."""


def _release(model: LoadedModel) -> str:
    """Drop every reference the model holds to its weights, now.  A torch.export module is full of
    reference cycles (graph <-> nodes) that only a full garbage collection (about 0.2 s here, holding
    the GIL, so a stall of the event loop) would free; without this the weights and their mapping of
    the file would stay until some later collection.

    Never raises, whatever the module holds: a TorchScript module (torch.jit.script / trace, also
    as a submodule of a python model) keeps its parameters in the C++ module behind read-only
    wrappers (no ``clear``, no deletion); it is left whole and goes with the last reference to it
    (no Python cycles inside).  Returns what could not be dropped ("" when everything was), for the
    caller to log; the instance ends UNLOADED either way."""
    problems: list[str] = []
    module = model.module
    if module is not None:
        try:
            subs = list(module.modules())
        except Exception as exc:  # noqa: BLE001 - a module class may override modules()
            subs = [module]
            problems.append(f"listing the submodules: {type(exc).__name__}: {exc}")
        for sub in subs:
            if isinstance(sub, torch.jit.ScriptModule):
                continue
            for table in ("_parameters", "_buffers", "_modules"):
                try:
                    getattr(sub, table).clear()
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{type(sub).__name__}.{table}: {type(exc).__name__}: {exc}")
            try:
                for key, value in list(vars(sub).items()):
                    if isinstance(value, torch.Tensor):  # lifted constants live as plain attributes
                        del sub.__dict__[key]
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{type(sub).__name__} attributes: {type(exc).__name__}: {exc}")
        model.module = None
    try:
        model.weights.clear()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"weights: {type(exc).__name__}: {exc}")
    return "; ".join(problems)


class ModelInstance:
    """One loaded version of a model served by one worker thread (see the module docstring).

    Construct on the event loop thread; `start()` returns a future that resolves when the version is
    READY (or fails with ModelError, state FAILED).  `submit(request)` queues a request (READY only);
    the worker runs it, calls `finish(request)` in the worker thread (the server encodes the reply
    there) and posts the request to `completions`.  `unload()` returns a future that resolves when
    the queued requests have run and the worker thread has ended (state UNLOADED).
    """

    def __init__(self, name: str, version: int, path: str | os.PathLike, *, loop, completions: Completions,
                 finish: Callable[[Request], None] | None = None,
                 respond: Callable[[list], list] | None = None, torch_threads: int | None = None,
                 verify: str = "compressed", warmup: bool = True, device: str = "cpu",
                 weights: dict | None = None, workers: int = 1, devices: list | tuple | None = None) -> None:
        self.name = name
        self.version = version
        self.path = Path(path)
        self.state = LOADING
        self.reason = ""
        self.model: LoadedModel | None = None
        self.config: ModelConfig | None = None
        self.nbytes = 0
        self.load_s = 0.0
        self._loop = loop
        self._completions = completions
        self._finish = finish
        self._respond = respond
        self.metrics = None  # the server's metrics.ModelStats of this version (the worker records into it)
        # dynamic batching (config.batching, models without preprocess/postprocess hooks): the loop
        # counts requests submitted, the worker those it took out of the batcher; their difference is
        # the queue depth that max_queue_size bounds (each counter has one writer)
        self.batching = None
        self.batcher: Batcher | None = None
        self.max_queue: int | None = None
        self.submitted = 0
        self._taken_cells: list[list[int]] = []  # one counter per worker thread (each writes its own)
        self.max_batch_override: int | None = None
        self.decoded_bytes = 0  # weights decoded into anonymous memory (the rest are mapped from the file)
        self.workspace_bytes = 0  # anonymous memory the warm-up run left behind (RssAnon delta, >= 0)
        self.last_used = 0.0  # monotonic time of the last request (the loop writes it)
        self.placement_key: str | None = None  # the server's memory placement entry (None: no placement)
        self.evicted = False  # unloaded to make room for another model
        self.release_problem = ""  # what the release after unload could not drop (logged; still UNLOADED)
        self.on_oom: Callable | None = None  # server hook (worker thread): free memory, True if it did
        self.recording = True  # worker-side statistics (queue, batch sizes); the server may turn them off
        self.key = (name, version)
        self.loop_rec = None  # the server's recorder for this version on the loop thread
        self.queue_delay_override_us: int | None = None
        self._preloaded = weights  # tensors decoded already (a remote repository's streamed load)
        # one loaded copy of the model per device ("cpu", "cuda:N"; memory.resolver says which torch
        # device runs each); workers are assigned to the copies round-robin
        names = [str(d) for d in (devices if devices else [device])]
        if len(set(names)) != len(names):
            raise errors.ConfigError(f"model {name!r}: devices {names} repeat a device")
        self.devices = names
        self._replicas = [_Replica(i, d) for i, d in enumerate(names)]
        self._multi = len(names) > 1  # only then do workers check for a device fault
        first = self._replicas[0]
        self.torch_device = first.torch_device  # the first copy's (single-device callers)
        self._on_host = first.on_host
        # the first serving device's name in health reports (tinyserve.health.devices: "cpu", "gpu0", ...)
        self.device = first.health
        # worker threads sharing the queue (placement.min_instances, or the server's default, and at
        # least one per device; elastic models add and remove them): the first loads, the others start
        # once it is ready; the last to end releases the model
        self._want_workers = max(len(names), int(workers), 1)
        # set (for good) before a second worker starts: the queue then has several consumers, and the
        # workers of a batching model take from it one at a time (the turnstile, _serve_batched)
        self._shared_queue = self._want_workers > 1
        self._turnstile = _Turnstile()  # held by the one batching worker that may take from the queue
        # set once every batching worker takes through the turnstile: at once with several workers from
        # the start; for an instance that started with one (elastic), by that worker at its next turn
        # after add_worker, or when it ends.  A worker that add_worker starts waits for it.
        self._sharing = threading.Event()
        if self._shared_queue:
            self._sharing.set()
        self._workers = 0
        self._workers_lock = threading.Lock()  # guards _workers, _retiring and _stopping
        self._retiring = 0  # workers that took a retire marker and have not ended yet (_may_retire)
        self._stopping = False
        self._tls = threading.local()  # each worker's statistics recorder
        self._threads = torch_threads
        self._verify = verify
        self._warmup = warmup
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(target=self._main, name=f"tinyserve-{name}-{version}", daemon=True)
        self._started = False
        # filled at load: what the hot path needs, precomputed
        self._in_specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._in_names: tuple[str, ...] = ()
        self._out_names: tuple[str, ...] = ()
        self._pre = self._post = None
        self.output_names: frozenset[str] = frozenset()
        self.checks_inputs = True
        # the infer replies of this version (wire.ReplyEncoder: the same bytes as tensor_parts +
        # encode_frame, the header's constant part packed once); the TCP front end's _finish may use it
        self.reply_encoder = wire.ReplyEncoder(name, version)
        # inline runs (module docstring): the server's threshold, and the measured call time (an
        # exponential average over the last ~8 calls, ns) and how many calls it has seen
        self.inline_max_ns = 0
        self.call_ns = 0
        self.calls = 0
        self.fast_elements = -1  # the largest request (input elements) seen to run within inline_max_ns
        self.inline_runs = 0  # requests the loop ran itself (the loop writes it)
        self._inline_kind = False  # set at load: inline runs on, and a version that may run inline

    def __repr__(self) -> str:
        return f"<ModelInstance {self.name}:{self.version} {self.state}>"

    # --- loop side ----------------------------------------------------------------------------------
    def start(self) -> asyncio.Future:
        if not self._started:
            self._started = True
            self._thread.start()
        return self._ready

    def check_ready(self) -> None:
        """Raise UNAVAILABLE unless the instance takes requests."""
        if self.state is not READY:
            raise wire.Unavailable(f"model {self.name!r} version {self.version} is {self.state}"
                                   + (f" ({self.reason})" if self.reason else ""))

    def submit(self, req: Request) -> None:
        """Queue one request (READY only)."""
        self.check_ready()
        req.instance = self
        self._q.put([req])

    def submit_many(self, reqs: list[Request]) -> None:
        """Queue requests as one hand-off (one wakeup of the worker for all of them)."""
        self.check_ready()
        for req in reqs:
            req.instance = self
        n = self._workers
        if n > 1 and len(reqs) > 1:  # spread over the workers (one list goes to one worker)
            step = -(-len(reqs) // n)
            for i in range(0, len(reqs), step):
                self._q.put(reqs[i:i + step])
        else:
            self._q.put(reqs)

    def unload(self) -> asyncio.Future:
        """Stop taking requests, run what is queued, end the worker thread."""
        if self.state in (UNLOADING, UNLOADED, FAILED):
            return self._stopped  # a FAILED instance's thread ends by itself
        if not self._started:
            self._set_stopped()
            return self._stopped
        self.state = UNLOADING
        with self._workers_lock:
            self._stopping = True
            n = self._workers
        for _ in range(max(1, n)):
            self._q.put(_STOP)
        return self._stopped

    @property
    def taken(self) -> int:
        """Requests the workers took off the queue (started, or answered as expired or invalid)."""
        return sum(c[0] for c in list(self._taken_cells))

    @property
    def finished(self) -> int:
        """Requests the workers are done with (ran, or answered as expired or invalid): submitted -
        finished is the work in flight that memory placement never evicts."""
        return sum(c[1] for c in list(self._taken_cells))

    @property
    def workers(self) -> int:
        """Worker threads serving this version now."""
        return self._workers

    def add_worker(self) -> bool:
        """One more worker thread (elastic scale-up; READY only), on the serving device with the
        fewest workers (ties: the first listed): a copy already loaded, never a new one."""
        with self._workers_lock:
            live = [r for r in self._replicas if not r.down]
            if self.state is not READY or self._stopping or not live:
                return False
            rep = min(live, key=lambda r: (r.workers, r.index))
            self._workers += 1
            rep.workers += 1
            self._shared_queue = True
        self._spawn(rep)
        return True

    def remove_worker(self) -> bool:
        """One worker fewer, after the requests queued ahead (elastic scale-down; never the last)."""
        with self._workers_lock:
            if self._stopping or self._serving_workers() - self._retiring <= 1:
                return False
        self._q.put(_RETIRE)
        return True

    def _serving_workers(self) -> int:
        """Workers of copies not stopped by a device fault (call with _workers_lock held)."""
        return sum(r.workers for r in self._replicas if not r.down)

    def _may_retire(self, rep: _Replica) -> bool:
        """A worker that took a retire marker ends only if another serving worker remains (a device
        fault since the scale-down was decided may have left it the last).  A yes is reserved at
        once (``_retiring``, released in _worker_done), so two workers taking retire markers at the
        same moment cannot both end when only one may."""
        with self._workers_lock:
            if self._serving_workers() - self._retiring - (0 if rep.down else 1) > 0:
                self._retiring += 1
                self._tls.retiring = True
                return True
            return False

    def _spawn(self, rep: _Replica) -> None:
        threading.Thread(target=self._worker_main, args=(rep,), name=f"tinyserve-{self.name}-{self.version}+",
                         daemon=True).start()

    def stop_device(self, device: str, reason: str) -> bool:
        """A health fault on ``device`` (its "cuda:N" name or its health name "gpuN"): that copy's
        workers stop taking requests and end (what one of them took runs on a serving copy, never
        back on the queue; a batching worker finishes the requests already in its batcher on a
        serving copy), and the last of them releases the copy.  The other copies keep serving.  False (and
        nothing changes) when no serving copy is on ``device``, or it is the last serving one: the
        caller then fails the whole version."""
        with self._workers_lock:
            rep = next((r for r in self._replicas if not r.down and device in (r.device, r.health)), None)
            # another copy must be serving AND have workers (an elastic scale-down may have left a
            # copy with none): else nobody would take the queue and the caller fails the version
            if rep is None or not any(not r.down and r.workers > 0 for r in self._replicas if r is not rep):
                return False
            rep.down = str(reason) or "device fault"
            n = rep.workers
            self.device = next(r.health for r in self._replicas if not r.down)
        for _ in range(n):  # wake its idle workers (another worker taking one ignores it)
            self._q.put(_WAKE)
        self._turnstile.wake()  # and its batching workers waiting for the turnstile
        return True

    def device_stats(self) -> list[dict]:
        """Per device: requests its workers took (ran, or answered as expired / invalid), workers
        now, and ``serving`` or the fault that stopped it."""
        return [{"device": r.device, "requests": sum(c[0] for c in list(r.cells)), "workers": r.workers,
                 "state": "FAULTED" if r.down else "SERVING", **({"reason": r.down} if r.down else {})}
                for r in self._replicas]

    def _live(self) -> _Replica | None:
        return next((r for r in self._replicas if not r.down and r.module is not None), None)

    @property
    def stopped(self) -> asyncio.Future:
        """Resolves when the worker thread has ended (after unload, or after a failed load)."""
        return self._stopped

    def check_inputs(self, tensors: Mapping[str, tuple]) -> None:
        """Request tensors (wire.split_tensors' result) against the config's inputs: INVALID_INPUT
        naming the tensor.  Skipped for models with a `preprocess` hook (it validates)."""
        if not self.checks_inputs:
            return
        specs = self._in_specs
        for name, (dtype, shape, _) in tensors.items():
            spec = specs.get(name)
            if spec is None:
                raise wire.InvalidInput(f"input {wire.shown(name)} is not an input of model {self.name!r} "
                                        f"(inputs: {', '.join(self._in_names)})")
            want_dtype, want_shape = spec
            if dtype != want_dtype:
                raise wire.InvalidInput(f"input {name!r} of model {self.name!r}: dtype is {dtype}, "
                                        f"the model takes {want_dtype}")
            if len(shape) != len(want_shape):
                self._bad_shape(name, shape, want_shape)
            for d, w in zip(shape, want_shape):
                if w != d and w != -1:
                    self._bad_shape(name, shape, want_shape)
        if len(tensors) != len(specs):
            missing = [n for n in self._in_names if n not in tensors]
            raise wire.InvalidInput(f"input {missing[0]!r} of model {self.name!r} is missing "
                                    f"(inputs: {', '.join(self._in_names)})")

    def _bad_shape(self, name: str, shape: tuple, want: tuple) -> None:
        raise wire.InvalidInput(f"input {name!r} of model {self.name!r}: shape is {list(shape)}, "
                                f"the model takes {list(want)} (-1: any size)")

    def _call_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            pass

    def _set_ready(self, exc: BaseException | None) -> None:
        if self.state == UNLOADING:  # unload() came first: whatever the load did, it is going away
            if not self._ready.done():
                self._ready.set_exception(wire.Unavailable(
                    f"model {self.name!r} version {self.version} was unloaded while it was loading"
                    + (f" (the load failed too: {exc})" if exc is not None else "")))
                self._ready.exception()
            return
        if exc is None:
            if self.state == LOADING:
                self.state = READY
            if not self._ready.done():
                self._ready.set_result(self)
        else:
            self.state = FAILED
            self.reason = str(exc)
            if not self._ready.done():
                self._ready.set_exception(exc)
                self._ready.exception()  # retrieved: callers that never await it are not warned

    def _set_stopped(self) -> None:
        if self.state != FAILED:
            self.state = UNLOADED
        if not self._ready.done():
            self._ready.set_exception(wire.Unavailable(f"model {self.name!r} version {self.version} was unloaded"))
            self._ready.exception()
        if not self._stopped.done():
            self._stopped.set_result(None)

    # --- worker thread ------------------------------------------------------------------------------
    def _main(self) -> None:
        rep = None  # the copy this (first) worker serves; None while it loads
        try:
            if self._threads:
                torch.set_num_threads(self._threads)
            with torch.inference_mode():
                try:
                    t0 = time.perf_counter()
                    self._load()
                    if self._warmup and self.model.module is not None and self.config.warmup is not False:
                        for r in self._replicas:
                            self._run_warmup(r)
                    self.load_s = time.perf_counter() - t0
                except BaseException as exc:  # noqa: BLE001 - every failure becomes the reason
                    if isinstance(exc, errors.ModelError):
                        err = exc
                    else:
                        err = errors.ModelError(f"model {self.name!r} version {self.version}: loading failed: "
                                                f"{type(exc).__name__}: {exc}")
                    self._call_loop(self._set_ready, err)
                    return
                reps = self._replicas
                with self._workers_lock:  # counted before READY: an unload then stops every one
                    self._workers = n = self._want_workers
                    assigned = [reps[k % len(reps)] for k in range(n)]  # round-robin over the devices
                    for r in assigned:
                        r.workers += 1
                for r in assigned[1:]:
                    self._spawn(r)
                self._call_loop(self._set_ready, None)
                rep = assigned[0]
                self._serve(rep)
        finally:
            self._worker_done(rep)

    def _worker_main(self, rep: _Replica) -> None:
        try:
            if self._threads:
                torch.set_num_threads(self._threads)
            with torch.inference_mode():
                self._serve(rep)
        finally:
            self._worker_done(rep)

    def _worker_done(self, rep: _Replica | None) -> None:
        """A worker ends; the last one releases every copy of the model and reports the instance
        stopped; the last worker of a faulted device releases that device's copy."""
        with self._workers_lock:
            if getattr(self._tls, "retiring", False):
                self._retiring -= 1
                self._tls.retiring = False
            self._workers = max(0, self._workers - 1)
            last = self._workers == 0
            if rep is not None:
                rep.workers = max(0, rep.workers - 1)
            drop = rep is not None and not last and rep.down and rep.workers == 0 and rep.model is not None
            if drop:
                model, rep.model, rep.module, rep.call = rep.model, None, None, None
                if self.model is model:
                    self.model = next((r.model for r in self._replicas if r.model is not None), None)
        if drop:
            self._release(model, rep.device)
            del model
        if not last:
            return
        try:
            models = [r.model for r in self._replicas if r.model is not None]
            self.model = None
            for r in self._replicas:
                r.model = r.module = r.call = None
            self._pre = self._post = None
            for model in models:
                self._release(model)
            del models
        finally:  # whatever the release met, the instance ends (UNLOADED, or FAILED after a failed load)
            self._call_loop(self._set_stopped)

    def _release(self, model: LoadedModel, device: str | None = None) -> None:
        """_release(model), logging what it could not drop (never raises: an unload always ends)."""
        try:
            problem = _release(model)
        except BaseException as exc:  # noqa: BLE001 - _release catches its own; this is the last guard
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            where = f" on {device}" if device else ""
            log.warning("tinyserve: releasing model %r version %s%s left references behind (freed when "
                        "collected): %s", self.name, self.version, where, problem)
            self.release_problem = problem

    def _load(self) -> None:
        # the server checks every request against the config: skip torch.export's own per-call check
        weights, self._preloaded = self._preloaded, None
        models = []
        for r in self._replicas:  # one copy per device, one after the other
            w = weights
            if weights is not None and r.index > 0:  # the others get their own copy of the tensors
                w = {k: v.to(r.torch_device, copy=True) for k, v in weights.items()}
            m = load_version(self.path, verify=self._verify, check_inputs=False, device=r.torch_device, weights=w)
            r.model, r.module = m, m.module
            r.call = _direct_call(m.module)
            models.append(m)
        model = models[0]
        cfg = model.config
        if cfg.name != self.name:
            raise errors.ModelError(f"model {self.name!r} version {self.version}: its config names {cfg.name!r}")
        hooks = model.hooks
        pre = getattr(hooks, "preprocess", None) if hooks is not None else None
        post = getattr(hooks, "postprocess", None) if hooks is not None else None
        self._pre = pre if callable(pre) else None
        self._post = post if callable(post) else None
        self._in_specs = {s.name: (s.dtype, tuple(s.shape)) for s in cfg.inputs}
        self._in_names = tuple(s.name for s in cfg.inputs)
        self._out_names = tuple(s.name for s in cfg.outputs)
        # what a request may ask for: the declared reply tensors of a postprocess hook, else the module's
        self.output_names = frozenset(s.name for s in cfg.request_outputs) if cfg.request_outputs and self._post \
            else frozenset(self._out_names)
        self.checks_inputs = self._pre is None
        if cfg.batching is not None:  # with hooks: preprocess -> one batched module call -> postprocess
            self.batching = cfg.batching
            self.max_queue = cfg.batching.max_queue_size
        self.nbytes = sum(m.nbytes for m in models)  # every copy
        self.decoded_bytes = model.weights_stats.decoded_bytes  # one copy (placement counts it per device)
        self.config = cfg
        self.model = model
        # what inline runs need that cannot change once loaded (inline_ok checks the rest per request)
        self._inline_kind = bool(self.inline_max_ns and cfg.platform in INLINE_PLATFORMS and self._pre is None
                                 and self._post is None and self.batching is None and self._on_host
                                 and not self._multi)

    def _warmup_args(self, device) -> tuple[list, str]:
        """The warm-up run's inputs (the config's `warmup`, docs/repository.md section 3.6) and how
        to name them in an error."""
        cfg = self.config
        if cfg.warmup is None:
            return [torch.zeros([1 if d == -1 else d for d in s.shape], dtype=DTYPE_TO_TORCH[s.dtype], device=device)
                    for s in cfg.inputs], "on zeros (batch 1)"
        given = {w.name: w for w in cfg.warmup}
        args = []
        for spec in cfg.inputs:
            w = given[spec.name]  # the config lists every input exactly once
            dtype = DTYPE_TO_TORCH[spec.dtype]
            if w.file is not None:
                t = self._warmup_file(w.file, spec)
            elif w.values is not None:
                t = torch.tensor(w.values, dtype=torch.float64 if dtype.is_floating_point else torch.int64)
                t = t.to(dtype).reshape(w.shape)
            else:
                t = torch.full(w.shape, w.value if w.value is not None else 0, dtype=dtype)
            args.append(t.to(device))
        return args, "on the config's warmup inputs"

    def _warmup_file(self, name: str, spec) -> torch.Tensor:
        """A warm-up input from a .npy file of the version directory: its dtype must be the input's
        (a float32 array for bfloat16 / float8 inputs, which numpy lacks), its shape must fit."""
        path = self.path / name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise errors.ModelError(f"model {self.name!r} version {self.version}: warmup file {name!r}: {exc}") from None
        want = spec.dtype
        got = str(arr.dtype)
        cast = want in ("bfloat16", "float8_e4m3fn", "float8_e5m2") and got == "float32"
        if got != want and not cast:
            raise errors.ModelError(f"model {self.name!r} version {self.version}: warmup file {name!r} holds {got}, "
                                    f"input {spec.name!r} takes {want}")
        if arr.ndim != len(spec.shape) or any(w not in (-1, d) for d, w in zip(arr.shape, spec.shape)):
            raise errors.ModelError(f"model {self.name!r} version {self.version}: warmup file {name!r} has shape "
                                    f"{list(arr.shape)}, input {spec.name!r} takes {list(spec.shape)} (-1: any size)")
        if arr.size > MAX_WARMUP_ELEMENTS:
            raise errors.ModelError(f"model {self.name!r} version {self.version}: warmup file {name!r} has {arr.size} "
                                    f"elements, limit {MAX_WARMUP_ELEMENTS}")
        t = torch.from_numpy(np.array(arr))  # a copy: the mapping closes with arr
        return t.to(DTYPE_TO_TORCH[want]) if cast else t

    def _run_warmup(self, rep: _Replica) -> None:
        args, what = self._warmup_args(rep.torch_device)
        # the workspace the run needs: on the host the growth of RssAnon, on a GPU the peak of the
        # caching allocator above what the copy held before
        probe = rss_anon if rep.on_host else (lambda: torch.cuda.max_memory_allocated(rep.torch_device))
        try:
            # the first run of a model may import modules (torch.compile, lazy imports): alone, as
            # every import-sensitive step of a load (program.import_guard); one warm-up at a time
            # also keeps another's workspace out of this one's RssAnon delta
            with import_guard(f"warming up {self.name}:{self.version}"):
                if not rep.on_host:
                    torch.cuda.reset_peak_memory_stats(rep.torch_device)
                    base = torch.cuda.memory_allocated(rep.torch_device)
                before = rss_anon() if rep.on_host else base
                self._outputs_of(rep.module(*args))
                after = probe()
            if before is not None and after is not None:  # one footprint for every copy: the largest
                self.workspace_bytes = max(self.workspace_bytes if rep.index else 0, after - before)
        except Exception as exc:
            where = f" on {rep.device}" if self._multi else ""
            raise errors.ModelError(f"model {self.name!r} version {self.version}: warm-up run {what}{where} "
                                    f"failed: {type(exc).__name__}: {exc} (the model config's warmup gives other "
                                    "inputs, or false to turn the warm-up off)") from exc

    def _serve(self, rep: _Replica) -> None:
        """The worker loop.  Finished requests go back to the loop at once when the worker has
        nothing else to do; while a backlog is queued they go in groups of up to COALESCE (each
        wakeup of the loop thread preempts the worker, so fewer wakeups mean more throughput, and
        with a backlog the wait is dominated by the queue anyway)."""
        q = self._q
        get = q.get
        run = self.run
        finish = self._finish
        post_many = self._completions.post_many
        respond = self._respond
        ready: list[Request] = []
        limit = COALESCE
        rec = self._tls.rec = self.metrics.recorder() if self.metrics is not None and self.recording else None
        cell = self._tls.cell = [0, 0]  # [taken off the queue, finished with the model]
        with self._workers_lock:
            self._taken_cells.append(cell)
            rep.cells.append(cell)

        def flush() -> None:
            left = respond(ready, rec) if respond is not None else ready
            if left:
                post_many(left)
            ready.clear()

        finish_one = self._finish_one

        def done(req: Request) -> None:
            if finish is not None:
                finish_one(req)
            ready.append(req)
            if len(ready) >= limit:
                flush()

        if self.batching is not None:
            self._serve_batched(done, flush, rec, rep)
            return
        multi = self._multi
        while True:
            batch = get()
            if type(batch) is _Marker:
                if (batch is _WAKE and not rep.down) or (batch is _RETIRE and not self._may_retire(rep)):
                    continue
                return
            target = rep
            if multi and rep.down:  # its device faulted: what it took runs on a serving copy, then it ends
                # (never put back on the queue: it could land behind an unload's stop markers)
                target = self._live()
                if target is None:  # no serving copy: the server fails the version
                    q.put(batch)
                    return
                cell = self._tls.cell = [0, 0]  # counted for the copy that runs them
                with self._workers_lock:
                    self._taken_cells.append(cell)
                    target.cells.append(cell)
            else:
                n = self._workers
                if n > 1 and len(batch) > 1:  # leave the others their share (one list would pin it all here)
                    keep = -(-len(batch) // n)
                    with self._workers_lock:  # not once unload() has queued its stop markers
                        if not self._stopping:
                            q.put(batch[keep:])
                            batch = batch[:keep]
            if rec is not None:
                rec.dequeued(len(batch))
            run(batch, done, target)
            if ready:
                flush()
            if target is not rep:
                return

    def _serve_batched(self, done, flush, rec, rep: _Replica) -> None:
        """The worker loop of a batching model: requests go into a Batcher (docs/scheduler.md), which
        says when a batch is due; each batch is one model call, its outputs split back per request.
        After unload() the requests already queued still run (their delay is not cut short).

        One worker (the queue's only consumer) waits for more requests with SimpleQueue.get(timeout=
        the batch's remaining delay).  Several workers (a shared queue) take from it one at a time,
        through the turnstile, because CPython 3.11's timed SimpleQueue.get is wrong with several
        consumers (Modules/_queuemodule.c): a waiter woken by a put whose item another consumer took
        first recomputes its timeout from its deadline; once that is past the value is negative,
        which PyThread_acquire_lock_timed reads as "wait forever" (until the next put), so a partial
        batch could be held indefinitely.  The worker holding the turnstile (_Turnstile) is the only
        thread inside get / get_nowait, so its timed get is the correct single-consumer one.  A
        worker acquires the turnstile before it takes: with an empty batcher without a limit, with a
        partial batch for at most its remaining delay (a Condition's timed wait, correct with any
        number of waiters), then waits in get for what is left; a device fault wakes the faulted
        copy's waiters.  It keeps the turnstile while it collects, so arrivals join the batch being
        formed, and lets go before it runs a batch (the next worker takes what arrives meanwhile),
        when it stops taking (a marker, a fault) and when it ends (that hand-over wakes a waiting
        worker: one thread wake per batch).  Nothing polls, no thread or queue is added, and the
        loop's side (put) stays SimpleQueue's.  Not chosen: one batch-former thread feeding runner
        threads (one more hand-off per batch, and it must know when a runner is free for batches to
        keep growing while every runner is busy); queue.Queue for instances that may have several
        workers (a Python-level Condition in every put on the loop, and elastic instances start with
        one worker: the queue type would have to be known at construction).  An instance that starts with one worker and gains one (add_worker) switches
        over safely: the new worker takes nothing until the first one has set _sharing, at its next
        turn of this loop (before it takes anything more) or when it ends."""
        b = self.batcher = Batcher(self.batching, self._in_names, max_batch_size=self.max_batch_override,
                                   max_queue_delay_us=self.queue_delay_override_us)
        pre = self._pre
        q = self._q
        cell = self._tls.cell
        monotonic = time.monotonic
        multi = self._multi
        turnstile = self._turnstile
        if threading.current_thread() is self._thread:  # the first worker: alone until a second one starts
            shared = self._shared_queue
            if shared:
                self._sharing.set()
        else:  # started at load (set already) or by add_worker: wait until the first uses the turnstile
            self._sharing.wait()
            shared = True
        # stopping: a stop or retire marker, or a fault of its device: take nothing more from the
        # queue (the markers behind are the other workers'), run what the batcher holds, end
        stopping = faulted = held = False  # held: this worker holds the turnstile
        wait = None
        try:
            while True:
                if not shared and self._shared_queue:  # add_worker: from now on through the turnstile
                    shared = True
                    self._sharing.set()
                if stopping:
                    items = None
                    if wait:
                        time.sleep(wait)
                elif shared:
                    if not held:
                        if wait is None or wait <= 0:
                            held = turnstile.acquire(None if wait is None else 0, rep)
                        else:
                            t = monotonic()
                            held = turnstile.acquire(wait, rep)
                            wait -= monotonic() - t
                        if not held and multi and rep.down:  # its device faulted while it waited
                            stopping = faulted = True
                    items = None
                    if held:
                        try:
                            items = q.get(timeout=wait) if wait is None or wait > 0 else q.get_nowait()
                        except queue.Empty:
                            pass
                else:
                    try:
                        items = q.get(timeout=wait) if wait is None or wait > 0 else q.get_nowait()
                    except queue.Empty:
                        items = None
                while items is not None:
                    if type(items) is _Marker:
                        if items is _STOP or (items is _RETIRE and self._may_retire(rep)):
                            stopping = True
                        elif items is _WAKE and rep.down:
                            stopping = faulted = True
                    else:
                        if multi and rep.down:  # its device faulted: these run on a serving copy (below)
                            stopping = faulted = True  # (never put back: they could land behind stop markers)
                        now = monotonic()
                        if rec is not None:
                            rec.dequeued(len(items))
                        for r in items:
                            try:
                                if pre is not None:
                                    self._preprocess_for_batch(r)
                                b.add(r, now)
                            except errors.TinyserveError as exc:  # InvalidInput / BadRequest for that request
                                r.error = exc
                                cell[0] += 1
                                cell[1] += 1
                                done(r)
                    if stopping:
                        break
                    try:
                        items = q.get_nowait()
                    except queue.Empty:
                        items = None
                if stopping and held:  # it takes nothing more: the others may
                    held = False
                    turnstile.release()
                if faulted and rep.down:  # what the batcher holds runs on a serving copy
                    live = self._live()
                    if live is not None:
                        rep = live
                        cell = [0, 0]  # what runs from now on counts for the serving copy
                        with self._workers_lock:
                            self._taken_cells.append(cell)
                            rep.cells.append(cell)
                while True:
                    batch, expired, wait = b.next(monotonic())
                    for r in expired:
                        r.error = wire.DeadlineExceeded(f"request to model {self.name!r} could not start before "
                                                        "its deadline (timeout_ms)")
                        cell[0] += 1
                        cell[1] += 1
                        done(r)
                    if batch is None:
                        break
                    if held:  # another worker takes (and batches) what arrives while this one runs
                        held = False
                        turnstile.release()
                    cell[0] += len(batch.requests)
                    self._run_batch(batch, b, done, rec, rep)
                    cell[1] += len(batch.requests)
                    flush()
                flush()
                if stopping and not len(b):
                    return
        finally:
            if held:
                turnstile.release()
            self._sharing.set()  # a worker add_worker started while this one was alone may take now

    def _run_batch(self, batch, b: Batcher, done, rec, rep: _Replica) -> None:
        reqs = batch.requests
        t_run = time.perf_counter_ns()
        err = None
        try:
            module = rep.call
            if module is None:
                raise errors.ModelError(f"model {self.name!r} holds weights only; it has no program to run")
            buckets = self.batching.buckets
            args = assemble(batch, self._in_names, buckets)
            if not rep.on_host:
                args = [a.to(rep.torch_device, non_blocking=True) for a in args]
            try:
                outs = self._outputs_of(module(*args))
            except Exception as exc:
                if not (_is_oom(exc) and self._make_room()):
                    raise
                outs = self._outputs_of(module(*args))  # once more, after the server freed memory
            if not rep.on_host:
                outs = _to_host(outs)
            results = split(outs, batch, self._out_names, buckets)
        except (errors.ModelError, wire.InvalidInput) as exc:
            err = exc
        except Exception as exc:
            log.debug("model %s raised", self, exc_info=True)
            err = errors.ModelError(f"model {self.name!r} version {self.version} raised "
                                    f"{type(exc).__name__}: {exc}")
        t_done = time.perf_counter_ns()
        b.observe(batch.rows, (t_done - t_run) / 1e9)
        if rec is not None and err is None:
            rec.batch(len(reqs))
        post = self._post
        for i, r in enumerate(reqs):
            r.t_run, r.t_done = t_run, t_done
            if err is not None:
                r.error = err
            elif post is not None:  # per request, on its slice of the batch's outputs
                try:
                    r.result = self._select(r, self._postprocess(results[i]))
                except (errors.ModelError, wire.InvalidInput) as exc:
                    r.error = exc
                except Exception as exc:  # noqa: BLE001 - that request's error, the others go on
                    r.error = errors.ModelError(f"model {self.name!r} version {self.version}: postprocess raised "
                                                f"{type(exc).__name__}: {exc}")
            else:
                out = results[i]
                want = r.outputs
                if want is not None:
                    out = {n: out[n] for n in want}  # names were checked against the config
                r.result = out
            done(r)

    def _preprocess_for_batch(self, r: Request) -> None:
        """A batching model with a preprocess hook: run it on one request (in the worker, before the
        batcher sees the request) and put the module inputs it returns in place of the request's
        tensors, in the batcher's (dtype, shape, bytes) form; the batch then runs the module once.
        Raises InvalidInput / ModelError for that request only."""
        try:
            tensors = self._pre({name: to_array(*t, torch=True) for name, t in r.inputs.items()})
        except (errors.ModelError, wire.InvalidInput):
            raise
        except Exception as exc:  # noqa: BLE001
            raise errors.ModelError(f"model {self.name!r} version {self.version}: preprocess raised "
                                    f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(tensors, Mapping):
            raise errors.ModelError(f"model {self.name!r}: preprocess returned a {type(tensors).__name__}, not a dict")
        inputs = {}
        for name in self._in_names:
            if name not in tensors:
                raise errors.ModelError(f"model {self.name!r}: preprocess returned no input {name!r}")
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(np.asarray(t))
            dtype = TORCH_DTYPES.get(t.dtype)
            spec_dtype = self._in_specs[name][0]
            if dtype != spec_dtype:
                raise errors.ModelError(f"model {self.name!r}: preprocess returned input {name!r} as {t.dtype}, "
                                        f"the config's inputs say {spec_dtype}")
            t = t.detach().cpu().contiguous()
            flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            inputs[name] = (dtype, tuple(t.shape), memoryview(flat.numpy()))
        r.inputs = inputs

    def _postprocess(self, outputs: dict) -> Mapping:
        out = self._post(outputs)
        if not isinstance(out, Mapping):
            raise errors.ModelError(f"model {self.name!r}: postprocess returned a {type(out).__name__}, not a dict")
        return out

    def _select(self, r: Request, outputs: Mapping) -> dict:
        want = r.outputs
        if want is None:
            return dict(outputs)
        try:
            return {n: outputs[n] for n in want}
        except KeyError as exc:
            raise errors.ModelError(f"model {self.name!r} produced no output {exc.args[0]!r}") from None

    def run(self, requests: list[Request], done: Callable[[Request], None] | None = None,
            rep: _Replica | None = None) -> None:
        """Run a batch of requests (in the worker thread), setting each one's `result` or `error`;
        `done(request)` is called as each finishes.  Each request runs alone (batching models use
        `_serve_batched`).  ``rep``: the copy that runs them (default: the first)."""
        if rep is None:
            rep = self._replicas[0]
        rec = getattr(self._tls, "rec", None)
        cell = self._thread_cell(None)  # (set by the worker; run() called outside the workers: tests, tools)
        timed = self._run_timed
        for req in requests:
            timed(req, rep, cell, rec)
            if done is not None:
                done(req)

    def _thread_cell(self, rep: _Replica | None) -> list[int]:
        """This thread's [taken, finished] counters for the instance (created and registered on first
        use; with ``rep``, counted for that copy's device too)."""
        cell = getattr(self._tls, "cell", None)
        if cell is None:
            cell = self._tls.cell = [0, 0]
            with self._workers_lock:
                self._taken_cells.append(cell)
                if rep is not None:
                    rep.cells.append(cell)
        return cell

    def _run_timed(self, req: Request, rep: _Replica, cell: list[int], rec, inline: bool = False) -> None:
        """Run one request alone, counted and timed: `cell` (taken, finished), its call time (inline
        runs' measurements), the recorder's batch sizes.  Raises _Requeue (inline only) with the request
        counted as not taken."""
        cell[0] += 1  # started: no longer queued (the depth QUEUE_FULL and elastic scaling read)
        req.t_run = t = time.perf_counter_ns()
        try:
            self._run_request(req, time.monotonic(), rep, inline)
        except _Requeue:
            cell[0] -= 1
            req.t_run = 0
            raise
        req.t_done = t_done = time.perf_counter_ns()
        cell[1] += 1  # finished with the model (memory placement: no longer work in flight)
        if self._inline_kind:
            self._measured(req, t_done - t)
        if rec is not None and req.result is not None:
            sizes = rec.batches  # rec.batch(1), inlined: this is the per-request path
            sizes[1] = sizes.get(1, 0) + 1

    def _measured(self, req: Request, ns: int) -> None:
        """One call's time (any thread; an estimate, so unlocked): the average, and the largest
        request seen to run fast enough."""
        self.call_ns += (ns - self.call_ns) >> 3
        self.calls += 1
        if req.result is not None and ns <= self.inline_max_ns:
            n = _elements(req.inputs)
            if n > self.fast_elements:
                self.fast_elements = n

    def inline_ok(self, req: Request, new: int = 1) -> bool:
        """On the loop: may the loop run `req` itself (module docstring, inline runs)?  ``new``: the
        requests submitted but neither run nor handed over yet, `req` included (counted in
        ``submitted``)."""
        return (self._inline_kind and self.state is READY and self._workers == 1 and not self._shared_queue
                and self.calls >= INLINE_MIN_CALLS and self.call_ns <= self.inline_max_ns
                and self.submitted - new == self.finished and _elements(req.inputs) <= self.fast_elements)

    def run_inline(self, reqs: list[Request]) -> tuple[list, list]:
        """On the loop, after `inline_ok(reqs[0], len(reqs))`: run the requests in order as the worker
        would, while `inline_ok` holds for each (their replies encoded by `finish`, then written by
        `respond` together, one write per connection where it can).  Returns (the requests the loop
        must still answer: Completions' deliver, the requests not run: for the worker's queue).  One
        that runs out of memory goes to the worker's queue at once (it makes room); the rest then
        fail `inline_ok` (in flight) and are returned."""
        rep = self._replicas[0]
        cell = self._thread_cell(rep)  # the loop thread's own counters and recorder
        tls = self._tls
        if not hasattr(tls, "rec"):
            tls.rec = self.metrics.recorder() if self.metrics is not None and self.recording else None
        rec = tls.rec
        done: list[Request] = []
        rest: list[Request] = []
        with torch.inference_mode():  # as in the workers
            for i, req in enumerate(reqs):
                if i and not self.inline_ok(req, len(reqs) - i):
                    rest = reqs[i:]
                    break
                req.instance = self
                try:
                    self._run_timed(req, rep, cell, rec, inline=True)
                except _Requeue:
                    self._q.put([req])
                    continue
                self.inline_runs += 1
                if rec is not None:
                    rec.dequeued(1)
                self._finish_one(req)
                done.append(req)
        respond = self._respond
        if done and respond is not None:
            done = respond(done, rec)
        return done, rest

    def _finish_one(self, req: Request) -> None:
        """The reply of a finished request, encoded by the server's `finish` (never lost: a failure
        becomes the request's error)."""
        finish = self._finish
        if finish is not None:
            try:
                finish(req)
            except Exception as exc:  # never lose a reply
                log.exception("tinyserve: finishing a reply of %s failed", self)
                req.error = errors.TinyserveError(f"encoding the reply failed: {exc!r}")
                req.reply = None

    def _run_request(self, req: Request, now: float, rep: _Replica, inline: bool = False) -> None:
        if req.owner is not None and getattr(req.owner, "closed", False):
            req.error = wire.Unavailable("the request's connection closed before it ran")
            return  # nobody would read the result: do not run it
        if req.deadline is not None and now > req.deadline:
            req.error = wire.DeadlineExceeded(
                f"request to model {self.name!r} expired {1e3 * (now - req.deadline):.1f} ms before it "
                "could run (timeout_ms)")
            return
        try:
            try:
                req.result = self._run_one(req, rep)
            except Exception as exc:
                if inline and _is_oom(exc):
                    raise _Requeue from None  # the worker makes room (never the loop: it would wait on itself)
                if not (_is_oom(exc) and self._make_room()):
                    raise
                req.result = self._run_one(req, rep)  # once more, after the server freed memory
        except (errors.ModelError, wire.InvalidInput) as exc:
            # a hook that refuses a request with wire.InvalidInput answers INVALID_INPUT (the client's
            # mistake); anything else a model raises is MODEL_ERROR naming the model
            req.error = exc
        except Exception as exc:
            log.debug("model %s raised", self, exc_info=True)
            req.error = errors.ModelError(f"model {self.name!r} version {self.version} raised "
                                          f"{type(exc).__name__}: {exc}")

    def _make_room(self) -> bool:
        """Out of memory while running: ask the server to evict idle models (blocks this worker until
        it has); True when something was freed, so the batch is worth one more try."""
        hook = self.on_oom
        if hook is None:
            return False
        try:
            return bool(hook(self))
        except Exception:  # noqa: BLE001 - the batch then fails with its own error
            log.exception("tinyserve: making room after an out-of-memory error failed")
            return False

    def _run_one(self, req: Request, rep: _Replica) -> dict:
        if self._pre is not None:
            # torch tensors viewing the request frame (no copy); a list of bytes for `bytes`
            tensors = self._pre({name: to_array(*t, torch=True) for name, t in req.inputs.items()})
            if not isinstance(tensors, Mapping):
                raise errors.ModelError(f"model {self.name!r}: preprocess returned a "
                                        f"{type(tensors).__name__}, not a dict")
            try:
                args = [tensors[n] for n in self._in_names]
            except KeyError as exc:
                raise errors.ModelError(f"model {self.name!r}: preprocess returned no input {exc.args[0]!r}") from None
        else:
            inputs = req.inputs
            args = [to_array(*inputs[n], torch=True) for n in self._in_names]
        call = rep.call
        if call is None:
            raise errors.ModelError(f"model {self.name!r} holds weights only; it has no program to run")
        if not rep.on_host:
            args = [a.to(rep.torch_device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args]
        outputs = self._outputs_of(call(*args))
        if not rep.on_host:
            outputs = _to_host(outputs)
        if self._post is not None:
            outputs = self._post(outputs)
            if not isinstance(outputs, Mapping):
                raise errors.ModelError(f"model {self.name!r}: postprocess returned a "
                                        f"{type(outputs).__name__}, not a dict")
        want = req.outputs
        if want is not None:
            try:
                outputs = {n: outputs[n] for n in want}
            except KeyError as exc:
                raise errors.ModelError(f"model {self.name!r} produced no output {exc.args[0]!r}") from None
        return outputs

    def _outputs_of(self, out) -> dict:
        names = self._out_names
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, Mapping):
            return dict(out)
        if len(out) != len(names):
            raise errors.ModelError(f"model {self.name!r} returned {len(out)} outputs, its config lists "
                                    f"{len(names)} ({', '.join(names)})")
        return dict(zip(names, out))


