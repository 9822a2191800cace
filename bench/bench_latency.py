#!/usr/bin/env python3
"""Serving latency benchmark: tinyserve against two floors, the same MLP weights, the same load
generator (bench/loadgen.c), the same run.

    .venv/bin/python bench/bench_latency.py --quick          # 5 rounds, fewer requests (< 2 min on a quiet box)
    .venv/bin/python bench/bench_latency.py                  # 7 rounds, full request counts
    .venv/bin/python bench/bench_latency.py --diagnose       # where tinyserve's extra time per request goes

Method (see bench/README.md): the script packs three models into a temporary repository (the float32
MLP 64->256->256->10 of `tinyserve.examples:mlp`; the same MLP with batching on (`mlp_b`, max 32,
2 ms); an identity `python` model) and starts three servers, all pinned with `taskset` to one core:
- the eager floor (`--eager-floor-server`): what a user writes in an afternoon: asyncio + uvloop +
  msgpack, its own framing code, the eager `tinyserve.examples.MLP` (same weights, seed 0) called on
  the loop, one torch thread.  It speaks tinyserve's frame layout (docs/protocol.md 1-3), so one
  load generator drives all three with the same bytes;
- the export floor (`--floor-server`): the same loop, but frames handled with `tinyserve.wire` and
  the model loaded as tinyserve's worker loads it (the torch.export program): tinyserve's parts
  without its server;
- tinyserve (`python -m tinyserve serve --threads 1`).
The load generator (bench/loadgen.c, built with `cc -O2` at run time) runs on another core: closed
loop, N connections x K in flight.  Scenarios: 1 connection x 1; 1 x 32 pipelined; 32 connections x 1;
32 connections x 1 with tinyserve batching (floors unbatched).  Each round runs the three servers back
to back per scenario; a group disturbed by other processes is run again (at most 3 tries).  Figures
are medians over rounds; comparisons are medians of the per-round ratios.  Server CPU per request:
every thread of each server's process tree (/proc/<pid>/task/*/schedstat) over the measured phase.
Then the export floor and tinyserve run again with a garbage-collection log, and under cProfile.

Results: a table on stdout, JSON in <out>/latency-<date>[-quick].json, markdown in
<out>/latency-latest.md, the profile summary in <out>/latency-profile[-quick].txt.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import _proc_field, command_line, loadavg, phase_timer, render_text, results_page, tally, verdict  # noqa: E402  (bench/ is sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {  # against the eager floor (issue 14: what a user writes in an afternoon)
    "mlp_c1_p50_ratio_max": 1.3,  # tinyserve p50 / eager floor p50, 1 connection, 1 request at a time
    "mlp_pipe32_throughput_ratio_min": 0.8,  # tinyserve req/s / eager floor req/s, 1 connection, 32 pipelined
}
MODELS = ("mlp", "identity")
SCENARIOS = {  # name -> (connections, requests in flight per connection)
    "c1": (1, 1),
    "pipe32": (1, 32),
    "conn32": (32, 1),
    "conn32b": (32, 1),
}
SCENARIO_TEXT = {
    "c1": "1 connection, 1 request at a time",
    "pipe32": "1 connection, 32 pipelined",
    "conn32": "32 connections, 1 request in flight each",
    "conn32b": "32 connections, 1 in flight each, tinyserve batching (max 32, 2 ms; floors unbatched)",
}
SCENARIO_MODELS = {"conn32b": ("mlp",)}  # scenarios that run some models only
BATCHING = {"max_batch_size": 32, "max_queue_delay_us": 2000}  # model mlp_b: the MLP with batching on
SERVERS = ("eager", "floor", "tinyserve")
FLOORS = ("eager", "floor")
SERVER_TEXT = {"eager": "eager floor", "floor": "export floor", "tinyserve": "tinyserve"}
PROFILED = ("floor", "tinyserve")  # the gc and cProfile phases (the export floor: tinyserve's module)
# (warm-up, measured) requests per run
COUNTS = {
    "full": {"c1": (500, 5000), "pipe32": (2000, 20000), "conn32": (2000, 20000), "conn32b": (2000, 20000)},
    "quick": {"c1": (200, 1000), "pipe32": (500, 3000), "conn32": (500, 3000), "conn32b": (500, 3000)},
}


def served_model(server: str, model: str, scenario: str) -> str:
    """The model a server is sent: tinyserve's batched scenario goes to mlp_b (same weights, batching on)."""
    return "mlp_b" if scenario == "conn32b" and server == "tinyserve" else model


def scenario_models(scenario: str) -> tuple[str, ...]:
    return SCENARIO_MODELS.get(scenario, MODELS)
GC_PROBE = [("identity", 200000), ("mlp", 60000)]  # (model, requests), 1 connection x 32 pipelined
PROFILE_RUNS = {  # (model, scenario, requests)
    "full": [("mlp", "c1", 4000), ("mlp", "pipe32", 8000), ("identity", "c1", 4000)],
    "quick": [("mlp", "c1", 1500)],
}
RUN_TIMEOUT_S = 120.0  # one driver run (warm-up + measured), enforced in the driver and by the parent
START_TIMEOUT_S = 120.0  # a server from exec to listening (torch import, model load, warm-up)
STOP_TIMEOUT_S = 30.0
IN_SHAPE = (1, 64)  # batch 1, both models take float32 [-1, 64]
ID_PROBE = 0xFEEDFACECAFEBEEF  # a uint64 id (msgpack 0xcf + 8 bytes) located in the template and patched

IDENTITY_PY = '''\
"""Identity model for bench/bench_latency.py: returns its input (one unused weight: a weights file
holds at least one tensor)."""
import torch


class Identity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        return x


def build(params):
    return Identity()
'''
IDENTITY_CONFIG = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}],
                   "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 64]}]}


# ------------------------------------------------------------------------------------------------
# environment (as bench_weights.py records it)


def git_commit() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = run("rev-parse", "HEAD") or "unknown"
    status = [ln for ln in run("status", "--porcelain").splitlines() if ln]
    return {"commit": head + ("-dirty" if status else ""), "dirty_paths": status[:40],
            "dirty_tracked": any(not ln.startswith("??") for ln in status)}


def environment(args, cores: dict) -> dict:
    import importlib.metadata

    import msgpack
    import numpy
    import torch
    import uvloop

    import tinyserve

    mem_kb = int((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "cores_online": os.cpu_count(),
            "cores_usable": cores["usable"],
            "ram_gib": round(mem_kb / (1 << 20), 2),
            "loadavg_start": loadavg(),
            "kernel": platform.release(),
        },
        **git_commit(),
        "tinyserve_path": str(Path(tinyserve.__file__).parent),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "msgpack": ".".join(map(str, msgpack.version)),
            "uvloop": uvloop.__version__,
            "tinyserve": importlib.metadata.version("tinyserve") if _has_dist("tinyserve") else "source",
        },
        "mode": "quick" if args.quick else "full",
        "rounds": args.rounds,
        "counts": {s: {"warmup": w, "measured": n} for s, (w, n) in COUNTS[args.mode].items()},
        "cores": cores,
        "note": ("shared 2-core VM: other sessions may be running tests at the same time, so absolute "
                 "times are noisy; floor and tinyserve run back to back in every round, and the "
                 "comparisons are medians of per-round ratios"),
    }


def _has_dist(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pick_cores() -> dict:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) >= 2:
        return {"server": usable[0], "driver": usable[1], "apart": True, "usable": len(usable)}
    return {"server": usable[0], "driver": usable[0], "apart": False, "usable": len(usable)}


# ------------------------------------------------------------------------------------------------
# the floor server (runs in its own process: --floor-server)


