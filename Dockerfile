# syntax=docker/dockerfile:1
# vigil: a release build in a Rust image, run from a slim Debian image as a non-root user.
#   docker build -t vigil:local .

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys, with TLS and SASL against the system OpenSSL.
# Not pinned (DL3008): Debian's archive keeps only a release's latest point versions, so a pin
# would break the build at its next security update; the image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY schemas schemas
COPY data data
COPY config.yml config.yml
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin vigil \
 && cp target/release/vigil /usr/local/bin/vigil

FROM debian:bookworm-slim
# Not pinned (DL3008), as above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vigil \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/vigil vigil \
 && mkdir -p /var/lib/vigil/models /var/log/vigil \
 && chown -R vigil /var/lib/vigil /var/log/vigil
COPY --from=build /usr/local/bin/vigil /usr/local/bin/vigil
COPY config.yml /etc/vigil/config.yml
# Numeric, so that Kubernetes can check runAsNonRoot without resolving a name.
USER 10001:10001
WORKDIR /var/lib/vigil
ENV VIGIL_CONFIG=/etc/vigil/config.yml \
    VIGIL_SERVER__ADDR=0.0.0.0:8080 \
    VIGIL_LOG__FORMAT=json \
    VIGIL_MODELS__DIR=/var/lib/vigil/models/current
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8080/health"]
ENTRYPOINT ["vigil"]
CMD ["run"]
