# syntax=docker/dockerfile:1.7
# podid MIC image. Build from the repository root:
#   docker build -f deploy/docker/mic.Dockerfile -t ghcr.io/podid/mic:v0.1.0 .
#
# Runtime base: distroless with glibc and libgcc only (no shell, no package manager), non-root.
# The manifests run it as uid 0 only when MIC must read the node's root-only azure.json hostPath.
# Bases are pinned by tag; pin by digest in your registry mirror for reproducibility.

ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p podid-mic --bin mic \
 && install -D -m 0755 target/release/mic /out/mic

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="podid-mic" \
      org.opencontainers.image.description="podid controller: assigns Azure identities to the nodes of pods that use them" \
      org.opencontainers.image.source="https://github.com/podid/podid" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/mic /usr/local/bin/mic
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mic"]
