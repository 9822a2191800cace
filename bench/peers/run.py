#!/usr/bin/env python3
"""tinyserve, LitServe and TorchServe side by side: the same MLP (tinyserve.examples.mlp, float32
64 -> 256 -> 256 -> 10, the same weights), the same cores, the same load generator
(tinyserve.bench.loadgen: the tinyserve protocol for tinyserve, HTTP/1.1 + JSON for the peers), one run.

    bench/peers/install.sh                       # once: the peers' virtual environments (torch 2.13.0)
    .venv/bin/python bench/peers/run.py          # 2 rounds x concurrency 1, 8, 32 (about 3-4 min)
    .venv/bin/python bench/peers/run.py --rounds 3 --concurrency 1,32 --systems tinyserve,litserve

Method: every server is pinned with taskset to the first usable core (one at a time is loaded; the
others sleep), the load generator (this process) to the second.  Each server: one worker, one torch
thread, no batching.  For each round, for each concurrency c, each system in turn gets a closed-loop
point with c connections x 1 request in flight (HTTP/1.1 carries one at a time, so tinyserve is
driven the same way): 1 s warm-up, then 1 s windows until 3 agree within 10% (at most 8 windows /
8 s).  Server CPU per request = CPU time of the server's whole process tree (/proc/<pid>/stat of
every descendant: LitServe's and TorchServe's worker processes, TorchServe's JVM) during the point
(warm-up included) / requests completed during it (warm-up included); "server cores" = that CPU
time / the point's wall time (at most 1 when the pinning holds).  Before measuring, each system answers one request whose output is
compared with the module run here.  A point is *disturbed* when other processes took more than 10%
of the servers' core during it (busy + steal time of that core in /proc/stat, less the server's own
CPU); it is run again, at most 3 tries (the rejected runs stay in the JSON).  Figures: medians over
rounds; ratios to tinyserve.

Results: bench/peers/results/peers-<date>T<HHMM>.json (every point), peers-latest.md, and the plots
latency_vs_throughput.png / latency_distribution.png (last round).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import _proc_field, loadavg  # noqa: E402

SYSTEMS = ("tinyserve", "litserve", "torchserve")
START_TIMEOUT_S = 240.0
CLK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        ppid = int(rest[1])
        children.setdefault(ppid, []).append(int(d))
        stats[int(d)] = (int(rest[11]) + int(rest[12])) / CLK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


def core_busy_s(core: int) -> float:
    """Seconds core `core` spent busy (user, nice, system, irq, softirq) or stolen by the hypervisor."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK
    return 0.0