def load_as_served(path):
    """The model version as tinyserve's worker loads it (runtime.ModelInstance._load): since commit
    04aa29f with `check_inputs=False` (torch.export's per-call input-constraint hook dropped; the
    server validates requests against the config instead).  Older trees have no such argument."""
    import inspect

    from tinyserve.runtime import load_version

    if "check_inputs" in inspect.signature(load_version).parameters:
        return load_version(path, check_inputs=False)
    return load_version(path)


def floor_server(repo_dir: str, models: list[str], host: str, gc_log: str | None = None,
                 prefix: str | None = None) -> int:
    """A bare asyncio + uvloop server: the same frames as tinyserve (tinyserve.wire), the same model
    (load_as_served: the module tinyserve's worker runs) directly on the event loop, one thread, no validation
    beyond what decoding needs, one writelines per read."""
    import asyncio

    import torch
    import uvloop

    from tinyserve import wire
    from tinyserve.repository import Repository
    from tinyserve.weights import DTYPE_TO_TORCH

    from tinyserve.runtime import load_version

    gcl = GcLog(gc_log) if gc_log else None
    prof = None
    if prefix:  # cProfile on the loop thread once listening; written at the end
        import cProfile

        prof = cProfile.Profile()
    torch.set_num_threads(1)
    repo = Repository(repo_dir)
    table = {}
    with torch.inference_mode():
        for name in models:
            path = repo.resolve(name)
            lm = load_as_served(path)
            in_names = [s.name for s in lm.config.inputs]
            out_names = [s.name for s in lm.config.outputs]
            warm = [torch.zeros([1 if d == -1 else d for d in s.shape], dtype=DTYPE_TO_TORCH[s.dtype])
                    for s in lm.config.inputs]
            lm.module(*warm)  # warm-up, as tinyserve does before it reports ready
            table[name] = (lm, lm.module, in_names, out_names, int(path.name))
    limits = wire.Limits()
    frame_size, decode_header, payload_view = wire.frame_size, wire.decode_header, wire.payload_view
    tensor_parts, encode_frame = wire.tensor_parts, wire.encode_frame

    def handle(h: dict, payload: memoryview) -> list:
        rid = h.get("id")
        try:
            _lm, module, in_names, out_names, version = table[h["model"]]
            byname, off = {}, 0
            for d in h["inputs"]:
                nb = d["nbytes"]
                # a private copy, as tinyserve's connection makes of a small frame's payload
                byname[d["name"]] = torch.frombuffer(bytearray(payload[off:off + nb]),
                                                     dtype=DTYPE_TO_TORCH[d["dtype"]]).view(d["shape"])
                off = (off + nb + 7) & ~7
            out = module(*[byname[n] for n in in_names])
            if isinstance(out, torch.Tensor):
                out = (out,)
            descs, views = tensor_parts(dict(zip(out_names, out)))
            return encode_frame({"id": rid, "ok": True, "model": h["model"], "version": version,
                                 "outputs": descs}, views)
        except Exception as exc:  # noqa: BLE001 - a bench server answers every request
            return wire.encode_error(rid if isinstance(rid, int) else 0, "INTERNAL", f"{type(exc).__name__}: {exc}")

    class Floor(asyncio.Protocol):
        def connection_made(self, transport):
            self.tr = transport
            self.rest = b""
            sock = transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

        def data_received(self, data):
            if self.rest:
                data = self.rest + data
            mv = memoryview(data)
            n, pos, out = len(data), 0, []
            try:
                while n - pos >= 8:
                    total, hlen = frame_size(mv, limits, pos)
                    if n - pos < total:
                        break
                    frame = mv[pos:pos + total]
                    out += handle(decode_header(frame, hlen), payload_view(frame, hlen))
                    pos += total
            except wire.WireError:
                self.tr.close()
                return
            self.rest = bytes(mv[pos:]) if pos < n else b""
            if out:
                self.tr.writelines(out)

    async def serve():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        srv = await loop.create_server(Floor, host, 0, reuse_address=True)
        print(f"floor: listening on {host}:{srv.sockets[0].getsockname()[1]} [uvloop], models: "
              f"{', '.join(models)}", flush=True)
        if gcl is not None:
            gcl.ready()
        if prof is not None:
            prof.enable()
        await stop.wait()
        if prof is not None:
            prof.disable()
        srv.close()
        try:
            await asyncio.wait_for(srv.wait_closed(), 2.0)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        print("floor: stopped", flush=True)

    with torch.inference_mode():
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve())
    if gcl is not None:
        gcl.dump()
    if prof is not None:
        prof.dump_stats(f"{prefix}.loop.prof")
    return 0


# ------------------------------------------------------------------------------------------------
# the eager floor (runs in its own process: --eager-floor-server): what a user writes in an afternoon


