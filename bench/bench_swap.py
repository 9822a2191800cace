#!/usr/bin/env python3
"""Swap benchmark (issue 5): how fast an evicted model comes back under `--memory-budget`, and the
throughput while three models rotate through a budget that holds two.

    .venv/bin/python bench/bench_swap.py                 # 512 MiB models, 5 rounds (about 3-4 min)
    .venv/bin/python bench/bench_swap.py --mib 64 --rounds 2 --requests 6 --out /tmp/x   # a smoke run

The model (`SwapMLP` in MODEL_PY, the same in every candidate): `layers` bfloat16 Linear(4096, 4096)
layers with bias (32 MiB each; 16 layers = 512 MiB), weights `randn * 0.02` (seed 0) cast to
bfloat16, biases zero.  Its forward is cheap on purpose, so that loading dominates: on a float32
[n, 4] input x it returns `x + tag + sum_i (weight_i[0, :4] + bias_i[:4])` (float32, layer order),
which reads one row of every layer (the answer depends on every tensor, `tag` tells the models
apart).  Its first forward also allocates a `workspace_mib` (default 40 MiB) float32 scratch that
it keeps, standing in for an activation workspace: the server measures it during warm-up and counts
it against the budget.  Without it a model whose weights are stored raw would cost nothing against
the CPU budget (raw tensors are mapped from the file: page cache, docs/scheduler.md 4.2) and would
never be evicted.

Repository (bench/data/swap/, git-ignored, deleted at the end unless --keep): six versions of the
same weights, `r1 r2 r3` packed with `compression="none"` (raw) and `c1 c2 c3` packed with
`compression="auto"` (bfloat16 -> byte planes), tags 1, 2, 3.  Each has its own weights file (no
shared page cache between models).

Phases (one run; every loop has a fixed count, and the run stops early, saying so, when it would
pass --max-seconds):

0. Footprints: a server with a budget of 16 GiB loads all six once (page cache warm, footprints
   measured by the server); `stats`' `placement` field gives each model's reservation.  With no
   eviction possible it then runs the part-2 workloads once per storage kind: the no-swap reference.
1. Swap back: a server whose budget B1 = reserved(c1) + reserved(r1) / 2 holds c1 or r1 but not
   both.  Requests alternate r1, c1, r1, c1, ...: each one finds its model evicted (checked in
   `placement` before it is sent: state `absent`) and so evicts the other, loads its own, and
   answers.  The time runs from sending `infer` to receiving the answer (client side), and the
   server's own load time (`last_load_s` of the `stats` op) is recorded with it.  Interleaved with
   them, a fresh plain script (`--plain`, its own process; imports are not timed) does
   `torch_load`: `SwapMLP(layers)` (ordinary construction, random initialisation),
   `torch.load(file, weights_only=True)`, `load_state_dict`, one forward; and `torch_load_mmap`: the
   module built on the meta device, `torch.load(file, mmap=True, weights_only=True)`,
   `load_state_dict(assign=True)`, one forward.  Page cache warm everywhere: one untimed round
   first.  Figures: medians [min..max] of --rounds rounds; ratio = plain median / swap-back median.
   Target (issue 5): swap-back from the host copy at least 5x faster than the fresh plain torch.load.
2. Rotation: per storage kind, a server whose budget B2 = the two largest reservations of the trio
   + half the smallest (holds any two, never three); after one untimed request per model, (a) `seq`:
   one client asks a, b, c, a, b, c, ... (--requests requests: the least-recently-used worst case,
   every request a swap) and (b) `conc3`: three clients at once, asking in turn in the orders abc,
   bca, cab (--requests each).  Requests per second = answered requests / wall time; loads and
   evictions are the change of `placement`'s per-model counters over the workload.  Every answer is
   checked against the value computed here from the weights.

Results: a table on stdout, bench/results/swap-<date>.json and bench/results/swap-latest.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import fsync_file, loadavg, machine, phase_timer, source_module, verdict, write_atomic  # noqa: E402  (bench/ is sys.path[0])
from bench_latency import Proc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDTH = 4096
LAYER_MIB = WIDTH * WIDTH * 2 / (1 << 20)  # 32 MiB of bfloat16 weight per layer (+ 8 KiB bias)
MIB = 1 << 20
TARGET_RATIO = 5.0  # swap-back at least 5x faster than a fresh plain torch.load (issue 5)
MEASURE_BUDGET = 16 << 30
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
PLAIN_TIMEOUT_S = 120.0
KINDS = {"raw": ("r", "none"), "compressed": ("c", "auto")}  # storage kind -> (model prefix, compression)
PLAIN = ("torch_load", "torch_load_mmap")

MODEL_PY = '''\
"""SwapMLP for bench/bench_swap.py: bfloat16 Linear(4096, 4096) layers and a cheap forward."""
import torch


class SwapMLP(torch.nn.Module):
    def __init__(self, layers, width=4096, dtype=torch.bfloat16, tag=0.0, workspace_mib=40):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, dtype=dtype) for _ in range(layers))
        self.tag = float(tag)
        self.workspace_mib = int(workspace_mib)
        self.scratch = None

    def forward(self, x):
        if self.scratch is None:  # kept: an activation workspace the server measures at warm-up
            self.scratch = torch.ones(self.workspace_mib << 18, dtype=torch.float32)
        y = x + self.tag
        for layer in self.layers:
            y = y + layer.weight[0, :4].float() + layer.bias[:4].float()
        return y


def build(params):
    with torch.device("meta"):
        m = SwapMLP(int(params["layers"]), tag=params["tag"], workspace_mib=params["workspace_mib"])
    return m
'''


def log(msg: str) -> None:
    print(f"[bench_swap {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_module(data: Path):
    """Import MODEL_PY (written into the data folder) as a module."""
    return source_module(data, "swapmlp.py", MODEL_PY)


def med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# --------------------------------------------------------------------------------------------------
# data


def make_data(data: Path, layers: int, workspace_mib: int) -> dict:
    """weights.pt (torch.save) and a repository with r1..r3 (raw) and c1..c3 (compressed)."""
    import torch

    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    pt_path = data / "weights.pt"
    torch.manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"layers.{i}.weight"] = (torch.randn(WIDTH, WIDTH) * 0.02).to(torch.bfloat16)
        sd[f"layers.{i}.bias"] = torch.zeros(WIDTH, dtype=torch.bfloat16)
    torch.save(sd, pt_path)
    del sd
    fsync_file(pt_path)
    repo_dir = data / "repo"
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    repo = Repository(repo_dir, create=True)
    model_py = data / "swapmlp.py"
    out = {"layers": layers, "mib": round(layers * LAYER_MIB), "workspace_mib": workspace_mib,
           "torch_save": str(pt_path), "repo": str(repo_dir), "models": {}}
    for kind, (prefix, comp) in KINDS.items():
        for tag in (1, 2, 3):
            cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                   "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}],
                   "extra": {"layers": layers, "tag": float(tag), "workspace_mib": workspace_mib}}
            _v, summary = pack(repo, f"{prefix}{tag}", str(pt_path), program=str(model_py), config=cfg,
                               compression=comp)
            out["models"][f"{prefix}{tag}"] = {"kind": kind, "tag": tag, "file_bytes": summary.file_bytes,
                                               "ratio": round(summary.ratio, 4), "pack_s": round(summary.seconds, 2)}
    out["torch_save_bytes"] = pt_path.stat().st_size
    return out


def expected_answers(info: dict, data: Path) -> dict:
    """The answer to X for every model, computed here from weights.pt (mapped: no copy)."""
    import torch

    mod = model_module(data)
    sd = torch.load(info["torch_save"], mmap=True, weights_only=True)
    out = {}
    with torch.device("meta"):
        m = mod.SwapMLP(info["layers"], workspace_mib=0)
    m.load_state_dict(sd, assign=True)
    with torch.inference_mode():
        for name, meta in info["models"].items():
            m.tag = float(meta["tag"])
            out[name] = m(x_input()).numpy().copy()
    return out


def x_input():
    import torch

    return torch.arange(4, dtype=torch.float32).reshape(1, 4)


# --------------------------------------------------------------------------------------------------
# the plain script (its own process: --plain)


def plain(kind: str, path: str, layers: int, workspace_mib: int, data: str) -> int:
    import torch

    mod = model_module(Path(data))
    torch.set_num_threads(1)
    x = x_input()
    t0 = time.perf_counter()
    if kind == "torch_load":
        m = mod.SwapMLP(layers, tag=1.0, workspace_mib=workspace_mib)
        m.load_state_dict(torch.load(path, weights_only=True))
    elif kind == "torch_load_mmap":
        with torch.device("meta"):
            m = mod.SwapMLP(layers, tag=1.0, workspace_mib=workspace_mib)
        m.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    else:
        raise SystemExit(f"unknown plain kind {kind!r}: one of {PLAIN}")
    t_loaded = time.perf_counter()
    with torch.inference_mode():
        y = m(x)
    t1 = time.perf_counter()
    print(json.dumps({"total_s": t1 - t0, "load_s": t_loaded - t0, "first_s": t1 - t_loaded,
                      "y": y[0].tolist()}), flush=True)
    return 0


def run_plain(kind: str, info: dict, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--plain", kind, info["torch_save"], str(info["layers"]),
           str(info["workspace_mib"]), str(data)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=PLAIN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"plain {kind} failed ({r.returncode}): {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = wall  # the whole process: interpreter start, imports, load, forward, exit
    return out


# --------------------------------------------------------------------------------------------------
# the server


class Server:
    """`tinyserve serve --memory-budget B` in a child process (Proc: stopped by pid)."""

    def __init__(self, repo: str, budget: int, log_path: Path):
        argv = [sys.executable, "-m", "tinyserve.cli", "serve", "--repo", repo, "--port", "0", "--threads", "1",
                "--memory-budget", str(int(budget))]
        self.budget = int(budget)
        self.proc = Proc(f"server(budget {budget})", argv, log_path)
        try:
            m = self.proc.wait_for(r"listening on [^\s]*:(\d+)", START_TIMEOUT_S)
        except BaseException:
            self.proc.stop()
            raise
        self.port = int(m.group(1))
        self.pid = self.proc.pid

    def stop(self) -> int | None:
        return self.proc.stop()


def placement(client) -> dict:
    return client.stats(timeout=REQUEST_TIMEOUT_S)["placement"]


def counters(pl: dict, names) -> dict:
    return {n: {"loads": pl["models"].get(f"{n}:1", {}).get("loads", 0),
                "evictions": pl["models"].get(f"{n}:1", {}).get("evictions", 0)} for n in names}


def ask(client, name: str, expected: dict) -> float:
    """One request; returns its seconds (client side).  Raises if the answer is wrong."""
    import numpy as np

    x = x_input().numpy()
    t0 = time.perf_counter()
    y = client.infer(name, {"x": x}, timeout=REQUEST_TIMEOUT_S)["y"]
    dt = time.perf_counter() - t0
    if not np.array_equal(np.asarray(y), expected[name]):
        raise AssertionError(f"model {name}: answer {np.asarray(y).tolist()} != expected {expected[name].tolist()}")
    return dt


def rotation(port: int, trio: list[str], expected: dict, requests: int) -> dict:
    """The part-2 workloads on a running server: seq (one client, a b c a b c ...) and conc3 (three
    clients at once, orders abc / bca / cab, `requests` each).  A request the server refuses is
    counted (with its message) and the client goes on to its next request; a wrong answer is
    counted apart."""
    from tinyserve.client import Client

    def one(c, name: str, lat: list, failed: list, wrong: list) -> None:
        try:
            lat.append(ask(c, name, expected))
        except AssertionError as exc:
            wrong.append(str(exc))
        except Exception as exc:  # tinyserve errors (UNAVAILABLE, ...): counted, with the message
            failed.append(f"{name}: {type(exc).__name__}: {exc}")

    out = {}
    with Client("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S) as c:
        before = counters(placement(c), trio)
        lat, failed, wrong = [], [], []
        t0 = time.perf_counter()
        for i in range(requests):
            one(c, trio[i % 3], lat, failed, wrong)
        wall = time.perf_counter() - t0
        after = counters(placement(c), trio)
    out["seq"] = summarize_workload(lat, failed, wrong, wall, before, after, trio, clients=1)

    orders = [trio, trio[1:] + trio[:1], trio[2:] + trio[:2]]
    lats: list[list[float]] = [[] for _ in orders]
    failed, wrong, broken = [], [], []

    def client(k: int) -> None:
        try:
            with Client("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S) as cc:
                for i in range(requests):
                    one(cc, orders[k][i % 3], lats[k], failed, wrong)
        except BaseException as exc:  # the connection itself: reported, never swallowed
            broken.append(f"client {k}: {type(exc).__name__}: {exc}")

    with Client("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S) as c:
        before = counters(placement(c), trio)
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(len(orders))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S * requests)
        wall = time.perf_counter() - t0
        if any(t.is_alive() for t in threads):
            broken.append("a client thread did not finish in time")
        after = counters(placement(c), trio)
    if broken:
        raise RuntimeError("conc3 workload failed: " + "; ".join(broken))
    out["conc3"] = summarize_workload([x for xs in lats for x in xs], failed, wrong, wall, before, after, trio,
                                      clients=3)
    return out


def summarize_workload(lat, failed, wrong, wall, before, after, trio, clients) -> dict:
    loads = sum(after[n]["loads"] - before[n]["loads"] for n in trio)
    evictions = sum(after[n]["evictions"] - before[n]["evictions"] for n in trio)
    kinds: dict = {}
    for f in failed:  # distinct messages with their counts
        kinds[f] = kinds.get(f, 0) + 1
    return {"clients": clients, "sent": len(lat) + len(failed) + len(wrong), "answered": len(lat),
            "failed": len(failed), "wrong": len(wrong), "failures": kinds, "wrong_answers": wrong[:5],
            "wall_s": round(wall, 3), "rps": round(len(lat) / wall, 3),
            "latency_ms": {k: round(v * 1e3, 1) for k, v in med(lat).items() if k != "n"} if lat else None,
            "loads": loads, "evictions": evictions,
            "per_model": {n: {k: after[n][k] - before[n][k] for k in ("loads", "evictions")} for n in trio}}


# --------------------------------------------------------------------------------------------------
# the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="model size in MiB (rounded to 32 MiB layers; default 512)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of part 1 (default 5)")
    ap.add_argument("--requests", type=int, default=18, help="requests per client in part 2 (default 18)")
    ap.add_argument("--workspace-mib", type=int, default=40, help="the model's kept scratch (default 40)")
    ap.add_argument("--max-seconds", type=float, default=330.0, help="stop starting rounds after this (default 330)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--keep", action="store_true", help="keep bench/data/swap/")
    ap.add_argument("--plain", nargs=5, metavar=("KIND", "PATH", "LAYERS", "WORKSPACE", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        k, p, n, w, d = args.plain
        return plain(k, p, int(n), int(w), d)
    problems = [f"{name} {val} is outside {lo}..{hi}" for name, val, lo, hi in (
        ("--mib", args.mib, 32, 4096), ("--rounds", args.rounds, 1, 30), ("--requests", args.requests, 3, 300),
        ("--workspace-mib", args.workspace_mib, 33, 1024), ("--max-seconds", args.max_seconds, 30, 3600))
        if not lo <= val <= hi]
    if problems:
        ap.error("; ".join(problems))
    layers = max(1, round(args.mib / LAYER_MIB))
    data = ROOT / "bench" / "data" / "swap"
    data.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data).free
    need = layers * LAYER_MIB * MIB * 6
    if free < need + (2 << 30):
        log(f"not enough disk: {free / 2**30:.1f} GiB free, need about {need / 2**30:.1f} GiB + 2 GiB")
        return 2

    import torch

    from tinyserve.client import Client

    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds
    phases: dict = {}
    phase = phase_timer(phases, log)
    argv = " ".join(sys.argv[1:])
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": ".venv/bin/python bench/bench_swap.py" + (f" {argv}" if argv else ""),
        "args": {k: v for k, v in vars(args).items() if k not in ("plain", "out")},
    }
    results: dict = {"env": env, "phases": phases, "notes": []}
    servers: list[Server] = []

    def start(budget: int, tag: str) -> Server:
        s = Server(str(data / "repo"), budget, data / f"server-{tag}.log")
        servers.append(s)
        log(f"server {tag}: pid {s.pid}, port {s.port}, budget {budget / MIB:.1f} MiB")
        return s

    def stop(s: Server) -> int | None:
        code = s.stop()
        servers.remove(s)
        return code

    try:
        log(f"writing the data: {layers} layers ({layers * LAYER_MIB:.0f} MiB), six versions")
        model_module(data)
        info = make_data(data, layers, args.workspace_mib)
        expected = expected_answers(info, data)
        results["data"] = info
        phase("data")

        # 0. footprints, and the no-swap reference
        s = start(MEASURE_BUDGET, "measure")
        with Client("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT_S) as c:
            for name in info["models"]:
                ask(c, name, expected)
            pl = placement(c)
        reserved = {n: pl["models"][f"{n}:1"]["reserved"] for n in info["models"]}
        results["footprints"] = {"reserved": reserved, "placement": pl}
        log("reserved MiB: " + ", ".join(f"{n} {b / MIB:.1f}" for n, b in reserved.items()))
        results["reference"] = {}
        for kind, (prefix, _comp) in KINDS.items():
            trio = [f"{prefix}{t}" for t in (1, 2, 3)]
            results["reference"][kind] = rotation(s.port, trio, expected, args.requests)
        results["reference_server_exit"] = stop(s)
        phase("footprints + no-swap reference")

        # 1. swap back
        r1, c1 = "r1", "c1"
        b1 = reserved[c1] + reserved[r1] // 2
        if not max(reserved[c1], reserved[r1]) <= b1 < reserved[c1] + reserved[r1]:
            raise RuntimeError(f"part 1: no budget holds one of r1 ({reserved[r1]} B) and c1 ({reserved[c1]} B) "
                               "but not both")
        s = start(b1, "part1")
        samples: dict = {"raw": [], "compressed": [], "torch_load": [], "torch_load_mmap": []}
        plain_answers = {}
        rounds_done = 0
        with Client("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT_S) as c:
            def swap_back(name: str) -> dict:
                before = placement(c)["models"].get(f"{name}:1", {})
                dt = ask(c, name, expected)
                st = c.stats(name, timeout=REQUEST_TIMEOUT_S)
                after = placement(c)["models"][f"{name}:1"]
                other = c1 if name == r1 else r1
                return {"total_s": dt, "server_load_s": st.get("last_load_s"),
                        "was": before.get("state", "unregistered"), "loads": after["loads"],
                        "other_state_after": placement(c)["models"].get(f"{other}:1", {}).get("state")}

            # untimed: both loaded once (their footprints measured), unloaded, then r1 and c1 once
            # more so that c1 evicts r1 under the measured footprints (a first load is planned with
            # its weight bytes only, so two first loads can both stay resident)
            for name in (r1, c1):
                ask(c, name, expected)
            for name in (r1, c1):
                c.unload(name, timeout=REQUEST_TIMEOUT_S)
            for r in range(args.rounds + 1):  # round 0: untimed (the plain scripts' page cache)
                if r > 0 and time.perf_counter() > deadline - 60:
                    results["notes"].append(f"part 1 stopped after {rounds_done} rounds: --max-seconds")
                    break
                row = {"raw": swap_back(r1), "compressed": swap_back(c1)}
                for k in PLAIN:
                    row[k] = run_plain(k, info, data)
                    plain_answers.setdefault(k, row[k]["y"])
                if r == 0:
                    continue
                rounds_done += 1
                for k, v in row.items():
                    samples[k].append(v)
                log(f"part 1 round {r}: " + ", ".join(f"{k} {v['total_s'] * 1e3:.0f} ms" for k, v in row.items()))
        part1_exit = stop(s)
        p1 = {"budget": b1, "rounds": rounds_done, "server_exit": part1_exit, "samples": samples, "figures": {}}
        swapped = all(x["was"] == "absent" and x["other_state_after"] == "absent"
                      for k in ("raw", "compressed") for x in samples[k])
        p1["every_timed_request_found_its_model_evicted"] = swapped
        p1["plain_answers_agree"] = all(abs(a - b) < 1e-6 for k in PLAIN
                                        for a, b in zip(plain_answers[k], expected["r1"][0].tolist()))
        for k, xs in samples.items():
            f = {"total_ms": med([x["total_s"] * 1e3 for x in xs])}
            if k in KINDS:
                f["server_load_ms"] = med([x["server_load_s"] * 1e3 for x in xs if x["server_load_s"] is not None])
            else:
                f["load_ms"] = med([x["load_s"] * 1e3 for x in xs])
                f["process_ms"] = med([x["process_s"] * 1e3 for x in xs])
            p1["figures"][k] = f
        p1["ratios"] = {f"{plain_k}/{k}": round(p1["figures"][plain_k]["total_ms"]["median"]
                                                / p1["figures"][k]["total_ms"]["median"], 2)
                        for k in KINDS for plain_k in PLAIN}
        p1["round_ratios"] = {f"{plain_k}/{k}": [round(a["total_s"] / b["total_s"], 2)
                                                 for a, b in zip(samples[plain_k], samples[k])]
                              for k in KINDS for plain_k in PLAIN}
        p1["target"] = {k: {"ratio": p1["ratios"][f"torch_load/{k}"], "min": TARGET_RATIO,
                            "verdict": verdict(p1["ratios"][f"torch_load/{k}"] >= TARGET_RATIO)} for k in KINDS}
        results["part1"] = p1
        phase("part 1 swap back")

        # 2. rotation through a budget for two
        results["part2"] = {}
        for kind, (prefix, _comp) in KINDS.items():
            if time.perf_counter() > deadline - 45:
                results["notes"].append(f"part 2 {kind} skipped: --max-seconds")
                continue
            trio = [f"{prefix}{t}" for t in (1, 2, 3)]
            sizes = sorted(reserved[n] for n in trio)
            b2 = sizes[1] + sizes[2] + sizes[0] // 2
            s = start(b2, f"part2-{kind}")
            with Client("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT_S) as c:
                for n in trio:  # untimed: each loaded once (footprint measured by this server), then
                    ask(c, n, expected)  # unloaded: from now on every load is planned with it
                for n in trio:
                    c.unload(n, timeout=REQUEST_TIMEOUT_S)
            res = rotation(s.port, trio, expected, args.requests)
            with Client("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT_S) as c:
                pl = placement(c)
            res.update(budget=b2, placement_end=pl, server_exit=stop(s),
                       never_over_budget_at_end=pl["devices"]["cpu"]["reserved"] <= b2)
            results["part2"][kind] = res
            log(f"part 2 {kind}: seq {res['seq']['rps']} req/s ({res['seq']['loads']} loads, "
                f"{res['seq']['evictions']} evictions); conc3 {res['conc3']['rps']} req/s")
            phase(f"part 2 {kind}")
    finally:
        for s in list(servers):
            s.stop()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["env"]["loadavg_end"] = loadavg()
    text = render(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"swap-{env['date'][:10]}"
    write_atomic(out / f"{stem}.json", json.dumps(results, indent=1, default=_json_default).encode())
    write_atomic(out / "swap-latest.md", (f"# Swap (issue 5): latest results\n\n```\n{text}\n```\n\n"
                                          f"Command: `{env['command']}`; every sample: "
                                          f"`bench/results/{stem}.json`.\n").encode())
    log(f"wrote {out / (stem + '.json')} and swap-latest.md in {results['wall_s']} s")
    return 0


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _ms(v: float) -> str:
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def _span(m: dict) -> str:
    return f"{m['median']:.0f} [{m['min']:.0f}..{m['max']:.0f}]"


def render(results: dict) -> str:
    env = results["env"]
    m = env["machine"]
    info = results["data"]
    lines = [f"tinyserve swap benchmark (issue 5), {env['date']}",
             f"machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; load avg at start "
             f"{' '.join(m['loadavg_start'])}, at end {' '.join(env.get('loadavg_end', []))}; commit {env['commit']}; "
             f"torch {env['versions']['torch']}",
             f"command: {env['command']}",
             f"model: SwapMLP, {info['layers']} bfloat16 Linear {WIDTH}x{WIDTH} layers ({info['mib']} MiB), cheap "
             f"forward (one row per layer), {info['workspace_mib']} MiB kept workspace; server --threads 1", ""]
    fp = results.get("footprints", {}).get("reserved", {})
    files = {n: v["file_bytes"] for n, v in info["models"].items()}
    lines.append("footprints (placement reservation, MiB): " + ", ".join(
        f"{n} {fp[n] / MIB:.1f}" for n in fp) + "; files (MiB): " + ", ".join(
        f"{n} {b / MIB:.0f}" for n, b in files.items()))
    p1 = results.get("part1")
    if p1:
        lines += ["", f"== 1. swap back: request for an evicted model -> answer (budget {p1['budget'] / MIB:.1f} MiB "
                      f"holds r1 or c1, not both; page cache warm; {p1['rounds']} rounds, median [min..max] ms)"]
        lines.append(f"  {'candidate':<34} {'total ms':>20}  {'of which load ms':>16}")
        names = {"raw": "tinyserve swap-back, raw", "compressed": "tinyserve swap-back, compressed",
                 "torch_load": "plain torch.load + build", "torch_load_mmap": "plain torch.load(mmap) + meta build"}
        for k, f in p1["figures"].items():
            load = f.get("server_load_ms") or f.get("load_ms")
            extra = f"  (process incl. imports {_span(f['process_ms'])})" if "process_ms" in f else ""
            lines.append(f"  {names[k]:<34} {_span(f['total_ms']):>20}  {load['median']:>16.0f}{extra}")
        for k, t in p1["target"].items():
            rr = p1["round_ratios"][f"torch_load/{k}"]
            lines.append(f"  torch.load / swap-back {k:<10} {t['ratio']:>6.2f}x  target >= {t['min']:.0f}x  "
                         f"{t['verdict']}   (per round {min(rr):.2f}..{max(rr):.2f}x; torch.load(mmap) / "
                         f"swap-back {k}: {p1['ratios'][f'torch_load_mmap/{k}']:.2f}x)")
        lines.append("  (tinyserve 'load': the server's load_s, weights + module + warm-up; the rest of the total is the "
                     "request,\n   making room (the evicted other model's worker ends, its memory is freed) and the answer. "
                     "plain 'load':\n   construction + torch.load + load_state_dict, imports excluded; ratios use totals)")
        lines.append(f"  every timed request found its model evicted and evicted the other: "
                     f"{p1['every_timed_request_found_its_model_evicted']}; plain answers agree: "
                     f"{p1['plain_answers_agree']}; server exit {p1['server_exit']}")
    ref = results.get("reference", {})
    p2 = results.get("part2", {})
    if p2 or ref:
        lines += ["", "== 2. three models rotating (clients ask in turn; every answer checked)"]
        lines.append(f"  {'storage':<11} {'budget':<28} {'workload':<34} {'req/s':>7}  {'latency ms p50 [min..max]':>26}"
                     f"  {'loads':>5}  {'evictions':>9}  answered")
        for kind in KINDS:
            for label, res, budget in (("holds all three", ref.get(kind), MEASURE_BUDGET),
                                       ("holds two", p2.get(kind), (p2.get(kind) or {}).get("budget"))):
                if not res:
                    continue
                for w, wl in (("seq", "1 client, a b c a b c ..."), ("conc3", "3 clients, abc / bca / cab")):
                    r = res[w]
                    lat = r["latency_ms"]
                    bud = f"{label} ({budget / MIB:.0f} MiB)"
                    work = f"{wl} x{r['sent'] // r['clients']}"
                    span = f"{_ms(lat['median'])} [{_ms(lat['min'])}..{_ms(lat['max'])}]" if lat else "-"
                    lines.append(f"  {kind:<11} {bud:<28} {work:<34} {r['rps']:>7.2f}  {span:>26}  "
                                 f"{r['loads']:>5}  {r['evictions']:>9}  {r['answered']}/{r['sent']}"
                                 + (f" ({r['wrong']} WRONG)" if r["wrong"] else ""))
                    for msg, n in r["failures"].items():
                        lines.append(f"  {'':<11} refused x{n}: {msg}")
    for n in results.get("notes", []):
        lines.append(f"note: {n}")
    lines += ["", f"wall time {results.get('wall_s', 0)} s; phases: " + "; ".join(
        f"{k} {v['s']} s (load {' '.join(v['loadavg_after'])})" for k, v in results["phases"].items())]
    return "\n".join(lines)


def git_commit() -> str:
    def run(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = run("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


if __name__ == "__main__":
    sys.exit(main())
