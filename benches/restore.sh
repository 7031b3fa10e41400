#!/usr/bin/env bash
# State restore per partition, from the changelog and from the input topic, at several lengths
# of history with the same accounts: is restore bounded by the accounts or by the history?
#
#   benches/restore.sh [EVENTS ...]     default: 1000000 3000000
#
# For each length: a 6-partition topic with that many simulated events of 20,000 accounts;
# `vigil run` processes it all (writing the changelog) and stops; the broker compacts the
# changelog; a few new events arrive and a new `vigil run` restores every partition from the
# changelog; then a few more, and one with `kafka.changelog: false` restores from the input topic.
# Prints each restore's log line fields and the median per source. Needs the project's broker
# (started here if it is not running) and about 1.5 KB of disk per event.
set -euo pipefail
cd "$(dirname "$0")/.."

lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(1000000 3000000)
accounts=20000
partitions=6
addr=127.0.0.1:18090

cargo build --release --quiet
vigil=target/release/vigil
kafka/broker.sh status 2>/dev/null || kafka/broker.sh start
brokers=$(kafka/broker.sh bootstrap)
data=kafka/.run/data
work=$(mktemp -d)
trap 'kill "$(cat "$work/pid" 2>/dev/null)" 2>/dev/null || true' EXIT

group_lag() {
  java -cp "kafka/.dist/lib/*" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$brokers" --describe --group "$1" 2>/dev/null |
    awk 'NR > 1 && $6 ~ /^[0-9]+$/ { lag += $6; n++ } END { if (n == 0) print -1; else print lag }'
}

# vigil run on topic $1 / group $2, extra environment after; waits for `until` (a command).
run_until() {
  local topic=$1 group=$2 log=$3 until=$4
  shift 4
  env VIGIL_KAFKA__BROKERS="$brokers" VIGIL_KAFKA__TOPICS__TRANSACTIONS="$topic" \
    VIGIL_KAFKA__TOPICS__ALERTS="$topic-alerts" VIGIL_KAFKA__TOPICS__DEAD_LETTER="$topic-dlq" \
    VIGIL_KAFKA__GROUP_ID="$group" VIGIL_SERVER__ADDR="$addr" VIGIL_LOG__FORMAT=json \
    VIGIL_MODELS__DIR="$work/model" "$@" "$vigil" run >"$log" 2>&1 &
  echo $! >"$work/pid"
  until eval "$until"; do sleep 2; done
  kill -TERM "$(cat "$work/pid")"
  wait "$(cat "$work/pid")" || true
}

simulate() {
  VIGIL_KAFKA__BROKERS="$brokers" VIGIL_KAFKA__TOPICS__TRANSACTIONS="$1" \
    "$vigil" simulate --count "$2" --rate 1000000 --accounts "$accounts" --seed "$3" >/dev/null 2>&1
}

restores() { # log message → "partition ms records events" lines
  grep -F "\"message\":\"$2\"" "$1" | python3 -c '
import json, sys
for line in sys.stdin:
    l = json.loads(line)
    print(l["partition"], l["ms"], l.get("records", 0), l["events"], l["accounts"])'
}

median_ms() { awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

summary=()
for n in "${lengths[@]}"; do
  topic="bench-restore-$n-$(date +%s)"
  group="$topic"
  for t in "$topic" "$topic-alerts" "$topic-dlq"; do kafka/broker.sh topic "$t" "$partitions" >/dev/null 2>&1; done
  echo "== $n events on $topic"
  simulate "$topic" "$n" 7
  run_until "$topic" "$group" "$work/process.log" '[ "$(group_lag "$group")" = 0 ]'
  echo "   processed; waiting for the changelog's compaction"
  previous=0
  while :; do
    sleep 20
    size=$(cat "$data/$group-state-changelog-"*/*.log | wc -c)
    [ "$size" = "$previous" ] && break
    previous=$size
  done
  echo "   changelog on disk: $((size / 1048576)) MiB"

  simulate "$topic" 600 8
  run_until "$topic" "$group" "$work/changelog.log" \
    "[ \$(grep -c 'restored from the changelog' '$work/changelog.log') -ge $partitions ] && [ \"\$(group_lag '$group')\" = 0 ]"
  simulate "$topic" 600 9
  run_until "$topic" "$group" "$work/input.log" \
    "[ \$(grep -c 'rebuilt from the input topic' '$work/input.log') -ge $partitions ] && [ \"\$(group_lag '$group')\" = 0 ]" \
    VIGIL_KAFKA__CHANGELOG=false
  echo "   from the changelog (partition ms records events accounts):"
  restores "$work/changelog.log" "account state restored from the changelog" | sed 's/^/     /'
  echo "   from the input topic (partition ms records events accounts):"
  restores "$work/input.log" "account state rebuilt from the input topic" | sed 's/^/     /'
  c=$(restores "$work/changelog.log" "account state restored from the changelog" | median_ms)
  i=$(restores "$work/input.log" "account state rebuilt from the input topic" | median_ms)
  summary+=("$n events: median restore per partition ${c} ms from the changelog, ${i} ms from the input topic")
done
printf '%s\n' "${summary[@]}"
