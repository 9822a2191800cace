"""`tinyserve bench`: drive a running server with load and report throughput and latency.

    tinyserve bench mlp                                   # closed loop, 1 connection, 1 in flight
    tinyserve bench mlp --connections 4 --depth 8         # 4 connections x 8 pipelined
    tinyserve bench mlp --concurrency 1,4,16,64 --connections 4 --plot out/   # concurrency sweep
    tinyserve bench mlp --rate 500,1000,2000 --json out/open.json             # open loop, rate sweep

Exit status: 0 when every request was answered without error, 1 when some failed (the table and
JSON count them by code), 2 on a usage or connection error (as the other client commands).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
from pathlib import Path

from tinyserve import errors

ENV_HOST, ENV_PORT, ENV_TOKEN = "TINYSERVE_HOST", "TINYSERVE_PORT", "TINYSERVE_TOKEN"
MAX_POINTS = 64
PROBE_FATAL = ("INVALID_INPUT", "BAD_REQUEST")  # a first request refused with these stops the bench


def _list(kind):
    def parse(value: str):
        try:
            items = [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {value!r}") from None
        if not items or any(not x > 0 for x in items):
            raise argparse.ArgumentTypeError(f"every value must be > 0, got {value!r}")
        if len(items) > MAX_POINTS:
            raise argparse.ArgumentTypeError(f"at most {MAX_POINTS} points in a sweep, got {len(items)}")
        return items

    return parse


def _ranged(kind, lo, hi, what: str, unit: str = ""):
    """argparse type: a `kind` (int or float) in lo..hi; `what` names it in the error."""
    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not lo <= x <= hi:
            raise argparse.ArgumentTypeError(f"must be {lo:g}..{hi:g}{unit}, got {value}")
        return x

    return parse


def _count(lo: int, hi: int):
    return _ranged(int, lo, hi, "an integer")


def _seconds(lo: float, hi: float):
    return _ranged(float, lo, hi, "a number of seconds", " seconds")


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1, got {value!r}") from None
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return x


def _pair(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, rest


def _shape_arg(value: str) -> tuple[str, list[int]]:
    name, dims = _pair(value)
    try:
        shape = [int(d) for d in dims.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... with integers, got {value!r}") from None
    if any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be >= 0, got {value!r}")
    return name, shape


def check_shapes(specs, dims) -> None:
    """--shape against the model's metadata: the same number of dimensions, and each fixed dimension
    (not -1) the model's size; a ConfigError names the input, the dimension and both sizes."""
    by_name = {s.get("name"): s for s in specs}
    for name, shape in dims.items():
        spec = by_name.get(name)
        if spec is None:
            continue  # random_inputs names unknown inputs
        want = list(spec.get("shape") or [])
        if len(shape) != len(want):
            raise errors.ConfigError(f"--shape {name}={','.join(map(str, shape))}: {len(shape)} dimensions, the "
                                     f"model's input {name!r} has {len(want)} (shape {want})")
        for i, (got, need) in enumerate(zip(shape, want)):
            if need != -1 and got != need:
                raise errors.ConfigError(f"--shape {name}={','.join(map(str, shape))}: dimension {i} is {got}, the "
                                         f"model's input {name!r} has {need} there (shape {want}; -1 is free)")


def probe(host, port, model, version, inputs, *, token, ssl, timeout) -> None:
    """Send one request before the load: when the server refuses its content (INVALID_INPUT,
    BAD_REQUEST: a wrong --shape, dtype or input the model's hooks reject), stop with the server's
    message instead of a table of errors.  Other failures (UNAVAILABLE, overload) are what a load test
    measures: they are counted by the run."""
    from tinyserve.client import Client

    with Client(host, port, token=token, ssl=ssl, timeout=timeout, connect_attempts=2) as client:
        try:
            client.infer(model, inputs, version=version, timeout=timeout)
        except errors.TinyserveError as exc:
            code = getattr(exc, "code", "ERROR")
            if code not in PROBE_FATAL:
                return
            raise errors.ConfigError(f"the first request to {model} was refused, so no load was run: [{code}] {exc} "
                                     "(check --input / --shape / --batch against `tinyserve` metadata)") from None


