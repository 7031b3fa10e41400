#!/usr/bin/env bash
# Throughput and latency against the real broker, side by side in one run:
#
#   benches/broker.sh [EVENTS] [RATE] [SECONDS]     default 200000 10000 30
#   VIGIL_BIN=path/to/vigil benches/broker.sh …       that build instead of this tree's
#
# 1. Fills a 6-partition topic with EVENTS simulated events (20,000 accounts).
# 2. Apache Kafka's own consumer (org.apache.kafka.tools.ConsumerPerformance) reads it all, three
#    times; the median fetch rate (rebalance time excluded) is what this machine can deliver to a
#    consumer.
# 3. `vigil run` (release, the default model, at-least-once) processes the same topic in a
#    fresh group; its rate is the events whose outcome was acknowledged and offset stored, per
#    second, from the first such event to the last (start-up and group join excluded, like
#    Kafka's), read from its /metrics every 0.2 s.
# 4. Open loop: with that vigil caught up, `vigil simulate` offers RATE events/s for SECONDS
#    (evenly spread, never waiting for the consumer) and the consume → acknowledged latency
#    percentiles come from vigil_end_to_end_seconds' buckets over exactly that load.
#
# Needs the project's broker (started here if it is not running). The broker, the load and
# vigil share the machine's cores, as they do in the issue's measurement: compare the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-200000}
rate=${2:-10000}
seconds=${3:-30}
partitions=6
port=18091

# VIGIL_BIN: another build to measure (an A/B of two versions on one noisy host).
source benches/stream-env.sh
bench_setup bench-broker "$partitions"

echo "== $events events on $run ($partitions partitions)"
# The load generator's producer batches as it did before vigil's default `linger.ms` went from
# 5 to 2, so that the offered load arrives as in every earlier row of docs/benchmarks.md.
VIGIL_KAFKA__CLIENT__LINGER_MS=5 "$vigil" simulate --count "$events" --rate 1000000 --accounts 20000 --seed 1 >/dev/null 2>&1

# It reads the topic in well under a second, so one read swings with the host: the median of
# three, each in a fresh group.
kafka_rates=()
for i in 1 2 3; do
  kafka_rates+=("$(java -cp "kafka/.dist/lib/*" org.apache.kafka.tools.ConsumerPerformance \
    --bootstrap-server "$brokers" --topic "$run" --messages "$events" --group "$run-kafka-$i" \
    --timeout 60000 2>/dev/null | awk -F', *' 'NR == 2 { print $NF }')")
done
kafka_rate=$(printf '%s\n' "${kafka_rates[@]}" | sort -g | sed -n 2p)
printf 'Kafka ConsumerPerformance: %.0f events/s (the median of %s/s)\n' "$kafka_rate" \
  "$(printf '%.0f ' "${kafka_rates[@]}" | sed 's/ $//; s/ /, /g')"

VIGIL_KAFKA__GROUP_ID="$run-vigil" VIGIL_SERVER__ADDR="127.0.0.1:$port" "$vigil" run >"$work/vigil.log" 2>&1 &
echo $! >"$work/pid"

# Polls /metrics: the acknowledged-event rate until EVENTS are done, then the open-loop
# latency over the offered load.
python3 - "$port" "$events" "$rate" "$seconds" "$vigil" "$kafka_rate" <<'EOF'
import os, re, subprocess, sys, time
sys.path.insert(0, "benches")
import vigil_metrics
from vigil_metrics import value

port, vigil = sys.argv[1], sys.argv[5]
events, rate, seconds, kafka_rate = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[6])

def metrics():
    return vigil_metrics.metrics(port)

def buckets(text):
    return [(float("inf") if le == "+Inf" else float(le), float(n)) for le, n in
            re.findall(r'^vigil_end_to_end_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)]

def percentile(before, after, q):
    """The q-quantile of what was observed between two snapshots, interpolated in its bucket."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = counts[-1][1]
    want, lower, below = q * total, 0.0, 0.0
    for le, n in counts:
        if n >= want:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (want - below) / max(n - below, 1e-12)
        lower, below = le, n
    return lower

deadline = time.time() + 600
first = None
while time.time() < deadline:
    text = metrics()
    done = value(text, "vigil_end_to_end_seconds_count") if text else 0.0
    now = time.time()
    if done > 0 and first is None:
        first = (now, done)
    if done >= events:
        break
    time.sleep(0.2)
else:
    sys.exit("vigil did not finish in 10 minutes")
processing = value(text, "vigil_processing_seconds_sum") / max(value(text, "vigil_processing_seconds_count"), 1)
vigil_rate = (done - first[1]) / (now - first[0])
print(f"vigil run: {vigil_rate:.0f} events/s ({processing * 1e6:.1f} µs of processing per event)")
print(f"ratio vigil / Kafka's consumer: {vigil_rate / kafka_rate:.2f}")

before = buckets(metrics())
count = int(rate * seconds)
subprocess.run([vigil, "simulate", "--count", str(count), "--rate", str(rate), "--accounts", "20000",
                "--seed", "2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
               env={**os.environ, "VIGIL_KAFKA__CLIENT__LINGER_MS": "5"})
while True:
    text = metrics()
    if value(text, "vigil_end_to_end_seconds_count") >= events + count:
        break
    time.sleep(0.2)
after = buckets(text)
shares = ", ".join(f"p{int(q * 1000) / 10:g} {percentile(before, after, q) * 1e3:.1f} ms"
                   for q in (0.5, 0.9, 0.99, 0.999))
print(f"open loop at {rate:.0f} events/s offered for {seconds} s: consume -> acknowledged {shares}")
EOF
