# syntax=docker/dockerfile:1
# The stack's helper services (certs, logrotate, es-setup) with their tools built in, so that starting
# the stack downloads nothing: docker compose builds it once (`docker compose build`).
FROM alpine:3.20
# Not pinned (DL3018): Alpine's repositories keep only a branch's latest versions, so a pin
# breaks the build at the next security update; the image tag pins the branch.
# hadolint ignore=DL3018
RUN apk add --no-cache openssl logrotate curl jq
