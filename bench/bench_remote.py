"""Remote repository benchmark (issue 7): load a bf16 model from SeaweedFS on loopback.

In one run, against one `weed mini` started here (tests/s3server.py):
  cold      RemoteRepository.load_weights with an empty cache: streamed download, per-chunk verify,
            decode into tensors; timed until the tensors are returned, usable (what a server waits
            for before it starts the model).  The parts holding only compressed chunks are kept in
            memory (up to defer_bytes) and written into the cache file after the return; that write,
            the entry's fsync and rename run in the background, waited for outside the timing and
            reported as "background commit after"
  cold_committed  the same, timed until wait_committed returns (the cache entry is durable): not
            the figure a request waits for, shown so nobody confuses the two
  warm      the same with the entry in the cache and the version named (what a restart costs)
  warm (listing)  the same, the version found by listing the remote
  local     Repository load of the same version directory (WeightsFile.load): the warm target
  get       plain parallel ranged GETs of the same stored bytes into memory (same part size and
            concurrency): the cold target is <= 1.1x this.  Its buffer is a zero-filled bytearray
            (as before issue 7's deferred write), whose filling is inside the clock
  get_uninit  the same into an uninitialised numpy buffer (what the deferred write's held parts
            use): the stricter baseline, shown beside it
  boto3+st  boto3 download_file of the uncompressed safetensors, then safetensors.torch.load_file
  cpu       CPU seconds of this process and of the storage server over the timed spans of the plain
            GET and the cold load: the cold load's CPU seconds / the machine's cores is a floor on its
            wall time that no overlap can beat (the "cold floor" row)

    .venv/bin/python bench/bench_remote.py [--mib 1024] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import loadavg, render_text, verdict  # noqa: E402

import s3server  # noqa: E402
from tinyserve.remote import RemoteRepository, push  # noqa: E402
from tinyserve.storage import Cache  # noqa: E402
from tinyserve.weights import WeightsFile, write_weights  # noqa: E402


def synthetic(mib: int) -> dict[str, torch.Tensor]:
    """bf16 tensors, randn * 0.02 (the shape of bench_weights' synthetic set), exactly `mib` MiB."""
    torch.manual_seed(0)
    out, left, i = {}, mib << 20, 0
    while left > 0:
        rows = min(4096, left // 2 // 1024)
        out[f"layer{i}.weight"] = (torch.randn(rows, 1024) * 0.02).to(torch.bfloat16)
        left -= rows * 1024 * 2
        i += 1
    return out


def self_cpu() -> float:
    """CPU seconds of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    """CPU seconds of process `pid` and its waited-for children (/proc/PID/stat utime..cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


CPU: dict[str, tuple[float, float]] = {}  # name -> median (this process, storage server) CPU seconds per run


def timed(fn, repeats: int, setup=None, name: str | None = None, server_pid: int | None = None
          ) -> tuple[float, list[float]]:
    """Median and all of `repeats` timings of fn(); `setup()` runs before each, outside the clock.
    With `name`, the median CPU seconds of this process and of `server_pid` over the same spans go to
    CPU[name]."""
    ts, mine, srv = [], [], []
    for _ in range(repeats):
        if setup is not None:
            setup()
        s0 = proc_cpu(server_pid) if server_pid else 0.0
        c0 = self_cpu()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        mine.append(self_cpu() - c0)
        srv.append((proc_cpu(server_pid) - s0) if server_pid else 0.0)
    if name is not None:
        CPU[name] = (statistics.median(mine), statistics.median(srv))
    return statistics.median(ts), ts


def cpu_rows(get_s: float, cold_s: float) -> list[dict]:
    """CPU seconds per run (this process + the storage server) of the plain GET and the cold load, and
    what they imply: with n cores, a cold load can take no less than its CPU seconds / n of wall time,
    however well the decode overlaps the transfer."""
    n = os.cpu_count() or 1
    (gc, gs), (cc, cs) = CPU["get_uninit"], CPU["cold"]
    bound = (cc + cs) / n
    return [
        {"section": "cpu", "figure": "plain GET (uninit), cpu s client + server",
         "value": f"{gc:.3f} + {gs:.3f} = {gc + gs:.3f} s ({(gc + gs) / get_s:.2f} of {n} cores busy)",
         "target": "-", "verdict": "-"},
        {"section": "cpu", "figure": "cold load, cpu s client + server",
         "value": f"{cc:.3f} + {cs:.3f} = {cc + cs:.3f} s ({(cc + cs) / cold_s:.2f} of {n} cores busy)",
         "target": "-", "verdict": "-"},
        {"section": "cpu", "figure": "cold floor on these cores / plain GET",
         "value": f"{bound / get_s:.2f}x (cold cpu s / {n} cores = {bound:.3f} s)", "target": "-",
         "verdict": "-"},
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part-mib", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ts-bench-remote-"))
    srv = s3server.SeaweedServer(bucket="bench").start()
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    try:
        sd = synthetic(a.mib)
        vdir = work / "v"
        vdir.mkdir()
        summary = write_weights(vdir / "weights.tsw", sd)
        (vdir / "model.json").write_text(json.dumps({"name": "big", "platform": "weights", "inputs": [],
                                                     "outputs": []}))
        from safetensors.torch import load_file, save_file

        save_file(sd, str(work / "model.safetensors"))
        raw_bytes = sum(t.numel() * 2 for t in sd.values())
        del sd
        log(f"packed {raw_bytes >> 20} MiB -> {summary.file_bytes >> 20} MiB (ratio {summary.ratio:.3f})")
        st = srv.storage("repo")
        push(st, vdir, "big")
        client = srv.client()
        client.upload_file(str(work / "model.safetensors"), srv.bucket, "st/model.safetensors")
        log("uploaded")
        part, conc = a.part_mib << 20, a.concurrency
        key = "big/1/weights.tsw"
        stored = st.size(key)

        def plain_get():
            buf = bytearray(stored)
            st.read_parallel(key, memoryview(buf), part_bytes=part, concurrency=conc)

        def plain_get_uninit():
            buf = np.empty(stored, dtype=np.uint8)
            st.read_parallel(key, memoryview(buf), part_bytes=part, concurrency=conc)

        pending: list = []
        commit_s: list[float] = []
        held: list[int] = []  # bytes the cold loads kept in memory for the deferred write

        def settle():  # the previous cold load's background commit, outside the timed region
            while pending:
                r = pending.pop()
                t0 = time.perf_counter()
                assert r.wait_committed("big", 1) is not None
                commit_s.append(time.perf_counter() - t0)
                r.close()

        def cold_setup():  # the previous load's commit and its cache entry: not part of a cold load
            settle()
            shutil.rmtree(work / "cache", ignore_errors=True)

        def cold():
            cold_setup()  # (a no-op when timed() ran it already)
            r = RemoteRepository(st, Cache(work / "cache", 8 << 30), part_bytes=part, concurrency=conc)
            _, t = r.load_weights("big")  # returns when the last chunk is decoded; the commit goes on
            pending.append(r)
            return t

        def cold_committed():  # the same cold load, until the cache entry is committed (durable)
            cold_setup()
            r = RemoteRepository(st, Cache(work / "cache", 8 << 30), part_bytes=part, concurrency=conc)
            _, t = r.load_weights("big")
            assert r.wait_committed("big", 1) is not None
            held.append(r.last_stream.extra.get("held_bytes", 0))
            r.close()
            return t

        def warm():  # version known (from the poller or the request): no listing
            settle()
            r = RemoteRepository(st, Cache(work / "cache", 8 << 30), part_bytes=part, concurrency=conc)
            _, t = r.load_weights("big", 1)
            r.close()
            return t

        def warm_latest():  # version resolved by listing the remote
            r = RemoteRepository(st, Cache(work / "cache", 8 << 30), part_bytes=part, concurrency=conc)
            _, t = r.load_weights("big")
            r.close()
            return t

        def local():
            with WeightsFile(vdir / "weights.tsw") as wf:
                wf.load()

        def boto_st():
            from boto3.s3.transfer import TransferConfig

            dst = work / "dl.safetensors"
            client.download_file(srv.bucket, "st/model.safetensors", str(dst),
                                 Config=TransferConfig(multipart_chunksize=part, max_concurrency=conc))
            load_file(str(dst))
            dst.unlink()

        res = {}
        for name, fn in (("get", plain_get), ("get_uninit", plain_get_uninit), ("cold", cold), ("cold_committed", cold_committed), ("warm", warm),
                         ("warm_latest", warm_latest), ("local", local), ("boto3_st", boto_st)):
            fn()  # warm-up (page cache, connections)
            res[name] = timed(fn, a.repeats, cold_setup if fn in (cold, cold_committed) else None, name=name,
                              server_pid=srv.proc.pid)
            log(f"{name}: median {res[name][0]:.3f} s {['%.3f' % x for x in res[name][1]]}")
        # correctness of what the benchmark loads
        t = cold()
        settle()
        ref = WeightsFile(vdir / "weights.tsw").load()
        assert all(torch.equal(t[k], ref[k]) for k in ref)
        g, gu, c, cc, w, wl, lo, b = (res[k][0] for k in ("get", "get_uninit", "cold", "cold_committed", "warm",
                                                          "warm_latest", "local", "boto3_st"))
        cm = statistics.median(commit_s)
        rows = [
            {"section": "cold load", "figure": "cold / plain GET (uninitialised buffer)",
             "value": f"{c / gu:.2f}x ({c:.2f} s / {gu:.2f} s)", "target": "<= 1.10x", "verdict": verdict(c / gu <= 1.10)},
            {"section": "cold load", "figure": "cold / plain GET (zero-filled bytearray)",
             "value": f"{c / g:.2f}x ({c:.2f} s / {g:.2f} s)", "target": "- (baseline pays a memset)", "verdict": "-"},
            {"section": "cold load", "figure": "cold, until committed / plain GET (uninit)",
             "value": f"{cc / gu:.2f}x ({cc:.2f} s; held {max(held) / 2**20:.0f} MiB for the deferred write)",
             "target": "- (not the load time)", "verdict": "-"},
            {"section": "cold load", "figure": "boto3+safetensors / cold", "value": f"{b / c:.2f}x ({b:.2f} s)",
             "target": f">= ~{summary.ratio:.2f}x (ratio)", "verdict": verdict(b / c >= summary.ratio * 0.95)},
            {"section": "warm load", "figure": "warm / local repository", "value": f"{w / lo:.2f}x ({w:.3f} s / {lo:.3f} s)",
             "target": "<= 1.10x", "verdict": verdict(w / lo <= 1.10)},
            {"section": "warm load", "figure": "warm (listing) / local", "value": f"{wl / lo:.2f}x ({wl:.3f} s)",
             "target": "-", "verdict": "-"},
            {"section": "cold load", "figure": "background commit after", "value": f"{cm:.2f} s (median)",
             "target": "-", "verdict": "-"},
            *cpu_rows(gu, c),
            {"section": "throughput", "figure": "plain GET", "value": f"{stored / g / 1e9:.2f} GB/s", "target": "-",
             "verdict": "-"},
        ]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        head = (f"bench_remote: {raw_bytes >> 20} MiB bf16 (stored {stored} bytes, ratio {summary.ratio:.3f}), "
                f"SeaweedFS weed mini on loopback, part {a.part_mib} MiB x {conc}, median of {a.repeats}\n"
                f"machine {platform.node()} {os.cpu_count()} cpus, commit {commit}, "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}, load avg {' '.join(loadavg())}")
        text = render_text(head, rows)
        print(text)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        day = datetime.date.today().isoformat()
        (out / f"remote-{day}.json").write_text(json.dumps(
            {"header": head, "rows": rows, "seconds": {k: v[1] for k, v in res.items()},
             "cpu_s_client_server": CPU, "mib": a.mib,
             "stored_bytes": stored, "ratio": summary.ratio}, indent=1))
        (out / "remote-latest.md").write_text("```\n" + text + "\n```\n")
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
