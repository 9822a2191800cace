"""`tinyserve` command line: wiring only (every command calls into the library)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tinyserve import errors


def _progress_bar(enabled: bool):
    """A tqdm bar over bytes for big packs on a terminal; None otherwise."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if total < (64 << 20):
            return
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="pack", file=sys.stderr)
        bar.update(done - bar.n)

    return update, lambda: bar.close() if bar is not None else None


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _level(value: str):
    if value == "max":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"level must be 1..22 or 'max', not {value!r}") from None


def _file_arg(value: str) -> tuple[str, str]:
    """--file [NAME=]PATH: a file copied into the version as NAME (default: PATH's file name)."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = Path(value).name, value
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected [NAME=]PATH, got {value!r}")
    return name, path


def _read_json_file(path: str, what: str):
    try:
        return json.loads(Path(path).read_text())
    except ValueError as exc:
        raise errors.ConfigError(f"{what} {path}: not valid JSON ({exc})") from None


def cmd_pack(args) -> int:
    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    files: dict[str, str] = {}
    for name, path in args.file:
        if name in files:
            raise errors.ConfigError(f"--file: two files are named {name!r} in the version")
        files[name] = path
    config = _read_json_file(args.config, "--config") if args.config else None
    repo = Repository(args.repo, create=True)
    update, close = _progress_bar(not args.quiet)
    try:
        version, summary = pack(repo, args.name, args.source, version=args.version, program=args.program,
                                config=config, compression=args.compression, level=args.level,
                                threads=args.threads, progress=update, files=files or None, key=args.key,
                                metadata=not args.no_metadata, task=args.task,
                                **({"max_source_bytes": args.max_source_bytes} if args.max_source_bytes else {}))
    finally:
        close()
    mbps = summary.raw_bytes / summary.seconds / 1e6 if summary.seconds else 0.0
    print(f"packed {args.name} version {version}: {len(summary.tensors)} tensors, "
          f"{_fmt_bytes(summary.raw_bytes)} -> {_fmt_bytes(summary.file_bytes)} "
          f"(ratio {summary.ratio:.3f}) in {summary.seconds:.2f} s ({mbps:.0f} MB/s)")
    print(f"  {summary.path}")
    src = getattr(summary, "source", None)
    if src is not None:
        print(f"  source: {src.description}" + (f", state dict at key {src.key!r}" if src.key else ""))
        if src.metadata:
            print(f"  metadata kept in the config: {', '.join(src.metadata)}")
        if src.stringified:
            print(f"  kept as text (not JSON values): {', '.join(src.stringified)}")
        if src.left_out:
            print(f"  left out (they hold tensors): {', '.join(src.left_out)}")
    for name in files:
        print(f"  file: {name}")
    return 0


def cmd_rm(args) -> int:
    from tinyserve.repository import Repository

    name, version = _model_arg(args.model)
    if version is None:
        raise errors.ConfigError(f"rm {args.model}: give the version to remove (NAME:VERSION); versions of "
                                 f"{name}: {Repository(args.repo).versions(name) or 'none'}")
    repo = Repository(args.repo)
    repo.remove(name, version)
    left = repo.versions(name)
    print(f"removed {name} version {version}; versions left: {', '.join(map(str, left)) or 'none'}")
    return 0


def _weights_path(target: str, repo: str | None) -> Path:
    p = Path(target)
    if repo is not None:
        from tinyserve.repository import Repository

        name, ver = _model_arg(target)
        r = Repository(repo)
        vdir = r.resolve(name, ver)
        return vdir / r.read_config(name, int(vdir.name)).weights
    if p.is_dir():
        from tinyserve.repository import load_config_dir

        return p / load_config_dir(p).weights
    return p


def _inspect_source(path: Path, args) -> int:
    """inspect of a model source (a safetensors file, a torch.save state dict or checkpoint): what it
    is, where its state dict is, its tensors and what pack would keep as metadata."""
    from tinyserve.pack import describe, identify, read_source

    kind, what = identify(path)
    try:
        src = read_source(path, args.key)
    except errors.TinyserveError as exc:
        doc = {"file": str(path), "kind": kind, "description": what, "error": str(exc)}
        if kind in ("torch_zip", "torch_legacy") and isinstance(exc, errors.FormatError) and "weights_only" not in str(exc):
            from tinyserve.pack import _torch_load

            try:
                doc["keys"] = describe(_torch_load(str(path), kind), depth=3)
            except errors.TinyserveError:
                pass
        if args.json:
            _print_json(doc)
        else:
            print(f"{path}: {what}")
            for line in doc.get("keys", []):
                print(f"  {line}")
            print(f"cannot pack it as it is: {exc}")
        return 1
    from tinyserve.weights import TORCH_DTYPES

    rows = [{"name": k, "dtype": TORCH_DTYPES.get(t.dtype, str(t.dtype)), "shape": list(t.shape),
             "raw_bytes": t.numel() * t.element_size()} for k, t in src.tensors.items()]
    raw = sum(r["raw_bytes"] for r in rows)
    if args.json:
        _print_json({"file": str(path), "kind": kind, "description": what, "key": src.key, "tensors": rows,
                     "raw_bytes": raw, "metadata": src.metadata, "left_out": src.left_out,
                     "stringified": src.stringified})
        return 0
    print(f"{path}: {what}" + (f", state dict at key {src.key!r}" if src.key else ""))
    width = min(60, max([len(r["name"]) for r in rows] + [4]))
    print(f"{'name':<{width}} {'dtype':<9} {'shape':<18} {'raw':>10}")
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        print(f"{r['name'][:width]:<{width}} {r['dtype']:<9} {shape:<18} {_fmt_bytes(r['raw_bytes']):>10}")
    print(f"{len(rows)} tensors, {_fmt_bytes(raw)}")
    if src.metadata:
        text = json.dumps(src.metadata, sort_keys=True, default=str)
        print(f"metadata (kept by pack): {text[:300]}{' ...' if len(text) > 300 else ''}")
    if src.left_out:
        print(f"left out by pack (they hold tensors): {', '.join(src.left_out)}")
    return 0


def cmd_inspect(args) -> int:
    from tinyserve.spec import CODECS, MAGIC
    from tinyserve.weights import WeightsFile

    path = _weights_path(args.path, args.repo)
    if path.is_file() and args.repo is None:
        from tinyserve.pack import identify

        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
        # a model source (or a format pack names): listed as such; anything else is read as weights
        if magic != MAGIC and identify(path)[0] not in ("unknown", "empty"):
            return _inspect_source(path, args)
    if args.key is not None:
        raise errors.ConfigError("--key applies to checkpoint files, not to tinyserve weights")
    with WeightsFile(path) as wf:
        rows = []
        for t in wf.tensors.values():
            codecs: dict[str, int] = {}
            for c in t.chunks:
                for code in c.codecs:
                    codecs[CODECS[code]] = codecs.get(CODECS[code], 0) + 1
            rows.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "encoding": t.encoding,
                         "raw_bytes": t.nbytes, "stored_bytes": t.data_size, "chunks": len(t.chunks),
                         "codecs": codecs,
                         "ratio": t.nbytes / t.data_size if t.data_size else 1.0})
        raw = sum(r["raw_bytes"] for r in rows)
        total = {"file": str(path), "tensors": len(rows), "raw_bytes": raw, "file_bytes": wf.header.file_size,
                 "ratio": raw / wf.header.file_size if wf.header.file_size else 1.0}
        damage = None
        if args.verify:
            t0 = time.perf_counter()
            try:
                wf.verify(args.threads)
            except errors.FormatError as exc:
                damage = str(exc)
            total["verify_s"] = time.perf_counter() - t0
            total["verified"] = damage is None
    if args.json:
        print(json.dumps({"summary": total, "tensors": rows, "damage": damage}, indent=1))
    else:
        width = min(60, max([len(r["name"]) for r in rows] + [4]))
        print(f"{'name':<{width}} {'dtype':<9} {'shape':<18} {'enc':<6} {'raw':>10} {'stored':>10} {'ratio':>6}  codecs")
        for r in rows:
            codecs = " ".join(f"{k}:{v}" for k, v in sorted(r["codecs"].items()))
            shape = "x".join(map(str, r["shape"])) or "scalar"
            print(f"{r['name'][:width]:<{width}} {r['dtype']:<9} {shape:<18} {r['encoding']:<6} "
                  f"{_fmt_bytes(r['raw_bytes']):>10} {_fmt_bytes(r['stored_bytes']):>10} {r['ratio']:>6.3f}  {codecs}")
        print(f"{len(rows)} tensors, {_fmt_bytes(raw)} -> {_fmt_bytes(total['file_bytes'])} "
              f"(ratio {total['ratio']:.3f})")
        if args.verify:
            print("verify: OK" if damage is None else f"verify: DAMAGED: {damage}",
                  f"({total['verify_s'] * 1e3:.1f} ms)")
    return 0 if damage is None else 1


# --- talking to a server ---------------------------------------------------------------------------
ENV_HOST, ENV_PORT, ENV_TOKEN = "TINYSERVE_HOST", "TINYSERVE_PORT", "TINYSERVE_TOKEN"


def _default_port() -> int:
    from tinyserve.client import DEFAULT_PORT

    value = os.environ.get(ENV_PORT)
    if value is None:
        return DEFAULT_PORT
    try:
        return int(value)
    except ValueError:
        raise errors.ConfigError(f"{ENV_PORT}={value!r} is not a port number") from None


def _token(args) -> str | None:
    """--token-file, then --token, then $TINYSERVE_TOKEN (a file keeps the secret out of `ps`)."""
    if getattr(args, "token_file", None):
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise errors.ConfigError(f"token file {args.token_file} is empty")
        return token
    return getattr(args, "token", None) or os.environ.get(ENV_TOKEN) or None


def _client(args, *, attempts: int = 3):
    from tinyserve.client import Client

    ssl = None
    if args.tls_ca or args.tls:
        import ssl as ssl_mod

        ssl = ssl_mod.create_default_context(cafile=args.tls_ca)
    port = args.port if args.port is not None else _default_port()
    host = args.host or os.environ.get(ENV_HOST) or "127.0.0.1"
    return Client(host, port, token=_token(args), ssl=ssl, timeout=args.timeout,
                  connect_timeout=min(10.0, args.timeout), connect_attempts=attempts, backoff=0.1)


def _model_arg(value: str) -> tuple[str, int | None]:
    """NAME[:VERSION] -> (name, version or None); an argparse type (model names have no ':')."""
    from tinyserve.client import _parse_model

    name, version = _parse_model(value, None)
    if not name or ":" in name:
        raise argparse.ArgumentTypeError(f"expected NAME[:VERSION] with an integer VERSION, got {value!r}")
    return name, version


def _model_text(value: str) -> str:
    """argparse type of a MODEL[:VERSION] argument: checked, kept as text."""
    _model_arg(value)
    return value


def _positive(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not t > 0 or t == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value!r}")
    return t


def _print_json(doc) -> None:
    print(json.dumps(doc, indent=1, sort_keys=True, default=str))


def _summary(value) -> str:
    """One line about an output: dtype, shape, a few values, range."""
    if isinstance(value, list):  # the bytes dtype: UTF-8 items print as text
        shown = ", ".join(_text_item(v) for v in value[:3])
        return f"bytes [{len(value)}]  [{shown}{', ...' if len(value) > 3 else ''}]"
    import numpy as np

    if not isinstance(value, np.ndarray):  # bfloat16 arrives as a torch tensor
        dtype = str(value.dtype).removeprefix("torch.")
        value = value.float().numpy()
    else:
        dtype = str(value.dtype)
    shape = "x".join(map(str, value.shape)) or "scalar"
    flat = value.reshape(-1)
    head = np.array2string(flat[:6], precision=4, separator=", ", suppress_small=True)
    if flat.size > 6:
        head = head[:-1] + ", ...]"
    stats = ""
    if flat.size and value.dtype != np.bool_:
        stats = f"  min {flat.min():.4g} max {flat.max():.4g} mean {flat.astype(np.float64).mean():.4g}"
    return f"{dtype} [{shape}]  {head}{stats}"


def _text_item(item) -> str:
    """One item of a bytes output: quoted text when it is UTF-8, else its bytes' repr."""
    raw = bytes(item)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return repr(raw[:40]) + ("..." if len(raw) > 40 else "")
    return json.dumps(text[:80] + ("..." if len(text) > 80 else ""), ensure_ascii=False)


