# One image for every ohx binary: the six stages and the `ohx` operations command.
#
#   docker build -t ohx:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#
# The build stage compiles the workspace (librdkafka is built from source by rdkafka-sys and
# linked statically; reqwest links the system OpenSSL). The runtime stage is debian-slim with
# ca-certificates and libssl3 only: no compiler, no package manager cache, no shell tools beyond
# the base image, and a fixed non-root user (uid/gid 10001) so Kubernetes can verify
# runAsNonRoot. Everything the binaries read at run time (Avro schemas, topic definitions,
# migrations, the FHIR R5 JSON schema, the default mapping table) is compiled in.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# rust:*-bookworm already carries gcc, g++, make, pkg-config, libssl-dev and zlib1g-dev,
# which is everything rdkafka-sys and openssl-sys need.
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY services services
COPY schemas schemas
COPY topics topics
# tests/ is a workspace member: cargo needs its manifest to resolve the workspace.
COPY tests tests
# The binaries the image ships; every name is a [[bin]] of a crate under services/.
ARG BINS="webhook-gateway fetcher hourly-aggregator fhir-mapper deduplicator publisher ohx"
RUN cargo build --release --locked --workspace --bins --exclude ohx-tests \
 && mkdir -p /out \
 && for b in $BINS; do install -m 0755 "target/release/$b" "/out/$b"; done

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ohx" \
      org.opencontainers.image.description="ohx stream-processing pipeline: device clouds to FHIR R5 EHRs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ohx \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ohx
COPY --from=build /out/ /usr/local/bin/
ENV OHX_VERSION=${VERSION}
# Numeric, so that runAsNonRoot can be checked without reading /etc/passwd.
USER 10001:10001
# Gateway webhooks and admin endpoints; the stages' admin endpoints (fetcher … publisher).
EXPOSE 8080 9101 9102 9103 9104 9105
# Each container names its binary (`fetcher`, `publisher`, `ohx migrate`, …).
CMD ["ohx", "--help"]
