#!/bin/sh
# Writes OUT from the template IN, replacing each ${NAME} with the environment's NAME.
# Fails, naming the variable, if one is unset or empty, or still holds .env.example's change-me
# placeholder (alerts would go nowhere). POSIX sh (runs in the Alertmanager image).
#   render.sh alertmanager.yml /tmp/alertmanager.yml
set -eu
in=$1
out=$2
cp "$in" "$out.tmp"
for name in $(grep -v '^[[:space:]]*#' "$in" | grep -o '\${[A-Za-z_][A-Za-z0-9_]*}' | sort -u | sed 's/^\${//; s/}$//'); do
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    echo "render.sh: $name is not set (copy .env.example to .env and fill it in)" >&2
    rm -f "$out.tmp"
    exit 1
  fi
  case $value in
    *change-me*)
      echo "render.sh: $name is still the placeholder from .env.example ($value); set the real URL in .env" >&2
      rm -f "$out.tmp"
      exit 1
      ;;
  esac
  escaped=$(printf '%s' "$value" | sed 's/[&|\\]/\\&/g')
  sed -i "s|\${$name}|$escaped|g" "$out.tmp"
done
mv "$out.tmp" "$out"
