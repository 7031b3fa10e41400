#!/usr/bin/env bash
# The whole test suite: unit tests next to the code, then the integration suites against the
# real things: an Apache Kafka broker that kafka/broker.sh starts on loopback (and stops
# afterwards), Prometheus/promtool/amtool/logrotate (tests/install-tools.sh installs them when
# missing). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install-tools.sh
kafka/broker.sh start
trap 'kafka/broker.sh stop' EXIT
VIGIL_TEST_BROKERS="$(kafka/broker.sh bootstrap)"
export VIGIL_TEST_BROKERS

cargo test --all-targets "$@"
