#!/usr/bin/env bash
# POST /predict on loopback with wrk: one transaction, then the whole bundled dataset (2,512
# transactions) as one batch, each over a single connection, closed loop (one request at a time).
# Starts a release-build `vigil demo` (embedded cluster, one simulated event a second) on port
# 18081 with the rate limit off, and stops it after. Each body is run several times, because a
# shared 2-vCPU host varies by ±15% from minute to minute; the last line per body is the median
# run (by requests/s).
#
#   benches/predict.sh [seconds per run, default 10] [runs per body, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
runs="${2:-5}"
command -v wrk >/dev/null || { echo "predict.sh: needs wrk (Debian: apt-get install wrk)" >&2; exit 1; }
cargo build --release -q
work=$(mktemp -d)
python3 benches/predict/bodies.py data/bank_transactions.csv "$work"
VIGIL_SERVER__ADDR=127.0.0.1:18081 VIGIL_SERVER__RATE_LIMIT__PER_SECOND=0 VIGIL_LOG__FILTER=warn \
  VIGIL_MODELS__DIR="$work/models" \
  target/release/vigil demo --rate 1 --anomaly-share 0 --malformed-share 0 >"$work/vigil.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do
  curl -sf http://127.0.0.1:18081/ready >/dev/null && break
  sleep 0.5
done
curl -sf http://127.0.0.1:18081/ready >/dev/null || { cat "$work/vigil.log" >&2; exit 1; }
for body in one batch; do
  n=$([ "$body" = one ] && echo 1 || echo 2512)
  echo "== $body.json ($n transactions per request), $runs runs of ${secs}s"
  # A few requests first so the page cache, allocator and branch predictors are warm.
  BODY="$work/$body.json" wrk -t1 -c1 -d2s -s benches/predict/post.lua http://127.0.0.1:18081/predict >/dev/null
  for _ in $(seq 1 "$runs"); do
    BODY="$work/$body.json" wrk -t1 -c1 -d"${secs}s" --latency -s benches/predict/post.lua \
      http://127.0.0.1:18081/predict |
      awk -v n="$n" '/ 50%/ {p50=$2} / 99%/ {p99=$2} /Requests\/sec/ {rps=$2}
        END {printf "p50 %s  p99 %s  %.1f requests/s  %.0f transactions/s\n", p50, p99, rps, rps*n}'
  done | tee "$work/$body.runs"
  sort -t' ' -k6 -g "$work/$body.runs" | sed -n "$(((runs + 1) / 2))p" | sed 's/^/median: /'
done
