#!/usr/bin/env bash
# The whole process's resident memory with many accounts, on the real broker:
#
#   benches/memory.sh [ACCOUNTS] [EVENTS_PER_ACCOUNT]     default 1000000 4
#   VIGIL_BIN=path/to/vigil benches/memory.sh …             that build instead of this tree's
#
# Fills a 6-partition topic with ACCOUNTS × EVENTS_PER_ACCOUNT simulated events, runs
# `vigil run` (release, the default model, the changelog on, at-least-once) over all of it, and
# prints, once every event is acknowledged, the accounts it holds (`vigil_accounts_tracked`),
# its estimate of their state (`vigil_state_bytes`) and the process's resident set (VmRSS, and
# VmHWM, its peak) — models, buffers, the alert index and librdkafka's queues included — next to
# the same process's resident set before its first event.
set -euo pipefail
cd "$(dirname "$0")/.."
accounts=${1:-1000000}
per_account=${2:-4}
events=$((accounts * per_account))
partitions=6
port=18092

source benches/stream-env.sh
bench_setup bench-memory "$partitions"

VIGIL_KAFKA__GROUP_ID="$run-vigil" VIGIL_SERVER__ADDR="127.0.0.1:$port" "$vigil" run >"$work/vigil.log" 2>&1 &
echo $! >"$work/pid"

echo "== $events events of $accounts accounts on $run ($partitions partitions)"
python3 - "$port" "$events" "$(cat "$work/pid")" "$vigil" "$accounts" <<'EOF'
import re, subprocess, sys, time
sys.path.insert(0, "benches")
import vigil_metrics
from vigil_metrics import value

port, events, pid, vigil, accounts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def metrics():
    return vigil_metrics.metrics(port)

def status(field):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024

deadline = time.time() + 120
while metrics() is None:
    if time.time() > deadline:
        sys.exit("vigil did not serve /metrics in 2 minutes")
    time.sleep(0.5)
time.sleep(2)
idle = status("VmRSS")
print(f"vigil resident before its first event: {idle / 1e6:.0f} MB")

subprocess.run([vigil, "simulate", "--count", str(events), "--rate", "1000000", "--accounts",
                accounts, "--seed", "3"], check=True, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
deadline = time.time() + 1800
while value(metrics(), "vigil_end_to_end_seconds_count") < events:
    if time.time() > deadline:
        sys.exit("vigil did not finish in 30 minutes")
    time.sleep(1)
# The state gauge is refreshed every 5 s.
time.sleep(6)
text = metrics()
held = value(text, "vigil_accounts_tracked")
indexed = value(text, "vigil_alert_index_alerts")
index_bytes = value(text, "vigil_alert_index_bytes")
state = value(text, "vigil_state_bytes")
rss, peak = status("VmRSS"), status("VmHWM")
print(f"accounts held: {held:.0f}; their state (vigil_state_bytes): {state / 1e6:.0f} MB, "
      f"{state / max(held, 1):.0f} bytes each")
print(f"vigil resident: {rss / 1e6:.0f} MB ({(rss - idle) / max(held, 1):.0f} bytes per account "
      f"above the idle process), peak {peak / 1e6:.0f} MB")
print(f"alerts in the triage index: {indexed:.0f}, {index_bytes / 1e6:.0f} MB "
      f"({index_bytes / max(indexed, 1):.0f} bytes each; alerts.index_memory_mb of it in memory)")
EOF
