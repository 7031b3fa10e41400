#!/usr/bin/env bash
# The whole test suite: unit tests next to the code, then the integration suites against a real
# Apache Kafka broker that kafka/broker.sh starts on loopback (and stops afterwards).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

kafka/broker.sh start
trap 'kafka/broker.sh stop' EXIT
VIGIL_TEST_BROKERS="$(kafka/broker.sh bootstrap)"
export VIGIL_TEST_BROKERS

cargo test --all-targets "$@"
