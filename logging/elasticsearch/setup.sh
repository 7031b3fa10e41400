#!/bin/sh
# One-shot Elasticsearch setup for the compose stack (service es-setup): the kibana_system
# password, a least-privilege writer user for Filebeat, vigil's lifecycle policy and index
# template. Idempotent: every call is a PUT/POST that replaces what it set last time.
set -eu
es=${ES_URL:-https://elasticsearch:9200}
ca=${ES_CA:-/certs/ca/ca.crt}
here=$(cd "$(dirname "$0")" && pwd)

call() { # METHOD PATH [BODY_FILE]
  if [ $# -eq 3 ]; then
    curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" -X "$1" "$es$2" \
      -H 'Content-Type: application/json' --data-binary "@$3"
  else
    curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" -X "$1" "$es$2" \
      -H 'Content-Type: application/json' --data-binary "$4"
  fi
  echo
}

until curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" "$es/_cluster/health?wait_for_status=yellow&timeout=5s" >/dev/null; do
  echo "es-setup: waiting for Elasticsearch"; sleep 5
done

call POST /_security/user/kibana_system/_password - "{\"password\":\"$KIBANA_SYSTEM_PASSWORD\"}"
call PUT /_security/role/vigil_log_writer - '{
  "cluster": ["monitor", "read_ilm"],
  "indices": [{"names": ["vigil-logs*"], "privileges": ["create_doc", "create_index", "auto_configure", "view_index_metadata"]}]
}'
call PUT /_security/user/filebeat_writer - "{\"password\":\"$FILEBEAT_PASSWORD\",\"roles\":[\"vigil_log_writer\"]}"
call PUT /_ilm/policy/vigil-logs "$here/ilm-policy.json"
call PUT /_index_template/vigil-logs "$here/index-template.json"
echo "es-setup: done"
