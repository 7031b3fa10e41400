# Sourced by the benchmarks that run vigil on the project's broker (broker.sh, scale_out.sh,
# memory.sh). `bench_setup NAME PARTITIONS` picks the build under test (VIGIL_BIN, else this
# tree's release build), starts the broker if it is not running, makes a fresh run's input,
# alerts and dead-letter topics and a work directory, and points vigil at them; on exit the
# work directory goes, and every vigil whose pid it holds (files pid, pid.*) is stopped.
# Sets vigil, brokers, run and work.

bench_setup() {
  local name=$1 partitions=$2
  vigil=${VIGIL_BIN:-target/release/vigil}
  [ -n "${VIGIL_BIN:-}" ] || cargo build --release --quiet
  kafka/broker.sh status >/dev/null 2>&1 || kafka/broker.sh start
  brokers=$(kafka/broker.sh bootstrap)
  run=$name-$(date +%s)
  work=$(mktemp -d)
  trap bench_cleanup EXIT
  for t in "$run" "$run-alerts" "$run-dlq"; do kafka/broker.sh topic "$t" "$partitions" >/dev/null 2>&1; done
  export VIGIL_KAFKA__BROKERS="$brokers" VIGIL_KAFKA__TOPICS__TRANSACTIONS="$run" \
    VIGIL_KAFKA__TOPICS__ALERTS="$run-alerts" VIGIL_KAFKA__TOPICS__DEAD_LETTER="$run-dlq" \
    VIGIL_SERVER__RATE_LIMIT__PER_SECOND=0 VIGIL_LOG__FILTER=warn VIGIL_MODELS__DIR="$work/model"
}

bench_cleanup() {
  for p in "$work"/pid "$work"/pid.*; do
    [ -f "$p" ] && kill -TERM "$(cat "$p")" 2>/dev/null || true
  done
  rm -rf "$work"
}
