#!/bin/sh
# Makes a private CA and the TLS certificates of the stack:
#   CERTS/ca/ca.crt                               the CA every service trusts
#   CERTS/<name>/<name>.crt, <name>.key           for elasticsearch, kibana, traefik
#   KEYS/ca.key                                   the CA's key: only this script reads it, so
#                                                 only the certs service mounts KEYS
# Elasticsearch and Kibana talk TLS to each other, Filebeat to Elasticsearch, Traefik to Kibana
# and browsers to Traefik, whose certificate also names PUBLIC_HOST (the name the stack is
# reached at; localhost by default) and PUBLIC_HOST_ALIASES (more names or addresses,
# comma-separated). Idempotent: existing files are
# kept, but a certificate whose names changed (a new PUBLIC_HOST) is issued again. Needs openssl.
#   PUBLIC_HOST=vigil.bank.example PUBLIC_HOST_ALIASES=10.0.0.5 sh logging/make-certs.sh /certs /ca-key
#   (the certs service in docker-compose.yml does this)
set -eu
dir=${1:-./certs}
keys=${2:-$dir/ca-key}
days=825
mkdir -p "$dir/ca" "$keys"
if [ ! -f "$dir/ca/ca.crt" ] || [ ! -f "$keys/ca.key" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=vigil stack CA" \
    -keyout "$keys/ca.key" -out "$dir/ca/ca.crt" 2>/dev/null
  # A new CA: every certificate it did not sign is stale.
  rm -f "$dir"/*/names
fi
public=$(printf '%s,%s' "${PUBLIC_HOST:-localhost}" "${PUBLIC_HOST_ALIASES:-}" | tr ',' ' ')
# name, then the names it answers to
for spec in "elasticsearch elasticsearch localhost" "kibana kibana localhost" "traefik traefik localhost $public"; do
  # shellcheck disable=SC2086
  set -- $spec
  name=$1
  shift
  out="$dir/$name"
  names="$*"
  if [ -f "$out/$name.crt" ] && [ "$(cat "$out/names" 2>/dev/null)" = "$names" ]; then continue; fi
  mkdir -p "$out"
  san="subjectAltName=IP:127.0.0.1"
  for host in "$@"; do
    case $host in
      *[!0-9.]*) san="$san,DNS:$host" ;;
      *) san="$san,IP:$host" ;;
    esac
  done
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" \
    -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  printf '%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$out/ext.cnf"
  openssl x509 -req -in "$out/$name.csr" -CA "$dir/ca/ca.crt" -CAkey "$keys/ca.key" \
    -CAcreateserial -CAserial "$keys/ca.srl" -days "$days" -sha256 -extfile "$out/ext.cnf" \
    -out "$out/$name.crt" 2>/dev/null
  rm -f "$out/$name.csr" "$out/ext.cnf"
  printf '%s' "$names" > "$out/names"
done
# Elasticsearch and Kibana run as uid 1000, gid 0; Traefik as root. The CA key stays root's.
chmod -R a+rX "$dir"
chmod 640 "$dir"/*/*.key
chmod 700 "$keys"
chmod 600 "$keys/ca.key"
if [ "$(id -u)" = 0 ]; then chown -R 1000:0 "$dir"; fi
echo "make-certs: certificates in $dir (names: $public), CA key in $keys"
