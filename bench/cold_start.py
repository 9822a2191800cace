#!/usr/bin/env python3
"""Cold start: time from a `load` request to the first answer, for models of 128 MiB to 2 GiB, page
cache warm and cold, tinyserve raw vs compressed weights, against the same weights loaded in a plain
script with safetensors or torch.load plus model construction.

    .venv/bin/python bench/cold_start.py --quick        # 128 MiB only, 3 repeats (about 1-2 min)
    .venv/bin/python bench/cold_start.py                # 128, 512, 2048 MiB, 3 repeats (about 10-15 min)
    .venv/bin/python bench/cold_start.py --sizes 256 --repeats 5 --keep

The model (the same in every candidate): `BigMLP` below, bfloat16, width 4096, `layers` Linear
4096x4096 layers with bias (32 MiB each) and a ReLU between them: 4 layers = 128 MiB, 16 = 512 MiB,
64 = 2 GiB.  Weights: `torch.manual_seed(0)`, each weight `randn * 0.02` in float32 cast to
bfloat16, biases zero.  The input is one bfloat16 row [1, 4096]; "the first answer" is the output of
that row.

Candidates (each trial in a fresh process or a fresh load; imports are never timed):

- `tinyserve_raw` / `tinyserve_compressed`: a `tinyserve serve` process (started once per size, no
  model loaded, `--threads 1`) is sent `load`, then `infer` with the row, by a client in this
  script; the time runs from sending `load` to receiving the answer, then the model is unloaded.
  The version is a `python` model (this file's MODEL_PY, which builds the module on the meta device:
  the server binds the weights with `load_state_dict(assign=True)`), packed with
  `compression="none"` or `"auto"` (the default).  The server's load includes its warm-up run on
  zeros; decoding uses the codec's default thread count.
- `safetensors` / `torch_load` (a plain script, `python bench/cold_start.py --plain ...`, the
  timing printed by the child): `m = BigMLP(layers, dtype=bfloat16)` (ordinary construction with
  random initialisation), `m.load_state_dict(safetensors.torch.load_file(path))` or
  `torch.load(path, weights_only=True)`, then `m(x)`.
- `safetensors_meta` / `torch_load_mmap_meta`: the careful script: the module built on the meta
  device, `load_state_dict(sd, assign=True)` with `safetensors.torch.load_file` or
  `torch.load(path, mmap=True, weights_only=True)`, then `m(x)`.  `safetensors_meta` is the baseline of
  the ratios.

Page cache: *warm* trials follow an untimed load of the same candidate; *cold* trials first evict
every file the candidate reads (`os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)` on the weights
file, and for tinyserve every file of the version directory; the files are fsynced when written so
their pages are clean and can be dropped).  Method: for each size, for each cache state, `repeats`
rounds, each running every candidate once in turn (interleaved); figures are medians [min..max].

Data lives in bench/data/cold-start/ (git-ignored) and is deleted at the end unless --keep.
Results: a table on stdout, bench/results/cold_start-<date>[-quick].json, bench/results/cold_start-latest.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import fsync_file, loadavg, machine, phase_timer, source_module, write_atomic  # noqa: E402  (bench/ is sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDTH = 4096
LAYER_MIB = WIDTH * WIDTH * 2 / (1 << 20)  # 32 MiB of bfloat16 weight per layer (+ 8 KiB bias)
CANDIDATES = ("tinyserve_raw", "tinyserve_compressed", "safetensors", "safetensors_meta", "torch_load",
              "torch_load_mmap_meta")
BASELINE = "safetensors_meta"
TRIAL_TIMEOUT_S = 300.0
START_TIMEOUT_S = 120.0

MODEL_PY = '''\
"""BigMLP for bench/cold_start.py: `layers` bfloat16 Linear(4096, 4096) with ReLU between them."""
import torch


class BigMLP(torch.nn.Module):
    def __init__(self, layers, width=4096, dtype=torch.bfloat16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, dtype=dtype) for _ in range(layers))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


def build(params):
    with torch.device("meta"):
        return BigMLP(int(params["layers"]))
'''


def log(msg: str) -> None:
    print(f"[cold_start {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_module(data: Path):
    """Import MODEL_PY (written into the data folder) as a module."""
    return source_module(data, "bigmlp.py", MODEL_PY)


def evict(paths) -> None:
    """Drop the files' pages from the page cache (they must be clean: fsynced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# data


