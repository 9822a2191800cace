#!/usr/bin/env python3
"""tinyserve against Triton Inference Server itself, side by side, over the Open Inference Protocol
(KServe v2): the same MLP, the same weights, the same cores, the same C/C++ load generators, one run.

    .venv/bin/python bench/bench_oip.py --quick          # 1 round, 2 s points (about 2 min after setup)
    .venv/bin/python bench/bench_oip.py                  # 3 interleaved rounds, 4 s points (about 5 min)
    .venv/bin/python bench/bench_oip.py --profile        # cProfile of tinyserve at c=1, HTTP and gRPC
    .venv/bin/python bench/bench_oip.py --baseline REV   # also tinyserve at git revision REV, same run

Setup (once, cached under --work, default /tmp/tinyserve-bench-oip): a separate virtualenv for Triton
(`python3 -m venv`; pip installs nvidia-pytriton 0.7.0, whose wheel bundles the real `tritonserver`
binary and its python backend, tritonclient 2.51.0, whose wheel carries the `perf_analyzer` binary,
the PyPI `perf-analyzer` package (an empty placeholder, installed and recorded as asked), torch 2.13.0
and numpy).  Nothing is installed into tinyserve's own .venv.  The load generators `wrk` (HTTP/JSON)
and `h2load` (nghttp2: HTTP/2, here carrying gRPC) come from Debian (`apt-get install -y wrk
nghttp2-client`, run by the setup when they are missing and this process is root).

Servers: Triton serves a plain python-backend model repository (bench/peers/triton/: model.py runs
the MLP, one torch thread, inference mode; model `mlp` without batching, `mlp_b` with dynamic
batching, max 32 rows, 2 ms); tinyserve serves the MLP packed with tinyserve.pack.pack (`mlp`, and
`mlp_b` with batching {max_batch_size 32, max_queue_delay_us 2000}) through
`tinyserve.server.run(ServerConfig(http_port=..., grpc_port=..., torch_threads=1))`.  Both are
pinned with taskset to the first usable core, every load generator to the second.

Points: for each round, for each protocol (HTTP/JSON by wrk, gRPC by h2load), for each scenario
(c=1 unbatched, c=32 unbatched, c=32 batched: c connections, 1 request in flight each), each
system in turn: a warm-up run, then the measured run.  One row [1, 64] float32 per request.  gRPC
requests are real `inference.GRPCInferenceService/ModelInfer` calls (a serialized ModelInferRequest
with raw_input_contents in a gRPC length-prefixed message, content-type application/grpc); h2load
counts HTTP/2 responses but not grpc-status trailers, so every point is also checked against the
server's own statistics (`GET /v2/models/M/stats`: success count delta = the generator's count).
perf_analyzer (gRPC and HTTP, binary tensors) is run against both servers in the first round, the
same points for each, as a cross-check of the generators: it reads each server's model
configuration (`GET /v2/models/M/config`, gRPC `ModelConfig`) and statistics, then measures
(at most 3 trials; stability check loosened to --stability-percentage 1000, since on a shared machine
the default refuses most points); its ratios are printed beside the wrk / h2load ones.

--baseline REV serves a third system, `baseline`: tinyserve's source tree at REV (`git archive` into
the work directory, with this checkout's built native extension, which REV's tinyserve/_native and
csrc must match), measured in the same rounds and interleaved orders; the ratios tinyserve / baseline
are printed beside those against Triton.

Figures: p50/p99 from the generator's per-request latencies, req/s = requests / measured seconds,
server CPU per request = CPU time of the server's process tree (/proc, Triton's python-backend stub
included) over the measured run / requests.  A point is *disturbed* when other processes took more
than 10% of the servers' core during it (that core's busy + steal time, less both servers' CPU).
Results: medians over rounds; ratios tinyserve / Triton on the same protocol and client, medians of
the per-round ratios.  Written to bench/results/oip-<date>.json and oip-latest.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _common import command_line, loadavg, machine, write_atomic  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 180.0
TRITON_PINS = {"nvidia-pytriton": "0.7.0", "tritonclient": "2.51.0", "torch": "2.13.0"}
SCENARIOS = (("c1", 1), ("c32", 32), ("c32b", 32))  # c32b: the batched models
PROTOCOLS = ("http", "grpc")
SYSTEMS = ("tinyserve", "triton")
CLIENT = {"http": "wrk (HTTP/1.1 JSON)", "grpc": "h2load (gRPC over HTTP/2)"}
BATCHING = {"max_batch_size": 32, "max_queue_delay_us": 2000}
# perf_analyzer's points (protocol, concurrency, model), each against both servers in the first round
PA_POINTS = (("http", 1, "mlp"), ("grpc", 1, "mlp"), ("http", 32, "mlp"), ("grpc", 32, "mlp"),
             ("http", 32, "mlp_b"), ("grpc", 32, "mlp_b"))
SETUP_VERSION = 1


def log(msg: str) -> None:
    print(f"[oip {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_of(scenario: str) -> str:
    return "mlp_b" if scenario.endswith("b") else "mlp"


# ---------------------------------------------------------------- /proc readings

def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of pid and every descendant still alive."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(d))
        stats[int(d)] = (int(rest[11]) + int(rest[12])) / CLK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


def thread_cpu_s(pid: int) -> dict:
    """CPU seconds per thread of one process, keyed by 'name/tid' (/proc/pid/task/*/stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2:].split()
        label = "main (event loop)" if int(tid) == pid else name
        out[f"{label}/{tid}"] = (int(rest[11]) + int(rest[12])) / CLK
    return out


def core_busy_s(core: int) -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK
    return 0.0


# ---------------------------------------------------------------- setup

def run_cmd(cmd: list, **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def setup(work: Path) -> dict:
    """The Triton virtualenv, the tools, and the facts about them (cached in work/setup.json)."""
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "setup.json"
    venv = work / "venv"
    for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            if os.geteuid() != 0:
                raise RuntimeError(f"{tool} is missing: apt-get install -y {pkg}")
            log(f"installing {pkg} from Debian")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            run_cmd(["apt-get", "install", "-y", "-qq", pkg])
    if stamp.exists():
        facts = json.loads(stamp.read_text())
        if facts.get("setup_version") == SETUP_VERSION and (venv / "bin" / "python").exists():
            return facts
    t0 = time.perf_counter()
    if not (venv / "bin" / "python").exists():
        log(f"creating {venv}")
        run_cmd(["python3", "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    log("pip install nvidia-pytriton, tritonclient, perf-analyzer, torch, numpy into the Triton venv")
    run_cmd(pip + [f"{k}=={v}" for k, v in TRITON_PINS.items()] + ["perf-analyzer", "numpy<2"], timeout=1200)
    py = str(venv / "bin" / "python")
    info = json.loads(run_cmd([py, "-c", (
        "import json, sys, sysconfig, importlib.metadata as m, pathlib, pytriton\n"
        "v = {d: m.version(d) for d in ('nvidia-pytriton', 'tritonclient', 'perf-analyzer', 'torch', 'numpy', 'protobuf')}\n"
        "print(json.dumps({'versions': v, 'python': sys.version.split()[0], 'libdir': sysconfig.get_config_var('LIBDIR'),\n"
        "  'site': sysconfig.get_paths()['purelib'], 'pytriton': str(pathlib.Path(pytriton.__file__).parent)}))")]))
    pt = Path(info["pytriton"])
    server = pt / "tritonserver" / "bin" / "tritonserver"
    backends = pt / "tritonserver" / "backends"
    libs = Path(info["site"]) / "nvidia_pytriton.libs"
    pyver = ".".join(info["python"].split(".")[:2])
    stub = pt / "tritonserver" / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"the pytriton wheel has no python-backend stub for Python {pyver} ({stub})")
    # the python backend runs backends/python/triton_python_backend_stub: the one built for our Python
    # (the same directory depth, so the stub's relative rpath to nvidia_pytriton.libs still holds)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    # perf_analyzer (from the tritonclient wheel) links libcudart.so.12 and libb64.so.0d by their plain
    # names; the pytriton wheel carries both under hashed names
    palib = work / "palib"
    palib.mkdir(exist_ok=True)
    for want, prefix in (("libb64.so.0d", "libb64-"), ("libcudart.so.12", "libcudart-")):
        found = sorted(libs.glob(prefix + "*"))
        if not found:
            raise RuntimeError(f"{want}: no {prefix}* in {libs}")
        link = palib / want
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    facts = {"setup_version": SETUP_VERSION, **info, "tritonserver": str(server), "backends": str(backends),
             "libs": str(libs), "palib": str(palib), "perf_analyzer": str(venv / "bin" / "perf_analyzer"),
             "setup_s": round(time.perf_counter() - t0, 1)}
    # the facts that decide whether the binaries run here
    missing = [line.strip() for exe in (server, stub) for line in
               run_cmd(["ldd", str(exe)], env={**os.environ, "LD_LIBRARY_PATH": f"{info['libdir']}:{libs}"}).splitlines()
               if "not found" in line]
    if missing:
        raise RuntimeError("tritonserver / its python stub need libraries this machine lacks: " + "; ".join(missing))
    write_atomic(stamp, json.dumps(facts, indent=1))
    return facts


def tool_versions(facts: dict) -> dict:
    out = dict(facts["versions"])
    out["wrk"] = (subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].removeprefix("wrk ")
                  .split(" [")[0].strip())
    out["h2load"] = run_cmd(["h2load", "--version"]).split("\n")[0].strip()
    env = {**os.environ, "LD_LIBRARY_PATH": facts["palib"]}
    r = subprocess.run([facts["tritonserver"], "--help"], capture_output=True, text=True,
                       env={**os.environ, "LD_LIBRARY_PATH": f"{facts['libdir']}:{facts['libs']}"})
    out["tritonserver_runs"] = r.returncode in (0, 1)
    r = subprocess.run([facts["perf_analyzer"], "--version"], capture_output=True, text=True, env=env)
    out["perf_analyzer"] = (r.stdout + r.stderr).strip().splitlines()[-1] if (r.stdout + r.stderr).strip() else "?"
    return out


# ---------------------------------------------------------------- model repositories

def reference(work: Path):
    """The MLP's state dict (saved for Triton), one request row, and the module's answer to it."""
    import torch

    from tinyserve.examples import mlp

    torch.set_num_threads(1)
    module, _ = mlp()
    torch.save(module.state_dict(), work / "mlp.pt")
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 64, generator=g)
    with torch.inference_mode():
        want = module(row).numpy().copy()
    return row.numpy().copy(), want


def triton_repo(work: Path, facts: dict) -> Path:
    repo = work / "triton-repo"
    shutil.rmtree(repo, ignore_errors=True)
    template = (HERE / "peers" / "triton" / "config.pbtxt.in").read_text()
    template = "\n".join(line for line in template.splitlines() if not line.startswith("#")) + "\n"
    for name, batched in (("mlp", False), ("mlp_b", True)):
        (repo / name / "1").mkdir(parents=True)
        shutil.copy2(HERE / "peers" / "triton" / "model.py", repo / name / "1" / "model.py")
        shutil.copy2(work / "mlp.pt", repo / name / "1" / "mlp.pt")
        cfg = (template.replace("@NAME@", name).replace("@MAX_BATCH@", "32" if batched else "0")
               .replace("@DIMS_X@", "64" if batched else "-1, 64").replace("@DIMS_Y@", "10" if batched else "-1, 10")
               .replace("@BATCHING@", f"dynamic_batching {{ max_queue_delay_microseconds: {BATCHING['max_queue_delay_us']} }}"
                        if batched else ""))
        (repo / name / "config.pbtxt").write_text(cfg)
    return repo


def baseline_tree(work: Path, rev: str) -> tuple[Path, str]:
    """tinyserve's sources at git revision `rev` under work/, with this checkout's native extension."""
    full = run_cmd(["git", "-C", str(ROOT), "rev-parse", "--verify", rev + "^{commit}"]).strip()
    native = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", full, "--", "tinyserve/_native", "csrc"])
    if native.returncode != 0:
        raise SystemExit(f"--baseline {rev}: its tinyserve/_native or csrc differ from this checkout's, whose "
                         "built extension the baseline would use")
    dest = work / f"baseline-{full[:12]}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", full], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for so in (ROOT / "tinyserve" / "_native").glob("*.so"):
        shutil.copy2(so, dest / "tinyserve" / "_native" / so.name)
    return dest, full[:12]


def tinyserve_repo(work: Path) -> Path:
    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    repo = work / "ts-repo"
    shutil.rmtree(repo, ignore_errors=True)
    r = Repository(repo, create=True)
    pack(r, "mlp", "tinyserve.examples:mlp")
    pack(r, "mlp_b", "tinyserve.examples:mlp", config={"batching": BATCHING})
    return repo


# ---------------------------------------------------------------- servers

LAUNCHER = r"""
import cProfile, json, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from tinyserve.server import ServerConfig, run
repo, prof_path = sys.argv[2], sys.argv[3]
cfg = ServerConfig(repo=repo, models=("mlp", "mlp_b"), torch_threads=1, http_port=0, grpc_port=0)
def ready(s):
    print("READY " + json.dumps({"tcp": s.port, "http": s.http_port, "grpc": s.grpc_port}), flush=True)
profs, marks = [], []
def _key(code):
    if isinstance(code, str):
        return code
    return f"{code.co_filename}:{code.co_firstlineno}({code.co_name})"
def _snapshot():  # {thread: {function: [calls, own seconds, cumulative seconds]}} of every profiler
    out = {}
    for name, p in profs:
        d = out.setdefault(name, {})
        for e in p.getstats():
            v = d.setdefault(_key(e.code), [0, 0.0, 0.0])
            v[0] += e.callcount; v[1] += e.inlinetime; v[2] += e.totaltime
    return out
def _mark(signum, frame):  # SIGUSR1: start of the measured window; SIGUSR2: its end, written out
    marks.append(_snapshot())
    if signum == signal.SIGUSR2:
        a, b = marks[0], marks[-1]
        diff = {t: {k: [v[0] - a.get(t, {}).get(k, [0, 0, 0])[0], v[1] - a.get(t, {}).get(k, [0, 0, 0])[1],
                        v[2] - a.get(t, {}).get(k, [0, 0, 0])[2]] for k, v in fs.items()} for t, fs in b.items()}
        with open(prof_path + ".json.tmp", "w") as f:
            json.dump(diff, f)
        import os; os.replace(prof_path + ".json.tmp", prof_path + ".json")
if prof_path:
    def _hook(frame, event, arg):  # one profiler per thread started from now on (model workers)
        sys.setprofile(None)
        p = cProfile.Profile(time.thread_time); profs.append((threading.current_thread().name, p)); p.enable()
    threading.setprofile(_hook)
    signal.signal(signal.SIGUSR1, _mark)
    signal.signal(signal.SIGUSR2, _mark)
    main = cProfile.Profile(time.thread_time); profs.append(("loop", main)); main.enable()
run(cfg, on_ready=ready)
"""


class Proc:
    """A server in its own session; stopped by its process group id (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: list, log_path: Path, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **(env or {})}, cwd=cwd)

    def tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-30:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        else:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def http_json(url: str, body: bytes | None = None, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def wait_ready(proc: Proc, http_port: int, models) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            break
        try:
            for m in models:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{m}/ready", timeout=2).read()
            return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"{proc.name} was not ready within {START_TIMEOUT_S:.0f} s ({last!r}):\n{proc.tail()}")


def start_tinyserve(work: Path, repo: Path, core: int, profile: str = "", root: Path = ROOT,
                    name: str = "tinyserve") -> dict:
    proc = Proc(name, ["taskset", "-c", str(core), sys.executable, "-c", LAUNCHER, str(root), str(repo), profile],
                work / f"{name}.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.p.poll() is None:
        text = proc.log_path.read_text()
        if "READY " in text:
            ports = json.loads(text.split("READY ", 1)[1].split("\n", 1)[0])
            wait_ready(proc, ports["http"], ("mlp", "mlp_b"))
            return {"proc": proc, **ports}
        time.sleep(0.2)
    raise RuntimeError(f"tinyserve did not start:\n{proc.tail()}")


def start_triton(work: Path, facts: dict, repo: Path, core: int) -> dict:
    http, grpc = free_port(), free_port()
    # The python-backend stub embeds an isolated interpreter (PYTHONPATH is ignored) that finds its
    # prefix from the first `python3` on PATH: the Triton venv's bin/ first makes it run in that venv
    # (its torch and its numpy < 2; the stub built against numpy 1.x, fed the machine's numpy 2.x,
    # sends every output tensor with a byte size of 0).  Its libpython: the interpreter's LIBDIR.
    env = {"LD_LIBRARY_PATH": f"{facts['libdir']}:{facts['libs']}", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(facts['perf_analyzer']).parent}:{os.environ.get('PATH', '')}"}
    cmd = ["taskset", "-c", str(core), facts["tritonserver"], f"--model-repository={repo}",
           f"--backend-directory={facts['backends']}", f"--http-port={http}", f"--grpc-port={grpc}",
           "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false", "--log-verbose=0",
           "--exit-on-error=true"]
    proc = Proc("triton", cmd, work / "triton.log", env=env, cwd=work)
    wait_ready(proc, http, ("mlp", "mlp_b"))
    return {"proc": proc, "http": http, "grpc": grpc}


# ---------------------------------------------------------------- requests and answers

def json_body(model: str, row) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                   "data": [float(v) for v in row.ravel()]}]}).encode()


def grpc_body(model: str, row) -> bytes:
    """One gRPC message: compressed flag 0, 4-byte big-endian length, a serialized ModelInferRequest."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add()
    t.name, t.datatype = "x", "FP32"
    t.shape.extend([1, 64])
    req.raw_input_contents.append(row.astype("<f4").tobytes())
    msg = req.SerializeToString()
    return struct.pack(">BI", 0, len(msg)) + msg


def check_answers(servers: dict, row, want) -> dict:
    """Each system's answer to one row over HTTP/JSON and gRPC, against the module run here."""
    import numpy as np
    import tritonclient.grpc as gc

    out = {}
    for system, s in servers.items():
        for model in ("mlp", "mlp_b"):
            r = http_json(f"http://127.0.0.1:{s['http']}/v2/models/{model}/infer", json_body(model, row))
            got_http = np.asarray(r["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
            cli = gc.InferenceServerClient(f"127.0.0.1:{s['grpc']}")
            inp = gc.InferInput("x", [1, 64], "FP32")
            inp.set_data_from_numpy(row)
            got_grpc = cli.infer(model, [inp]).as_numpy("output0")
            cli.close()
            for proto, got in (("http", got_http), ("grpc", got_grpc)):
                out[f"{system}/{model}/{proto}"] = {
                    "bit_identical": bool(np.array_equal(got.view(np.uint32), want.view(np.uint32))),
                    "max_abs_diff": float(np.max(np.abs(got - want)))}
    return out


def model_success(http_port: int, model: str) -> int:
    r = http_json(f"http://127.0.0.1:{http_port}/v2/models/{model}/stats")
    return sum(int(m["inference_stats"]["success"]["count"]) for m in r["model_stats"])


# ---------------------------------------------------------------- load generators

WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("@BODY@", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, '
    .. '"max_us": %d, "socket_errors": %d, "non2xx": %d}\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def run_wrk(gen_core: int, url: str, c: int, seconds: float, lua: Path) -> dict:
    out = run_cmd(["taskset", "-c", str(gen_core), "wrk", "-t1", f"-c{c}", f"-d{max(1, round(seconds))}s",
                   "--timeout", "10s", "-s", str(lua), url], timeout=seconds + 60)
    r = json.loads(out.split("WRKJSON ", 1)[1].split("\n", 1)[0])
    dur = r["duration_us"] / 1e6
    return {"requests": r["requests"], "seconds": dur, "rps": r["requests"] / dur, "p50_ms": r["p50_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "mean_ms": r["mean_us"] / 1e3, "max_ms": r["max_us"] / 1e3,
            "errors": r["socket_errors"] + r["non2xx"]}


def run_h2load(gen_core: int, url: str, c: int, seconds: float, body: Path, logf: Path) -> dict:
    logf.unlink(missing_ok=True)
    out = run_cmd(["taskset", "-c", str(gen_core), "h2load", "-t1", f"-c{c}", "-m1", f"-D{max(1, round(seconds))}",
                   "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                   f"--log-file={logf}", url], timeout=seconds + 60)
    fields = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("requests:"):
            for part in line[len("requests:"):].split(","):
                n, what = part.split()
                fields[what] = int(n)
        elif line.startswith("finished in"):
            fields["seconds"] = float(line.split()[2].rstrip("s,"))
    lat = sorted(int(ln.split("\t")[2]) for ln in logf.read_text().splitlines()
                 if ln.count("\t") >= 2 and ln.split("\t")[1] == "200")
    if not lat:
        raise RuntimeError(f"h2load got no 200 responses from {url}:\n{out[-2000:]}")

    def pct(q):
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] / 1e3

    done = fields.get("succeeded", len(lat))
    return {"requests": done, "seconds": fields["seconds"], "rps": done / fields["seconds"], "p50_ms": pct(50),
            "p99_ms": pct(99), "mean_ms": sum(lat) / len(lat) / 1e3, "max_ms": lat[-1] / 1e3,
            "errors": fields.get("failed", 0) + fields.get("errored", 0) + fields.get("timeout", 0)}


def run_perf_analyzer(facts: dict, gen_core: int, proto: str, port: int, model: str, c: int, csv: Path,
                      interval_ms: int) -> dict:
    csv.unlink(missing_ok=True)
    cmd = ["taskset", "-c", str(gen_core), facts["perf_analyzer"], "-m", model, "-u", f"127.0.0.1:{port}", "-i", proto,
           "--shape", "x:1,64", "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(interval_ms),
           "--max-trials", "3", "--stability-percentage", "1000", "-f", str(csv)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LD_LIBRARY_PATH": facts["palib"]})
    if r.returncode != 0 or not csv.exists():
        return {"error": (r.stdout + r.stderr).strip()[-600:]}
    head, vals = csv.read_text().splitlines()[:2]
    row = dict(zip(head.split(","), vals.split(",")))
    return {"rps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3, "client_send_recv_us": float(row.get("Client Send", 0) or 0)
            + float(row.get("Client Recv", 0) or 0)}


# ---------------------------------------------------------------- the run

def measure(system, s, proto, scen, c, servers, cores, files, seconds, warm_s) -> dict:
    model = model_of(scen)
    if proto == "http":
        url = f"http://127.0.0.1:{s['http']}/v2/models/{model}/infer"
        gen = lambda secs: run_wrk(cores[1], url, c, secs, files[("lua", model)])  # noqa: E731
    else:
        url = f"http://127.0.0.1:{s['grpc']}/inference.GRPCInferenceService/ModelInfer"
        gen = lambda secs: run_h2load(cores[1], url, c, secs, files[("grpc", model)], files["h2log"])  # noqa: E731
    gen(warm_s)
    ok0 = model_success(s["http"], model)
    cpu0 = {k: tree_cpu_s(v["proc"].p.pid) for k, v in servers.items()}
    busy0, t0 = core_busy_s(cores[0]), time.perf_counter()
    r = gen(seconds)
    wall = time.perf_counter() - t0
    busy = core_busy_s(cores[0]) - busy0
    cpu = {k: tree_cpu_s(v["proc"].p.pid) - cpu0[k] for k, v in servers.items()}
    ok = model_success(s["http"], model) - ok0
    other = max(0.0, busy - sum(cpu.values())) / wall
    r.update({"system": system, "protocol": proto, "scenario": scen, "c": c, "model": model,
              "server_cpu_s": round(cpu[system], 4), "server_cpu_us_per_req": cpu[system] / max(1, r["requests"]) * 1e6,
              "server_cores": cpu[system] / wall, "other_load_on_server_core": round(other, 3),
              "disturbed": other > 0.10, "server_success_delta": ok,
              # the server's count may exceed the generator's by up to c requests still in flight when the
              # warm-up run ended (finished after the first reading) and c when the measured run ended
              "answers_confirmed": r["requests"] <= ok <= r["requests"] + 2 * c and r["errors"] == 0,
              "loadavg": loadavg()})
    return r


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(points: list[dict], rounds: int, systems=SYSTEMS, versus: str = "triton") -> tuple[list[dict], list[dict]]:
    """Rows per system and point; ratios tinyserve / `versus` (medians of per-round ratios)."""
    rows, ratios = [], []
    for proto in PROTOCOLS:
        for scen, c in SCENARIOS:
            per = {sy: [p for p in points if p["system"] == sy and p["protocol"] == proto and p["scenario"] == scen]
                   for sy in systems}
            for sy in systems:
                ps = per[sy]
                if not ps:
                    continue
                rows.append({"system": sy, "protocol": proto, "client": CLIENT[proto], "scenario": scen, "c": c,
                             "batching": "32, 2 ms" if scen.endswith("b") else "off",
                             **{k: med([p[k] for p in ps]) for k in ("p50_ms", "p99_ms", "rps", "server_cpu_us_per_req")},
                             "rounds": len(ps), "disturbed": sum(p["disturbed"] for p in ps),
                             "answers_confirmed": all(p["answers_confirmed"] for p in ps)})
            by_round = {}
            for sy in systems:
                for p in per[sy]:
                    by_round.setdefault(p["round"], {})[sy] = p
            rr = [v for v in by_round.values() if "tinyserve" in v and versus in v]
            if rr:
                ratios.append({"protocol": proto, "scenario": scen, "c": c,
                               **{f"{k}_ratio": med([v["tinyserve"][k] / v[versus][k] for v in rr])
                                  for k in ("p50_ms", "p99_ms", "rps", "server_cpu_us_per_req")},
                               "rounds": len(rr)})
    return rows, ratios


def targets(ratios: list[dict]) -> list[dict]:
    out = []
    for r in ratios:
        if r["scenario"] == "c1":
            out.append({"target": f"{r['protocol']} p50 at c=1 <= 0.7x Triton's", "value": r["p50_ms_ratio"],
                        "pass": r["p50_ms_ratio"] <= 0.7})
        else:
            out.append({"target": f"{r['protocol']} req/s at c=32 {'batched' if r['scenario'].endswith('b') else 'unbatched'}"
                                  " >= 1.5x Triton's", "value": r["rps_ratio"], "pass": r["rps_ratio"] >= 1.5})
    return out


def git_commit() -> str:
    try:
        h = run_cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run_cmd(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "tinyserve"]).strip()
        return h + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def fmt(v, nd=2):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def render(res: dict) -> str:
    m = res["machine"]
    L = [f"# tinyserve vs Triton over the Open Inference Protocol ({res['date']})", "",
         f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; kernel {m['kernel']}. "
         f"Commit {res['commit']}. Load average at start {' '.join(m['loadavg_start'])}, at end "
         f"{' '.join(res['loadavg_end'])} (other sessions share the 2 cores). Wall time {res['wall_s']:.0f} s. "
         f"Command: `{res['command']}`.", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
         f"Servers pinned to core {res['cores'][0]}, load generators to core {res['cores'][1]}; {res['rounds']} "
         f"interleaved round(s), {res['seconds']:.0f} s per measured run after a {res['warm_s']:.1f} s warm-up; "
         "one float32 row [1, 64] per request, c connections x 1 in flight. Figures: medians over rounds; "
         "server CPU = the server's process tree (Triton's python-backend stub included) over the measured run.", "",
         "| system | protocol (client) | c | batching | p50 ms | p99 ms | req/s | server CPU us/req | disturbed | answers confirmed |",
         "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        L.append(f"| {r['system']} | {r['protocol']} ({r['client']}) | {r['c']} | {r['batching']} | {fmt(r['p50_ms'], 3)} | "
                 f"{fmt(r['p99_ms'])} | {fmt(r['rps'])} | {fmt(r['server_cpu_us_per_req'], 0)} | "
                 f"{r['disturbed']}/{r['rounds']} | {'yes' if r['answers_confirmed'] else 'NO'} |")
    L += ["", "Ratios tinyserve / Triton, same protocol and client (medians of per-round ratios):", "",
          "| protocol | scenario | p50 | p99 | req/s | server CPU/req |", "|---|---|---:|---:|---:|---:|"]
    for r in res["ratios"]:
        L.append(f"| {r['protocol']} | {r['scenario']} | {r['p50_ms_ratio']:.2f}x | {r['p99_ms_ratio']:.2f}x | "
                 f"{r['rps_ratio']:.2f}x | {r['server_cpu_us_per_req_ratio']:.2f}x |")
    if res.get("baseline_ratios"):
        L += ["", f"Ratios tinyserve / baseline (tinyserve at {res['baseline']}, same run, same client; medians of "
              "per-round ratios):", "",
              "| protocol | scenario | p50 | p99 | req/s | server CPU/req |", "|---|---|---:|---:|---:|---:|"]
        for r in res["baseline_ratios"]:
            L.append(f"| {r['protocol']} | {r['scenario']} | {r['p50_ms_ratio']:.2f}x | {r['p99_ms_ratio']:.2f}x | "
                     f"{r['rps_ratio']:.2f}x | {r['server_cpu_us_per_req_ratio']:.2f}x |")
    L += ["", "| target | value | result |", "|---|---:|---|"]
    for t in res["targets"]:
        L.append(f"| {t['target']} | {t['value']:.2f}x | {'PASS' if t['pass'] else 'FAIL'} |")
    if res.get("perf_analyzer"):
        L += ["", "perf_analyzer (binary tensors; first round only, one run per point: a cross-check of the "
              "generators, not a median):", "",
              "| protocol | c | model | system | p50 ms | p99 ms | req/s |", "|---|---:|---|---|---:|---:|---:|"]
        by = {}
        for p in res["perf_analyzer"]:
            by[(p["protocol"], p["c"], p["model"], p.get("system", "triton"))] = p
            if "error" in p:
                L.append(f"| {p['protocol']} | {p['c']} | {p['model']} | {p.get('system', 'triton')} | "
                         f"error: {p['error'][-160:]!r} | | |")
            else:
                L.append(f"| {p['protocol']} | {p['c']} | {p['model']} | {p.get('system', 'triton')} | "
                         f"{p['p50_ms']:.3f} | {p['p99_ms']:.2f} | {p['rps']:,.0f} |")
        ratios = []
        for (proto, c, model, system), p in by.items():
            t = by.get((proto, c, model, "triton"))
            if system == "tinyserve" and t and "error" not in p and "error" not in t:
                ratios.append(f"| {proto} | {c} | {model} | {p['p50_ms'] / t['p50_ms']:.2f}x | "
                              f"{p['rps'] / t['rps']:.2f}x |")
        if ratios:
            L += ["", "perf_analyzer ratios tinyserve / Triton:", "", "| protocol | c | model | p50 | req/s |",
                  "|---|---:|---|---:|---:|"] + ratios
    L += ["", "Answers to one row, against the module run in the script: " + "; ".join(
        f"{k} {'bit-identical' if v['bit_identical'] else 'max |diff| %.2g' % v['max_abs_diff']}"
        for k, v in res["answers"].items()) + "."]
    return "\n".join(L) + "\n"


def profile_run(args, work: Path, cores) -> None:
    """cProfile of tinyserve's server process at c=1 over HTTP (wrk) and gRPC (h2load): every thread
    profiled from the start with its own CPU clock (time.thread_time: waits cost nothing), snapshots taken (SIGUSR1 / SIGUSR2) around the measured window, the
    difference divided by the requests the server answered in it.  Writes work/prof-<proto>.txt and
    bench/results/oip-profile-<proto>.txt (top functions per thread)."""
    row, _ = reference(work)
    repo = tinyserve_repo(work)
    files = prepare_files(work, row)
    # first without the profiler: CPU per request of each server thread (/proc), the true split
    split = {}
    s = start_tinyserve(work, repo, cores[0])
    try:
        for proto in PROTOCOLS:
            model = "mlp"
            if proto == "http":
                url = f"http://127.0.0.1:{s['http']}/v2/models/{model}/infer"
                gen = lambda secs: run_wrk(cores[1], url, 1, secs, files[("lua", model)])  # noqa: E731
            else:
                url = f"http://127.0.0.1:{s['grpc']}/inference.GRPCInferenceService/ModelInfer"
                gen = lambda secs: run_h2load(cores[1], url, 1, secs, files[("grpc", model)], files["h2log"])  # noqa: E731
            gen(1.0)
            ok0, t0 = model_success(s["http"], model), thread_cpu_s(s["proc"].p.pid)
            r = gen(args.profile_seconds)
            t1, n = thread_cpu_s(s["proc"].p.pid), model_success(s["http"], model) - ok0
            per = {k: (v - t0.get(k, 0.0)) / max(1, n) * 1e6 for k, v in t1.items()}
            split[proto] = {"requests": n, "rps": r["rps"], "p50_ms": r["p50_ms"],
                            "threads_us_per_req": {k: round(v, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 1},
                            "total_us_per_req": round(sum(per.values()), 1)}
            log(f"thread split {proto}: {split[proto]}")
    finally:
        s["proc"].stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "oip-profile-threads.json", json.dumps({"commit": git_commit(), "date": f"{_dt.datetime.now():%Y-%m-%d %H:%M}",
                                                             "loadavg": loadavg(), "split": split}, indent=1))
    for proto in PROTOCOLS:
        prefix = work / f"prof-{proto}"
        Path(str(prefix) + ".json").unlink(missing_ok=True)
        s = start_tinyserve(work, repo, cores[0], profile=str(prefix))
        try:
            model = "mlp"
            if proto == "http":
                url = f"http://127.0.0.1:{s['http']}/v2/models/{model}/infer"
                gen = lambda secs: run_wrk(cores[1], url, 1, secs, files[("lua", model)])  # noqa: E731
            else:
                url = f"http://127.0.0.1:{s['grpc']}/inference.GRPCInferenceService/ModelInfer"
                gen = lambda secs: run_h2load(cores[1], url, 1, secs, files[("grpc", model)], files["h2log"])  # noqa: E731
            gen(1.0)
            ok0 = model_success(s["http"], model)
            cpu0 = tree_cpu_s(s["proc"].p.pid)
            os.kill(s["proc"].p.pid, signal.SIGUSR1)
            r = gen(args.profile_seconds)
            os.kill(s["proc"].p.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not Path(str(prefix) + ".json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            cpu = tree_cpu_s(s["proc"].p.pid) - cpu0
            n = model_success(s["http"], model) - ok0
        finally:
            s["proc"].stop()
        diff = json.loads(Path(str(prefix) + ".json").read_text())
        lines = [f"tinyserve {proto} c=1 under cProfile (every thread), commit {git_commit()}, "
                 f"{_dt.datetime.now():%Y-%m-%d %H:%M}: {n} requests in the window ({r['rps']:.0f} req/s, "
                 f"p50 {r['p50_ms']:.3f} ms under the profiler), server CPU {cpu / max(1, n) * 1e6:.0f} us/request "
                 f"(profiler included). Timer: each thread's CPU time. Figures: microseconds per request; own = time in the function itself, "
                 f"cum = with its callees; calls per request.", ""]
        for thread, fs in sorted(diff.items(), key=lambda kv: -sum(v[1] for v in kv[1].values())):
            # the snapshot code itself (the launcher's <string> functions, getstats) is not the server's
            fs = {k: v for k, v in fs.items() if not k.startswith("<string>") and "getstats" not in k}
            total = sum(v[1] for v in fs.values())
            if total * 1e6 / max(1, n) < 5:
                continue
            lines.append(f"== thread {thread}: {total * 1e6 / max(1, n):.0f} us of CPU per request")
            for label, idx in (("own", 1), ("cum", 2)):
                lines.append(f"  top by {label}:")
                for k, v in sorted(fs.items(), key=lambda kv: -kv[1][idx])[:args.profile_top]:
                    if v[0] <= 0 and v[idx] <= 0:
                        continue
                    short = k.replace(str(ROOT) + "/", "").replace(sys.prefix + "/lib/python3.11/site-packages/", "")
                    lines.append(f"    {v[1] * 1e6 / max(1, n):8.1f} own {v[2] * 1e6 / max(1, n):8.1f} cum "
                                 f"{v[0] / max(1, n):6.2f} calls  {short}")
            lines.append("")
        text = "\n".join(lines)
        (work / f"prof-{proto}.txt").write_text(text)
        write_atomic(out / f"oip-profile-{proto}.txt", text)
        log(f"profile {proto}: {out}/oip-profile-{proto}.txt")


def prepare_files(work: Path, row) -> dict:
    files = {"h2log": work / "h2load.log"}
    for model in ("mlp", "mlp_b"):
        jb = work / f"body-{model}.json"
        jb.write_bytes(json_body(model, row))
        lua = work / f"wrk-{model}.lua"
        lua.write_text(WRK_LUA.replace("@BODY@", str(jb)))
        files[("lua", model)] = lua
        gb = work / f"body-{model}.grpc"
        gb.write_bytes(grpc_body(model, row))
        files[("grpc", model)] = gb
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/tinyserve-bench-oip", help="setup cache and scratch directory")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 s points")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float, help="measured seconds per point (default 4, quick 2)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-perf-analyzer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile tinyserve at c=1 (HTTP, gRPC) instead")
    ap.add_argument("--baseline", metavar="REV", help="also serve tinyserve at git revision REV (system 'baseline')")
    ap.add_argument("--profile-seconds", type=float, default=5.0)
    ap.add_argument("--profile-top", type=int, default=25, help="functions listed per thread and ordering")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    work = Path(args.work)
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        raise SystemExit("needs two usable cores (servers on one, load generators on the other)")
    cores = usable[:2]
    os.sched_setaffinity(0, {cores[1]})  # this script waits beside the generators, off the servers' core
    if args.profile:
        setup(work)
        profile_run(args, work, cores)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    warm_s = 1.0
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    mach = machine()
    commit = git_commit()
    log(f"{mach['cpu_model']}, {mach['cores']} cores; commit {commit}; load avg {' '.join(mach['loadavg_start'])}")
    facts = setup(work)
    versions = tool_versions(facts)
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    row, want = reference(work)
    trepo, tsrepo = triton_repo(work, facts), tinyserve_repo(work)
    files = prepare_files(work, row)
    systems, baseline = SYSTEMS, None
    if args.baseline:
        base_root, baseline = baseline_tree(work, args.baseline)
        systems = ("tinyserve", "baseline", "triton")
    servers = {}
    try:
        servers["tinyserve"] = start_tinyserve(work, tsrepo, cores[0])
        if baseline:
            servers["baseline"] = start_tinyserve(work, tsrepo, cores[0], root=base_root, name="baseline")
        servers["triton"] = start_triton(work, facts, trepo, cores[0])
        log("servers ready: " + ", ".join(f"{k} http {v['http']} grpc {v['grpc']}" for k, v in servers.items()))
        answers = check_answers(servers, row, want)
        bad = [k for k, v in answers.items() if v["max_abs_diff"] > 1e-5]
        if bad:
            raise RuntimeError(f"answers differ from the module: {bad}: {answers}")
        points, pa = [], []
        for rnd in range(rounds):
            for proto in PROTOCOLS:
                for scen, c in SCENARIOS:
                    order = systems if rnd % 2 == 0 else systems[::-1]
                    for system in order:
                        p = measure(system, servers[system], proto, scen, c, servers, cores, files, seconds, warm_s)
                        p["round"] = rnd
                        points.append(p)
                        log(f"r{rnd} {proto:4} {scen:4} {system:9} p50 {p['p50_ms']:.3f} ms p99 {p['p99_ms']:.2f} ms "
                            f"{p['rps']:8.0f} req/s cpu {p['server_cpu_us_per_req']:.0f} us/req other {p['other_load_on_server_core']:.2f}"
                            f"{'' if p['answers_confirmed'] else ' UNCONFIRMED (success delta %d)' % p['server_success_delta']}")
            if rnd == 0 and not args.no_perf_analyzer:
                for proto, c, model in PA_POINTS:
                    for system in SYSTEMS:
                        port = servers[system]["grpc" if proto == "grpc" else "http"]
                        r = run_perf_analyzer(facts, cores[1], proto, port, model, c, work / "pa.csv",
                                              1000 if args.quick else 2000)
                        r.update({"protocol": proto, "c": c, "model": model, "system": system})
                        pa.append(r)
                        log(f"perf_analyzer {system} {proto} c{c} {model}: {r}")
    finally:
        for s in servers.values():
            s["proc"].stop()
    rows, ratios = summarize(points, rounds, systems)
    base_ratios = summarize(points, rounds, systems, "baseline")[1] if baseline else []
    res = {"date": date, "commit": commit, "machine": mach, "command": command_line(ROOT, "bench/bench_oip.py", argv),
           "versions": versions, "cores": cores, "rounds": rounds, "seconds": seconds, "warm_s": warm_s,
           "answers": answers, "rows": rows, "ratios": ratios, "targets": targets(ratios), "perf_analyzer": pa,
           "baseline": baseline, "baseline_ratios": base_ratios,
           "points": points, "loadavg_end": loadavg(),
           "wall_s": time.perf_counter() - t_start}
    text = render(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    write_atomic(out / f"oip-{date}{suffix}.json", json.dumps(res, indent=1))
    write_atomic(out / f"oip-latest{suffix}.md", text)
    log(f"wrote {out}/oip-{date}{suffix}.json and oip-latest{suffix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
