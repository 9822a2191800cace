"""Helpers shared by the benchmark scripts (machine readings, verdicts, the text table)."""

from __future__ import annotations

import time


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
