#!/bin/sh
# Creates vigil's topics from kafka/topics.conf, or brings an existing topic's configuration and
# partition count up to it. Idempotent. POSIX sh.
#   BOOTSTRAP=kafka:9092 sh kafka/create-topics.sh [topics.conf]
# KAFKA_TOPICS / KAFKA_CONFIGS name the Kafka CLI tools (default: the apache/kafka image's);
# tests use `kafka/broker.sh kafka-topics` and `kafka/broker.sh kafka-configs`.
set -eu
conf=${1:-$(dirname "$0")/topics.conf}
bootstrap=${BOOTSTRAP:-kafka:9092}
topics=${KAFKA_TOPICS:-/opt/kafka/bin/kafka-topics.sh}
configs=${KAFKA_CONFIGS:-/opt/kafka/bin/kafka-configs.sh}

grep -v '^[[:space:]]*#' "$conf" | while read -r name partitions settings; do
  [ -n "$name" ] || continue
  config_args=""
  for kv in $settings; do config_args="$config_args --config $kv"; done
  # shellcheck disable=SC2086
  $topics --bootstrap-server "$bootstrap" --create --if-not-exists --topic "$name" \
    --partitions "$partitions" --replication-factor 1 $config_args
  current=$($topics --bootstrap-server "$bootstrap" --describe --topic "$name" \
    | sed -n 's/.*PartitionCount: *\([0-9]*\).*/\1/p' | head -n 1)
  if [ -n "$current" ] && [ "$current" -lt "$partitions" ]; then
    $topics --bootstrap-server "$bootstrap" --alter --topic "$name" --partitions "$partitions"
  fi
  if [ -n "$settings" ]; then
    $configs --bootstrap-server "$bootstrap" --alter --entity-type topics --entity-name "$name" \
      --add-config "$(echo "$settings" | tr ' ' ',')"
  fi
  echo "create-topics: $name ready ($partitions partitions${settings:+, $settings})"
done
