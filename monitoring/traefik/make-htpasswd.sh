#!/bin/sh
# Writes the htpasswd file Traefik's basic auth reads (dynamic.yml) from TRAEFIK_USER and
# TRAEFIK_PASSWORD (.env), hashed with APR1-MD5 by openssl. Rewritten on every start so that a
# changed password takes effect.
#   TRAEFIK_USER=ops TRAEFIK_PASSWORD=... sh make-htpasswd.sh /certs/traefik/htpasswd
set -eu
out=$1
: "${TRAEFIK_USER:?TRAEFIK_USER is not set (copy .env.example to .env)}"
: "${TRAEFIK_PASSWORD:?TRAEFIK_PASSWORD is not set (copy .env.example to .env)}"
mkdir -p "$(dirname "$out")"
printf '%s:%s\n' "$TRAEFIK_USER" "$(openssl passwd -apr1 "$TRAEFIK_PASSWORD")" > "$out.tmp"
chmod 644 "$out.tmp"
mv "$out.tmp" "$out"
echo "make-htpasswd: wrote $out for $TRAEFIK_USER"
