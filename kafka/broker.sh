#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft) on loopback for tests and local runs, from jars resolved from
# Maven Central (kafka/pom.xml) into kafka/.dist (git-ignored, cached between runs).
#
#   kafka/broker.sh start            resolve jars if needed, format storage, start, wait until ready
#   kafka/broker.sh stop             stop it and delete its data
#   kafka/broker.sh status           exit 0 if it answers
#   kafka/broker.sh topic NAME [P]   create a topic with P partitions (default 3)
#   kafka/broker.sh bootstrap        print the bootstrap address
#   kafka/broker.sh kafka-topics ... / kafka-configs ...
#                                    the Kafka CLI tools (kafka-topics.sh, kafka-configs.sh)
#
# Port: VIGIL_TEST_KAFKA_PORT (default 19092; the controller uses the next port).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dist="$here/.dist"
run="$here/.run"
port="${VIGIL_TEST_KAFKA_PORT:-19092}"
controller_port=$((port + 1))
bootstrap="127.0.0.1:$port"
java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
  -Dlog4j2.configurationFile="$here/log4j2.properties")

fetch() {
  if [ -f "$dist/.complete" ]; then return; fi
  echo "broker.sh: resolving Apache Kafka jars from Maven Central into $dist" >&2
  rm -rf "$dist"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$dist/lib" -DincludeScope=runtime
  touch "$dist/.complete"
}

kafka_java() {
  java "${java_opts[@]}" -cp "$dist/lib/*" "$@"
}

status() {
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --list >/dev/null 2>&1
}

start() {
  fetch
  if [ -f "$run/pid" ] && kill -0 "$(cat "$run/pid")" 2>/dev/null && status; then
    echo "broker.sh: already running on $bootstrap" >&2
    return
  fi
  rm -rf "$run"
  mkdir -p "$run/data"
  cat > "$run/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$run/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
PROPS
  local cluster_id
  cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid)
  kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$run/server.properties" >"$run/format.log" 2>&1
  nohup java "${java_opts[@]}" -cp "$dist/lib/*" kafka.Kafka "$run/server.properties" >"$run/broker.log" 2>&1 &
  echo $! >"$run/pid"
  for _ in $(seq 1 60); do
    if status; then
      echo "broker.sh: Apache Kafka ready on $bootstrap" >&2
      return
    fi
    if ! kill -0 "$(cat "$run/pid")" 2>/dev/null; then
      echo "broker.sh: the broker exited; last log lines:" >&2
      tail -n 40 "$run/broker.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "broker.sh: the broker did not become ready in 60 s" >&2
  tail -n 40 "$run/broker.log" >&2
  exit 1
}

stop() {
  if [ -f "$run/pid" ]; then
    local pid
    pid=$(cat "$run/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$run"
}

topic() {
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --create \
    --if-not-exists --topic "$1" --partitions "${2:-3}" --replication-factor 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  topic) shift; topic "$@" ;;
  bootstrap) echo "$bootstrap" ;;
  kafka-topics) fetch; shift; kafka_java org.apache.kafka.tools.TopicCommand "$@" ;;
  kafka-configs) fetch; shift; kafka_java kafka.admin.ConfigCommand "$@" ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
