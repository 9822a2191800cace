"""Output of `tinyserve bench`: the terminal table, a progress line, JSON (written atomically) and
PNG plots (matplotlib, imported only when plotting, Agg backend)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyserve.bench.stats import PERCENTILES, pct_key

COLUMNS = ("point", "req/s", "ok/s") + tuple(pct_key(q) for q in PERCENTILES) + ("errors", "windows", "gen cpu")


def _us(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 10_000 else f"{v:.0f} us"


def point_label(r: dict) -> str:
    if r["mode"] == "open":
        return f"rate {r['rate']:g}/s"
    return f"c{r['concurrency']} ({r['connections']} conn)"


def table(results: Sequence[dict], title: str = "") -> str:
    """A plain text table, one row per point, then each point's warnings."""
    rows = []
    for r in results:
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        rows.append((point_label(r), f"{r['throughput']:,.0f}", f"{r['ok_throughput']:,.0f}",
                     *(_us(r["latency_us"][pct_key(q)]) for q in PERCENTILES), errs,
                     f"{r['windows_reported']}/{len(r['windows'])}{'' if r['stable'] else ' !'}",
                     f"{r['loadgen']['cpu_cores'] * 100:.0f}%"))
    widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in rows)) for i in range(len(COLUMNS))]
    out = [title] if title else []
    out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths))))
    for row in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    notes = []
    for r in results:
        srv = r.get("server")
        if srv:
            lat = srv.get("latency_us_cumulative") or {}
            line = (f"  {point_label(r)}: server counted {srv['requests']} requests"
                    + (f", errors {srv['errors']}" if srv["errors"] else "")
                    + (f"; server latency (since start) p50 {lat.get('p50')} us, p99 {lat.get('p99')} us" if lat else ""))
            for k, v in (srv.get("split") or {}).items():
                if isinstance(v, dict):
                    line += f"; {k.removesuffix('_us')} p50 {v.get('p50')} us, p99 {v.get('p99')} us"
            bs = srv.get("batch_size_cumulative")
            if bs:
                line += f"; batch size p50 {bs.get('p50')}, max {bs.get('max')}"
            notes.append(line)
        lg = r["loadgen"]
        if "send_lag_us" in lg:
            lag = lg["send_lag_us"]
            notes.append(f"  {point_label(r)}: sent after the intended time p50 {_us(lag['p50'])}, p99 {_us(lag['p99'])}")
        for w in r["warnings"]:
            notes.append(f"  WARNING {point_label(r)}: {w}")
    if notes:
        out.append("")
        out.extend(notes)
    out.append("")
    out.append("windows: reported/measured ('!' = not stable); gen cpu: the load generator's CPU, in % of one core")
    return "\n".join(out)


class Progress:
    """A progress line on stderr while a point runs (only on a terminal): windows measured and the
    last window's throughput and p50."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = ""
        self.max_windows = 1

    def start(self, label: str, max_windows: int) -> None:
        self.label, self.max_windows = label, max_windows

    def window(self, w) -> None:
        if not self.enabled:
            return
        done = min(1.0, (w.index + 1) / self.max_windows)
        bar = "#" * int(done * 20)
        p50 = "-" if w.p50 is None else f"{w.p50:.0f} us"
        self.stream.write(f"\r{self.label:<24} [{bar:<20}] window {w.index + 1}: {w.throughput:,.0f} req/s, "
                          f"p50 {p50}   ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def to_json(doc) -> str:
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if not k.startswith("_")}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o

    return json.dumps(clean(doc), indent=1)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def plot(results: Sequence[dict], out_dir: str | os.PathLike, title: str = "",
         groups: dict[str, Sequence[dict]] | None = None) -> list[Path]:
    """Two PNGs: latency percentiles against throughput (one line per percentile; per target when
    `groups` maps target labels to their results), and the latency distribution (CDF of each point's
    latencies, log time axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = groups or {"": results}
    files = []

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    for gi, (label, rs) in enumerate(groups.items()):
        x = [r["ok_throughput"] for r in rs]
        for q in PERCENTILES:
            y = [(r["latency_us"][pct_key(q)] or float("nan")) / 1000 for r in rs]
            ax.plot(x, y, styles[gi % len(styles)], marker="o", label=f"{label} {pct_key(q)}".strip())
    ax.set_xlabel("throughput (answers/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "latency percentiles vs throughput")
    p = out_dir / "latency_vs_throughput.png"
    _save(fig, p)
    plt.close(fig)
    files.append(p)

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in groups.items():
        for r in rs:
            lat = np.sort(np.asarray(r.get("_latencies_us", []), dtype=np.float64))
            if lat.size == 0:
                continue
            y = np.arange(1, lat.size + 1) / lat.size
            ax.plot(lat / 1000, y, label=f"{label} {point_label(r)}".strip())
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title((title + ": " if title else "") + "latency distribution (CDF)")
    p = out_dir / "latency_distribution.png"
    _save(fig, p)
    plt.close(fig)
    files.append(p)
    return files


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
