"""Microbenchmark: the cost of recording one request in tinyserve.metrics (target: at most 1 us).

    .venv/bin/python bench/bench_stats.py                 # ~10 s; writes bench/results/stats-<date>.json and stats-latest.md
    .venv/bin/python bench/bench_stats.py --quick --out /tmp/r

Each figure is the median over rounds of (time of N calls) / N, with the spread (min..max of the
rounds).  The baseline, measured in the same rounds, is a call of an empty function with the same
arguments: the cost of the call itself, which any recording API pays.  Figures:

  record_ok            Recorder.record("OK", q, c, t): a success, three histograms (the hot path)
  record_ok_small      the same with sub-16-us durations (the exact-bucket branch)
  record_via_local     ModelStats.record(...): the thread's recorder found through threading.local
  record_error         Recorder.record("MODEL_ERROR", ..., message=...): the error path
  admitted+dequeued    the two queue counters the loop and the worker bump per request
  per_request_total    admitted + dequeued + record_ok: everything the server adds per request
  ejection_record_ok   EjectionPolicy.record(key, True, "OK", now): a success seen by the policy
  ejection_admit       EjectionPolicy.admit(key, now) of a serving model
  server_stats_before  what tinyserve/server.py's _deliver did per request before this module (server and
                       model Stats: two counters, two Histogram.add), when server.py still has them
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import _proc_field, loadavg, render_text, verdict, write_atomic  # noqa: E402

from tinyserve.health.ejection import EjectionConfig, EjectionPolicy  # noqa: E402
from tinyserve.metrics import ModelStats  # noqa: E402

TARGET_NS = 1000.0


def git_commit() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = run("rev-parse", "HEAD") or "unknown"
    status = [ln for ln in run("status", "--porcelain").splitlines() if ln]
    return {"commit": head + ("-dirty" if status else ""), "dirty_tracked": any(not ln.startswith("??") for ln in status)}


def cases(n: int):
    """name -> a function running the operation n times (loop overhead included in all, baseline too)."""
    ms = ModelStats("m", 1)
    rec = ms.recorder()
    record, admitted, dequeued = rec.record, rec.admitted, rec.dequeued
    policy = EjectionPolicy(EjectionConfig())
    key = ("m", 1)

    def empty(code, q, c, t):
        pass

    def baseline():
        for _ in range(n):
            empty("OK", 123_456, 2_345_678, 3_456_789)

    def record_ok():
        for _ in range(n):
            record("OK", 123_456, 2_345_678, 3_456_789)

    def record_ok_small():
        for _ in range(n):
            record("OK", 1_234, 5_678, 9_999)

    def record_via_local():
        msr = ms.record
        for _ in range(n):
            msr("OK", 123_456, 2_345_678, 3_456_789)

    def record_error():
        for _ in range(n):
            record("MODEL_ERROR", 123_456, 2_345_678, 3_456_789, "model 'm' raised ValueError: x")

    def queue_counters():
        for _ in range(n):
            admitted()
            dequeued()

    def per_request_total():
        for _ in range(n):
            admitted()
            dequeued()
            record("OK", 123_456, 2_345_678, 3_456_789)

    def ejection_record_ok():
        pr = policy.record
        for i in range(n):
            pr(key, True, "OK", i * 1e-4)

    def ejection_admit():
        pa = policy.admit
        for i in range(n):
            pa(key, 1.0)

    out = {}
    try:  # the server's own statistics as they were (imports torch; absent once the server moves over)
        from tinyserve.server import Stats
    except ImportError:
        Stats = None
    if Stats is not None:
        st, mst = Stats(), Stats()

        def server_stats_before():
            for _ in range(n):
                us = 3_456_789 // 1000
                st.requests += 1
                st.latency.add(us)
                mst.requests += 1
                mst.latency.add(us)

        out["server_stats_before"] = server_stats_before
    return {**{"baseline_empty_call": baseline, "record_ok": record_ok, "record_ok_small": record_ok_small,
            "record_via_local": record_via_local, "record_error": record_error, "admitted+dequeued": queue_counters,
            "per_request_total": per_request_total, "ejection_record_ok": ejection_record_ok,
            "ejection_admit": ejection_admit}, **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--calls", type=int, default=None, help="calls per round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 11)
    n = args.calls or (50_000 if args.quick else 200_000)
    if not 1 <= rounds <= 1000 or not 1000 <= n <= 10**8:
        ap.error("--rounds must be 1..1000 and --calls 1000..1e8")
    fns = cases(n)
    for fn in fns.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved: every case sees the same machine conditions
        for name, fn in fns.items():
            t0 = time.perf_counter_ns()
            fn()
            times[name].append((time.perf_counter_ns() - t0) / n)
    base = statistics.median(times["baseline_empty_call"])
    figures = {}
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        figures[name] = {"median_ns": round(med, 1), "min_ns": round(min(ts), 1), "max_ns": round(max(ts), 1),
                         "over_baseline_ns": round(med - base, 1)}
        target = f"<= {TARGET_NS:.0f} ns" if name in ("record_ok", "per_request_total", "record_via_local") else "-"
        ok = med <= TARGET_NS if target != "-" else None
        rows.append({"section": "ns per call (median of rounds; spread min..max)", "figure": name,
                     "value": f"{med:7.1f} ns ({min(ts):.1f}..{max(ts):.1f}), +{med - base:.1f} over the empty call",
                     "target": target, "verdict": "" if ok is None else verdict(ok)})
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
                    "cores_online": os.cpu_count(), "loadavg_start": loadavg(), "kernel": platform.release()},
        **git_commit(),
        "python": platform.python_version(),
        "rounds": rounds, "calls_per_round": n,
        "note": "shared 2-core VM: other sessions may run at the same time; cases are interleaved per round",
    }
    env["machine"]["loadavg_end"] = loadavg()
    header = (f"bench_stats: {env['date']} commit {env['commit']} python {env['python']} "
              f"{env['machine']['cpu_model']} x{env['machine']['cores_online']} load {' '.join(env['machine']['loadavg_start'])} "
              f"(rounds {rounds} x {n} calls)")
    text = render_text(header, rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    day = env["date"][:10]
    write_atomic(out / f"stats-{day}.json", json.dumps({"environment": env, "figures": figures}, indent=2) + "\n")
    write_atomic(out / "stats-latest.md", "```\n" + text + "\n```\n\nCommand: `.venv/bin/python bench/bench_stats.py"
                  + (" --quick" if args.quick else "") + "`\n")
    return 0 if all(r["verdict"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
