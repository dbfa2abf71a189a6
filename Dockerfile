# A Conclave node: a multi-stage build on the Rust toolchain, run on a slim Debian.
#   docker build -t conclave .
#   docker run -p 127.0.0.1:8080:8080 -e CONCLAVE_JWT_SECRET=... conclave
# Migrations and the web page are compiled into the binary; nothing else is needed at run time.
FROM rust:1.95-slim-bookworm AS build
# jemalloc, the binary's allocator, is built from source with make.
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY migrations migrations
COPY static static
# Cargo reads the bench targets the manifest names, even when building only the binary.
COPY benches benches
RUN cargo build --release --locked --bin conclave

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/conclave --create-home conclave
COPY --from=build /src/target/release/conclave /usr/local/bin/conclave
USER conclave
WORKDIR /var/lib/conclave
ENV CONCLAVE_BIND=0.0.0.0:8080 \
    CONCLAVE_DATA_DIR=/var/lib/conclave/data
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=6 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["conclave"]
CMD ["serve"]
