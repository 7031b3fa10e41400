#!/usr/bin/env bash
# What writing the state changelog costs the stream: `vigil run` (release, at-least-once) on one
# 6-partition topic of N simulated events, with kafka.changelog true and false alternately (two
# runs each, a fresh group each time), timed from start to the group's lag reaching 0.
#
#   benches/changelog_cost.sh [N]     default 200000
#
# The lag is read with Kafka's own group tool once a second, which costs CPU too; compare the
# two settings within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200000}
cargo build --release --quiet
kafka/broker.sh status 2>/dev/null || kafka/broker.sh start
brokers=$(kafka/broker.sh bootstrap)
topic=bench-changelog-$(date +%s)
models=$(mktemp -d)
for t in "$topic" "$topic-alerts" "$topic-dlq"; do kafka/broker.sh topic "$t" 6 >/dev/null 2>&1; done
VIGIL_KAFKA__BROKERS="$brokers" VIGIL_KAFKA__TOPICS__TRANSACTIONS="$topic" \
  target/release/vigil simulate --count "$n" --rate 1000000 --accounts 20000 --seed 3 >/dev/null 2>&1
lag() {
  java -cp "kafka/.dist/lib/*" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$brokers" --describe --group "$1" 2>/dev/null |
    awk 'NR > 1 && $6 ~ /^[0-9]+$/ { l += $6; k++ } END { if (k == 0) print -1; else print l }'
}
for changelog in true false true false; do
  group="$topic-$changelog-$RANDOM"
  start=$(date +%s.%N)
  VIGIL_KAFKA__BROKERS="$brokers" VIGIL_KAFKA__TOPICS__TRANSACTIONS="$topic" \
    VIGIL_KAFKA__TOPICS__ALERTS="$topic-alerts" VIGIL_KAFKA__TOPICS__DEAD_LETTER="$topic-dlq" \
    VIGIL_KAFKA__GROUP_ID="$group" VIGIL_KAFKA__CHANGELOG="$changelog" \
    VIGIL_SERVER__ADDR=127.0.0.1:0 VIGIL_LOG__FILTER=warn VIGIL_MODELS__DIR="$models" \
    target/release/vigil run >/dev/null 2>&1 &
  pid=$!
  until [ "$(lag "$group")" = 0 ]; do sleep 1; done
  end=$(date +%s.%N)
  kill -TERM "$pid"
  wait "$pid" || true
  awk -v n="$n" -v s="$start" -v e="$end" -v c="$changelog" \
    'BEGIN { printf "changelog=%s: %d events in %.1f s, %.0f events/s\n", c, n, e - s, n / (e - s) }'
done
