#!/usr/bin/env python3
"""Device load benchmark (issue 5, GPU figures; docs/gpu.md): load_to_device's throughput against,
in the same run, the pinned host-to-device copy bandwidth and the CPU decode rate at the same thread
count; and the batch-1 latency of two MLPs on the device.

    python bench/bench_gpu_load.py                      # CUDA if present, else the CPU (a smoke run)
    python bench/bench_gpu_load.py --mib 256 --threads 8 --json out.json

Method: synthetic bfloat16 weights ("weights-like": N(0, 0.02), 16 MiB tensors, --mib in all) are
packed twice into a temporary directory: compressed (compression='auto': the plane coder) and raw
('none').  Both files are read once so the page cache holds them (this measures decode and copy, not
the disk).  Then, each figure the best of --repeats runs after one warm-up:
  * pinned copy: the bytes of the raw file, in staging-buffer-sized pieces, from pinned host buffers
    to device buffers on one stream (the ceiling for any host-to-device load);
  * CPU decode: decode_planes_into of every compressed chunk into a reused host buffer, same threads
    (the ceiling of the CPU side of the pipeline);
  * load raw / load compressed: load_to_device(file, device) into preallocated device tensors
    (`into=`, as a re-load after eviction does), bytes of the decoded tensors per second;
  * naive: WeightsFile.load then .to(device) (decode everything, then a pageable copy), for context.
Targets (issue 5): raw >= 80% of the pinned copy; compressed >= 80% of min(pinned copy, CPU decode).
MLP latency: float32 MLPs 64->256->256->10 and 1024->4096->1024, batch 1, eager under
torch.inference_mode, each call synchronized; p50 / p99 over --iters calls.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _proc_field, loadavg, render_text, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tinyserve._backend import NAME as CORE_NAME  # noqa: E402
from tinyserve._backend import core  # noqa: E402
from tinyserve.kernels import DeviceLoadStats, StagingPool, load_to_device  # noqa: E402
from tinyserve.weights import WeightsFile, default_threads, write_weights  # noqa: E402

TARGETS = {"raw_vs_pinned_min": 0.8, "compressed_vs_min_min": 0.8}
TENSOR_MIB = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def environment(device: torch.device, threads: int) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    env = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "codec": CORE_NAME,
        "threads": threads,
        "device": str(device),
        "loadavg": loadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def make_files(tmp: Path, mib: int, threads: int) -> tuple[Path, Path, int]:
    g = torch.Generator().manual_seed(0)
    n = TENSOR_MIB * (1 << 20) // 2
    sd = {f"layer{i}.weight": (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
          for i in range(max(1, mib // TENSOR_MIB))}
    comp, raw = tmp / "compressed.tsw", tmp / "raw.tsw"
    write_weights(comp, sd, compression="auto", threads=threads)
    write_weights(raw, sd, compression="none", threads=threads)
    for p in (comp, raw):  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return comp, raw, sum(t.numel() * 2 for t in sd.values())


def pinned_copy_gbs(device: torch.device, nbytes: int, pool: StagingPool, repeats: int) -> float:
    eng = pool.engine
    dev_bufs = [s if s is not None else torch.empty(pool.buffer_bytes, dtype=torch.uint8) for s in pool.staging]

    def run():
        left, k = nbytes, 0
        while left:
            n = min(left, pool.buffer_bytes)
            slot = k % pool.buffers
            eng.copy(dev_bufs[slot][:n], pool.host[slot][:n])
            left -= n
            k += 1
        eng.synchronize()
    return nbytes / best_of(run, repeats) / 1e9


def decode_gbs(path: Path, threads: int, repeats: int) -> tuple[float, int]:
    wf = WeightsFile(path)
    infos = [i for i in wf.tensors.values() if i.encoding == "planes"]
    if not infos:
        return float("nan"), 0
    buf = np.empty(max(i.nbytes for i in infos), np.uint8)

    def run():
        for info in infos:
            core.decode_planes_into(wf.mapping, [(info, 0, len(info.chunks), buf[:info.nbytes])], True, threads)
    total = sum(i.nbytes for i in infos)
    return total / best_of(run, repeats) / 1e9, total


def load_gbs(path: Path, device: torch.device, threads: int, pool: StagingPool, repeats: int) -> tuple[float, dict]:
    wf = WeightsFile(path)
    into = load_to_device(wf, device, threads=threads, pool=pool, raw="bounce")
    nbytes = sum(t.numel() * t.element_size() for t in into.values())
    stats = DeviceLoadStats()
    best = best_of(lambda: load_to_device(wf, device, threads=threads, pool=pool, raw="bounce", into=into,
                                          stats=stats), repeats)
    ref = wf.load()
    assert all(torch.equal(into[k].cpu().view(torch.int16), ref[k].view(torch.int16)) for k in ref), "wrong bytes"
    return nbytes / best / 1e9, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(stats).items()}


def naive_gbs(path: Path, device: torch.device, threads: int, repeats: int) -> float:
    wf = WeightsFile(path)
    nbytes = sum(i.nbytes for i in wf.tensors.values())

    def run():
        out = {k: v.to(device) for k, v in wf.load(threads=threads).items()}
        sync(device)
        return out
    return nbytes / best_of(run, repeats) / 1e9


def mlp_latency(device: torch.device, dims: tuple[int, ...], iters: int) -> dict:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(device).eval()
    x = torch.randn(1, dims[0], device=device)
    times = []
    with torch.inference_mode():
        for i in range(iters + max(50, iters // 10)):
            t0 = time.perf_counter()
            model(x)
            sync(device)
            if i >= max(50, iters // 10):
                times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_us": round(statistics.median(times) * 1e6, 1),
            "p99_us": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mib", type=int, default=None, help="synthetic weights size (default 512 on CUDA, 64 on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mib = args.mib or (512 if device.type == "cuda" else 64)
    threads = args.threads or default_threads()
    env = environment(device, threads)
    print(f"bench_gpu_load: {env}", flush=True)
    pool = StagingPool(device)
    with tempfile.TemporaryDirectory(prefix="tsgpu-") as d:
        t0 = time.perf_counter()
        comp, raw, nbytes = make_files(Path(d), mib, threads)
        ratio = nbytes / os.path.getsize(comp)
        print(f"packed {nbytes >> 20} MiB (ratio {ratio:.3f}) in {time.perf_counter() - t0:.1f} s", flush=True)
        pinned = pinned_copy_gbs(device, nbytes, pool, args.repeats)
        decode, _ = decode_gbs(comp, threads, args.repeats)
        load_raw, st_raw = load_gbs(raw, device, threads, pool, args.repeats)
        load_comp, st_comp = load_gbs(comp, device, threads, pool, args.repeats)
        naive = naive_gbs(comp, device, threads, args.repeats)
    mlp_small = mlp_latency(device, (64, 256, 256, 10), args.iters)
    mlp_big = mlp_latency(device, (1024, 4096, 1024), args.iters)
    ceiling = min(pinned, decode)
    res = {
        "env": env, "mib": nbytes >> 20, "ratio": round(ratio, 4), "targets": TARGETS,
        "pool": {"buffer_bytes": pool.buffer_bytes, "buffers": pool.buffers},
        "pinned_copy_gbs": round(pinned, 3), "cpu_decode_gbs": round(decode, 3),
        "load_raw_gbs": round(load_raw, 3), "load_compressed_gbs": round(load_comp, 3),
        "naive_load_then_to_gbs": round(naive, 3),
        "raw_vs_pinned": round(load_raw / pinned, 3), "compressed_vs_min": round(load_comp / ceiling, 3),
        "stats_raw": st_raw, "stats_compressed": st_comp,
        "mlp_64_256_256_10_b1": mlp_small, "mlp_1024_4096_1024_b1": mlp_big,
    }
    sec = f"load {nbytes >> 20} MiB bf16 to {device} ({threads} threads)"
    rows = [
        {"section": sec, "figure": "pinned H2D copy", "value": f"{pinned:.2f} GB/s", "target": "baseline", "verdict": ""},
        {"section": sec, "figure": "CPU decode (planes)", "value": f"{decode:.2f} GB/s", "target": "baseline", "verdict": ""},
        {"section": sec, "figure": "load raw", "value": f"{load_raw:.2f} GB/s ({load_raw / pinned:.0%} of pinned)",
         "target": ">= 80% of pinned", "verdict": verdict(load_raw >= TARGETS["raw_vs_pinned_min"] * pinned)},
        {"section": sec, "figure": "load compressed", "value": f"{load_comp:.2f} GB/s ({load_comp / ceiling:.0%} of min)",
         "target": ">= 80% of min(pinned, decode)",
         "verdict": verdict(load_comp >= TARGETS["compressed_vs_min_min"] * ceiling)},
        {"section": sec, "figure": "naive load() + .to()", "value": f"{naive:.2f} GB/s", "target": "context", "verdict": ""},
        {"section": "MLP batch 1", "figure": "64-256-256-10 p50/p99",
         "value": f"{mlp_small['p50_us']}/{mlp_small['p99_us']} us", "target": "report", "verdict": ""},
        {"section": "MLP batch 1", "figure": "1024-4096-1024 p50/p99",
         "value": f"{mlp_big['p50_us']}/{mlp_big['p99_us']} us", "target": "report", "verdict": ""},
    ]
    print(render_text(f"bench_gpu_load  {env['date']}  commit {env['commit']}  {env.get('gpu', env['cpu'])}", rows))
    print(f"stats compressed: {st_comp}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
