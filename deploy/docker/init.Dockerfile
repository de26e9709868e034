# syntax=docker/dockerfile:1.7
# tracecar-init: programs the pod's network namespace with iptables (`tracecar-proxy init`).
# Debian's iptables ships both backends (iptables-nft and iptables-legacy) and iptables-restore.
# Build from the repository root:
#   docker build -f deploy/docker/init.Dockerfile -t ghcr.io/tracecar-dev/tracecar-init:0.1.0 .
ARG RUST_IMAGE=rust:1.90-alpine3.22

FROM ${RUST_IMAGE} AS build
# The builder is pinned by its tag; apk package versions follow it.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tracecar-proxy \
 && install -D -m 0755 target/release/tracecar-proxy /out/tracecar-proxy

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="tracecar-init" \
      org.opencontainers.image.description="tracecar's init step: iptables redirection to the proxy" \
      org.opencontainers.image.source="https://github.com/tracecar-dev/tracecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# Versions follow the pinned Debian release; pinning package versions would break on every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/tracecar-proxy /usr/local/bin/tracecar-proxy
# The injector runs this image as root with only NET_ADMIN and NET_RAW: changing iptables needs them.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/tracecar-proxy"]
CMD ["init"]