def add_parsers(sub, client_options) -> None:
    b = sub.add_parser("bench", help="load-test a model on a running server: throughput, latency percentiles",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", metavar="MODEL[:VERSION]")
    g = b.add_argument_group("load")
    g.add_argument("--connections", type=_count(1, 4096), default=None,
                   help="connections (closed loop default 1: all requests pipelined on it; open loop default 4)")
    g.add_argument("--depth", type=_count(1, 4096), default=1,
                   help="closed loop: requests in flight per connection (default 1)")
    g.add_argument("--concurrency", type=_list(int), default=None, metavar="C1,C2,...",
                   help="closed-loop sweep: total requests in flight per point, spread over --connections")
    g.add_argument("--rate", type=_list(float), default=None, metavar="R1,R2,...",
                   help="open loop: Poisson arrivals at these rates (requests/s), one point each")
    g.add_argument("--max-outstanding", type=_count(1, 1_000_000), default=10_000,
                   help="open loop: arrivals beyond this many in flight are counted as LOADGEN_BACKLOG")
    g.add_argument("--keep-going", action="store_true",
                   help="open loop: run every rate even after the server fell behind")
    m = b.add_argument_group("measurement")
    m.add_argument("--warmup", type=_seconds(0, 600), default=1.0, help="seconds of load before measuring (1)")
    m.add_argument("--window", type=_seconds(0.05, 600), default=1.0, help="seconds per window (1)")
    m.add_argument("--stable-windows", type=_count(1, 100), default=3, help="windows that must agree (3)")
    m.add_argument("--stability", type=_fraction, default=0.10, help="tolerance of the agreement (0.10)")
    m.add_argument("--max-windows", type=_count(1, 10_000), default=30, help="windows at most per point (30)")
    m.add_argument("--time-bound", type=_seconds(0.05, 86400), default=30.0, help="seconds at most per point (30)")
    m.add_argument("--seed", type=int, default=0)
    i = b.add_argument_group("inputs")
    i.add_argument("--input", type=_pair, action="append", default=[], metavar="NAME=FILE.npy",
                   help="send this array as input NAME (repeat for each input) instead of random values")
    i.add_argument("--batch", type=_count(1, 1 << 20), default=1, help="rows per request for random inputs (1)")
    i.add_argument("--shape", type=_shape_arg, action="append", default=[], metavar="NAME=D0,D1,...",
                   help="shape of a random input (for dimensions other than the batch that are -1)")
    i.add_argument("--pool", type=_count(1, 1024), default=16, help="different random input sets to cycle through")
    o = b.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON ('-': stdout)")
    o.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    o.add_argument("--quiet", action="store_true", help="no progress line")
    client_options(b, timeout=30.0)
    b.set_defaults(fn=cmd_bench)


def _token(args) -> str | None:
    if getattr(args, "token_file", None):
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise errors.ConfigError(f"token file {args.token_file} is empty")
        return token
    return getattr(args, "token", None) or os.environ.get(ENV_TOKEN) or None


def _address(args) -> tuple[str, int]:
    from tinyserve.client import DEFAULT_PORT

    port = args.port
    if port is None:
        value = os.environ.get(ENV_PORT)
        try:
            port = int(value) if value is not None else DEFAULT_PORT
        except ValueError:
            raise errors.ConfigError(f"{ENV_PORT}={value!r} is not a port number") from None
    return args.host or os.environ.get(ENV_HOST) or "127.0.0.1", port


def _ssl(args):
    if args.tls_ca or args.tls:
        import ssl

        return ssl.create_default_context(cafile=args.tls_ca)
    return None


def cmd_bench(args) -> int:
    from tinyserve.bench import inputs as inp
    from tinyserve.bench import loadgen, report
    from tinyserve.bench.stats import StopRule
    from tinyserve.client import _parse_model

    model, version = _parse_model(args.model, None)
    if not model or ":" in model:
        raise errors.ConfigError(f"expected MODEL[:VERSION] with an integer VERSION, got {args.model!r}")
    if args.rate is not None and args.concurrency is not None:
        raise errors.ConfigError("give --rate (open loop) or --concurrency (closed loop), not both")
    host, port = _address(args)
    token, ssl = _token(args), _ssl(args)
    rule = StopRule(window_s=args.window, k=args.stable_windows, tolerance=args.stability,
                    min_windows=args.stable_windows, max_windows=max(args.max_windows, args.stable_windows),
                    time_bound_s=args.time_bound)
    meta = loadgen.fetch_metadata(host, port, model, version, token=token, ssl=ssl, timeout=args.timeout)
    specs = meta.get("inputs") or []
    if args.input:
        pool = inp.npy_inputs(dict(args.input), specs)
    else:
        check_shapes(specs, dict(args.shape))
        pool = inp.random_inputs(specs, batch=args.batch, count=args.pool, seed=args.seed, dims=dict(args.shape))
    probe(host, port, model, version, pool[0], token=token, ssl=ssl, timeout=args.timeout)
    target = loadgen.TinyserveTarget(host, port, model, pool, version=version, token=token, ssl=ssl,
                                     timeout=args.timeout)
    progress = report.Progress(not args.quiet)
    if args.rate is not None:
        mode, conns = "open", args.connections or 4
        points = [{"rate": r} for r in args.rate]
        kw = {"connections": conns, "max_outstanding": args.max_outstanding, "seed": args.seed}
    else:
        mode, conns = "closed", args.connections or 1
        concs = args.concurrency or [conns * args.depth]
        points = [{"concurrency": c} for c in concs]
        kw = {"connections": conns}

    results = []

    async def run_all():
        for p in points:
            progress.start(f"closed c={p['concurrency']}" if mode == "closed" else f"open {p['rate']:g}/s",
                           rule.max_windows)
            fn = loadgen.closed_loop_async if mode == "closed" else loadgen.open_loop_async
            res = await fn(target, rule=rule, warmup_s=args.warmup, on_window=progress.window, **kw, **p)
            progress.done()
            results.append(res)
            if mode == "open" and not args.keep_going and res["ok_throughput"] < 0.9 * res["rate"]:
                print(f"stopping the sweep: the server answered {res['ok_throughput']:,.0f}/s of {res['rate']:g}/s "
                      f"offered (--keep-going runs every rate)", file=sys.stderr)
                break

    loadgen._run(run_all())
    where = f"{model}" + (f":{version}" if version is not None else "")
    title = (f"tinyserve bench {where} at {host}:{port}: {mode} loop, inputs "
             + (", ".join(f"{k}={v}" for k, v in args.input) if args.input else
                ", ".join(f"{s['name']} {s.get('dtype')} {s.get('shape')}" for s in specs) + f", batch {args.batch}"))
    text = report.table(results, title)
    doc = {"tool": "tinyserve bench", "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version()},
           "server": {"host": host, "port": port, "model": model, "version": version,
                      "metadata": {k: meta.get(k) for k in ("version", "platform", "inputs", "outputs")}},
           "mode": mode, "stop_rule": vars(rule), "warmup_s": args.warmup, "points": results}
    if args.json == "-":
        print(report.to_json(doc))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json:
            report.write_atomic(args.json, report.to_json(doc).encode())
            print(f"JSON: {args.json}")
    if args.plot:
        for f in report.plot(results, args.plot, title=f"{where} ({mode} loop)"):
            print(f"plot: {f}")
    return 0 if all(not r["errors"] for r in results) else 1
