# syntax=docker/dockerfile:1
# ws-notify container image.
#
#   docker build -t ws-notify .
#   docker run --rm -p 8081:8081 --env-file template.env -e REDIS_HOST=redis ws-notify
#
# Build stage: a release binary from the locked dependencies. BuildKit cache
# mounts keep the crate registry and target/ between builds, so a code change
# does not recompile every dependency.
#
# The root manifest is a workspace whose member bench/ is the load tool. Cargo
# reads every member's manifest before it builds anything, but only the sources
# of the package it builds: bench/Cargo.toml comes along, bench/src does not, so
# a change to the load tool does not invalidate this build. .ci/check-docker-context
# runs this stage's COPY lines and cargo build on exactly the files .dockerignore
# admits.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench/Cargo.toml ./bench/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ws-notify \
    && strip -o /ws-notify target/release/ws-notify \
    && /ws-notify --version

# Run stage: distroless "cc" (glibc, libgcc_s, CA certificates for rediss://,
# a nonroot user); no shell, no package manager, no build tools.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ws-notify /usr/local/bin/ws-notify
USER 65532:65532
EXPOSE 8081
ENV WS_HOST=0.0.0.0 WS_PORT=8081
# No shell or curl in the image: the binary probes its own /health
# (exit 0 on 200; 1 on 503 degraded, a refused connection or no answer in 2 s).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/ws-notify", "healthcheck"]
# SIGTERM (docker stop) closes every client with 1001 and exits 0 within
# SHUTDOWN_TIMEOUT; give `docker stop --time` at least that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ws-notify"]
