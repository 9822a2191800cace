"""Fleet throughput for 1, 2 and 3 tinyserve hosts behind HAProxy, and the rollout time (issue 16).

One fleet (tests/fleet.py: SeaweedFS cluster, three hosts polling it, each process in its own network
namespace) is started once; HAProxy is started over the first 1, 2 and 3 hosts in turn, and the same
closed-loop load (client processes, one connection each, `infer` of the 64-wide MLP back to back) runs
for --seconds against it.  Baseline in the same run: the same load straight at host 0 (no proxy).
Per-host CPU seconds per request (utime + stime of each serve process, /proc/<pid>/stat) are
reported too: on a machine with few cores the hosts share them, so throughput cannot scale with
hosts there, and the CPU cost per request is what says what a host would give on its own cores.
Rollout: a new version pushed (--rollouts times), the time until every host serves it (READY in
`models`, the old version unloaded), under the load.

    .venv/bin/python bench/bench_fleet.py [--seconds 5] [--clients 4] [--rollouts 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench"), str(ROOT)]

import _common  # noqa: E402
import fleet  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _worker(addr: str, seconds: float, start_at: float, q) -> None:
    import numpy as np

    from tinyserve.client import Client

    x = np.full((1, 64), 0.5, np.float32)
    n = errors = 0
    with Client(addr, retries=2, timeout=20) as c:
        c.infer("mlp", {"x": x})
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while time.time() < end:
            try:
                c.infer("mlp", {"x": x})
                n += 1
            except Exception:  # noqa: BLE001 - counted
                errors += 1
    q.put((n, errors))


def run_load(addr: str, clients: int, seconds: float, pids: list[int]) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0  # every worker connected and warm first
    procs = [ctx.Process(target=_worker, args=(addr, seconds, start_at, q)) for _ in range(clients)]
    for p in procs:
        p.start()
    while time.time() < start_at:
        time.sleep(0.005)
    cpu0 = [cpu_s(p) for p in pids]
    time.sleep(seconds)
    cpu1 = [cpu_s(p) for p in pids]
    res = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    n = sum(r[0] for r in res)
    cpu = [round(b - a, 2) for a, b in zip(cpu0, cpu1)]
    return {"requests": n, "errors": sum(r[1] for r in res), "rps": round(n / seconds, 1),
            "cpu_s_by_process": cpu, "cpu_ms_per_request": round(1000 * sum(cpu) / max(n, 1), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=3)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/fleet-<date>.json)")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    res: dict = {"bench": "fleet", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "commit": commit, "machine": _common.machine(), "seconds": args.seconds, "clients": args.clients,
                 "command": _common.command_line(ROOT, "bench/bench_fleet.py", argv)}
    f = fleet.Fleet(Path(tempfile.mkdtemp(prefix="ts-benchfleet-")), tag="b")
    try:
        t0 = time.monotonic()
        f.start(push=[("mlp", "fleet:mlp_v1")], proxy=False)
        res["fleet_startup_s"] = round(time.monotonic() - t0, 1)
        res["netns"] = f.use_netns
        host_pids = [h.proc.pid for h in f.hosts]
        res["direct_host0"] = run_load(f.hosts[0].addr, args.clients, args.seconds, host_pids[:1])
        print("direct host0", res["direct_host0"], flush=True)
        res["behind_haproxy"] = {}
        for n in (1, 2, 3):
            proxy = f.start_proxy(f.hosts[:n])
            r = run_load(proxy.addr, args.clients, args.seconds, host_pids[:n] + [proxy.proc.pid])
            r["ratio_to_direct"] = round(r["rps"] / max(res["direct_host0"]["rps"], 1e-9), 3)
            res["behind_haproxy"][str(n)] = r
            print(f"{n} host(s) behind haproxy", r, flush=True)
            if n < 3:
                proxy.stop()
        # the baseline again, after the proxied runs (the first one runs right after startup)
        res["direct_host0_again"] = run_load(f.hosts[0].addr, args.clients, args.seconds, host_pids[:1])
        print("direct host0 again", res["direct_host0_again"], flush=True)
        base = max(res["direct_host0"]["rps"], res["direct_host0_again"]["rps"], 1e-9)
        for r in res["behind_haproxy"].values():
            r["ratio_to_best_direct"] = round(r["rps"] / base, 3)
        # rollouts under load (through the 3-host proxy)
        import threading

        import numpy as np

        from tinyserve.client import Client

        stop, fails, count = threading.Event(), [], [0]

        def load():
            x = np.full((1, 64), 0.5, np.float32)
            with Client(f.proxy.addr, retries=3, timeout=20) as c:
                while not stop.is_set():
                    try:
                        c.infer("mlp", {"x": x})
                        count[0] += 1
                    except Exception as exc:  # noqa: BLE001
                        fails.append(repr(exc))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        times = []
        for k in range(args.rollouts):
            src = "fleet:mlp_v2" if k % 2 == 0 else "fleet:mlp_v1"
            t_push = time.monotonic()
            v = f.push("mlp", src)

            def rolled():
                for h in f.hosts:
                    with Client(h.addr, timeout=10) as c:
                        m = next(m for m in c.models() if m["name"] == "mlp")
                        if sorted(e["version"] for e in m["loaded"] if e["state"] == "READY") != [v]:
                            return False
                return True
            fleet.wait_for(rolled, 120, f"version {v} on every host", 0.05)
            times.append(round(time.monotonic() - t_push, 2))
            print(f"rollout to version {v}: {times[-1]} s", flush=True)
        stop.set()
        for t in threads:
            t.join(30)
        res["rollout"] = {"poll_interval_s": f.poll_interval, "push_to_fleet_s": times,
                          "requests_during": count[0], "failed_requests": len(fails), "failures": fails[:5]}
        cores = os.cpu_count() or 1
        res["note"] = (f"{cores} cores shared by 3 hosts, HAProxy, SeaweedFS and {args.clients} client processes: "
                       "throughput cannot scale with hosts on this machine; cpu_ms_per_request (serve processes "
                       "+ HAProxy) is the per-request CPU cost a host pays on its own cores"
                       if cores < 8 else "")
    finally:
        f.stop()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"fleet-{datetime.date.today()}.json"
    _common.write_atomic(out, json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
