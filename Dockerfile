# Build: a release binary from the locked dependencies.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/ws-notify

# Run: distroless, no shell, no build tools, non-root (UID/GID 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ws-notify /usr/local/bin/ws-notify
USER 65532:65532
EXPOSE 8081
ENV WS_HOST=0.0.0.0 WS_PORT=8081
ENTRYPOINT ["/usr/local/bin/ws-notify"]
