# syntax=docker/dockerfile:1.7
# tracecar-proxy: the sidecar. A static musl binary on an empty base, running as uid/gid 2140.
# Build from the repository root:
#   docker build -f deploy/docker/proxy.Dockerfile -t ghcr.io/tracecar-dev/tracecar-proxy:0.1.0 .
ARG RUST_IMAGE=rust:1.90-alpine3.22

FROM ${RUST_IMAGE} AS build
# musl-dev: libc headers for ring's C/asm parts; the alpine toolchain links statically by default.
# The builder is pinned by its tag; apk package versions follow it.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tracecar-proxy \
 && install -D -m 0755 target/release/tracecar-proxy /out/tracecar-proxy

# The preload library runs inside the app's (glibc) processes, so it is built against glibc, and
# against old symbol versions: glibc refuses to load a library that needs versions newer than
# its own. scripts/build-preload.sh links it against glibc 2.17's (cargo-zigbuild with Zig's
# glibc stubs) and checks that: it loads from RHEL 7 / CentOS 7 and Debian 9 on
# (docs/causal.md).
ARG PRELOAD_IMAGE=rust:1.90-bookworm
FROM ${PRELOAD_IMAGE} AS preload
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip binutils \
 && rm -rf /var/lib/apt/lists/* \
 && pip3 install --no-cache-dir --break-system-packages ziglang==0.17.1 \
 && cargo install --locked cargo-zigbuild@0.24.1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-preload.sh /out >/dev/null

FROM scratch
LABEL org.opencontainers.image.title="tracecar-proxy" \
      org.opencontainers.image.description="tracecar's tracing HTTP sidecar proxy" \
      org.opencontainers.image.source="https://github.com/tracecar-dev/tracecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# Root CAs for collectors with publicly trusted certificates (mTLS setups pass their own CA).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/tracecar-proxy /usr/local/bin/tracecar-proxy
# Copied next to the causal table at start-up (TRACECAR_PRELOAD_SOURCE), where the app's
# containers load it with LD_PRELOAD.
COPY --from=preload /out/libtracecar_preload.so /usr/lib/tracecar/libtracecar_preload.so
# iptables rules exempt this uid's traffic from redirection: it must be exactly 2140.
# The injected pod spec names the binary without a path (`command: [tracecar-proxy, ...]`).
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 2140:2140
# outbound (loopback only), inbound, admin
EXPOSE 15140 15143 15190
ENTRYPOINT ["/usr/local/bin/tracecar-proxy"]
CMD ["run"]
