#!/usr/bin/env bash
# Scale-out on one machine: one instance on both cores against two instances of one group,
# each pinned to one core, on the same topic:
#
#   benches/scale_out.sh [EVENTS] [ROUNDS]      default 300000 2
#   VIGIL_BIN=path/to/vigil benches/scale_out.sh  that build instead of this tree's
#
# Fills a 6-partition topic with EVENTS simulated events (20,000 accounts), then, ROUNDS times
# and alternating (the host is shared and noisy: compare neighbouring runs), lets a fresh group
# process all of it: `taskset -c 0,1` one `vigil run`, or `taskset -c 0` and `taskset -c 1` one
# each (the group splits the partitions three and three). The rate is the events whose outcome
# was acknowledged and offset stored, summed over the instances' /metrics, per second from the
# first to the last (start-up and the group's join excluded). The broker runs on the same two
# cores throughout, as in benches/broker.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-300000}
rounds=${2:-2}
partitions=6

source benches/stream-env.sh
bench_setup bench-scale "$partitions"

echo "== $events events on $run ($partitions partitions)"
"$vigil" simulate --count "$events" --rate 1000000 --accounts 20000 --seed 1 >/dev/null 2>&1
# Trains the model once, so that no run pays for it.
"$vigil" train --out "$work/model" >/dev/null 2>&1

# Starts one instance per core list in group $1, waits until together they stored every
# event's offset and prints their rate.
measure() {
  local group=$1 label=$2
  shift 2
  local ports=() i=0
  for cores in "$@"; do
    local port=$((18101 + i))
    VIGIL_KAFKA__GROUP_ID="$group" VIGIL_SERVER__ADDR="127.0.0.1:$port" \
      taskset -c "$cores" "$vigil" run >"$work/vigil.$group.$i.log" 2>&1 &
    echo $! >"$work/pid.$i"
    ports+=("$port")
    i=$((i + 1))
  done
  python3 - "$events" "$label" "${ports[@]}" <<'EOF'
import re, sys, time, urllib.request

events, label, ports = int(sys.argv[1]), sys.argv[2], sys.argv[3:]

def done(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = re.search(r"^vigil_end_to_end_seconds_count (\S+)$", r.read().decode(), re.M)
            return float(m.group(1)) if m else 0.0
    except OSError:
        return 0.0

deadline, first = time.time() + 900, None
while time.time() < deadline:
    n, now = sum(done(p) for p in ports), time.time()
    if n > 0 and first is None:
        first = (now, n)
    if n >= events:
        break
    time.sleep(0.2)
else:
    sys.exit(f"{label}: not done in 15 minutes")
print(f"{label}: {(n - first[1]) / (now - first[0]):.0f} events/s")
EOF
  for p in "$work"/pid.*; do kill -TERM "$(cat "$p")" 2>/dev/null || true; wait "$(cat "$p")" 2>/dev/null || true; rm -f "$p"; done
}

for r in $(seq "$rounds"); do
  measure "$run-one-$r" "round $r, one instance on cores 0,1" 0,1
  measure "$run-two-$r" "round $r, two instances on core 0 and core 1" 0 1
done