def _save_output(directory: Path, name: str, value) -> Path:
    import numpy as np

    if isinstance(value, list):
        arr = np.array(value, dtype=np.bytes_) if value else np.zeros(0, dtype="S1")
    elif not isinstance(value, np.ndarray):  # bfloat16 (torch): numpy has no bfloat16
        arr = value.float().numpy()
    else:
        arr = value
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "output"
    path = directory / f"{safe}.npy"
    np.save(path, arr, allow_pickle=False)
    return path


def _input_arg(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, rest


def _policy_arg(value: str) -> tuple[str, str]:
    name, sep, policy = value.partition("=")
    if not sep or not name or not policy.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=POLICY, got {value!r}")
    return name, policy.strip()


def _size_arg(value: str) -> int:
    from tinyserve.remote.cli import parse_size

    try:
        return parse_size(value)
    except (ValueError, errors.TinyserveError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device_arg(value: str) -> str:
    from tinyserve.config import parse_devices

    try:
        return ",".join(parse_devices(value, "--device"))
    except errors.TinyserveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget_arg(value: str):
    from tinyserve.config import parse_budgets
    from tinyserve.remote.cli import parse_size

    try:
        return parse_budgets(value, parse_size, "--memory-budget")
    except errors.TinyserveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_serve(args) -> int:
    from tinyserve.server import ServerConfig, run

    port = args.port if args.port is not None else _default_port()
    from tinyserve.health import EjectionConfig, configure_logging

    storage = {k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region),
                                 ("part_attempts", args.part_attempts), ("backoff", args.backoff)) if v is not None}
    if args.backoff is not None:  # the doubling is capped at 1 s, or at --backoff when that is longer
        from tinyserve.storage.base import DEFAULT_BACKOFF_MAX_S

        storage["backoff_max"] = max(DEFAULT_BACKOFF_MAX_S, args.backoff)
    if args.anonymous:
        storage["anonymous"] = True
    ejection = EjectionConfig(consecutive_failures=args.eject_consecutive, error_rate=args.eject_error_rate,
                              base_ejection_s=args.eject_base_s, max_ejection_s=max(args.eject_max_s, args.eject_base_s),
                              fail_after=args.fail_after)
    config = ServerConfig(repo=args.repo, host=args.host or "127.0.0.1", port=port, models=tuple(args.model),
                          token=_token(args), tls_certfile=args.tls_cert, tls_keyfile=args.tls_key,
                          torch_threads=args.threads, use_uvloop=not args.no_uvloop,
                          idle_timeout_s=args.idle_timeout, drain_timeout_s=args.drain_timeout,
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                          http_port=args.http_port, grpc_port=args.grpc_port,
                          device_poll_s=args.device_poll, ejection=ejection, pinned=tuple(args.pin),
                          require_model=args.require_model, cache_dir=args.cache_dir, cache_bytes=args.cache_size,
                          storage=storage, model_control=args.model_control, poll_interval_s=args.poll_interval,
                          version_policies=dict(args.version_policy), memory_budget=args.memory_budget,
                          statistics=not args.no_statistics, device=args.device, instances=args.instances,
                          inline_max_us=args.inline_max_us)
    configure_logging(json_lines=args.log_json)
    return run(config)


