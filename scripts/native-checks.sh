#!/usr/bin/env bash
# Native checks of csrc/: ASan/UBSan unit tests, then the libFuzzer targets (committed corpora
# replayed, then FUZZ_SECONDS per target, default 30, both targets in parallel).
# Installs clang / libzstd-dev / libxxhash-dev with apt-get when they are missing.
# Usage: scripts/native-checks.sh            (FUZZ_SECONDS=30 by default)
#        FUZZ_SECONDS=300 scripts/native-checks.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
export TS_TEST_STRICT=1  # the known-bug checks found by the first review are fixed: they must stay fixed

need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
[ -f /usr/include/zstd.h ] || need+=(libzstd-dev)
[ -f /usr/include/xxhash.h ] || need+=(libxxhash-dev)
# libFuzzer's runtime ships with clang on Debian (libclang-rt-<ver>-dev on newer releases)
if command -v clang >/dev/null 2>&1; then
    if ! ls "$(clang -print-resource-dir 2>/dev/null)"/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 &&
       ! ls "$(clang -print-resource-dir 2>/dev/null)"/lib/*/libclang_rt.fuzzer*.a >/dev/null 2>&1; then
        ver="$(clang -dumpversion | cut -d. -f1)"
        need+=("libclang-rt-${ver}-dev")
    fi
fi
if [ "${#need[@]}" -gt 0 ]; then
    echo "native-checks: installing ${need[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

start=$(date +%s)
make -C "$here/csrc" --no-print-directory test fuzz-run
echo "native-checks: OK in $(( $(date +%s) - start ))s"
