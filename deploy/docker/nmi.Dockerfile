# syntax=docker/dockerfile:1.7
# podid NMI image. Build from the repository root:
#   docker build -f deploy/docker/nmi.Dockerfile -t ghcr.io/podid/nmi:v0.1.0 .
#
# Runtime base: Kubernetes' debian-iptables image, which ships iptables with the same
# legacy/nft auto-detection wrapper kube-proxy uses, so nmi's rules land in the backend the node
# already uses, and conntrack(8) (used by --enable-conntrack-deletion); ca-certificates is added
# below. Bases are pinned by tag; pin by digest in your registry mirror for reproducibility.

ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=registry.k8s.io/build-image/debian-iptables:bookworm-v1.0.0

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p podid-nmi --bin nmi \
 && install -D -m 0755 target/release/nmi /out/nmi

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="podid-nmi" \
      org.opencontainers.image.description="podid node agent: answers pods' IMDS token requests with their own identity" \
      org.opencontainers.image.source="https://github.com/podid/podid" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base has no CA bundle; nmi's HTTPS client (Entra for type 1/2 and federated identities)
# verifies servers against the system roots in /etc/ssl/certs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/nmi /usr/local/bin/nmi
# Runs as root: iptables needs uid 0 with NET_ADMIN/NET_RAW (granted by the DaemonSet, which
# drops every other capability).
USER 0:0
ENTRYPOINT ["/usr/local/bin/nmi"]