def eager_floor_server(host: str) -> int:
    """A bare asyncio + uvloop + msgpack server with the eager `tinyserve.examples.MLP` (the weights
    `tinyserve.examples.mlp()` builds, seed 0: the ones `pack` packed) run on the loop, one torch
    thread.  Its own code end to end: nothing of tinyserve's wire, protocol, runtime or loader.  It
    speaks tinyserve's frame layout (docs/protocol.md 1-3: `<II` body_len, header_len, msgpack header,
    8-aligned payload) because that is what a length-prefixed msgpack protocol looks like anyway, and
    one load generator then drives all three servers with the same bytes; it checks nothing the
    decoding does not need.  `identity` returns its input; `mlp_b` is the same MLP (unbatched)."""
    import asyncio

    import msgpack
    import torch
    import uvloop

    from tinyserve.examples import mlp

    torch.set_num_threads(1)
    net = mlp()[0]
    models = {"mlp": net, "mlp_b": net, "identity": lambda x: x}
    with torch.inference_mode():
        net(torch.zeros(1, 64))
    prefix = struct.Struct("<II")
    packb = msgpack.packb

    def answer(h, payload):
        d = h["inputs"][0]
        x = torch.frombuffer(payload, dtype=torch.float32, count=d["nbytes"] // 4).view(d["shape"])
        y = models[h["model"]](x).numpy().tobytes()
        head = packb({"id": h["id"], "ok": True, "model": h["model"], "version": 1, "outputs": [
            {"name": "y", "dtype": "float32", "shape": list(x.shape[:1]) + [len(y) // 4 // x.shape[0]],
             "nbytes": len(y)}]})
        poff = (8 + len(head) + 7) & ~7
        pad = b"\0" * (poff - 8 - len(head))
        tail = b"\0" * (-len(y) % 8)
        return prefix.pack(poff - 4 + len(y) + len(tail), len(head)) + head + pad + y + tail

    class Floor(asyncio.Protocol):
        def connection_made(self, transport):
            self.tr = transport
            self.buf = bytearray()
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data):
            buf = self.buf
            buf += data
            out, pos, n = [], 0, len(buf)
            while n - pos >= 8:
                body, hlen = prefix.unpack_from(buf, pos)
                if n - pos < 4 + body:
                    break
                h = msgpack.unpackb(buf[pos + 8:pos + 8 + hlen])
                poff = pos + ((8 + hlen + 7) & ~7)
                try:
                    out.append(answer(h, bytearray(buf[poff:pos + 4 + body])))
                except Exception as exc:  # noqa: BLE001 - a bench server answers every request
                    head = packb({"id": h.get("id", 0), "ok": False,
                                  "error": {"code": "INTERNAL", "message": repr(exc)}})
                    out.append(prefix.pack(4 + len(head) + (-(8 + len(head)) % 8), len(head)) + head
                               + b"\0" * (-(8 + len(head)) % 8))
                pos += 4 + body
            del buf[:pos]
            if out:
                self.tr.write(b"".join(out))

    async def serve():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        srv = await loop.create_server(Floor, host, 0)
        print(f"eager floor: listening on {host}:{srv.sockets[0].getsockname()[1]} [uvloop]", flush=True)
        await stop.wait()
        srv.close()

    with torch.inference_mode():
        uvloop.run(serve())
    return 0


# ------------------------------------------------------------------------------------------------
# the models' own time, in process (runs in its own process on the servers' core: --model-timing)


def model_timing(repo_dir: str, models: list[str], calls: int) -> int:
    """Median time of one call of each packed model (as both servers run it: the module that
    load_as_served builds, batch 1, inference mode, 1 thread), and for scale the module that
    tinyserve.runtime.load_version builds by default and the eager MLP of tinyserve.examples with the
    same weights."""
    import torch

    from tinyserve import examples
    from tinyserve.repository import Repository
    from tinyserve.runtime import load_version

    torch.set_num_threads(1)
    repo = Repository(repo_dir)
    x = torch.randn(IN_SHAPE)
    fns = {}
    for name in models:
        fns[f"{name} (packed, as served)"] = load_as_served(repo.resolve(name)).module
    fns["mlp (packed, load_version default)"] = load_version(repo.resolve("mlp")).module
    fns["mlp (eager nn.Module, same weights)"] = examples.mlp()[0]
    out = {}
    with torch.inference_mode():
        for f in fns.values():
            for _ in range(200):
                f(x)
        samples = {k: [] for k in fns}
        for _ in range(7):  # interleaved blocks; the median block
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    f(x)
                samples[k].append((time.perf_counter() - t0) / calls * 1e6)
        for k, xs in samples.items():
            out[k] = med_span(xs)
    print(json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# the profiled tinyserve server (runs in its own process: --profile-server)


class GcLog:
    """Every garbage collection of this process (gc.callbacks): generation, start, pause, thread,
    objects collected.  `ready()` marks the moment the server listens; `dump()` writes a JSON summary
    split into start-up and serving."""

    def __init__(self, path: str):
        import gc
        import threading

        self.path = path
        self.events: list[tuple] = []
        self.t_ready: float | None = None
        self._starts: dict[int, float] = {}
        self._threading = threading
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        tid = self._threading.get_ident()
        if phase == "start":
            self._starts[tid] = time.perf_counter()
            return
        t0 = self._starts.pop(tid, None)
        if t0 is not None:
            self.events.append((info["generation"], t0, time.perf_counter() - t0,
                                self._threading.current_thread().name, info["collected"]))

    def ready(self) -> None:
        self.t_ready = time.perf_counter()

    def dump(self) -> None:
        import gc

        def summary(evs):
            out = {}
            for g in (0, 1, 2):
                ds = [e[2] for e in evs if e[0] == g]
                out[f"gen{g}"] = {"n": len(ds), "total_ms": sum(ds) * 1e3, "max_ms": max(ds, default=0) * 1e3}
            return out

        ready = self.t_ready
        serving = [e for e in self.events if ready is not None and e[1] >= ready]
        startup = [e for e in self.events if ready is None or e[1] < ready]
        out = {"startup": summary(startup), "serving": summary(serving),
               "full_collections_serving": [{"at_s": round(e[1] - ready, 3), "pause_ms": round(e[2] * 1e3, 2),
                                             "thread": e[3], "collected": e[4]} for e in serving if e[0] == 2],
               "tracked_objects_at_exit": len(gc.get_objects()), "thresholds": list(gc.get_threshold())}
        Path(self.path).write_text(json.dumps(out, indent=1) + "\n")


def instrumented_server(repo_dir: str, models: list[str], host: str, prefix: str | None, gc_log: str | None) -> int:
    """tinyserve's own server (tinyserve.server.run, torch_threads=1), observed from this launcher
    (tinyserve/ is not touched).  With `prefix`: cProfile on the event-loop thread (enabled once the
    server listens, after the models are loaded and warmed up) and on each model's worker thread
    (enabled when its serving loop starts, after the warm-up); written as <prefix>.loop.prof and
    <prefix>.worker-<model>.prof when the server stops (SIGTERM: graceful).  With `gc_log`: every
    garbage collection, written to that file at the end."""
    import cProfile

    from tinyserve import runtime, server

    gcl = GcLog(gc_log) if gc_log else None
    loop_prof = cProfile.Profile() if prefix else None
    if prefix:
        orig_serve = runtime.ModelInstance._serve

        def profiled_serve(self, *args):
            prof = cProfile.Profile()
            prof.enable()
            try:
                return orig_serve(self, *args)
            finally:
                prof.disable()
                prof.dump_stats(f"{prefix}.worker-{self.name}.prof")

        runtime.ModelInstance._serve = profiled_serve  # this process only

    def on_ready(srv):
        print(f"tinyserve-instrumented: listening on {srv.host}:{srv.port}", flush=True)
        if gcl is not None:
            gcl.ready()
        if loop_prof is not None:
            loop_prof.enable()

    config = server.ServerConfig(repo=repo_dir, host=host, port=0, models=tuple(models), torch_threads=1)
    try:
        rc = server.run(config, on_ready=on_ready)
    finally:
        if loop_prof is not None:
            loop_prof.disable()
            loop_prof.dump_stats(f"{prefix}.loop.prof")
        if gcl is not None:
            gcl.dump()
    print("tinyserve-instrumented: stopped", flush=True)
    return rc


# ------------------------------------------------------------------------------------------------
# process management (parent)


class Proc:
    """A child process (stdout + stderr to a log file) that is stopped by pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, pipe: bool = False):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if pipe:
            self.p = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self.log)
        else:
            self.p = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                      stderr=subprocess.STDOUT)
        self.pid = self.p.pid  # taskset execs the command: the same pid
        self._rbuf = b""

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Poll the log for a line matching `pattern` (bounded by `timeout`)."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log_path.read_text(errors="replace")
            m = rx.search(text)
            if m:
                return m
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.p.returncode} before it was ready:\n{text[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} was not ready within {timeout:.0f} s:\n"
                           f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def readline(self, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self._rbuf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited ({self.p.poll()}):\n"
                                       f"{self.log_path.read_text(errors='replace')[-3000:]}")
                self._rbuf += chunk
        line, _, self._rbuf = self._rbuf.partition(b"\n")
        return line

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful), then SIGKILL after `timeout`; returns the exit code."""
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(10)
        self.log.close()
        return self.p.returncode


def taskset(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def py() -> str:
    return sys.executable


def setup_repo(work: Path) -> Path:
    import torch

    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    repo = Repository(work / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    pack(repo, "mlp_b", "tinyserve.examples:mlp", config={"batching": BATCHING})
    src = work / "identity-src"
    src.mkdir()
    (src / "model.py").write_text(IDENTITY_PY)
    torch.save({"unused": torch.zeros(1)}, src / "weights.pt")
    pack(repo, "identity", str(src / "weights.pt"), program=str(src / "model.py"), config=IDENTITY_CONFIG)
    return work / "repo"


class Bench:
    def __init__(self, args, cores: dict, work: Path, log):
        self.args = args
        self.cores = cores
        self.work = work
        self.log = log
        self.procs: list[Proc] = []
        self.loadgen: Path | None = None

    def start_driver(self) -> None:
        """Build the C load generator (bench/loadgen.c) with `cc -O2` into the work folder."""
        exe = self.work / "loadgen"
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-std=c99", "-o", str(exe), str(ROOT / "bench" / "loadgen.c")], check=True,
                       timeout=120)
        self.loadgen = exe

    def start_server(self, kind: str, repo: Path, name: str | None = None, *, profile: bool = False,
                     gc_log: bool = False, extra: list[str] | None = None) -> tuple[Proc, int]:
        """kind floor or tinyserve; `profile` / `gc_log` run tinyserve through this file's
        instrumented launcher (the measured tinyserve is plain `python -m tinyserve serve`)."""
        me = str(Path(__file__).resolve())
        models = ",".join(MODELS)
        name = name or kind
        if kind == "eager":
            argv = [py(), me, "--eager-floor-server"]
            pat = r"eager floor: listening on [^:\s]+:(\d+)"
        elif kind == "floor":
            argv = [py(), me, "--floor-server", "--repo", str(repo), "--models", models]
            if profile:
                argv += ["--prof-prefix", str(self.work / name)]
            pat = r"floor: listening on [^:\s]+:(\d+)"
        elif profile or gc_log:
            argv = [py(), me, "--instrumented-server", "--repo", str(repo), "--models", models + ",mlp_b"]
            if profile:
                argv += ["--prof-prefix", str(self.work / name)]
            pat = r"tinyserve-instrumented: listening on [^:\s]+:(\d+)"
        else:
            argv = [py(), "-m", "tinyserve", "serve", "--repo", str(repo), "--threads", "1", "--port", "0"]
            for m in (*MODELS, "mlp_b"):
                argv += ["--model", m]
            pat = r"tinyserve: listening on [^:\s]+:(\d+)"
        if gc_log:
            argv += ["--gc-log", str(self.work / f"{name}.gc.json")]
        argv += extra or []
        p = Proc(name, taskset(self.cores["server"], argv), self.work / f"{name}.log")
        self.procs.append(p)
        m = p.wait_for(pat, START_TIMEOUT_S)
        return p, int(m.group(1))

    def drive(self, port: int, pid: int, model: str, scenario: str, warmup: int, count: int) -> dict:
        """One run of the C load generator (pinned to the driver's core): `warmup` then `count`
        requests on the scenario's connections; every request must be answered with success."""
        conns, window = SCENARIOS[scenario]
        argv = [str(self.loadgen), "--host", "127.0.0.1", "--port", str(port), "--model", model,
                "--conns", str(conns), "--inflight", str(window), "--warmup", str(warmup), "--count", str(count),
                "--timeout", str(RUN_TIMEOUT_S), "--server-pid", str(pid)]
        p = subprocess.run(taskset(self.cores["driver"], argv), capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S + 30)
        try:
            r = json.loads(p.stdout)
        except ValueError:
            raise RuntimeError(f"loadgen: {model} {scenario} on port {port}: exit {p.returncode}: "
                               f"{p.stderr[-2000:]}") from None
        if p.returncode != 0 or r["ok"] != count:
            raise RuntimeError(f"loadgen: {model} {scenario} on port {port}: exit {p.returncode}, {r}")
        r["server_runq_wait"] = r["server_runq_wait_us_per_req"] * r["ok"] / 1e6 / max(r["elapsed_s"], 1e-9)
        r["core_foreign_busy"] = None  # not sampled by the C generator
        r["n"] = r["ok"]
        return r

    def stop_all(self) -> dict:
        codes = {}
        for p in self.procs:
            codes[p.name] = p.stop()
        self.procs = []
        return codes


# ------------------------------------------------------------------------------------------------
# statistics and report


def med_span(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


DISTURBED = 0.05  # a run is disturbed above this share of its wall time (see disturbance())
MAX_ATTEMPTS = 3  # a disturbed pair (floor + tinyserve) is run again, at most this many times in all


def disturbance(r: dict) -> float:
    """How much of a run's wall time something outside the benchmark took: the larger of the driver's
    run-queue wait, the servers' core busy outside the server (tick-sampled, so only runs of 0.3 s
    or more are judged by it), and, for the floor (one thread, so any wait is another process), its
    run-queue wait.  tinyserve's own run-queue wait is not counted: its two threads share one core."""
    xs = [r.get("driver_runq_wait") or 0.0]
    if r.get("core_foreign_busy") is not None and r["elapsed_s"] >= 0.3:
        xs.append(r["core_foreign_busy"])
    if r["server"] in FLOORS and r.get("server_runq_wait") is not None:
        xs.append(r["server_runq_wait"])
    return max(xs)


SERVER_FIELDS = ("server_cpu_us_per_req", "server_main_cpu_us_per_req", "server_other_cpu_us_per_req",
                 "server_runq_wait_us_per_req", "server_switches_per_req")


def summarize(records: list[dict]) -> dict:
    """Per model and scenario: each server's medians over rounds, and tinyserve against each floor
    (medians of the per-round ratios and differences)."""
    out: dict = {}
    servers = [srv for srv in SERVERS if any(r["server"] == srv for r in records)]
    floors = [f for f in FLOORS if f in servers]
    for model in MODELS:
        for scen in SCENARIOS:
            recs = [r for r in records if r["model"] == model and r["scenario"] == scen]
            if not recs:
                continue
            by = {srv: {r["round"]: r for r in recs if r["server"] == srv} for srv in servers}
            rounds = sorted(set.intersection(*(set(by[srv]) for srv in servers)))
            s: dict = {"rounds": len(rounds), "ratio": {}, "added_us": {}, "outputs_identical": {}}
            for srv in servers:
                rs = [by[srv][k] for k in rounds]
                s[srv] = {f: med_span([r[f] for r in rs]) for f in
                          ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us", "throughput_rps",
                           "driver_busy", "disturbance")}
                for f in SERVER_FIELDS:
                    xs = [r[f] for r in rs if r.get(f) is not None]
                    if xs:
                        s[srv][f] = med_span(xs)
            for fl in floors:
                pairs = [(by[fl][k], by["tinyserve"][k]) for k in rounds]
                s["ratio"][fl] = {
                    "p50": med_span([t["p50_us"] / f["p50_us"] for f, t in pairs]),
                    "p99": med_span([t["p99_us"] / f["p99_us"] for f, t in pairs]),
                    "throughput": med_span([t["throughput_rps"] / f["throughput_rps"] for f, t in pairs]),
                }
                a = s["added_us"][fl] = {
                    "p50": med_span([t["p50_us"] - f["p50_us"] for f, t in pairs]),
                    "p99": med_span([t["p99_us"] - f["p99_us"] for f, t in pairs]),
                }
                cpu = [(f["server_cpu_us_per_req"], t["server_cpu_us_per_req"]) for f, t in pairs
                       if f.get("server_cpu_us_per_req") and t.get("server_cpu_us_per_req")]
                if cpu:
                    a["server_cpu"] = med_span([t - f for f, t in cpu])
                    s["ratio"][fl]["server_cpu"] = med_span([t / f for f, t in cpu])
                s["outputs_identical"][fl] = all(f["digest"] == t["digest"] for f, t in pairs)
            out.setdefault(model, {})[scen] = s
    return out


def _us(m: dict) -> str:
    return f"{m['median']:.0f} [{m['min']:.0f}..{m['max']:.0f}]"


def _sus(m: dict) -> str:
    return f"{m['median']:+.0f} [{m['min']:+.0f}..{m['max']:+.0f}]"


def _x(m: dict, digits: int = 2) -> str:
    return f"{m['median']:.{digits}f}x [{m['min']:.{digits}f}..{m['max']:.{digits}f}]"


def build_rows(summary: dict, timing: dict, records: list[dict], rejected: int = 0) -> list[dict]:
    rows = []

    def add(section, figure, value, target="", ok=None):
        rows.append({"section": section, "figure": figure, "value": value, "target": target,
                     "verdict": "" if ok is None else verdict(ok)})

    for k, m in timing.items():
        add("model call in process (servers' core, 1 thread, batch 1)", k,
            f"{m['median']:.1f} us [{m['min']:.1f}..{m['max']:.1f}]")
    if records:
        groups = {(r["round"], r["model"], r["scenario"]): r for r in records if r["server"] == "tinyserve"}
        first = sum(1 for r in groups.values() if r["attempt"] == 1 and not r["disturbed"])
        retried = sum(1 for r in groups.values() if r["attempt"] > 1 and not r["disturbed"])
        still = {(r["round"], r["model"], r["scenario"]) for r in records if r["disturbed"]}
        add("disturbance (shared machine)", "server groups (eager floor, export floor, tinyserve)",
            f"{len(groups)} kept: {first} undisturbed at the first try, {retried} after a rerun, "
            f"{len(still)} still disturbed after {MAX_ATTEMPTS} tries; {rejected} disturbed groups rejected and "
            f"rerun (a run is disturbed when more than {DISTURBED:.0%} of its wall time went to other processes: "
            f"the load generator or a floor waiting for its core)")

    for model in MODELS:
        for scen in SCENARIOS:
            s = summary.get(model, {}).get(scen)
            if s is None:
                continue
            sec = f"{model}: {SCENARIO_TEXT[scen]}"
            for srv in SERVERS:
                if srv not in s:
                    continue
                m = s[srv]
                add(sec, SERVER_TEXT[srv], f"p50 {_us(m['p50_us'])} us, p99 {_us(m['p99_us'])} us, "
                    f"{m['throughput_rps']['median']:,.0f} req/s [{m['throughput_rps']['min']:,.0f}.."
                    f"{m['throughput_rps']['max']:,.0f}]; load generator busy {m['driver_busy']['median']:.0%}, "
                    f"disturbance {m['disturbance']['median']:.1%}")
                if "server_cpu_us_per_req" in m:
                    add(sec, f"{SERVER_TEXT[srv]}: server per request",
                        f"CPU {_us(m['server_cpu_us_per_req'])} us (main thread "
                        f"{m['server_main_cpu_us_per_req']['median']:.0f}, other threads "
                        f"{m['server_other_cpu_us_per_req']['median']:.0f}); run-queue wait "
                        f"{m['server_runq_wait_us_per_req']['median']:.0f} us; scheduled in "
                        f"{m['server_switches_per_req']['median']:.2f}x")
            for fl in FLOORS:
                if fl not in s["ratio"]:
                    continue
                r, a, name = s["ratio"][fl], s["added_us"][fl], SERVER_TEXT[fl]
                if model == "mlp" and scen == "c1" and fl == "eager":
                    t = TARGETS["mlp_c1_p50_ratio_max"]
                    add(sec, f"p50 tinyserve / {name}", _x(r["p50"], 3), f"<= {t}x", r["p50"]["median"] <= t)
                else:
                    add(sec, f"p50 tinyserve / {name}", _x(r["p50"]))
                add(sec, f"p99 tinyserve / {name}", _x(r["p99"]))
                if model == "mlp" and scen == "pipe32" and fl == "eager":
                    t = TARGETS["mlp_pipe32_throughput_ratio_min"]
                    add(sec, f"throughput tinyserve / {name}", _x(r["throughput"], 3), f">= {t}x",
                        r["throughput"]["median"] >= t)
                else:
                    add(sec, f"throughput tinyserve / {name}", _x(r["throughput"]))
                if "server_cpu" in r:
                    add(sec, f"server CPU per request tinyserve / {name}", _x(r["server_cpu"]))
                extra = f"; server CPU {_sus(a['server_cpu'])} us/req" if "server_cpu" in a else ""
                add(sec, f"tinyserve adds to the {name} (p50, p99)",
                    f"p50 {_sus(a['p50'])} us, p99 {_sus(a['p99'])} us{extra}")
                same = s["outputs_identical"][fl]
                add(sec, f"replies identical ({name} vs tinyserve, every round)",
                    "yes" if same else ("no (batched: tinyserve ran [n, 64] matmuls)" if scen == "conn32b" else "NO"))
    return rows


def header_text(env: dict) -> str:
    m, v, c = env["machine"], env["versions"], env["cores"]
    pin = (f"servers on core {c['server']}, driver on core {c['driver']}" if c["apart"]
           else f"ONE usable core ({c['server']}): server and driver share it")
    counts = ", ".join(f"{s} {x['warmup']}+{x['measured']}" for s, x in env["counts"].items())
    return (f"tinyserve latency benchmark, {env['mode']} mode, {env['date']}\n"
            f"machine: {m['cpu_model']}, {m['cores_usable']} cores, {m['ram_gib']} GiB RAM, load avg at start "
            f"{' '.join(m['loadavg_start'])}; kernel {m['kernel']}\n"
            f"commit {env['commit']} (tinyserve from {env['tinyserve_path']}); torch {v['torch']}, "
            f"numpy {v['numpy']}, msgpack {v['msgpack']}, uvloop {v['uvloop']}, python {v['python']}\n"
            f"{env['rounds']} rounds (floor then tinyserve per scenario, back to back), requests per run "
            f"(warm-up+measured): {counts}; {pin} (taskset)\n"
            f"figures: median [min..max] over rounds; ratios: median [min..max] of per-round ratios; "
            f"{env['note']}")


def render_md(env: dict, rows: list[dict], res: dict, profile_name: str) -> str:
    method = ("Latency is measured by the load generator (send of the request to read of its reply), so it "
              "includes the generator's own cost, the same for both servers. Server CPU us/req: on-CPU time "
              "of every thread of the server process (schedstat) over the measured requests. Driver busy: "
              "the generator's CPU time / wall time (near 100%: the generator, not the server, set the pace).")
    lines = results_page("Latency benchmark: latest results", header_text(env), res, rows, method)
    lines += ["", tally(rows), "",
              f"Profiles of both servers (cProfile; tinyserve: loop and worker threads): `{profile_name}`."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# profile summary

# (label, path suffix or "", function name) -> a stage of a request's way through the server
LOOP_STAGES = [
    ("Connection.buffer_updated (cum): receive, parse, dispatch, hand-off", "tinyserve/protocol.py", "buffer_updated"),
    ("  Connection._frame (cum): header decode, id checks, dispatch", "tinyserve/protocol.py", "_frame"),
    ("  Server._op_infer (cum): routing, validation, Request", "tinyserve/server.py", "_op_infer"),
    ("    wire.split_tensors", "tinyserve/wire.py", "split_tensors"),
    ("    ModelInstance.check_inputs", "tinyserve/runtime.py", "check_inputs"),
    ("  Server._submit_pending (cum): hand-off to the worker (SimpleQueue.put)", "tinyserve/server.py",
     "_submit_pending"),
    ("Completions._drain (cum): replies back on the loop", "tinyserve/runtime.py", "_drain"),
    ("  Server._deliver (cum): send_parts, stats, flush", "tinyserve/server.py", "_deliver"),
    ("  ReplyFlusher.flush (cum): transport.writelines", "tinyserve/protocol.py", "flush"),
]
FLOOR_STAGES = [
    ("Floor.data_received (cum): parse, run the model, encode, write (writelines: self time)",
     "bench/bench_latency.py", "data_received"),
    ("  wire.decode_header (cum)", "tinyserve/wire.py", "decode_header"),
    ("  handle (cum): one request: tensors, model call, reply encoding", "bench/bench_latency.py", "handle"),
    ("    nn.Module._wrapped_call_impl (cum): the model's forward", "torch/nn/modules/module.py", "_wrapped_call_impl"),
    ("    wire.tensor_parts (cum)", "tinyserve/wire.py", "tensor_parts"),
    ("    wire.encode_frame (cum): msgpack header", "tinyserve/wire.py", "encode_frame"),
]
WORKER_STAGES = [
    ("SimpleQueue.get self time: the worker waiting for work", "", "<method 'get' of '_queue.SimpleQueue' objects>"),
    ("ModelInstance.run (cum): everything per request in the worker", "tinyserve/runtime.py", "run"),
    ("  ModelInstance._run_one (cum): inputs to tensors, model call, outputs", "tinyserve/runtime.py", "_run_one"),
    ("    runtime._to_torch (cum): input tensors viewing the frame", "tinyserve/runtime.py", "_to_torch"),
    ("    wire.to_array (cum): input tensors viewing the frame", "tinyserve/wire.py", "to_array"),
    ("    nn.Module._wrapped_call_impl (cum): the model's forward", "torch/nn/modules/module.py", "_wrapped_call_impl"),
    ("  Server._finish (cum): reply encoding", "tinyserve/server.py", "_finish"),
    ("    wire.tensor_parts (cum)", "tinyserve/wire.py", "tensor_parts"),
    ("    wire.encode_frame (cum): msgpack header", "tinyserve/wire.py", "encode_frame"),
    ("  Server._respond (cum): statistics, then the reply written by the worker", "tinyserve/server.py", "_respond"),
    ("    Server._count (cum): statistics and ejection bookkeeping", "tinyserve/server.py", "_count"),
    ("    Connection.reply_threadsafe (cum): release, writev", "tinyserve/protocol.py", "reply_threadsafe"),
    ("  Completions.post_many (cum): wake the loop (call_soon_threadsafe)", "tinyserve/runtime.py", "post_many"),
]


def _short(fn: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        if marker in fn:
            return fn.split(marker, 1)[1] if marker != "/lib/python3" else "stdlib" + fn.split(marker, 1)[1][4:]
    return fn


def _stats(path: Path):
    import pstats

    return pstats.Stats(str(path)).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}


def _find(stats: dict, suffix: str, func: str) -> tuple[float, float, int] | None:
    """(tottime, cumtime, calls) summed over matching entries (cumtime of the outermost calls)."""
    if suffix:  # a Python function: exact name in a file ending with suffix
        hit = [(v[2], v[3], v[1]) for (f, _l, fn), v in stats.items() if fn == func and f.endswith(suffix)]
    else:  # a builtin ("~" entries): a part of its name
        hit = [(v[2], v[3], v[1]) for (f, _l, fn), v in stats.items() if f == "~" and func in fn]
    if not hit:
        return None
    return sum(h[0] for h in hit), sum(h[1] for h in hit), sum(h[2] for h in hit)


def profile_report(stats: dict, stages, requests: int, top: int, what: str) -> list[str]:
    lines = []
    total_tt = sum(v[2] for v in stats.values())
    lines.append(f"  profiled time of this thread: {total_tt:.3f} s = {total_tt / requests * 1e6:.1f} us per request "
                 f"({what})")
    lines.append(f"  {'us/req self':>11} {'us/req cum':>10} {'calls/req':>9}  stage")
    for label, suffix, func in stages:
        f = _find(stats, suffix, func)
        if f is None:  # a stage that this tree's code does not have (the lists cover older trees too)
            continue
        tt, ct, nc = f
        lines.append(f"  {tt / requests * 1e6:11.1f} {ct / requests * 1e6:10.1f} {nc / requests:9.2f}  {label}")
    lines.append("")
    lines.append(f"  top {top} by self time:")
    lines.append(f"  {'us/req self':>11} {'us/req cum':>10} {'calls/req':>9}  function")
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (f, ln, fn), v in ranked:
        where = fn if f == "~" else f"{fn} ({_short(f)}:{ln})"
        lines.append(f"  {v[2] / requests * 1e6:11.1f} {v[3] / requests * 1e6:10.1f} {v[1] / requests:9.2f}  {where}")
    return lines


def _python_us(stats: dict, requests: int, minus: str | None = None) -> float:
    """Profiled time per request, less the self time of the builtin named `minus` (a wait)."""
    tt = sum(v[2] for v in stats.values())
    if minus:
        f = _find(stats, "", minus)
        tt -= f[0] if f else 0.0
    return tt / requests * 1e6


def _driver_line(r: dict) -> str:
    return (f"p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, {r['throughput_rps']:,.0f} req/s, server CPU "
            f"{r['server_cpu_us_per_req']:.0f} us/req (main/loop thread {r['server_main_cpu_us_per_req']:.0f}, "
            f"other threads {r['server_other_cpu_us_per_req']:.0f}), scheduled in "
            f"{r['server_switches_per_req']:.2f}x per request")


def profile_section(bench: Bench, repo: Path, mode: str, log) -> tuple[dict, list[str]]:
    """For each profile scenario: the floor and then tinyserve, each a fresh process under cProfile,
    the same requests from the same driver (no warm-up request: both servers warmed the model up
    before listening)."""
    wait = "<method 'get' of '_queue.SimpleQueue' objects>"
    results, text = {}, []
    for model, scen, count in PROFILE_RUNS[mode]:
        got = {}
        for srv in PROFILED:
            name = f"profiled-{srv}-{model}-{scen}"
            p, port = bench.start_server(srv, repo, name, profile=True)
            try:
                got[srv] = bench.drive(port, p.pid, served_model(srv, model, scen), scen, 0, count)
            finally:
                rc = p.stop()
                bench.procs.remove(p)
            if rc != 0:
                raise RuntimeError(f"the profiled {srv} server exited with {rc}:\n{p.log_path.read_text()[-3000:]}")
        fl = _stats(bench.work / f"profiled-floor-{model}-{scen}.loop.prof")
        lp = _stats(bench.work / f"profiled-tinyserve-{model}-{scen}.loop.prof")
        wk = _stats(bench.work / f"profiled-tinyserve-{model}-{scen}.worker-{model}.prof")
        py_floor = _python_us(fl, count)
        py_loop, py_worker = _python_us(lp, count), _python_us(wk, count, wait)
        results[f"{model}/{scen}"] = {"requests": count, "driver": got,
                                      "profiled_python_us_per_req": {"floor": py_floor, "tinyserve_loop": py_loop,
                                                                     "tinyserve_worker": py_worker}}
        text += [f"== {model}, {SCENARIO_TEXT[scen]}: {count} requests per server, under cProfile",
                 f"  floor:     {_driver_line(got['floor'])}",
                 f"  tinyserve: {_driver_line(got['tinyserve'])}",
                 f"  profiled Python time per request: floor {py_floor:.1f} us; tinyserve {py_loop + py_worker:.1f} us "
                 f"(loop thread {py_loop:.1f} + worker thread {py_worker:.1f}, its SimpleQueue.get wait excluded)",
                 "", "-- floor, event-loop thread (its only thread)"]
        text += profile_report(fl, FLOOR_STAGES, count, 15,
                               "the Python callbacks only: the profiler starts inside uvloop's run_forever, so "
                               "the loop's own C code and its epoll waits are not attributed")
        text += ["", "-- tinyserve, event-loop thread"]
        text += profile_report(lp, LOOP_STAGES, count, 25,
                               "the Python callbacks only, as for the floor")
        text += ["", f"-- tinyserve, worker thread of model {model!r}"]
        text += profile_report(wk, WORKER_STAGES, count, 25, "wall time, waits included")
        text.append("")
        log(f"profile {model} {scen}: done")
    return results, text


# ------------------------------------------------------------------------------------------------
# garbage collection while serving


def gc_section(bench: Bench, repo: Path, log) -> dict:
    """Both servers again, each with a gc.callbacks log (the tinyserve one through the instrumented
    launcher, no profiler), driven alternately with long pipelined runs: how many collections of
    each generation happen while serving, how long the full (generation 2) ones pause the process,
    and the slowest request of each run."""
    procs = {srv: bench.start_server(srv, repo, f"gc-{srv}", gc_log=True) for srv in PROFILED}
    runs: dict[str, list] = {srv: [] for srv in PROFILED}
    try:
        for model, n in GC_PROBE:
            for srv in PROFILED:
                p, port = procs[srv]
                r = bench.drive(port, p.pid, model, "pipe32", 0, n)
                runs[srv].append({"model": model, "requests": n, **{k: r[k] for k in (
                    "p50_us", "p99_us", "p999_us", "max_us", "throughput_rps", "server_cpu_us_per_req")}})
    finally:
        for srv, (p, _) in procs.items():
            p.stop()
            bench.procs.remove(p)
    log("gc probe: done")
    return {srv: {"runs": runs[srv], "gc": json.loads((bench.work / f"gc-{srv}.gc.json").read_text())}
            for srv in PROFILED}


def gc_rows(gcres: dict) -> list[dict]:
    rows = []
    work = ", ".join(f"{m} {n:,}" for m, n in GC_PROBE)
    sec = f"garbage collection while serving (gc.callbacks; 1 connection, 32 pipelined; per server: {work} requests)"
    for srv in PROFILED:
        g = gcres[srv]["gc"]
        sv = g["serving"]
        full = g["full_collections_serving"]
        pauses = ", ".join(f"{c['pause_ms']:.0f} ms ({c['thread']}, {c['collected']} collected)"
                           for c in full) or "none"
        slow = ", ".join(f"{r['model']} {r['max_us'] / 1e3:.1f} ms" for r in gcres[srv]["runs"])
        young_ms = sv["gen0"]["total_ms"] + sv["gen1"]["total_ms"]
        st = g["startup"]["gen2"]
        value = (f"full collections: {len(full)} [{pauses}]; gen0 {sv['gen0']['n']}, gen1 {sv['gen1']['n']} "
                 f"({young_ms:.0f} ms in all); slowest request: {slow}; start-up full collections {st['n']} "
                 f"(max {st['max_ms']:.0f} ms), {g['tracked_objects_at_exit']:,} tracked objects")
        rows.append({"section": sec, "figure": srv, "value": value, "target": "", "verdict": ""})
    return rows


# ------------------------------------------------------------------------------------------------
# --diagnose: where tinyserve's extra time per request goes (issue 14)


def handoff_timing(n: int) -> int:
    """The loop -> worker thread -> loop hand-off alone, in process, on one core (as the servers run):
    the loop puts a future on a queue.SimpleQueue, a worker thread takes it and resolves it with
    loop.call_soon_threadsafe, the loop awaits it (tinyserve's shape: SimpleQueue to the worker,
    call_soon_threadsafe back).  Baseline in the same run: the same future resolved by call_soon on
    the loop (no thread).  Wall and process CPU per round trip, median of 7 interleaved blocks."""
    import asyncio
    import queue
    import threading

    import uvloop

    async def main():
        loop = asyncio.get_running_loop()
        q: queue.SimpleQueue = queue.SimpleQueue()

        def worker():
            while True:
                fut = q.get()
                if fut is None:
                    return
                loop.call_soon_threadsafe(fut.set_result, None)

        t = threading.Thread(target=worker, daemon=True)
        t.start()

        async def via_thread(k):
            for _ in range(k):
                fut = loop.create_future()
                q.put(fut)
                await fut

        async def on_loop(k):
            for _ in range(k):
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                await fut

        res = {"thread hand-off (SimpleQueue + call_soon_threadsafe)": ([], []),
               "same future resolved on the loop (baseline)": ([], [])}
        fns = dict(zip(res, (via_thread, on_loop)))
        for f in fns.values():
            await f(500)
        for _ in range(7):
            for k, f in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                await f(n)
                res[k][0].append((time.perf_counter() - w0) / n * 1e6)
                res[k][1].append((time.process_time() - c0) / n * 1e6)
        q.put(None)
        t.join(5)
        return {k: {"wall_us": med_span(w), "cpu_us": med_span(c)} for k, (w, c) in res.items()}

    print(json.dumps(uvloop.run(main())), flush=True)
    return 0


DIAG_ROUNDS = 7
DIAG_COUNTS = (300, 3000)  # warm-up, measured requests per run (1 connection, 1 in flight)


def diagnose(args, log) -> int:
    """(a) model call, export program vs eager, in process; (b) the thread hand-off alone, in
    process; (c) cProfile of one c=1 run of the export floor and tinyserve (per stage); (d)
    statistics: tinyserve with and without --no-statistics; and the c=1 totals of the three servers
    and tinyserve without statistics, all interleaved per round.  Writes <out>/latency-hotpath-<date>.json
    and prints a summary (bench/results/hotpath-diagnosis.md is written from it by hand)."""
    cores = pick_cores()
    os.sched_setaffinity(0, {cores["driver"]})
    env = environment(args, cores)
    work = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    bench = Bench(args, cores, work, log)
    out: dict = {"env": env, "rounds": DIAG_ROUNDS, "counts": DIAG_COUNTS}
    me = str(Path(__file__).resolve())
    penv = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        repo = setup_repo(work)
        for what, flag in (("model_timing_us", "--model-timing"), ("handoff_us", "--handoff-timing")):
            r = subprocess.run(taskset(cores["server"], [py(), me, flag, "--repo", str(repo)]), cwd=ROOT,
                               capture_output=True, text=True, timeout=START_TIMEOUT_S, env=penv)
            if r.returncode != 0:
                raise RuntimeError(f"{flag} failed:\n{r.stderr[-3000:]}")
            out[what] = json.loads(r.stdout.strip().splitlines()[-1])
            log(f"{what}: done")
        bench.start_driver()
        servers = {kind: bench.start_server(kind, repo) for kind in SERVERS}
        p, port = bench.start_server("tinyserve", repo, "tinyserve-nostats", extra=["--no-statistics"])
        servers["tinyserve-nostats"] = (p, port)
        log("servers started")
        records = []
        for rnd in range(DIAG_ROUNDS):
            for model in MODELS:
                for srv, (p, port) in servers.items():
                    r = bench.drive(port, p.pid, model, "c1", *DIAG_COUNTS)
                    records.append({"round": rnd, "model": model, "server": srv,
                                    **{k: r[k] for k in ("p50_us", "p99_us", "throughput_rps", "server_cpu_us_per_req",
                                                         "server_main_cpu_us_per_req", "server_other_cpu_us_per_req",
                                                         "server_switches_per_req", "driver_runq_wait",
                                                         "server_runq_wait_us_per_req")}})
            log(f"round {rnd + 1}")
        for p, _ in servers.values():
            p.stop()
            bench.procs.remove(p)
        out["records"] = records
        summ = {}
        for model in MODELS:
            rs = [r for r in records if r["model"] == model]
            by = {srv: {r["round"]: r for r in rs if r["server"] == srv} for srv in servers}
            m = summ[model] = {srv: {f: med_span([r[f] for r in by[srv].values()])
                                     for f in ("p50_us", "server_cpu_us_per_req", "server_main_cpu_us_per_req",
                                               "server_other_cpu_us_per_req", "server_switches_per_req")}
                               for srv in servers}
            for a, b in (("tinyserve", "eager"), ("tinyserve", "floor"), ("floor", "eager"),
                         ("tinyserve", "tinyserve-nostats")):
                m[f"{a} - {b}"] = {f: med_span([by[a][k][f] - by[b][k][f] for k in range(DIAG_ROUNDS)])
                                   for f in ("p50_us", "server_cpu_us_per_req")}
                m[f"{a} / {b}"] = {f: med_span([by[a][k][f] / by[b][k][f] for k in range(DIAG_ROUNDS)])
                                   for f in ("p50_us", "server_cpu_us_per_req")}
        out["summary"] = summ
        log("c=1 rounds: done")
        if not args.no_profile:
            out["profile"], text = profile_section(bench, repo, "quick", log)
            out["profile_text"] = text
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"latency-hotpath-{env['date'][:10]}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    print(json.dumps({"model_timing_us": out["model_timing_us"], "handoff_us": out["handoff_us"]}, indent=1))
    for model, m in out["summary"].items():
        print(f"== {model}, c=1")
        for k, v in m.items():
            print(f"  {k:32} " + ", ".join(f"{f} {x['median']:.2f} [{x['min']:.2f}..{x['max']:.2f}]"
                                            for f, x in v.items()))
    if out.get("profile_text"):
        print("\n".join(out["profile_text"]))
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per run, one profile run (< 2 min)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 7, --quick 5; at least 5 for a verdict)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    ap.add_argument("--no-gc", action="store_true", help="skip the garbage-collection probe")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (repository, logs, .prof files)")
    ap.add_argument("--render", metavar="JSON", help="only rebuild the table and markdown from a results JSON")
    ap.add_argument("--diagnose", action="store_true",
                    help="where tinyserve's extra time per request goes: model call, hand-off, statistics, profile")
    ap.add_argument("--eager-floor-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--handoff-timing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--instrumented-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gc-log", help=argparse.SUPPRESS)
    ap.add_argument("--model-timing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--prof-prefix", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.eager_floor_server:
        return eager_floor_server(args.host)
    if args.handoff_timing:
        return handoff_timing(20000)
    if args.floor_server:
        return floor_server(args.repo, args.models.split(","), args.host, args.gc_log, args.prof_prefix)
    if args.instrumented_server:
        return instrumented_server(args.repo, args.models.split(","), args.host, args.prof_prefix, args.gc_log)
    if args.model_timing:
        return model_timing(args.repo, args.models.split(","), 1000)

    if args.render:  # the measurements stay as they are; summary, rows and markdown are rebuilt
        d = json.loads(Path(args.render).read_text())
        d["results"]["summary"] = summarize(d["results"]["records"])
        report(d["env"], d["results"], Path(args.out), None)
        return 0
    args.mode = "quick" if args.quick else "full"
    args.rounds = args.rounds or (5 if args.quick else 7)
    if args.diagnose:
        t0 = time.perf_counter()
        return diagnose(args, lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    cores = pick_cores()
    os.sched_setaffinity(0, {cores["driver"]})  # this process stays off the servers' core too
    env = environment(args, cores)
    print(header_text(env), flush=True)
    if args.rounds < 5:
        log(f"WARNING: {args.rounds} rounds; the method asks for at least 5")
    phases: dict[str, dict] = {}
    phase = phase_timer(phases, log)

    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    bench = Bench(args, cores, work, log)
    res: dict = {"phases": phases, "records": [], "rejected": []}
    profile_text: list[str] = []
    prev_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM -> finally below
    try:
        repo = setup_repo(work)
        phase("setup: pack mlp + identity")
        mt = subprocess.run(taskset(cores["server"], [py(), str(Path(__file__).resolve()), "--model-timing",
                                                      "--repo", str(repo)]),
                            cwd=ROOT, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if mt.returncode != 0:
            raise RuntimeError(f"model timing failed:\n{mt.stderr[-3000:]}")
        res["model_timing_us"] = json.loads(mt.stdout.strip().splitlines()[-1])
        phase("model timing (in process)")
        bench.start_driver()
        servers = {kind: bench.start_server(kind, repo) for kind in SERVERS}
        res["servers"] = {k: {"pid": p.pid, "port": port, "argv": p.argv} for k, (p, port) in servers.items()}
        phase("start driver and servers")
        for rnd in range(args.rounds):
            for model in MODELS:
                for scen in SCENARIOS:
                    if model not in scenario_models(scen):
                        continue
                    warm, count = COUNTS[args.mode][scen]
                    for attempt in range(1, MAX_ATTEMPTS + 1):
                        pair = []
                        for srv in SERVERS:
                            p, port = servers[srv]
                            r = bench.drive(port, p.pid, served_model(srv, model, scen), scen, warm, count)
                            r.update(round=rnd, model=model, scenario=scen, server=srv, loadavg=loadavg(),
                                     attempt=attempt)
                            r["disturbance"] = disturbance(r)
                            pair.append(r)
                        bad = any(r["disturbance"] > DISTURBED for r in pair)
                        for r in pair:
                            r["disturbed"] = bad
                        if not bad or attempt == MAX_ATTEMPTS:
                            res["records"] += pair
                            break
                        res["rejected"].append(pair)
            phase(f"round {rnd + 1}")
        codes = {}
        for srv in SERVERS:
            p, _ = servers[srv]
            codes[srv] = p.stop()
            bench.procs.remove(p)
        res["exit_codes"] = codes
        phase("stop servers (SIGTERM)")
        if not args.no_gc:
            res["gc"] = gc_section(bench, repo, log)
            phase("gc probe (gc.callbacks)")
        if not args.no_profile:
            res["profile"], profile_text = profile_section(bench, repo, args.mode, log)
            phase("profile (cProfile)")
    finally:
        res.setdefault("exit_codes", {}).update(bench.stop_all())
        signal.signal(signal.SIGTERM, prev_term)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    env["machine"]["loadavg_end"] = loadavg()
    res["summary"] = summarize(res["records"])
    res["wall_s"] = time.perf_counter() - t_start
    res["command"] = command_line(ROOT, "bench/bench_latency.py", argv)
    report(env, res, Path(args.out), profile_text)
    return 0


def report(env: dict, res: dict, out: Path, profile_text: list[str] | None) -> None:
    """The table on stdout; JSON, markdown (and the profile text when given) under `out`."""
    rows = build_rows(res["summary"], res.get("model_timing_us", {}), res["records"], len(res["rejected"]))
    if "gc" in res:
        rows += gc_rows(res["gc"])
    text = render_text(header_text(env), rows)
    print()
    print(text)
    print(f"\nwall time {res['wall_s']:.1f} s; load avg at end {' '.join(env['machine']['loadavg_end'])}; "
          f"server exit codes {res['exit_codes']}")
    out.mkdir(parents=True, exist_ok=True)
    day = env["date"][:10]
    sfx = "-quick" if env["mode"] == "quick" else ""
    jpath = out / f"latency-{day}{sfx}.json"
    ppath = out / f"latency-profile{sfx}.txt"
    jpath.write_text(json.dumps({"env": env, "targets": TARGETS, "results": res, "rows": rows}, indent=1) + "\n")
    (out / "latency-latest.md").write_text(render_md(env, rows, res, ppath.name))
    written = [jpath, out / "latency-latest.md"]
    if profile_text:
        head = [header_text(env), "",
                "Where the time per request goes in the tinyserve server, next to the floor: cProfile "
                "(deterministic; its own overhead inflates Python-heavy code, roughly 1.5-2x, so compare "
                "the two servers' profiles with each other, not with the unprofiled figures). Fresh server "
                "processes, the same driver and requests. The floor has one profiler (its only thread); "
                "tinyserve one on the event-loop thread (enabled once the server listens) and one on the "
                "model's worker thread (enabled after the warm-up). Times are per thread, divided by the "
                "requests served. Loop-thread profiles start inside uvloop's run_forever, so they hold the "
                "Python callbacks only (uvloop's own C code and its epoll waits are not attributed); "
                "transport.writelines (uvloop, Cython, invisible to cProfile) shows as the self time of its "
                "caller (floor: data_received; tinyserve: Connection._flush), and call_soon_threadsafe as "
                "the self time of Completions._wake. The worker profile is wall time: its waiting shows as "
                "the self time of SimpleQueue.get. Server and load generator pinned to different cores; "
                "tinyserve's loop and worker threads share the server's one core.", ""]
        ppath.write_text("\n".join(head + profile_text) + "\n")
        written.append(ppath)
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    sys.exit(main())