def cmd_infer(args) -> int:
    import numpy as np

    inputs: dict = {}
    for name, path in args.input:
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise errors.ConfigError(f"--input {name}={path}: not a plain .npy array ({exc})") from None
    for name, text in args.text:
        inputs.setdefault(name, [])
        if not isinstance(inputs[name], list):
            raise errors.ConfigError(f"input {name!r} is given both as --input and --text")
        inputs[name].append(text)
    if not inputs:
        raise errors.ConfigError("no inputs: give at least one --input NAME=FILE.npy or --text NAME=STRING")
    model, version = _model_arg(args.model)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        t0 = time.perf_counter()
        outputs = client.infer(model, inputs, version=version, outputs=args.output or None,
                               timeout=args.timeout, priority=args.priority)
        dt = time.perf_counter() - t0
    where = f"{model}" + (f":{version}" if version is not None else "")
    print(f"{where}: {len(outputs)} output{'s' if len(outputs) != 1 else ''} in {dt * 1e3:.2f} ms")
    width = max([len(n) for n in outputs] + [4])
    for name, value in outputs.items():
        line = f"  {name:<{width}}  {_summary(value)}"
        if out_dir is not None:
            line += f"  -> {_save_output(out_dir, name, value)}"
        print(line)
    return 0


def cmd_models(args) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        _print_json(models)
        return 0
    if not models:
        print("no models in the repository")
        return 0
    width = max(len(m.get("name", "")) for m in models)
    print(f"{'name':<{width}}  {'versions':<12} loaded")
    for m in models:
        versions = ",".join(str(v) for v in m.get("versions", [])) or "-"
        loaded = ", ".join(f"v{x.get('version')} {x.get('state')} ({_fmt_bytes(x.get('bytes') or 0)})"
                           for x in m.get("loaded", [])) or "-"
        print(f"{m.get('name', '?'):<{width}}  {versions:<12} {loaded}")
    return 0


