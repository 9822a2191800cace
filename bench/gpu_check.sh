#!/usr/bin/env bash
# The GPU check (issue 5, docs/gpu.md): on a CUDA machine, run the `gpu`-marked tests and the device
# load benchmark, then print one table.  Under 5 minutes on an H100.
#
# That machine has Python 3.12 with torch (2.11) and Triton installed and no internet.  Build what it
# lacks here first, then carry it:
#     scripts/build_wheel_cp312.sh                       # -> build/gpu-wheels/ (~31 MB)
#     run(command="bench/gpu_check.sh", carry=["build/gpu-wheels"], timeout_s=420)
# Missing modules are unpacked from build/gpu-wheels into a temporary directory on PYTHONPATH (no pip,
# nothing installed system-wide); the cp312 native core is copied out of the tinyserve wheel into
# tinyserve/_native/ (git-ignored).  Figures go to $OUT (when set) and bench/results/.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
WHEELS="${WHEELS:-$here/build/gpu-wheels}"
RESULTS="${OUT:-$here/bench/results}"
mkdir -p "$RESULTS"
start=$(date +%s)

PY="${PY:-}"
if [ -z "$PY" ]; then
    for c in python3.12 python3 python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import torch' >/dev/null 2>&1; then PY="$c"; break; fi
    done
fi
[ -n "$PY" ] || { echo "gpu_check: no Python with torch found (set PY=)"; exit 2; }
echo "gpu_check: $($PY -c 'import sys, torch; print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu_check: /'

deps="$(mktemp -d)/site"
mkdir -p "$deps"
export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
# module to import -> wheel name prefix; unpacked only when the module is missing
for pair in numpy:numpy zstandard:zstandard xxhash:xxhash msgpack:msgpack uvloop:uvloop \
            pluggy:pluggy iniconfig:iniconfig packaging:packaging pygments:pygments \
            sortedcontainers:sortedcontainers _pytest:pytest pytest_timeout:pytest_timeout hypothesis:hypothesis \
            prometheus_client:prometheus_client pynvml:nvidia_ml_py; do
    mod="${pair%%:*}"
    whl="${pair#*:}"
    if ! "$PY" -c "import $mod" >/dev/null 2>&1; then
        f="$(ls "$WHEELS/$whl"-[0-9]*.whl 2>/dev/null | head -1)"
        if [ -n "$f" ]; then
            "$PY" -m zipfile -e "$f" "$deps" && echo "gpu_check: unpacked $(basename "$f")"
        else
            echo "gpu_check: $mod is missing and no $whl wheel is in $WHEELS"
        fi
    fi
done
pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
if ! "$PY" -c 'from tinyserve._native import _core' >/dev/null 2>&1; then
    whl="$(ls "$WHEELS"/tinyserve-*-cp"$pyver"-*.whl 2>/dev/null | head -1)"
    if [ -n "$whl" ]; then
        tmp="$(mktemp -d)"
        "$PY" -m zipfile -e "$whl" "$tmp"
        cp "$tmp"/tinyserve/_native/_core.cpython-"$pyver"-*.so tinyserve/_native/
        echo "gpu_check: native core from $(basename "$whl")"
    else
        echo "gpu_check: no cp$pyver tinyserve wheel: the pure-Python codec is used (slow decode figures)"
        export TINYSERVE_PUREPYTHON=1
    fi
fi

# compiled Triton kernels, not the interpreter (tests/conftest.py only sets TRITON_INTERPRET when unset)
export TRITON_INTERPRET=0
tests_rc=0
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --timeout 150 \
    tests/test_kernels.py tests/test_gpu_load.py 2>&1 | tee "$RESULTS/gpu-tests.txt" | tail -25
tests_rc=${PIPESTATUS[0]}
# the server on cuda:0 (its own run: it imports the whole server, so a missing module there cannot
# keep the kernel and load tests above from running)
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --timeout 90 \
    tests/test_devices.py 2>&1 | tee "$RESULTS/gpu-server-tests.txt" | tail -15
server_rc=${PIPESTATUS[0]}

day="$(date +%Y-%m-%d)"
bench_rc=0
timeout 240 "$PY" bench/bench_gpu_load.py --json "$RESULTS/gpu-load-$day.json" 2>&1 | tee "$RESULTS/gpu-load-$day.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "== gpu_check summary ($(( $(date +%s) - start )) s)"
printf '  %-28s %s\n' "gpu tests" "$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$RESULTS/gpu-tests.txt" | tail -1) (rc $tests_rc)"
printf '  %-28s %s\n' "gpu server test" "$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$RESULTS/gpu-server-tests.txt" | tail -1) (rc $server_rc)"
if [ -f "$RESULTS/gpu-load-$day.json" ]; then
    "$PY" - "$RESULTS/gpu-load-$day.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rows = [("device", r["env"].get("gpu", r["env"]["device"])),
        ("pinned H2D copy GB/s", r["pinned_copy_gbs"]), ("CPU decode GB/s", r["cpu_decode_gbs"]),
        ("load raw GB/s", f'{r["load_raw_gbs"]} ({r["raw_vs_pinned"]:.0%} of pinned, target 80%)'),
        ("load compressed GB/s", f'{r["load_compressed_gbs"]} ({r["compressed_vs_min"]:.0%} of min, target 80%)'),
        ("naive load+.to GB/s", r["naive_load_then_to_gbs"]),
        ("MLP 64-256-256-10 b1 p50/p99 us", f'{r["mlp_64_256_256_10_b1"]["p50_us"]}/{r["mlp_64_256_256_10_b1"]["p99_us"]}'),
        ("MLP 1024-4096-1024 b1 p50/p99 us", f'{r["mlp_1024_4096_1024_b1"]["p50_us"]}/{r["mlp_1024_4096_1024_b1"]["p99_us"]}')]
for k, v in rows:
    print(f"  {k:<34} {v}")
EOF
else
    echo "  benchmark                    did not finish (rc $bench_rc)"
fi
[ "$tests_rc" = 0 ] && [ "$server_rc" = 0 ] && [ "$bench_rc" = 0 ]