class Proc:
    """A server process in its own session (stopped by its process group id: SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, env: dict | None = None):
        self.name = name
        (HERE / "logs").mkdir(exist_ok=True)
        self.log_path = HERE / "logs" / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.p = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **(env or {})})

    def tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-25:])
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
        else:  # the leader exited: its group may live on (TorchServe's JVM)
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def http_post(url: str, body: bytes, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(proc: Proc, url: str, body: bytes) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if proc.p.poll() is not None and proc.name != "torchserve":
            break
        try:
            return http_post(url, body)
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"{proc.name} did not answer at {url} within {START_TIMEOUT_S:.0f} s ({last!r}):\n{proc.tail()}")


def start_systems(systems, work: Path, weights: Path, core: int, row_body: bytes) -> dict:
    pin = ["taskset", "-c", str(core)]
    out = {}
    if "tinyserve" in systems:
        from tinyserve.pack import pack
        from tinyserve.repository import Repository

        repo = work / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        pack(Repository(repo, create=True), "mlp", "tinyserve.examples:mlp")
        proc = Proc("tinyserve", pin + [sys.executable, "-m", "tinyserve.cli", "serve", "--repo", str(repo),
                                        "--model", "mlp", "--threads", "1", "--port", "0"], ROOT,
                    {"PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + START_TIMEOUT_S
        port = None
        while time.monotonic() < deadline and port is None and proc.p.poll() is None:
            text = proc.log_path.read_text()
            if "listening on" in text:
                port = int(text.split("listening on", 1)[1].split()[0].rsplit(":", 1)[1])
            else:
                time.sleep(0.2)
        if port is None:
            raise RuntimeError(f"tinyserve did not start:\n{proc.tail()}")
        out["tinyserve"] = {"proc": proc, "port": port}
    if "litserve" in systems:
        py = HERE / ".venv-litserve" / "bin" / "python"
        if not py.exists():
            raise RuntimeError("LitServe is not installed: run bench/peers/install.sh litserve")
        port = free_port()
        proc = Proc("litserve", pin + [str(py), str(HERE / "litserve_mlp.py"), str(weights), str(port)], work)
        url = f"http://127.0.0.1:{port}/predict"
        out["litserve"] = {"proc": proc, "url": url, "first": wait_http(proc, url, row_body)}
    if "torchserve" in systems:
        venv = HERE / ".venv-torchserve" / "bin"
        if not (venv / "torchserve").exists():
            raise RuntimeError("TorchServe is not installed: run bench/peers/install.sh torchserve")
        store = work / "store"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        subprocess.run([str(venv / "torch-model-archiver"), "--model-name", "mlp", "--version", "1.0",
                        "--handler", str(HERE / "torchserve_handler.py"), "--serialized-file", str(weights),
                        "--extra-files", str(HERE / "mlp_def.py"), "--export-path", str(store), "--force"],
                       check=True, cwd=work, timeout=120)
        port, mport, metport = free_port(), free_port(), free_port()
        cfg = work / "config.properties"
        cfg.write_text(f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{mport}\n"
                       f"metrics_address=http://127.0.0.1:{metport}\ndefault_workers_per_model=1\n"
                       f"disable_token_authorization=true\ninstall_py_dep_per_model=false\n"
                       f"default_response_timeout=60\njob_queue_size=1000\n")
        env = {"PATH": f"{venv}:{os.environ.get('PATH', '')}", "LOG_LOCATION": str(HERE / "logs"),
               "METRICS_LOCATION": str(HERE / "logs"), "OMP_NUM_THREADS": "1"}
        proc = Proc("torchserve", pin + [str(venv / "torchserve"), "--start", "--foreground", "--ncs",
                                         "--model-store", str(store), "--models", "mlp=mlp.mar",
                                         "--ts-config", str(cfg), "--disable-token-auth"], work, env)
        url = f"http://127.0.0.1:{port}/predictions/mlp"
        out["torchserve"] = {"proc": proc, "url": url, "first": wait_http(proc, url, row_body)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--time-bound", type=float, default=8.0)
    ap.add_argument("--tries", type=int, default=3, help="runs of a disturbed point at most (3)")
    ap.add_argument("--disturbed", type=float, default=0.10,
                    help="a point is disturbed when other processes took more than this share of the servers' core")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        ap.error(f"systems are {SYSTEMS}")
    concs = [int(c) for c in args.concurrency.split(",")]
    if not 1 <= args.rounds <= 10 or any(not 1 <= c <= 256 for c in concs):
        ap.error("rounds 1..10, concurrency 1..256")

    import numpy as np
    import torch

    from tinyserve import examples
    from tinyserve.bench import loadgen, report
    from tinyserve.bench.stats import StopRule

    cores = sorted(os.sched_getaffinity(0))
    server_core, gen_core = cores[0], cores[1] if len(cores) > 1 else cores[0]
    os.sched_setaffinity(0, {gen_core})
    work = HERE / "work"
    work.mkdir(exist_ok=True)
    module, _ = examples.mlp()
    weights = work / "mlp.pt"
    torch.save(module.state_dict(), weights)
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 64), dtype=np.float32) for _ in range(16)]
    bodies = [json.dumps({"x": r.tolist()}).encode() for r in rows]
    with torch.inference_mode():
        want0 = module(torch.from_numpy(rows[0])).numpy()
    rule = StopRule(window_s=args.window, k=3, tolerance=0.10, min_windows=3, max_windows=8,
                    time_bound_s=args.time_bound)
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": {"cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
                       "cores": os.cpu_count(), "loadavg_start": loadavg(), "server_core": server_core,
                       "loadgen_core": gen_core},
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "torch": torch.__version__, "rounds": args.rounds, "concurrency": concs, "stop_rule": vars(rule),
           "tries": args.tries, "disturbed": args.disturbed}
    log(f"starting {', '.join(systems)} on core {server_core}; load generator on core {gen_core}")
    t0 = time.perf_counter()
    running: dict = {}
    points: list[dict] = []
    rejected: list[dict] = []
    checks = {}
    try:
        running = start_systems(systems, work, weights, server_core, bodies[0])
        targets = {}
        for s, info in running.items():
            if s == "tinyserve":
                from tinyserve.client import Client

                with Client("127.0.0.1", info["port"]) as c:
                    got = next(iter(c.infer("mlp", {"x": rows[0]}).values()))
                targets[s] = loadgen.TinyserveTarget("127.0.0.1", info["port"], "mlp", [{"x": r} for r in rows],
                                                     label="tinyserve")
            else:
                got = np.asarray(info["first"]["y"], dtype=np.float32)
                targets[s] = loadgen.HttpTarget(info["url"], bodies, label=s)
            checks[s] = float(np.abs(got - want0).max())
            log(f"{s}: answer matches the module (max difference {checks[s]:.2e})")
            if checks[s] > 1e-4:
                raise RuntimeError(f"{s} answers {got} for {want0}")
        log(f"all up in {time.perf_counter() - t0:.0f} s; load avg {' '.join(loadavg())}")
        for r in range(args.rounds):
            for c in concs:
                for s in systems:
                    pid = running[s]["proc"].p.pid
                    for attempt in range(1, args.tries + 1):
                        cpu0, busy0, w0 = tree_cpu_s(pid), core_busy_s(server_core), time.perf_counter()
                        res = loadgen.run_closed_loop(targets[s], concurrency=c, connections=c, rule=rule,
                                                      warmup_s=1.0)
                        cpu, wall = tree_cpu_s(pid) - cpu0, time.perf_counter() - w0
                        others = max(0.0, core_busy_s(server_core) - busy0 - cpu)
                        res["server_cores"] = cpu / wall  # <= 1 when pinned to one core
                        res["others_on_server_core"] = others / wall
                        res["attempt"] = attempt
                        if res["others_on_server_core"] <= args.disturbed or attempt == args.tries:
                            break
                        res["round"], res["system"] = r, s
                        rejected.append(res)
                        log(f"round {r + 1} c{c} {s}: disturbed (other processes took "
                            f"{res['others_on_server_core']:.0%} of the servers' core): again")
                    res["disturbed"] = res["others_on_server_core"] > args.disturbed
                    res["round"], res["system"] = r, s
                    n = res.get("all_completions") or res["completed"]
                    res["server_cpu_us_per_request"] = cpu / n * 1e6 if n else None
                    res["loadavg_after"] = loadavg()
                    points.append(res)
                    log(f"round {r + 1} c{c} {s}: {res['throughput']:,.0f} req/s, p50 {res['latency_us']['p50']:.0f} us, "
                        f"p99 {res['latency_us']['p99']:.0f} us, errors {res['errors'] or 0}, server CPU "
                        f"{res['server_cpu_us_per_request'] or 0:.0f} us/req, generator {res['loadgen']['cpu_cores']:.0%}")
    finally:
        for info in running.values():
            info["proc"].stop()
    summary = summarize(points, systems, concs)
    doc = {"env": env, "answer_max_abs_diff": checks, "summary": summary, "points": points,
           "rejected_disturbed": rejected, "wall_s": round(time.perf_counter() - t0, 1)}
    text = render(doc)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"peers-{env['date'][:16].replace(':', '')}"
    report.write_atomic(out / f"{stem}.json", report.to_json(doc).encode())
    report.write_atomic(out / "peers-latest.md", (f"# Peers: latest results\n\n```\n{text}\n```\n\nCommand: "
                                                  f"`.venv/bin/python bench/peers/run.py`; every point: "
                                                  f"`bench/peers/results/{stem}.json`.\n").encode())
    last = [p for p in points if p["round"] == args.rounds - 1]
    report.plot(last, out, title="MLP, closed loop, c connections x 1",
                groups={s: [p for p in last if p["system"] == s] for s in systems})
    return 0


def summarize(points, systems, concs) -> list[dict]:
    rows = []
    for c in concs:
        base = None
        for s in systems:
            ps = [p for p in points if p["system"] == s and p["concurrency"] == c]
            if not ps:
                continue
            row = {"system": s, "concurrency": c,
                   "throughput": statistics.median(p["ok_throughput"] for p in ps),
                   "p50_us": statistics.median(p["latency_us"]["p50"] or 0 for p in ps),
                   "p99_us": statistics.median(p["latency_us"]["p99"] or 0 for p in ps),
                   "server_cpu_us": statistics.median(p["server_cpu_us_per_request"] or 0 for p in ps),
                   "server_cores": statistics.median(p["server_cores"] for p in ps),
                   "loadgen_cpu": statistics.median(p["loadgen"]["cpu_cores"] for p in ps),
                   "errors": sum(sum(p["errors"].values()) for p in ps),
                   "stable": sum(p["stable"] for p in ps), "rounds": len(ps),
                   "others_on_server_core": statistics.median(p["others_on_server_core"] for p in ps),
                   "disturbed": sum(p["disturbed"] for p in ps)}
            if s == "tinyserve":
                base = row
            if base is not None and s != "tinyserve":
                row["throughput_vs_tinyserve"] = row["throughput"] / base["throughput"]
                row["p50_vs_tinyserve"] = row["p50_us"] / base["p50_us"] if base["p50_us"] else None
            rows.append(row)
    return rows


def render(doc) -> str:
    env = doc["env"]
    m = env["machine"]
    lines = [f"tinyserve vs LitServe vs TorchServe, {env['date']}, commit {env['commit']}, torch {env['torch']}",
             f"machine: {m['cpu_model']}, {m['cores']} cores; servers on core {m['server_core']}, load generator on "
             f"core {m['loadgen_core']}; load avg at start {' '.join(m['loadavg_start'])}",
             f"MLP 64->256->256->10 float32, 1 row per request; closed loop, c connections x 1 in flight; "
             f"{env['rounds']} rounds, medians; answers checked (max |diff| "
             + ", ".join(f"{k} {v:.1e}" for k, v in doc["answer_max_abs_diff"].items()) + ")", "",
             f"{'c':>3}  {'system':<11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/req':>18} "
             f"{'srv cores':>9} {'others':>6} {'gen cpu':>8} {'errors':>6} {'stable':>6} {'disturbed':>9}  vs tinyserve (req/s, p50)"]
    for r in doc["summary"]:
        vs = ""
        if "throughput_vs_tinyserve" in r:
            vs = f"{r['throughput_vs_tinyserve']:.3f}x, {r['p50_vs_tinyserve']:.1f}x"
        lines.append(f"{r['concurrency']:>3}  {r['system']:<11} {r['throughput']:>9,.0f} {r['p50_us'] / 1000:>8.2f} "
                     f"{r['p99_us'] / 1000:>8.2f} {r['server_cpu_us']:>18,.0f} {r['server_cores']:>9.2f} "
                     f"{r['others_on_server_core']:>6.0%} {r['loadgen_cpu']:>7.0%} "
                     f"{r['errors']:>6} {r['stable']:>3}/{r['rounds']} {r['disturbed']:>6}/{r['rounds']}  {vs}")
    lines.append("")
    lines.append(f"srv cores: the server's CPU / wall time; others: share of the servers' core taken by other "
                 f"processes (or stolen); a point with others > {doc['env']['disturbed']:.0%} is run again (at most "
                 f"{doc['env']['tries']} tries; {len(doc['rejected_disturbed'])} runs rejected)")
    lines.append(f"wall time {doc['wall_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
