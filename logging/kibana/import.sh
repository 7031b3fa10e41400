#!/bin/sh
# One-shot (service kibana-setup): imports the data view and saved searches into Kibana,
# overwriting earlier copies, once Kibana answers.
set -eu
kibana=${KIBANA_URL:-https://kibana:5601/kibana}
ca=${KIBANA_CA:-/certs/ca/ca.crt}
here=$(cd "$(dirname "$0")" && pwd)
until curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" "$kibana/api/status" >/dev/null; do
  echo "kibana-setup: waiting for Kibana"; sleep 5
done
curl -fsS --cacert "$ca" -u "elastic:$ELASTIC_PASSWORD" -H 'kbn-xsrf: vigil' \
  -X POST "$kibana/api/saved_objects/_import?overwrite=true" \
  -F "file=@$here/saved-objects.ndjson"
echo
echo "kibana-setup: done"
