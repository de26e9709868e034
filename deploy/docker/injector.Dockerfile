# syntax=docker/dockerfile:1.7
# tracecar-injector: the mutating admission webhook. A static musl binary on an empty base,
# running as the non-root uid 65532 (the chart's injector.runAsUser).
# Build from the repository root:
#   docker build -f deploy/docker/injector.Dockerfile -t ghcr.io/tracecar-dev/tracecar-injector:0.1.0 .
ARG RUST_IMAGE=rust:1.90-alpine3.22

FROM ${RUST_IMAGE} AS build
# The builder is pinned by its tag; apk package versions follow it.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tracecar-injector \
 && install -D -m 0755 target/release/tracecar-injector /out/tracecar-injector

FROM scratch
LABEL org.opencontainers.image.title="tracecar-injector" \
      org.opencontainers.image.description="tracecar's admission webhook that injects the proxy" \
      org.opencontainers.image.source="https://github.com/tracecar-dev/tracecar" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/tracecar-injector /usr/local/bin/tracecar-injector
# The injected pod spec names the binary without a path (`command: [tracecar-proxy, ...]`).
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 65532:65532
# webhook (HTTPS), admin (/live, /ready, /metrics)
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/tracecar-injector"]
CMD ["serve"]