def make_data(data: Path, mib: int) -> dict:
    """safetensors + torch.save files and a tinyserve repository with a raw and a compressed version."""
    import safetensors.torch
    import torch

    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    layers = max(1, round(mib / LAYER_MIB))
    d = data / f"{mib}MiB"
    d.mkdir(parents=True, exist_ok=True)
    st_path, pt_path = d / "weights.safetensors", d / "weights.pt"
    torch.manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"layers.{i}.weight"] = (torch.randn(WIDTH, WIDTH) * 0.02).to(torch.bfloat16)
        sd[f"layers.{i}.bias"] = torch.zeros(WIDTH, dtype=torch.bfloat16)
    safetensors.torch.save_file(sd, str(st_path))
    torch.save(sd, pt_path)
    del sd
    for p in (st_path, pt_path):
        fsync_file(p)
    repo_dir = d / "repo"
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    repo = Repository(repo_dir, create=True)
    model_py = data / "bigmlp.py"
    cfg = {"inputs": [{"name": "x", "dtype": "bfloat16", "shape": [-1, WIDTH]}],
           "outputs": [{"name": "y", "dtype": "bfloat16", "shape": [-1, WIDTH]}],
           "extra": {"layers": layers}}
    out = {"mib": mib, "layers": layers, "dir": str(d), "safetensors": str(st_path), "torch_save": str(pt_path),
           "repo": str(repo_dir), "bytes": {}}
    for name, comp in (("raw", "none"), ("compressed", "auto")):
        _v, summary = pack(repo, name, str(st_path), program=str(model_py), config=cfg, compression=comp)
        out["bytes"][name] = summary.file_bytes
        out[f"ratio_{name}"] = round(summary.ratio, 4)
        out[f"pack_{name}_s"] = round(summary.seconds, 2)
    out["bytes"]["safetensors"] = st_path.stat().st_size
    out["bytes"]["torch_save"] = pt_path.stat().st_size
    return out


# --------------------------------------------------------------------------------------------------
# the plain script (its own process: --plain)


