"""What per-request statistics cost a served request: tinyserve with statistics on against the same
server with `--no-statistics` (no recording, no ejection bookkeeping), in alternating runs.

Both servers run the same repository (bench_latency.py's MLP and identity models) on the same pinned
core, driven by bench_latency.py's load generator on the other core.  Each round runs both, in an
order that alternates between rounds; the figures are medians of the per-round ratios (on / off),
next to the run-to-run spread of each configuration (max - min over rounds, relative to the median).
Target (issue 6): no difference beyond the run-to-run spread.

    .venv/bin/python bench/bench_stats_ab.py [--rounds 7] [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_latency as bl  # noqa: E402  (bench/ is sys.path[0])
from _common import loadavg, render_text, verdict  # noqa: E402

SCENARIOS = [("mlp", "c1"), ("mlp", "pipe32"), ("identity", "c1")]


def start(bench: bl.Bench, repo: Path, stats: bool, name: str) -> tuple[bl.Proc, int]:
    argv = [bl.py(), "-m", "tinyserve", "serve", "--repo", str(repo), "--threads", "1", "--port", "0"]
    for m in bl.MODELS:
        argv += ["--model", m]
    if not stats:
        argv.append("--no-statistics")
    p = bl.Proc(name, bl.taskset(bench.cores["server"], argv), bench.work / f"{name}.log")
    bench.procs.append(p)
    m = p.wait_for(r"tinyserve: listening on [^:\s]+:(\d+)", bl.START_TIMEOUT_S)
    return p, int(m.group(1))


def spread(xs: list[float]) -> float:
    med = statistics.median(xs)
    return (max(xs) - min(xs)) / med if med else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 7, --quick 5)")
    ap.add_argument("--quick", action="store_true", help="fewer requests per run")
    ap.add_argument("--out", default=str(bl.ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 7)
    counts = {"c1": (300, 3000), "pipe32": (1000, 10000)} if args.quick else \
        {"c1": (500, 5000), "pipe32": (2000, 20000)}
    cores = bl.pick_cores()
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="tinyserve-stats-ab-"))
    log = lambda msg: print(f"[{time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": bl.git_commit(),
           "load_avg_start": loadavg(), "cores": cores, "rounds": rounds, "quick": args.quick,
           "command": "bench/bench_stats_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    bench = bl.Bench(args, cores, work, log)
    runs: dict = {f"{m}/{s}": {"on": [], "off": []} for m, s in SCENARIOS}
    try:
        repo = bl.setup_repo(work)
        bench.start_driver()
        servers = {"on": start(bench, repo, True, "stats-on"), "off": start(bench, repo, False, "stats-off")}
        for r in range(rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for model, scen in SCENARIOS:
                warm, count = counts[scen]
                for which in order:
                    p, port = servers[which]
                    res = bench.drive(port, p.pid, model, scen, warm, count)
                    runs[f"{model}/{scen}"][which].append(res)
            log(f"round {r + 1}/{rounds} done (load {' '.join(loadavg())})")
    finally:
        codes = bench.stop_all()
    rows, out = [], {"env": env, "scenarios": {}}
    for key, got in runs.items():
        on, off = got["on"], got["off"]
        if not on or len(on) != len(off):
            continue
        p50 = [a["p50_us"] / b["p50_us"] for a, b in zip(on, off)]
        p99 = [a["p99_us"] / b["p99_us"] for a, b in zip(on, off)]
        tput = [a["throughput_rps"] / b["throughput_rps"] for a, b in zip(on, off)]
        sp_p50 = max(spread([x["p50_us"] for x in on]), spread([x["p50_us"] for x in off]))
        sp_tput = max(spread([x["throughput_rps"] for x in on]), spread([x["throughput_rps"] for x in off]))
        m_p50, m_tput = statistics.median(p50), statistics.median(tput)
        out["scenarios"][key] = {"p50_ratio": p50, "p99_ratio": p99, "throughput_ratio": tput,
                                 "spread_p50": sp_p50, "spread_throughput": sp_tput,
                                 "on": on, "off": off}
        sec = f"{key}: statistics on / off"
        med_on = statistics.median(x["p50_us"] for x in on)
        med_off = statistics.median(x["p50_us"] for x in off)
        rows.append({"section": sec, "figure": "p50 on, off (median of rounds)",
                     "value": f"{med_on:.0f} us, {med_off:.0f} us", "target": "", "verdict": ""})
        rows.append({"section": sec, "figure": "p50 on / off (median of per-round ratios)",
                     "value": f"{m_p50:.3f}x [{min(p50):.3f}..{max(p50):.3f}]",
                     "target": f"within the spread ({sp_p50:.1%})", "verdict": verdict(abs(m_p50 - 1) <= sp_p50)})
        rows.append({"section": sec, "figure": "throughput on / off",
                     "value": f"{m_tput:.3f}x [{min(tput):.3f}..{max(tput):.3f}]",
                     "target": f"within the spread ({sp_tput:.1%})", "verdict": verdict(abs(m_tput - 1) <= sp_tput)})
        rows.append({"section": sec, "figure": "p99 on / off", "value": f"{statistics.median(p99):.3f}x "
                     f"[{min(p99):.3f}..{max(p99):.3f}]", "target": "", "verdict": ""})
    env["load_avg_end"] = loadavg()
    env["exit_codes"] = codes
    header = (f"tinyserve statistics cost (on vs --no-statistics), {env['date']}\n"
              f"commit {env['commit']['commit']}; {rounds} alternating rounds; server core {cores['server']}, driver core "
              f"{cores['driver']}; load avg {' '.join(env['load_avg_start'])} -> {' '.join(env['load_avg_end'])}\n"
              "spread: (max - min) / median over rounds of the noisier configuration")
    text = render_text(header, rows)
    print(text)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    day = env["date"][:10]
    (outdir / f"stats-ab-{day}.json").write_text(json.dumps(out, indent=1, default=str))
    (outdir / "stats-ab-latest.md").write_text(f"# Statistics cost on served requests: latest\n\n"
                                               f"Command: `{env['command']}`\n\n```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
