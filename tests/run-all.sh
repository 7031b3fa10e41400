#!/usr/bin/env bash
# The whole test suite: unit tests next to the code, then the integration suites against the
# real things: an Apache Kafka broker that kafka/broker.sh starts on loopback with a plaintext
# and a SASL_SSL listener (and stops afterwards; tests/broker_faults.rs freezes, kills and
# restarts it, which cargo's one-test-binary-at-a-time order keeps from the other suites),
# Prometheus/promtool/amtool/logrotate (tests/install-tools.sh installs them when missing).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install-tools.sh
kafka/broker.sh start
trap 'kafka/broker.sh stop' EXIT
VIGIL_TEST_BROKERS="$(kafka/broker.sh bootstrap)"
export VIGIL_TEST_BROKERS
# The same broker's SASL_SSL listener: VIGIL_TEST_SASL_{BROKERS,CA,USER,PASSWORD}.
eval "$(kafka/broker.sh sasl-env)"

cargo test --all-targets "$@"
