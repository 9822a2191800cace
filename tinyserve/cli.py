"""`tinyserve` command line: wiring only (every command calls into the library)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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


def cmd_pack(args) -> int:
    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    repo = Repository(args.repo, create=True)
    config = json.loads(Path(args.config).read_text()) if args.config else None
    update, close = _progress_bar(not args.quiet)
    try:
        version, summary = pack(repo, args.name, args.source, version=args.version, program=args.program,
                                config=config, compression=args.compression, level=args.level,
                                threads=args.threads, progress=update)
    finally:
        close()
    mbps = summary.raw_bytes / summary.seconds / 1e6 if summary.seconds else 0.0
    print(f"packed {args.name} version {version}: {len(summary.tensors)} tensors, "
          f"{_fmt_bytes(summary.raw_bytes)} -> {_fmt_bytes(summary.file_bytes)} "
          f"(ratio {summary.ratio:.3f}) in {summary.seconds:.2f} s ({mbps:.0f} MB/s)")
    print(f"  {summary.path}")
    return 0


def _weights_path(target: str, repo: str | None) -> Path:
    p = Path(target)
    if repo is not None:
        from tinyserve.repository import Repository

        name, _, ver = target.partition(":")
        r = Repository(repo)
        vdir = r.resolve(name, int(ver) if ver else None)
        return vdir / r.read_config(name, int(vdir.name)).weights
    if p.is_dir():
        from tinyserve.repository import load_config_dir

        return p / load_config_dir(p).weights
    return p


def cmd_inspect(args) -> int:
    from tinyserve.spec import CODECS
    from tinyserve.weights import WeightsFile

    path = _weights_path(args.path, args.repo)
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


def cmd_demo(args) -> int:
    import torch

    from tinyserve import _backend
    from tinyserve import examples
    from tinyserve.pack import pack
    from tinyserve.repository import Repository
    from tinyserve.runtime import load_version

    root = Path(args.repo) if args.repo else Path(tempfile.mkdtemp(prefix="tinyserve-demo-"))
    repo = Repository(root, create=True)
    print(f"tinyserve demo: repository {root} (codec backend: {_backend.NAME})\n")
    ok = True
    for name, factory in (("mlp", examples.mlp), ("encoder-bf16", examples.encoder_bf16)):
        module, example = factory()
        version, summary = pack(repo, name, f"tinyserve.examples:{factory.__name__}", threads=args.threads)
        print(f"[pack]    {name} v{version}: {len(summary.tensors)} tensors, {_fmt_bytes(summary.raw_bytes)} -> "
              f"{_fmt_bytes(summary.file_bytes)} (ratio {summary.ratio:.3f}) in {summary.seconds * 1e3:.1f} ms")
        inspect_args = argparse.Namespace(path=f"{name}:{version}", repo=str(root), verify=True, json=False,
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
    print("demo OK" if ok else "demo FAILED: outputs differ")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyserve", description="tinyserve: a model-inference server for PyTorch models")
    sub = p.add_subparsers(dest="command", required=True)

    pk = sub.add_parser("pack", help="pack a model into a repository version")
    pk.add_argument("source", help="module:factory, a .safetensors file or a torch state-dict file")
    pk.add_argument("--repo", required=True, help="repository root directory")
    pk.add_argument("--name", required=True, help="model name")
    pk.add_argument("--version", type=int, default=None, help="version number (default: the next)")
    pk.add_argument("--program", default=None, help="a trusted model.py defining build(config) (python platform)")
    pk.add_argument("--config", default=None, help="JSON file with model config fields (inputs, outputs, batching...)")
    pk.add_argument("--compression", default="auto", choices=("auto", "none", "zstd", "planes"))
    pk.add_argument("--level", type=_level, default=None, help="zstd level 1..22, or 'max' for the strongest setting")
    pk.add_argument("--threads", type=int, default=None)
    pk.add_argument("--quiet", action="store_true", help="no progress bar")
    pk.set_defaults(fn=cmd_pack)

    ins = sub.add_parser("inspect", help="list the tensors of a weights file or model version")
    ins.add_argument("path", help="a weights file, a version directory, or NAME[:VERSION] with --repo")
    ins.add_argument("--repo", default=None)
    ins.add_argument("--verify", action="store_true", help="check every checksum; exit 1 on damage")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--threads", type=int, default=None)
    ins.set_defaults(fn=cmd_inspect)

    dm = sub.add_parser("demo", help="pack the built-in example models, inspect them and load them back")
    dm.add_argument("--repo", default=None, help="repository directory (default: a new temporary one)")
    dm.add_argument("--threads", type=int, default=None)
    dm.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except errors.TinyserveError as exc:
        print(f"tinyserve: error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tinyserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