def plain(kind: str, path: str, layers: int, data: str) -> int:
    import safetensors.torch
    import torch

    mod = model_module(Path(data))
    torch.set_num_threads(1)
    x = torch.ones(1, WIDTH, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    if kind in ("safetensors", "torch_load"):
        m = mod.BigMLP(layers)
        sd = safetensors.torch.load_file(path) if kind == "safetensors" else torch.load(path, weights_only=True)
        m.load_state_dict(sd)
    else:
        with torch.device("meta"):
            m = mod.BigMLP(layers)
        if kind == "safetensors_meta":
            sd = safetensors.torch.load_file(path)
        else:
            sd = torch.load(path, mmap=True, weights_only=True)
        m.load_state_dict(sd, assign=True)
    t_loaded = time.perf_counter()
    with torch.inference_mode():
        y = m(x)
    t1 = time.perf_counter()
    print(json.dumps({"total_s": t1 - t0, "load_s": t_loaded - t0, "first_s": t1 - t_loaded,
                      "y0": float(y[0, :4].float().sum())}), flush=True)
    return 0


def run_plain(kind: str, info: dict, data: Path) -> dict:
    path = info["safetensors"] if kind.startswith("safetensors") else info["torch_save"]
    cmd = [sys.executable, __file__, "--plain", kind, path, str(info["layers"]), str(data)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
    if r.returncode != 0:
        raise RuntimeError(f"plain {kind} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# tinyserve


class Server:
    """`tinyserve serve` in a subprocess (stopped by pid with SIGTERM, SIGKILL after 30 s)."""

    def __init__(self, repo: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyserve.cli", "serve", "--repo", repo, "--port", "0",
                                      "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=env)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT_S
        lines = []
        try:
            while time.monotonic() < deadline:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    break
                lines.append(line.rstrip())
                if "listening on" in line:
                    self.port = int(line.split("listening on", 1)[1].split()[0].rsplit(":", 1)[1])
                    return
        finally:
            sel.close()
        self.stop()
        raise RuntimeError("tinyserve did not start:\n" + "\n".join(lines[-20:]))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run_tinyserve(client, name: str) -> dict:
    import torch

    x = torch.ones(1, WIDTH, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    client.load(name, timeout=TRIAL_TIMEOUT_S)
    t_loaded = time.perf_counter()
    y = client.infer(name, {"x": x}, timeout=TRIAL_TIMEOUT_S)["y"]
    t1 = time.perf_counter()
    client.unload(name, timeout=TRIAL_TIMEOUT_S)
    return {"total_s": t1 - t0, "load_s": t_loaded - t0, "first_s": t1 - t_loaded,
            "y0": float(y[0, :4].float().sum())}


def version_files(info: dict, name: str) -> list[Path]:
    vdir = Path(info["repo"]) / name / "1"
    return [p for p in vdir.iterdir() if p.is_file()]


# --------------------------------------------------------------------------------------------------
# the run


def med(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB only")
    ap.add_argument("--sizes", default=None, help="MiB, comma-separated (default 128,512,2048; quick 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--keep", action="store_true", help="keep bench/data/cold-start/")
    ap.add_argument("--plain", nargs=4, metavar=("KIND", "PATH", "LAYERS", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        k, p, n, d = args.plain
        return plain(k, p, int(n), d)
    sizes = [int(s) for s in (args.sizes or ("128" if args.quick else "128,512,2048")).split(",")]
    if any(not 32 <= s <= 8192 for s in sizes) or not 1 <= args.repeats <= 20:
        ap.error("sizes must be 32..8192 MiB and repeats 1..20")
    data = ROOT / "bench" / "data" / "cold-start"
    data.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data).free
    need = sum(s for s in sizes) * (1 << 20) * 4
    if free < need + (2 << 30):
        log(f"not enough disk: {free / 2**30:.1f} GiB free, need about {need / 2**30:.1f} GiB + 2 GiB")
        return 2

    import torch

    import tinyserve
    from tinyserve.client import Client

    model_module(data)
    t_start = time.perf_counter()
    phases: dict = {}
    phase = phase_timer(phases, log)
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "tinyserve_path": str(Path(tinyserve.__file__).parent)},
        "mode": "quick" if args.quick else "full", "repeats": args.repeats, "sizes_mib": sizes,
    }
    results = {"env": env, "sizes": [], "phases": phases}
    try:
        for mib in sizes:
            log(f"{mib} MiB: writing the data")
            info = make_data(data, mib)
            phase(f"data {mib} MiB")
            srv = Server(info["repo"])
            samples = {c: {"warm": [], "cold": []} for c in CANDIDATES}
            answers = {}
            try:
                with Client("127.0.0.1", srv.port, timeout=TRIAL_TIMEOUT_S) as client:
                    def trial(c: str, cache: str) -> dict:
                        if c.startswith("tinyserve"):
                            name = c.split("_", 1)[1]
                            if cache == "cold":
                                evict(version_files(info, name))
                            return run_tinyserve(client, name)
                        if cache == "cold":
                            evict([info["safetensors"] if c.startswith("safetensors") else info["torch_save"]])
                        return run_plain(c, info, data)

                    for cache in ("warm", "cold"):
                        if cache == "warm":
                            for c in CANDIDATES:  # untimed: fill the page cache
                                trial(c, "warm")
                        for r in range(args.repeats):
                            for c in CANDIDATES:
                                s = trial(c, cache)
                                samples[c][cache].append(s)
                                answers.setdefault(c, s["y0"])
                                log(f"{mib} MiB {cache} round {r + 1}: {c} {s['total_s'] * 1e3:.0f} ms")
                        phase(f"{mib} MiB {cache}")
            finally:
                code = srv.stop()
            same = len({round(v, 2) for v in answers.values()}) == 1
            size_res = {**info, "server_exit": code, "answers_agree": same, "answers": answers, "figures": {}}
            for c in CANDIDATES:
                size_res["figures"][c] = {}
                for cache in ("warm", "cold"):
                    xs = samples[c][cache]
                    size_res["figures"][c][cache] = {
                        "total_ms": med([s["total_s"] * 1e3 for s in xs]),
                        "load_ms": med([s["load_s"] * 1e3 for s in xs]),
                        "first_ms": med([s["first_s"] * 1e3 for s in xs]),
                    }
            for c in CANDIDATES:
                for cache in ("warm", "cold"):
                    f = size_res["figures"][c][cache]
                    base = size_res["figures"][BASELINE][cache]["total_ms"]["median"]
                    f["vs_baseline"] = round(f["total_ms"]["median"] / base, 3)
            results["sizes"].append(size_res)
            if not args.keep:
                shutil.rmtree(info["dir"], ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = render(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cold_start-{env['date'][:10]}" + ("-quick" if args.quick else "")
    write_atomic(out / f"{stem}.json", json.dumps(results, indent=1).encode())
    write_atomic(out / "cold_start-latest.md", (f"# Cold start: latest results\n\n```\n{text}\n```\n\n"
                                                 f"Command: `.venv/bin/python bench/cold_start.py"
                                                 f"{' --quick' if args.quick else ''}`; every sample: "
                                                 f"`bench/results/{stem}.json`.\n").encode())
    log(f"wrote {out / (stem + '.json')} and cold_start-latest.md in {results['wall_s']} s")
    return 0


def render(results: dict) -> str:
    env = results["env"]
    m = env["machine"]
    lines = [f"tinyserve cold start, {env['mode']} mode, {env['date']}",
             f"machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, load avg at start "
             f"{' '.join(m['loadavg_start'])}; commit {env['commit']}; torch {env['versions']['torch']}",
             f"model: bfloat16 MLP, Linear {WIDTH}x{WIDTH} layers; one row in; {env['repeats']} interleaved rounds, "
             f"medians [min..max]; ratio = total / {BASELINE} total (same cache state, same run)", ""]
    hdr = f"{'size':>8}  {'cache':<5}  {'candidate':<22} {'load -> answer ms':>26}  {'of which load':>13}  {'ratio':>6}"
    lines.append(hdr)
    for s in results["sizes"]:
        for cache in ("warm", "cold"):
            for c in CANDIDATES:
                f = s["figures"][c][cache]
                t = f["total_ms"]
                span = f"{t['median']:.0f} [{t['min']:.0f}..{t['max']:.0f}]"
                lines.append(f"{s['mib']:>5} MiB  {cache:<5}  {c:<22} {span:>26}  {f['load_ms']['median']:>13.0f}  "
                             f"{f['vs_baseline']:>5.2f}x")
        lines.append(f"{'':>8}  files: raw {s['bytes']['raw'] / 2**20:.0f} MiB, compressed "
                     f"{s['bytes']['compressed'] / 2**20:.0f} MiB (ratio {s['ratio_compressed']}), safetensors "
                     f"{s['bytes']['safetensors'] / 2**20:.0f} MiB; answers agree: {s['answers_agree']}; "
                     f"server exit {s['server_exit']}")
        lines.append("")
    lines.append(f"wall time {results.get('wall_s', 0)} s; phases: " + "; ".join(
        f"{k} {v['s']} s (load {' '.join(v['loadavg_after'])})" for k, v in results["phases"].items()))
    return "\n".join(lines)


def git_commit() -> str:
    def run(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = run("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if run("status", "--porcelain") else "")


if __name__ == "__main__":
    sys.exit(main())
