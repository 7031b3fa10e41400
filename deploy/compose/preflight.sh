#!/bin/sh
# The compose stack's first step (service preflight): refuses to let it start while any value
# it was given still holds .env.example's change-me placeholder, naming each one. Every service
# that receives a secret or an address from .env waits for this to succeed.
set -eu
found=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*change-me.*/\1/p' | sort | tr '\n' ' ')
if [ -n "$found" ]; then
  echo "preflight: ${found}still hold the change-me placeholder from .env.example; set them in .env" >&2
  exit 1
fi
echo "preflight: no placeholder left"