def cmd_load(args) -> int:
    model, version = _model_arg(args.model)
    with _client(args) as client:
        t0 = time.perf_counter()
        reply = client.load(model, version, timeout=args.timeout)
    print(f"loaded {reply.get('model', model)} version {reply.get('version')}: {reply.get('state')} "
          f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    return 0


def cmd_unload(args) -> int:
    model, version = _model_arg(args.model)
    with _client(args) as client:
        reply = client.unload(model, version, timeout=args.timeout)
    versions = reply.get("versions") or []
    print(f"unloaded {reply.get('model', model)} version{'s' if len(versions) != 1 else ''} "
          f"{', '.join(map(str, versions)) or '(none was loaded)'}")
    return 0


def cmd_health(args) -> int:
    """Exit 0: ready; 1: the server answered but is not ready; 2: no answer (unreachable, refused)."""
    try:
        with _client(args, attempts=1) as client:
            health = client.health(timeout=args.timeout)
    except (errors.TinyserveError, OSError) as exc:
        code = getattr(exc, "code", None)
        print(f"tinyserve: unreachable{f' [{code}]' if code else ''}: {exc}", file=sys.stderr)
        return 2
    ready = health.get("ready") is True
    if args.json:
        _print_json(health)
    else:
        reasons = health.get("reasons") or []
        why = f": {'; '.join(map(str, reasons))}" if reasons and not ready else ""
        print(f"{'ready' if ready else 'NOT READY'}{why} (live: {health.get('live')})")
        for name, st in sorted((health.get("models") or {}).items()):
            st = st if isinstance(st, dict) else {}
            reason = f": {st.get('reason')}" if st.get("reason") else ""
            print(f"  {name}: {st.get('state')}{reason}")
    return 0 if ready else 1


def cmd_stats(args) -> int:
    with _client(args) as client:
        stats = client.stats(args.model)
    if args.json:
        _print_json(stats)
        return 0

    def line(label: str, st: dict) -> str:
        lat = st.get("latency_us") or {}
        errs = st.get("errors") or {}
        err = ", ".join(f"{k} {v}" for k, v in sorted(errs.items())) or "none"
        pcts = " ".join(f"{k} {lat[k]}" for k in ("p50", "p90", "p99", "max") if k in lat)
        out = f"{label}: {st.get('requests', 0)} requests, errors: {err}; latency us: {pcts or '-'}"
        q, c, b = st.get("queue_us"), st.get("compute_us"), st.get("batch_size")
        if isinstance(q, dict) and isinstance(c, dict):  # a model's entry (docs/health.md section 2)
            out += (f"; queue p50/p99 {q.get('p50')}/{q.get('p99')} us, compute p50/p99 {c.get('p50')}/{c.get('p99')} us"
                    f"; {st.get('throughput_rps', 0)} req/s; in flight {st.get('in_flight', 0)}")
            if isinstance(b, dict) and b.get("batches"):
                out += f"; batch mean {b.get('mean')} (max {b.get('max')})"
            le = st.get("last_error")
            if isinstance(le, dict):
                out += f"; last error {le.get('code')}: {str(le.get('message'))[:80]}"
        return out

    if args.model is not None:  # that model's own entry: the top level may carry server-wide fields
        own = (stats.get("models") or {}).get(args.model)
        print(line(args.model, own if isinstance(own, dict) else stats))
        return 0
    extra = "".join(f"; {label} {stats[k]}" for k, label in (("in_flight", "in flight"), ("connections", "connections"))
                    if k in stats)
    print(line("server", stats) + extra)
    for name, st in sorted((stats.get("models") or {}).items()):
        print("  " + line(name, st if isinstance(st, dict) else {}))
    return 0


# --- demo ------------------------------------------------------------------------------------------
def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {f"p{q}": ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e6 for q in (50, 90, 99)}


def _start_server(root: Path, models: list[str], threads: int | None, port: int, timeout: float = 120.0):
    """`tinyserve serve` in a subprocess; (process, port) once it listens (its models are loaded)."""
    import selectors
    import subprocess

    cmd = [sys.executable, "-m", "tinyserve.cli", "serve", "--repo", str(root), "--port", str(port)]
    for m in models:
        cmd += ["--model", m]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    try:
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "listening on" in line:
                addr = line.split("listening on", 1)[1].split()[0]
                return proc, int(addr.rsplit(":", 1)[1]), line.strip()
    finally:
        sel.close()
    proc.kill()
    proc.wait()
    raise errors.TinyserveError("the demo server did not start:\n  " + "\n  ".join(lines[-10:] or ["(no output)"]))


def _stop_server(proc, timeout: float = 30.0) -> tuple[int | None, str]:
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def cmd_demo(args) -> int:
    import numpy as np
    import torch

    from tinyserve import _backend
    from tinyserve import examples
    from tinyserve.client import Client
    from tinyserve.pack import pack
    from tinyserve.repository import Repository
    from tinyserve.runtime import load_version

    t_start = time.perf_counter()
    import tempfile

    root = Path(args.repo) if args.repo else Path(tempfile.mkdtemp(prefix="tinyserve-demo-"))
    repo = Repository(root, create=True)
    print(f"tinyserve demo: repository {root} (codec backend: {_backend.NAME})\n")
    ok = True
    modules = {}
    for name, factory in (("mlp", examples.mlp), ("encoder-bf16", examples.encoder_bf16)):
        module, example = factory()
        modules[name] = (module, example)
        version, summary = pack(repo, name, f"tinyserve.examples:{factory.__name__}", threads=args.threads)
        print(f"[pack]    {name} v{version}: {len(summary.tensors)} tensors, {_fmt_bytes(summary.raw_bytes)} -> "
              f"{_fmt_bytes(summary.file_bytes)} (ratio {summary.ratio:.3f}) in {summary.seconds * 1e3:.1f} ms")
        inspect_args = argparse.Namespace(path=f"{name}:{version}", repo=str(root), verify=True, json=False, key=None,
                                          threads=args.threads)
        print(f"[inspect] tinyserve inspect --repo {root} {name}:{version} --verify")
        cmd_inspect(inspect_args)
        loaded = load_version(repo.resolve(name, version), threads=args.threads)
        t0 = time.perf_counter()
        got = loaded(*example)
        t_first = time.perf_counter() - t0
        with torch.inference_mode():
            want = module(*example)
        same = torch.equal(got, want)
        ok &= same
        tm = loaded.timings
        print(f"[load]    {name} v{version}: weights {tm['weights_s'] * 1e3:.2f} ms "
              f"(decode {loaded.weights_stats.decode_s * 1e3:.2f} ms), program {tm['program_s'] * 1e3:.1f} ms, "
              f"total {tm['total_s'] * 1e3:.1f} ms; first inference {t_first * 1e3:.2f} ms; "
              f"output {'bit-exact' if same else 'DIFFERS'} vs the original module\n")

    # --- serve the repository and query it ---
    t0 = time.perf_counter()
    proc, port, banner = _start_server(root, ["mlp"], args.server_threads, args.port)
    print(f"[serve]   tinyserve serve --repo {root} --port {args.port} --model mlp --threads {args.server_threads}")
    print(f"          {banner}  (ready in {time.perf_counter() - t0:.1f} s)")
    try:
        ok &= _demo_requests(args, port, modules, np, torch, Client)
    finally:
        code, out = _stop_server(proc)
        for line in out.splitlines():
            print(f"          {line}")
        stopped = code == 0
        ok &= stopped
        print(f"[stop]    SIGTERM -> {'drained and exited 0' if stopped else f'exit status {code}'}\n")
    print(f"demo {'OK' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


def _demo_requests(args, port: int, modules: dict, np, torch, Client) -> bool:
    ok = True
    mlp, _ = modules["mlp"]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 64), dtype=np.float32) for _ in range(64)]
    with torch.inference_mode():
        want = [mlp(torch.from_numpy(x)).numpy() for x in xs]
    n, depth = args.requests, args.depth
    with Client("127.0.0.1", port, timeout=30.0) as client:
        t0 = time.perf_counter()
        reply = client.load("encoder-bf16")
        print(f"[load]    encoder-bf16 over the wire: version {reply.get('version')} {reply.get('state')} "
              f"in {(time.perf_counter() - t0) * 1e3:.0f} ms")
        health = client.health()
        print(f"[health]  ready: {health.get('ready')}; models: "
              + ", ".join(f"{k} {v.get('state')}" for k, v in sorted((health.get("models") or {}).items())))
        y = client.infer("mlp", {"x": xs[0]})
        name, value = next(iter(y.items()))
        print(f"[answer]  mlp(x) -> {name}: {_summary(value)}")
        enc, (ids,) = modules["encoder-bf16"]
        ids = ids[:1]
        got = client.infer("encoder-bf16", {"ids": ids})
        ename, evalue = next(iter(got.items()))
        with torch.inference_mode():
            ewant = enc(ids)
        esame = isinstance(evalue, torch.Tensor) and torch.equal(evalue, ewant)
        ok &= esame
        print(f"[answer]  encoder-bf16(ids) -> {ename}: {_summary(evalue)} "
              f"({'equal to' if esame else 'DIFFERS from'} the module run directly)")

        for i in range(200):  # warm-up
            client.infer("mlp", {"x": xs[i % 64]})
        lat, bad, worst = [], 0, 0.0
        t_all = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            out = client.infer("mlp", {"x": xs[i % 64]})[name]
            lat.append(time.perf_counter() - t)
            if not np.array_equal(out, want[i % 64]):
                bad += 1
                worst = max(worst, float(np.abs(out - want[i % 64]).max()))
        t_all = time.perf_counter() - t_all
        p = _percentiles(lat)
        print(f"[latency] mlp, {n} requests one at a time: p50 {p['p50']:.0f} us, p90 {p['p90']:.0f} us, "
              f"p99 {p['p99']:.0f} us; {n / t_all:,.0f} requests/s")
        t = time.perf_counter()
        outs = client.infer_many("mlp", [{"x": xs[i % 64]} for i in range(n)], depth=depth)
        dt = time.perf_counter() - t
        print(f"[pipeline] mlp, {n} requests {depth} in flight on one connection: {n / dt:,.0f} requests/s "
              f"({dt / n * 1e6:.0f} us per request)")
        for i, o in enumerate(outs):
            if not np.array_equal(o[name], want[i % 64]):
                bad += 1
                worst = max(worst, float(np.abs(o[name] - want[i % 64]).max()))
        # dynamic batching may run several rows together, which can move float sums by an ulp or so
        close = worst <= 1e-5
        ok &= close
        total = 2 * n
        print(f"[check]   {total - bad}/{total} answers bit-exact vs the model run directly"
              + (f"; the rest within {worst:.1e}" if bad and close else "")
              + (f"; WRONG: max difference {worst:.3g}" if not close else ""))
        st = client.stats("mlp")
        lat_us = st.get("latency_us") or {}
        print(f"[stats]   server side, mlp: {st.get('requests')} requests, p50 {lat_us.get('p50')} us, "
              f"p99 {lat_us.get('p99')} us")
    return ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyserve", description="tinyserve: a model-inference server for PyTorch models")
    sub = p.add_subparsers(dest="command", required=True)

    pk = sub.add_parser("pack", help="pack a model into a repository version")
    pk.add_argument("source", help="module:factory or file.py:factory, a safetensors file, a torch.save "
                                   "state dict or training checkpoint, a TorchScript archive or an ONNX model "
                                   "(README: bring your model); any file source may be compressed with gzip, "
                                   "bzip2, xz or zstd (recognised by its bytes, decompressed up to "
                                   "--max-source-bytes)")
    pk.add_argument("--task", default=None,
                    help="what a Hugging Face model directory (config.json + model.safetensors) is packed for: "
                         "feature-extraction or text-classification (docs/repository.md section 4.8)")
    pk.add_argument("--max-source-bytes", type=int, default=None,
                    help="the most bytes a source may hold decompressed (default 64 GiB); a larger one is refused")
    pk.add_argument("--repo", required=True, help="repository root directory")
    pk.add_argument("--name", required=True, help="model name")
    pk.add_argument("--version", type=int, default=None, help="version number (default: the next)")
    pk.add_argument("--program", default=None, help="a trusted model.py defining build(config) (python platform)")
    pk.add_argument("--config", default=None, help="JSON file with model config fields (inputs, outputs, batching...)")
    pk.add_argument("--compression", default="auto", choices=("auto", "none", "zstd", "planes"))
    pk.add_argument("--level", type=_level, default=None, help="zstd level 1..22, or 'max' for the strongest setting")
    pk.add_argument("--threads", type=int, default=None)
    pk.add_argument("--quiet", action="store_true", help="no progress bar")
    pk.add_argument("--key", default=None,
                    help="where the state dict is inside a checkpoint, e.g. model or model.state_dict "
                         "(default: found under common keys)")
    pk.add_argument("--no-metadata", action="store_true",
                    help="do not keep a checkpoint's other values (epoch, vocabulary...) in the config")
    pk.add_argument("--file", type=_file_arg, action="append", default=[], metavar="[NAME=]PATH",
                    help="copy this file into the version (a tokenizer the model file reads; repeatable)")
    pk.set_defaults(fn=cmd_pack)

    rm = sub.add_parser("rm", help="remove a version from a repository (a server that has it loaded keeps it)")
    rm.add_argument("model", metavar="NAME:VERSION", type=_model_text)
    rm.add_argument("--repo", required=True, help="repository root directory")
    rm.set_defaults(fn=cmd_rm)

    ins = sub.add_parser("inspect", help="list the tensors of a weights file, a model version, a checkpoint "
                                         "or a safetensors file")
    ins.add_argument("path", help="a weights file, a version directory, NAME[:VERSION] with --repo, or a "
                                  "model source (safetensors, torch.save state dict or checkpoint)")
    ins.add_argument("--key", default=None, help="a checkpoint's state dict key (as pack --key)")
    ins.add_argument("--repo", default=None)
    ins.add_argument("--verify", action="store_true", help="check every checksum; exit 1 on damage")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--threads", type=int, default=None)
    ins.set_defaults(fn=cmd_inspect)

    def client_options(sp, timeout: float = 60.0):
        sp.add_argument("--host", default=None, help=f"server host (default: ${ENV_HOST} or 127.0.0.1)")
        sp.add_argument("--port", type=int, default=None, help=f"server port (default: ${ENV_PORT} or 8470)")
        sp.add_argument("--token", default=None,
                        help=f"shared secret (visible in ps: prefer --token-file or ${ENV_TOKEN})")
        sp.add_argument("--token-file", default=None, help="read the shared secret from this file")
        sp.add_argument("--tls", action="store_true", help="use TLS, verified against the system's CAs")
        sp.add_argument("--tls-ca", default=None, help="use TLS, verified against this CA / certificate file")
        sp.add_argument("--timeout", type=_positive, default=timeout, help=f"seconds, > 0 (default {timeout:g})")

    sv = sub.add_parser("serve", help="serve a repository's models over TCP (SIGTERM / SIGINT: drain and exit)")
    sv.add_argument("--repo", required=True, help="repository root directory")
    sv.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help=f"port (default: ${ENV_PORT} or 8470; 0: any free port)")
    sv.add_argument("--model", action="append", default=[], metavar="NAME[:VERSION]",
                    help="load and warm up before listening (repeatable)")
    sv.add_argument("--token", default=None,
                    help=f"shared secret clients must send (visible in ps: prefer --token-file or ${ENV_TOKEN})")
    sv.add_argument("--token-file", default=None, help="read the shared secret from this file")
    sv.add_argument("--tls-cert", default=None, help="TLS certificate (PEM); with --tls-key")
    sv.add_argument("--tls-key", default=None, help="TLS private key (PEM)")
    sv.add_argument("--threads", type=int, default=None, help="torch threads per model worker")
    sv.add_argument("--no-uvloop", action="store_true", help="use the asyncio event loop")
    sv.add_argument("--idle-timeout", type=float, default=300.0, help="close idle connections after S seconds")
    sv.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, wait S seconds for requests")
    sv.add_argument("--metrics-port", type=int, default=None,
                    help="serve /metrics (Prometheus), /healthz and /readyz over HTTP on this port (0: any free)")
    sv.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics listener")
    sv.add_argument("--http-port", type=int, default=None,
                    help="serve the Open Inference Protocol (KServe v2) over HTTP/REST on this port "
                         "(0: any free; docs/http-grpc.md)")
    sv.add_argument("--grpc-port", type=int, default=None,
                    help="serve the Open Inference Protocol (KServe v2) over gRPC on this port (0: any free)")
    sv.add_argument("--device-poll", type=float, default=5.0, help="device health poll interval, seconds")
    sv.add_argument("--eject-consecutive", type=int, default=5,
                    help="eject a model version after this many failures in a row (0: off)")
    sv.add_argument("--eject-error-rate", type=float, default=0.5,
                    help="... or when this fraction of its answers over 30 s failed (0: off)")
    sv.add_argument("--eject-base-s", type=float, default=5.0, help="first ejection back-off, seconds")
    sv.add_argument("--eject-max-s", type=float, default=300.0, help="longest ejection back-off, seconds")
    sv.add_argument("--fail-after", type=int, default=5,
                    help="unload a version ejected this many times within 10 minutes (0: never)")
    sv.add_argument("--pin", action="append", default=[], metavar="NAME[:VERSION]",
                    help="ejected but never unloaded by the ejection policy (repeatable)")
    sv.add_argument("--require-model", action="store_true", help="not ready unless some model version serves")
    sv.add_argument("--log-json", action="store_true", help="logs as one JSON object per line")
    sv.add_argument("--no-statistics", action="store_true",
                    help="no per-request statistics and no ejection (only to measure what they cost)")
    sv.add_argument("--inline-max-us", type=int, default=200, metavar="US",
                    help="run a request on the event loop, without the hand-off to the model's worker "
                         "thread, when that worker is idle and the model's recent calls took at most US "
                         "microseconds (unbatched CPU models with one worker; 0: always the worker)")
    sv.add_argument("--device", type=_device_arg, default="cpu",
                    help="cpu, cuda:N, a comma list (cuda:0,cuda:1: instances spread over them), or auto "
                         "(every GPU torch sees, else cpu)")
    sv.add_argument("--instances", type=int, default=1,
                    help="worker threads per loaded version (a model's placement.min_instances wins)")
    sv.add_argument("--memory-budget", type=_budget_arg, default=None,
                    help="memory for models, e.g. 8G (every device in use) or cpu=8G,cuda:0=20G (a GPU not named: "
                         "NVML's total minus 1 GiB): models load on demand and idle ones are evicted "
                         "least-recently-used first to stay within it (on whenever a GPU is used)")
    sv.add_argument("--model-control", choices=("explicit", "poll"), default="explicit",
                    help="explicit: load/unload ops only; poll: load new versions the policy selects, unload old ones")
    sv.add_argument("--poll-interval", type=float, default=10.0, help="seconds between repository polls")
    sv.add_argument("--version-policy", type=_policy_arg, action="append", default=[], metavar="NAME=POLICY",
                    help="'latest: N', 'specific: [1,3]' or 'all' (default latest: 1; repeatable)")
    sv.add_argument("--cache-dir", default=None, help="local cache of a remote (s3://) repository")
    sv.add_argument("--cache-size", type=_size_arg, default=None, help="cache size limit, e.g. 20G")
    sv.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    sv.add_argument("--region", default=None, help="S3 region (default: $AWS_REGION / AWS config)")
    sv.add_argument("--anonymous", action="store_true", help="S3 without credentials")
    sv.add_argument("--part-attempts", type=int, default=None, metavar="N",
                    help="requests per ranged read of a remote file, the first included: a broken body is "
                         "re-requested from its first missing byte (1..100, default 4)")
    sv.add_argument("--backoff", type=float, default=None, metavar="SECONDS",
                    help="wait before the first re-request of a broken read, doubling after each up to "
                         "1 s or SECONDS if longer (default 0.05)")
    sv.set_defaults(fn=cmd_serve)

    inf = sub.add_parser("infer", help="send one inference request; print (and save) the outputs")
    inf.add_argument("model", metavar="MODEL[:VERSION]", type=_model_text)
    inf.add_argument("--input", type=_input_arg, action="append", default=[], metavar="NAME=FILE.npy",
                     help="an input tensor from a .npy file (repeatable)")
    inf.add_argument("--text", type=_input_arg, action="append", default=[], metavar="NAME=STRING",
                     help="a string for a bytes input; repeat a NAME for several strings")
    inf.add_argument("--output", action="append", default=[], metavar="NAME", help="only these outputs")
    inf.add_argument("--output-dir", default=None, help="save each output as NAME.npy in this directory")
    inf.add_argument("--priority", type=int, default=None, help="0..15, higher first")
    client_options(inf)
    inf.set_defaults(fn=cmd_infer)

    md = sub.add_parser("models", help="the repository's models, versions and what is loaded")
    md.add_argument("--json", action="store_true")
    client_options(md)
    md.set_defaults(fn=cmd_models)

    ld = sub.add_parser("load", help="load (and warm up) a model version on the server")
    ld.add_argument("model", metavar="MODEL[:VERSION]", type=_model_text)
    client_options(ld, timeout=600.0)
    ld.set_defaults(fn=cmd_load)

    ul = sub.add_parser("unload", help="unload a model version (default: every loaded version)")
    ul.add_argument("model", metavar="MODEL[:VERSION]", type=_model_text)
    client_options(ul, timeout=600.0)
    ul.set_defaults(fn=cmd_unload)

    hl = sub.add_parser("health", help="liveness and readiness; exit 0 ready, 1 not ready, 2 unreachable")
    hl.add_argument("--json", action="store_true")
    client_options(hl, timeout=5.0)
    hl.set_defaults(fn=cmd_health)

    stt = sub.add_parser("stats", help="request and error counts, latency percentiles")
    stt.add_argument("--model", default=None, help="one model only")
    stt.add_argument("--json", action="store_true")
    client_options(stt)
    stt.set_defaults(fn=cmd_stats)

    dm = sub.add_parser("demo", help="pack the example models, serve them, query them: answers, latency, throughput")
    dm.add_argument("--repo", default=None, help="repository directory (default: a new temporary one)")
    dm.add_argument("--threads", type=int, default=None, help="codec threads for pack / load")
    dm.add_argument("--server-threads", type=int, default=1, help="torch threads per model worker in the server")
    dm.add_argument("--port", type=int, default=0, help="server port (default: any free port)")
    dm.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    dm.add_argument("--depth", type=int, default=32, help="requests in flight when pipelining (default 32)")
    dm.set_defaults(fn=cmd_demo)

    # commands that live with their subsystem: each module defines add_parsers(sub, client_options)
    import importlib

    for module in _EXTENSIONS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module + ".").startswith(exc.name + "."):
                # the module exists but something it imports does not
                raise
            continue
        mod.add_parsers(sub, client_options)
    return p


# subsystems that add their own subcommands (`bench`, `push` / `pull`...)
_EXTENSIONS = ("tinyserve.bench.cli", "tinyserve.remote.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fn is cmd_inspect and args.repo is not None:  # the path is NAME[:VERSION] in the repository
        try:
            _model_arg(args.path)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"inspect: {exc}")
    try:
        return args.fn(args)
    except errors.TinyserveError as exc:
        print(f"tinyserve: error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tinyserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinyserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
