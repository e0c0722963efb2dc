# syntax=docker/dockerfile:1
# presence-server as a container image: built in a Rust image, run from a
# distroless one as a non-root user. Build:  docker build -t presence-server .
# Checked by deploy/check.sh (no image is built on the development machine:
# no container registry is reachable from it to pull the base images).

# ---- build: the release binary, with the lock file as committed.
FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src
# The whole workspace: cargo resolves every member even to build one.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY server server
COPY sdk-rust sdk-rust
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p presence-server --bin presence-server \
 && install -D -m 0755 target/release/presence-server /out/presence-server

# ---- run: glibc and CA roots only, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/presence-server /usr/local/bin/presence-server
# distroless's "nonroot" user (uid 65532); never root.
USER 65532:65532
# gRPC, gRPC-web, health and reflection; Prometheus metrics.
EXPOSE 50051 9090
# TLS is expected to end at a gateway in front of the container; to serve
# TLS from it, set PRESENCE_TLS_CERT and PRESENCE_TLS_KEY and
# PRESENCE_INSECURE_LISTEN=false.
ENV PRESENCE_LISTEN=0.0.0.0:50051 \
    PRESENCE_INSECURE_LISTEN=true \
    PRESENCE_METRICS_LISTEN=0.0.0.0:9090 \
    PRESENCE_LOG_FORMAT=json
# Readiness and liveness come from the orchestrator's gRPC health probe
# (deploy/k8s/presence.yaml), so no HEALTHCHECK: distroless has no shell or
# client to run one with.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/presence-server"]
CMD ["serve"]
