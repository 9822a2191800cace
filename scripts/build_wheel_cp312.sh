#!/usr/bin/env bash
# Builds what the CUDA machine needs to run bench/gpu_check.sh (docs/gpu.md): it runs Python 3.12 with
# torch 2.11 already installed and has no internet.
#   1. a cp312 wheel of tinyserve whose native core links libzstd STATICALLY (no libzstd on that machine
#      needed), built with $PY312 (default /root/.pyenv/versions/3.12.1) in a private build venv.  The
#      distribution's libzstd.a is not position-independent, so zstd is compiled here with -fPIC from the
#      single-file zstd.c that python-zstandard's source distribution bundles (fetched with pip);
#   2. the cp312 / pure-Python wheels of the other packages the tests and benchmarks import (numpy,
#      zstandard, xxhash, msgpack, uvloop, pytest, pytest-timeout, hypothesis and their dependencies),
#      fetched with pip (never torch or triton: torch 2.11 and its triton are already there);
#   3. a smoke test: the wheel's tinyserve._native._core imports under Python 3.12 without torch and
#      round-trips a chunk; its ELF file must not need libzstd.so.
# Output: build/gpu-wheels/ (git-ignored; carry it to the device: run(carry=["build/gpu-wheels"])).
# Usage: scripts/build_wheel_cp312.sh            (PY312=/path/to/python3.12 to pick another interpreter)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python}"
out="$here/build/gpu-wheels"
work="$here/build/cp312"
venv="$work/venv"

"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' ||
    { echo "build_wheel_cp312: $PY312 is not Python 3.12" >&2; exit 2; }
[ -f /usr/include/xxhash.h ] || { echo "build_wheel_cp312: /usr/include/xxhash.h missing (libxxhash-dev)" >&2; exit 2; }

mkdir -p "$out" "$work"
# zstd, position-independent, from the single-file source in python-zstandard's sdist
zdir="$work/zstd"
if [ ! -f "$zdir/libzstd_pic.a" ]; then
    rm -rf "$zdir" && mkdir -p "$zdir"
    "$PY312" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$zdir" "zstandard==0.25.0"
    tar -xzf "$zdir"/zstandard-*.tar.gz -C "$zdir" --wildcards --strip-components=2 '*/zstd/zstd.c' '*/zstd/zstd.h' \
        '*/zstd/zstd_errors.h'
    gcc -O3 -fPIC -DZSTD_DISABLE_ASM -fvisibility=hidden -c "$zdir/zstd.c" -o "$zdir/zstd.o"
    ar rcs "$zdir/libzstd_pic.a" "$zdir/zstd.o"
fi
ZSTD_A="$zdir/libzstd_pic.a"
rm -f "$out"/tinyserve-*.whl
if [ ! -x "$venv/bin/python" ]; then
    "$PY312" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=80" wheel "Cython>=3.0"

# A private copy of the source (tracked files plus untracked, not ignored ones), so the build neither
# writes into the working tree nor picks up its build outputs (the cp311 extension, generated C).
src="$work/src"
rm -rf "$src"
mkdir -p "$src"
(cd "$here" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src" 2>/dev/null || true)
rm -f "$src"/tinyserve/_native/*.so "$src"/tinyserve/_native/_core.c

# setup.py asks pkg-config for libzstd's flags: a private libzstd.pc that names the static archive
pc="$work/pkgconfig"
mkdir -p "$pc"
cat > "$pc/libzstd.pc" <<EOF
Name: libzstd
Description: zstd, linked statically into tinyserve's native core
Version: 1
Libs: $ZSTD_A
Cflags: -I$zdir
EOF
(cd "$src" && PKG_CONFIG_PATH="$pc" "$venv/bin/python" -m pip wheel -q --disable-pip-version-check \
    --no-deps --no-build-isolation -w "$out" .)
wheel="$(ls "$out"/tinyserve-*-cp312-*.whl)"
echo "build_wheel_cp312: built $wheel"

# the extension must not need libzstd.so at run time
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY312" -m zipfile -e "$wheel" "$tmp/site"
so="$(ls "$tmp"/site/tinyserve/_native/_core.cpython-312-*.so)"
if readelf -d "$so" | grep -q 'libzstd'; then
    echo "build_wheel_cp312: $so still needs a shared libzstd" >&2
    exit 1
fi

# the other wheels the CUDA machine may lack: cp312 binaries or pure Python, no torch / triton
"$PY312" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --implementation cp -d "$out" \
    numpy zstandard xxhash msgpack uvloop pytest pytest-timeout hypothesis prometheus-client nvidia-ml-py

# smoke test under Python 3.12 without torch: the core imports and round-trips a chunk
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links "$out" numpy xxhash zstandard
cd "$tmp" && PYTHONPATH="$tmp/site" "$venv/bin/python" - <<'EOF'
import sys
assert "torch" not in sys.modules
from tinyserve._native import _core as core
from tinyserve._fallback import core as fb
import numpy as np
src = (np.random.default_rng(0).standard_normal(70000).astype(np.float32) * 0.02).view(np.uint8)
payload, recs = core.encode_planes(src, "float32", 16384, "max", 19, 2)
assert fb.encode_planes(src, "float32", 16384, "huffman", 3, 1)[1] == core.encode_planes(src, "float32", 16384, "huffman", 3, 1)[1]
from tinyserve.spec import ChunkInfo, TensorInfo
chunks, off = [], 0
for codecs, sizes, checksum in recs:
    chunks.append(ChunkInfo(off, sum(sizes), checksum, tuple(codecs), tuple(sizes)))
    off += sum(sizes)
info = TensorInfo("t", "float32", "planes", (70000,), 0, len(payload), 16384, tuple(chunks))
dst = np.zeros(src.nbytes, np.uint8)
core.decode_into(payload, [(info, dst)], True, 2)
assert np.array_equal(dst, src)
planes = np.zeros(src.nbytes, np.uint8)
core.decode_planes_into(payload, [(info, 0, len(chunks), planes)], True, 2)
assert np.array_equal(planes.reshape(4, -1), fb._split_planes(src, "float32", 4))
print(f"build_wheel_cp312: _core from {core.__file__} imports under Python {sys.version.split()[0]}; "
      f"{src.nbytes} bytes -> {len(payload)} bytes, {len(recs)} chunks")
EOF
echo "build_wheel_cp312: wheels in $out:"
cd "$here"
ls -1 "$out" | sed 's/^/  /'
du -sh "$out" | awk '{print "build_wheel_cp312: " $1 " in all (the run tool carries at most 64 MiB)"}'
