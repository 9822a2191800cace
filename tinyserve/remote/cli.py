"""`tinyserve push` and `tinyserve pull` (added to the CLI by tinyserve/cli.py through add_parsers)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tinyserve.errors import ConfigError

_SIZE = re.compile(r"([0-9]+)([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'500M', '20G', '20GiB', '1048576' -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a number with an optional K/M/G/T suffix")
    n = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].upper()]
    if n < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 byte")
    return n


def _model(text: str) -> tuple[str, int | None]:
    name, _, v = text.partition(":")
    if v and not v.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: the version after ':' must be a positive integer")
    return name, int(v) if v else None


def _remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", metavar="s3://BUCKET/PREFIX", help="the remote repository (or a local directory)")
    g = p.add_argument_group("object storage (defaults: the AWS environment variables and config files)")
    g.add_argument("--endpoint-url", default=None, help="S3 endpoint, e.g. http://127.0.0.1:8333 ($AWS_ENDPOINT_URL)")
    g.add_argument("--region", default=None, help="region ($AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)")
    g.add_argument("--profile", default=None, help="profile of ~/.aws/credentials and ~/.aws/config ($AWS_PROFILE)")
    g.add_argument("--access-key", default=None, help="access key id ($AWS_ACCESS_KEY_ID); with --secret-key-file")
    g.add_argument("--secret-key-file", default=None, help="file holding the secret key ($AWS_SECRET_ACCESS_KEY)")
    g.add_argument("--anonymous", action="store_true", help="send unsigned requests (public buckets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def _storage(args):
    from tinyserve.storage import open_storage

    if not args.remote.startswith("s3://"):
        return open_storage(args.remote)
    secret = None
    if args.secret_key_file:
        secret = Path(args.secret_key_file).read_text().strip()
    if (args.access_key is None) != (secret is None):
        raise ConfigError("--access-key and --secret-key-file go together")
    return open_storage(args.remote, endpoint_url=args.endpoint_url, region=args.region, profile=args.profile,
                        access_key=args.access_key, secret_key=secret, anonymous=args.anonymous)


class _Bar:
    """A tqdm bar on a terminal (stderr), nothing otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_push(args) -> int:
    from tinyserve.remote.manifest import build_manifest
    from tinyserve.remote.repository import next_remote_version, push
    from tinyserve.repository import Repository

    storage = _storage(args)
    if args.repo:
        name, version = _model(args.source)
        src = Repository(args.repo).resolve(name, version)
    else:
        if not args.name:
            raise ConfigError("push DIR needs --name (or use --repo DIR NAME[:VERSION])")
        name, src = args.name, Path(args.source)
    target = args.version or next_remote_version(storage, name)
    total = build_manifest(src, name, target).total_bytes
    bar = _Bar(total, f"push {name}:{target}", not args.no_progress)
    try:
        v = push(storage, src, name, target, progress=bar)
    finally:
        bar.close()
    print(f"pushed {name} version {v} ({total} bytes) to {storage.url}")
    return 0


def cmd_pull(args) -> int:
    from tinyserve.remote.repository import RemoteRepository, pull
    from tinyserve.repository import Repository
    from tinyserve.storage import Cache

    from tinyserve.remote import DEFAULT_CACHE_BYTES, default_cache_dir

    storage = _storage(args)
    cache = Cache(args.cache_dir or default_cache_dir(), args.cache_size or DEFAULT_CACHE_BYTES)
    remote = RemoteRepository(storage, cache)
    name, version = _model(args.model)
    v = version if version is not None else remote.versions(name)[-1] if remote.versions(name) else None
    total = remote.manifest(name, v).total_bytes if v is not None else 0
    bar = _Bar(total, f"pull {name}:{v}", not args.no_progress)
    try:
        got, path = pull(remote, name, v, repo=Repository(args.repo, create=True) if args.repo else None,
                         progress=bar)
    finally:
        bar.close()
        remote.close()
    print(f"pulled {name} version {got} into {path}")
    return 0


def add_parsers(sub, client_options) -> None:
    ps = sub.add_parser("push", help="upload a model version to a remote repository (visible only when complete)")
    _remote_options(ps)
    ps.add_argument("source", metavar="DIR|NAME[:VERSION]",
                    help="a version directory (with --name), or a model of the local repository given by --repo")
    ps.add_argument("--repo", default=None, help="local repository holding the model to push")
    ps.add_argument("--name", default=None, help="model name (when pushing a directory)")
    ps.add_argument("--version", type=int, default=None, help="remote version number (default: the next free one)")
    ps.set_defaults(fn=cmd_push)

    pl = sub.add_parser("pull", help="download a model version into the local cache (or a local repository)")
    _remote_options(pl)
    pl.add_argument("model", metavar="NAME[:VERSION]", help="default version: the latest")
    pl.add_argument("--cache-dir", default=None,
                    help="cache directory ($TINYSERVE_CACHE_DIR, else ~/.cache/tinyserve)")
    pl.add_argument("--cache-size", type=parse_size, default=None, help="cache size limit, e.g. 20G (default 20G)")
    pl.add_argument("--repo", default=None, help="also install the version into this local repository")
    pl.set_defaults(fn=cmd_pull)


__all__ = ["add_parsers", "parse_size"]
