#!/bin/sh
# One-shot Elasticsearch setup for the compose stack (service es-setup): the kibana_system
# password, a least-privilege writer user for Filebeat, a read-only monitoring user for the
# Prometheus exporter, vigil's lifecycle policy and index template. Idempotent: every call is a PUT/POST that replaces what it set last time. Request
# bodies that carry a password are built by jq, so any character in it arrives as written.
# Refuses .env.example's change-me placeholders. Needs curl and jq (logging/tools.Dockerfile).
set -eu
es=${ES_URL:-https://elasticsearch:9200}
ca=${ES_CA:-/certs/ca/ca.crt}
here=$(cd "$(dirname "$0")" && pwd)

for name in ELASTIC_PASSWORD KIBANA_SYSTEM_PASSWORD FILEBEAT_PASSWORD ES_METRICS_PASSWORD; do
  eval "value=\${$name:-}"
  case $value in
    "") echo "es-setup: $name is not set (copy .env.example to .env)" >&2; exit 1 ;;
    *change-me*) echo "es-setup: $name is still the placeholder from .env.example; set it in .env" >&2; exit 1 ;;
  esac
done

call() { # METHOD PATH BODY_FILE
  curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" -X "$1" "$es$2" \
    -H 'Content-Type: application/json' --data-binary "@$3"
  echo
}

until curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" "$es/_cluster/health?wait_for_status=yellow&timeout=5s" >/dev/null; do
  echo "es-setup: waiting for Elasticsearch"; sleep 5
done

body=$(mktemp)
trap 'rm -f "$body"' EXIT
jq -n --arg password "$KIBANA_SYSTEM_PASSWORD" '{password: $password}' > "$body"
call POST /_security/user/kibana_system/_password "$body"
jq -n '{
  cluster: ["monitor", "read_ilm"],
  indices: [{names: ["vigil-logs*"], privileges: ["create_doc", "create_index", "auto_configure", "view_index_metadata"]}]
}' > "$body"
call PUT /_security/role/vigil_log_writer "$body"
jq -n --arg password "$FILEBEAT_PASSWORD" '{password: $password, roles: ["vigil_log_writer"]}' > "$body"
call PUT /_security/user/filebeat_writer "$body"
jq -n '{cluster: ["monitor"], indices: [{names: ["*"], privileges: ["monitor"]}]}' > "$body"
call PUT /_security/role/vigil_metrics "$body"
jq -n --arg password "$ES_METRICS_PASSWORD" '{password: $password, roles: ["vigil_metrics"]}' > "$body"
call PUT /_security/user/metrics_reader "$body"
call PUT /_ilm/policy/vigil-logs "$here/ilm-policy.json"
call PUT /_index_template/vigil-logs "$here/index-template.json"
echo "es-setup: done"
