# syntax=docker/dockerfile:1
# Build: the release binary, with the crate cache kept between builds.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin order-service \
    && cp target/release/order-service /order-service

# Run: a small image with only the binary, as a user without privileges.
# libssl3 for TLS and SASL SCRAM to the brokers; ca-certificates are the
# authorities a broker's certificate is checked against by default.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /order-service /usr/local/bin/order-service
USER 10001
ENV HTTP_ADDR=0.0.0.0:8080 LOG_FORMAT=json RUST_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["order-service"]
CMD ["serve"]
