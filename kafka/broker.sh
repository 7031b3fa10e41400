#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft) on loopback for tests and local runs, from jars resolved from
# Maven Central (kafka/pom.xml) into kafka/.dist (git-ignored, cached between runs).
#
#   kafka/broker.sh start            resolve jars if needed, format storage, start, wait until ready
#   kafka/broker.sh stop             stop it and delete its data
#   kafka/broker.sh freeze | thaw    SIGSTOP / SIGCONT it (a broker that hangs, sockets open)
#   kafka/broker.sh crash            SIGKILL it, keeping its data
#   kafka/broker.sh restart          start it again on the data it has (after crash)
#   kafka/broker.sh status           exit 0 if it answers
#   kafka/broker.sh topic NAME [P]   create a topic with P partitions (default 3)
#   kafka/broker.sh bootstrap        print the bootstrap address
#   kafka/broker.sh sasl-env         print `export` lines for the SASL_SSL listener: its address,
#                                    the CA certificate, the SCRAM/PLAIN user and its password
#   kafka/broker.sh kafka-topics ... / kafka-configs ...
#                                    the Kafka CLI tools (kafka-topics.sh, kafka-configs.sh)
#
# Listeners: PLAINTEXT on VIGIL_TEST_KAFKA_PORT (default 19092), the controller on the next port,
# SASL_SSL on the one after (SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN; a CA and the broker's
# certificate for 127.0.0.1/localhost are made with openssl at each start, and the user `vigil`
# gets a random password, in .run/sasl).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dist="$here/.dist"
run="$here/.run"
port="${VIGIL_TEST_KAFKA_PORT:-19092}"
controller_port=$((port + 1))
sasl_port=$((port + 2))
bootstrap="127.0.0.1:$port"
sasl_user=vigil
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

# A CA, a broker certificate it signs (SAN 127.0.0.1 and localhost) in a PKCS#12 keystore, and
# a random password for the SASL user, all in $run/sasl.
make_credentials() {
  local d="$run/sasl"
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=vigil test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$d/broker.key" -out "$d/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/san.ext"
  openssl x509 -req -in "$d/broker.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/san.ext" -out "$d/broker.pem" 2>/dev/null
  openssl rand -hex 16 >"$d/keystore.password"
  openssl pkcs12 -export -in "$d/broker.pem" -inkey "$d/broker.key" -name broker \
    -passout "file:$d/keystore.password" -out "$d/broker.p12"
  openssl rand -hex 16 >"$d/password"
  chmod 600 "$d"/*
}

start() {
  fetch
  if [ -f "$run/pid" ] && kill -0 "$(cat "$run/pid")" 2>/dev/null && status; then
    echo "broker.sh: already running on $bootstrap" >&2
    return
  fi
  rm -rf "$run"
  mkdir -p "$run/data"
  make_credentials
  local password keystore_password
  password=$(cat "$run/sasl/password")
  keystore_password=$(cat "$run/sasl/keystore.password")
  cat > "$run/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port,SASL_SSL://127.0.0.1:$sasl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$sasl_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$sasl_user="$password";
ssl.keystore.type=PKCS12
ssl.keystore.location=$run/sasl/broker.p12
ssl.keystore.password=$keystore_password
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
  kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$run/server.properties" \
    --add-scram "SCRAM-SHA-256=[name=$sasl_user,password=$password]" \
    --add-scram "SCRAM-SHA-512=[name=$sasl_user,password=$password]" >"$run/format.log" 2>&1
  launch
}

# Runs the broker on $run's configuration and data, and waits until it answers.
launch() {
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

signal() {
  [ -f "$run/pid" ] || { echo "broker.sh: not started" >&2; exit 1; }
  kill "-$1" "$(cat "$run/pid")"
}

crash() {
  signal KILL
  while kill -0 "$(cat "$run/pid")" 2>/dev/null; do sleep 0.1; done
}

restart() {
  [ -f "$run/server.properties" ] || { echo "broker.sh: no data to restart on" >&2; exit 1; }
  fetch
  launch
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
  freeze) signal STOP ;;
  thaw) signal CONT ;;
  crash) crash ;;
  restart) restart ;;
  status) status ;;
  topic) shift; topic "$@" ;;
  bootstrap) echo "$bootstrap" ;;
  sasl-env)
    printf 'export VIGIL_TEST_SASL_BROKERS=127.0.0.1:%s\n' "$sasl_port"
    printf 'export VIGIL_TEST_SASL_CA=%s\n' "$run/sasl/ca.pem"
    printf 'export VIGIL_TEST_SASL_USER=%s\n' "$sasl_user"
    printf 'export VIGIL_TEST_SASL_PASSWORD=%s\n' "$(cat "$run/sasl/password")"
    ;;
  kafka-topics) fetch; shift; kafka_java org.apache.kafka.tools.TopicCommand "$@" ;;
  kafka-configs) fetch; shift; kafka_java kafka.admin.ConfigCommand "$@" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
