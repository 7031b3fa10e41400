#!/bin/sh
# Makes a private CA and the TLS certificates of the stack into DIR (default ./certs):
#   DIR/ca/ca.crt, ca.key                         the CA every service trusts
#   DIR/<name>/<name>.crt, <name>.key             for elasticsearch, kibana, traefik
# Elasticsearch and Kibana talk TLS to each other, Filebeat to Elasticsearch, Traefik to Kibana
# and browsers to Traefik. Idempotent: existing files are kept. Needs openssl.
#   sh logging/make-certs.sh /certs     (the certs service in docker-compose.yml does this)
set -eu
dir=${1:-./certs}
days=825
mkdir -p "$dir/ca"
if [ ! -f "$dir/ca/ca.crt" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=vigil stack CA" \
    -keyout "$dir/ca/ca.key" -out "$dir/ca/ca.crt" 2>/dev/null
fi
# name, then the DNS names it answers to
for spec in "elasticsearch elasticsearch localhost" "kibana kibana localhost" "traefik traefik localhost"; do
  set -- $spec
  name=$1
  shift
  out="$dir/$name"
  [ -f "$out/$name.crt" ] && continue
  mkdir -p "$out"
  san="subjectAltName=IP:127.0.0.1"
  for dns in "$@"; do san="$san,DNS:$dns"; done
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" \
    -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  printf '%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$out/ext.cnf"
  openssl x509 -req -in "$out/$name.csr" -CA "$dir/ca/ca.crt" -CAkey "$dir/ca/ca.key" \
    -CAcreateserial -days "$days" -sha256 -extfile "$out/ext.cnf" -out "$out/$name.crt" 2>/dev/null
  rm -f "$out/$name.csr" "$out/ext.cnf"
done
# Elasticsearch and Kibana run as uid 1000, gid 0; Traefik as root. Only the CA may sign.
chmod -R a+rX "$dir"
chmod 640 "$dir"/*/*.key
chmod 600 "$dir/ca/ca.key"
if [ "$(id -u)" = 0 ]; then chown -R 1000:0 "$dir"; fi
echo "make-certs: certificates in $dir"
