"""Helpers shared by the benchmark scripts (machine readings, verdicts, the text table)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render_text(header: str, rows: list[dict]) -> str:
    w = [max(len(r[k]) for r in rows) for k in ("figure", "value", "target")]
    lines = [header, ""]
    sec = None
    for r in rows:
        if r["section"] != sec:
            sec = r["section"]
            lines.append(f"== {sec}")
        lines.append(f"  {r['figure']:<{w[0]}}  {r['value']:<{w[1]}}  {r['target']:<{w[2]}}  {r['verdict']}")
    return "\n".join(lines)


def results_page(title: str, header: str, res: dict, rows: list[dict], method: str | None = None) -> list[str]:
    """The lines of a `<name>-latest.md` page up to its table: the title, the run's header, wall time
    and command, the phases (seconds, load average after), an optional method paragraph, and the
    table of `rows` (section, figure, value, target, verdict)."""
    lines = [f"# {title}", "", "```", header, "```", "",
             f"Wall time: {res['wall_s']:.0f} s. Command: `{res['command']}`", "",
             "Phases (seconds, load average after): " + "; ".join(
                 f"{k} {v['s']:.0f} s ({' '.join(v['loadavg_after'])})" for k, v in res["phases"].items()) + ".", ""]
    if method:
        lines += [method, ""]
    lines += ["| section | figure | value | target | result |", "|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['figure']} | {r['value']} | {r['target']} | {r['verdict']} |" for r in rows]
    return lines


def tally(rows: list[dict]) -> str:
    """"N targets pass, M fail." over the rows' verdicts."""
    passed = sum(r["verdict"] == "PASS" for r in rows)
    failed = sum(r["verdict"] == "FAIL" for r in rows)
    return f"{passed} targets pass, {failed} fail."


def command_line(root: Path, script: str, argv: list[str] | None) -> str:
    """How the run was started: the interpreter relative to `root` (absolute when outside it), the
    script, and its arguments (`argv`, else this process's)."""
    import sys

    exe = os.path.relpath(sys.executable, root)
    return " ".join([exe if not exe.startswith("..") else sys.executable, script,
                     *(argv if argv is not None else sys.argv[1:])])


def phase_timer(phases: dict, log):
    """A `phase(name)` callable that records the seconds since the previous call and the load
    average after it into `phases`, and logs them."""
    last = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = {"s": round(now - last[0], 2), "loadavg_after": loadavg()}
        last[0] = now
        log(f"{name} done in {phases[name]['s']:.1f} s (load avg {' '.join(loadavg())})")

    return phase


def write_atomic(path, data) -> None:
    """Write a results file whole or not at all: a temp file beside it, fsync, rename (text or bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_module(data: Path, filename: str, source: str):
    """Import `source` (a model file a benchmark generates) written as data/filename."""
    path = Path(data) / filename
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine() -> dict:
    """The machine a benchmark ran on: CPU model, cores, RAM, load average at the start, kernel."""
    import platform

    mem_kb = int((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    return {"cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 2), "loadavg_start": loadavg(),
            "kernel": platform.release()}
