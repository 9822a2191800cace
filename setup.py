"""Builds tinyserve's native core: csrc/ (C99/C11) wrapped by Cython, linked to the system libzstd.

libzstd and the xxHash header come from the system (Debian: libzstd-dev, libxxhash-dev; the Makefile's
setup step installs them).  Flags come from pkg-config when it knows the library, else -lzstd."""

import os
import shlex
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup


def pkg_config(flag: str, lib: str, fallback: list[str]) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, lib], check=True, capture_output=True, text=True).stdout
        return shlex.split(out)
    except (OSError, subprocess.CalledProcessError):
        return fallback


# One known libzstd: the extension is built against the system library found by pkg-config (Debian
# bookworm: 1.5.4) and refuses to build against one older than ZSTD_MIN; the pure-Python backend uses
# python-zstandard's bundled copy (it exports no library to link, and zstd sources are not vendored).
# tests/test_weights.py records both versions and checks that the library loaded at run time is the one
# whose header the extension was compiled with; the decoded checksums of format 1.1 make both backends
# agree on damaged frames whatever the two libraries do (docs/format.md section 8).
ZSTD_MIN = "1.5.0"
try:
    _zv = subprocess.run(["pkg-config", "--modversion", "libzstd"], check=True, capture_output=True,
                         text=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    _zv = None
if _zv is not None and tuple(int(x) for x in _zv.split(".")[:3]) < tuple(int(x) for x in ZSTD_MIN.split(".")):
    raise SystemExit(f"tinyserve needs libzstd >= {ZSTD_MIN} to build its native core; pkg-config finds {_zv}")

CSRC = ["csrc/ts_status.c", "csrc/ts_huff.c", "csrc/ts_rans.c", "csrc/ts_planes.c", "csrc/ts_codec.c", "csrc/ts_weights.c"]
cflags = ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"] + pkg_config("--cflags", "libzstd", [])
if os.environ.get("TINYSERVE_NATIVE_DEBUG"):
    cflags += ["-O1", "-g", "-fno-omit-frame-pointer"]

ext = Extension(
    "tinyserve._native._core",
    sources=["tinyserve/_native/_core.pyx"] + CSRC,
    include_dirs=["csrc"],
    extra_compile_args=cflags,
    extra_link_args=pkg_config("--libs", "libzstd", ["-lzstd"]) + ["-lpthread"],
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": "3"}, quiet=True))
