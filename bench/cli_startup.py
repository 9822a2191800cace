#!/usr/bin/env python3
"""CLI start-up: how long `tinyserve health` takes against a port where no server listens.

    .venv/bin/python bench/cli_startup.py                 # 15 runs of each command (about 10 s)
    .venv/bin/python bench/cli_startup.py --runs 30 --json bench/results/cli_startup-<date>.json

Each run is a fresh process (`python -m tinyserve health --port P --timeout 1`, exit status 2:
unreachable), timed from spawn to exit with `time.perf_counter`, like hyperfine; the runs of the
candidates are interleaved so a busy neighbour slows them alike.  Baselines measured in the same run:
`python -c pass` (the interpreter alone) and `python -c "import torch"` (what every client command
paid before issue 17 item 11).  Figures: median [min..max] of the runs.  Target: health under 0.3 s.
Also checked in each health run: torch is not imported (`-X importtime` of one extra run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, write_atomic  # noqa: E402  (bench/ is sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_once(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, timeout=120)
    return time.perf_counter() - t0, proc.returncode


def imports_torch(cmd: list[str]) -> bool:
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in proc.stderr.splitlines())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    py = sys.executable
    port = closed_port()
    health = [py, "-m", "tinyserve", "health", "--port", str(port), "--timeout", "1"]
    candidates = {"python -c pass": [py, "-c", "pass"],
                  "python -c 'import torch'": [py, "-c", "import torch"],
                  "tinyserve health (no server)": health}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    codes: dict[str, set] = {k: set() for k in candidates}
    for name, cmd in candidates.items():  # one untimed run each: the page cache holds the files
        time_once(cmd)
    for _ in range(args.runs):
        for name, cmd in candidates.items():
            dt, rc = time_once(cmd)
            times[name].append(dt)
            codes[name].add(rc)
    torch_imported = imports_torch(health)
    m = machine()
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, load {' '.join(m['loadavg_start'])}; "
          f"python {platform.python_version()}; commit {commit()}; date {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"{args.runs} runs each, interleaved; median [min..max] seconds")
    base = statistics.median(times["python -c pass"])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "exit": sorted(codes[name])}
        print(f"  {name:<30} {med:.3f} [{min(ts):.3f}..{max(ts):.3f}]  {med / base:.1f}x the bare interpreter"
              f"  exit {sorted(codes[name])}")
    med = rows["tinyserve health (no server)"]["median_s"]
    ok = med < TARGET_S and not torch_imported and codes["tinyserve health (no server)"] == {2}
    print(f"tinyserve health: {med:.3f} s, target < {TARGET_S} s; torch imported: {torch_imported} -> "
          f"{'PASS' if ok else 'FAIL'}")
    if args.json:
        write_atomic(args.json, json.dumps({"machine": m, "commit": commit(), "runs": args.runs, "rows": rows,
                                            "torch_imported": torch_imported, "target_s": TARGET_S,
                                            "pass": ok}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
