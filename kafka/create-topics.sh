#!/bin/sh
# Creates vigil's topics from kafka/topics.conf, or brings an existing topic's configuration and
# partition count up to it. Idempotent. POSIX sh.
#   BOOTSTRAP=kafka:9092 sh kafka/create-topics.sh [topics.conf]
# KAFKA_TOPICS / KAFKA_CONFIGS name the Kafka CLI tools (default: the apache/kafka image's);
# tests use `kafka/broker.sh kafka-topics` and `kafka/broker.sh kafka-configs`.
# REPLICATION_FACTOR (default 1: the single-broker compose stack; 3 for a production cluster)
# applies to topics it creates. COMMAND_CONFIG names a client properties file (TLS, SASL) for
# both tools.
set -eu
conf=${1:-$(dirname "$0")/topics.conf}
bootstrap=${BOOTSTRAP:-kafka:9092}
topics=${KAFKA_TOPICS:-/opt/kafka/bin/kafka-topics.sh}
configs=${KAFKA_CONFIGS:-/opt/kafka/bin/kafka-configs.sh}
replication=${REPLICATION_FACTOR:-1}
client=""
if [ -n "${COMMAND_CONFIG:-}" ]; then client="--command-config $COMMAND_CONFIG"; fi

grep -v '^[[:space:]]*#' "$conf" | while read -r name partitions settings; do
  [ -n "$name" ] || continue
  config_args=""
  for kv in $settings; do config_args="$config_args --config $kv"; done
  # shellcheck disable=SC2086
  $topics --bootstrap-server "$bootstrap" $client --create --if-not-exists --topic "$name" \
    --partitions "$partitions" --replication-factor "$replication" $config_args
  # shellcheck disable=SC2086
  current=$($topics --bootstrap-server "$bootstrap" $client --describe --topic "$name" \
    | sed -n 's/.*PartitionCount: *\([0-9]*\).*/\1/p' | head -n 1)
  if [ -n "$current" ] && [ "$current" -lt "$partitions" ]; then
    # shellcheck disable=SC2086
    $topics --bootstrap-server "$bootstrap" $client --alter --topic "$name" --partitions "$partitions"
  fi
  if [ -n "$settings" ]; then
    # shellcheck disable=SC2086
    $configs --bootstrap-server "$bootstrap" $client --alter --entity-type topics --entity-name "$name" \
      --add-config "$(echo "$settings" | tr ' ' ',')"
  fi
  echo "create-topics: $name ready ($partitions partitions${settings:+, $settings})"
done
