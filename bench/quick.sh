#!/usr/bin/env bash
# The quick benchmark set (`make bench`): about 6-8 minutes on the 2-core VM.
#   1. bench_weights.py --quick   weights format: ratios, decode, load, pack, memory (needs zipnn)
#   2. bench_latency.py --quick   serving latency: tinyserve vs the bare uvloop floor
#   3. cold_start.py --quick      load request -> first answer, 128 MiB, warm / cold page cache
#   4. tinyserve bench            the load generator against the example MLP: closed-loop sweep and
#                                 open-loop rate sweep (bench/results/loadgen-quick.json + plots)
# Results go to bench/results/ (each script says which files), or to $BENCH_OUT when set.  The peers (bench/peers/) are not part
# of it: they need bench/peers/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TS=.venv/bin/tinyserve
OUT="${BENCH_OUT:-bench/results}"
mkdir -p "$OUT"
start=$(date +%s)
failed=()
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s)"; }
# run NAME CMD...: a failing benchmark is reported at the end; the others still run
run() { local name="$1"; shift; "$@" || { echo "!!! $name failed (exit $?)"; failed+=("$name"); }; }

step "1/4 weights (bench_weights.py --quick)"
run bench_weights $PY bench/bench_weights.py --quick --out "$OUT"
step "2/4 serving latency (bench_latency.py --quick)"
run bench_latency $PY bench/bench_latency.py --quick --out "$OUT"
step "3/4 cold start (cold_start.py --quick)"
run cold_start $PY bench/cold_start.py --quick --out "$OUT"

step "4/4 load generator (tinyserve bench)"
work=$(mktemp -d /tmp/tinyserve-quick.XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"; wait "$server_pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
$TS pack tinyserve.examples:mlp --repo "$work/repo" --name mlp --quiet
$TS serve --repo "$work/repo" --model mlp --threads 1 --port 0 > "$work/server.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 1 600); do  # at most 60 s
  port=$(sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' "$work/server.log" | head -1)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "the server did not start:"; cat "$work/server.log"; exit 1; }
common=(--port "$port" --window 1 --time-bound 8 --max-windows 8 --warmup 1 --quiet)
run "tinyserve bench (closed)" $TS bench mlp "${common[@]}" --concurrency 1,8,32 --connections 8 \
    --json "$OUT"/loadgen-quick-closed.json --plot "$OUT"/loadgen-quick-closed
run "tinyserve bench (open)" $TS bench mlp "${common[@]}" --rate 500,2000,5000 --connections 4 \
    --json "$OUT"/loadgen-quick-open.json --plot "$OUT"/loadgen-quick-open
step "done"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
