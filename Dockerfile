# Multi-stage build of the keelson binary into a small non-root image.
# The glibc build runs on a distroless/cc base (no shell, no package manager).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
COPY crds ./crds
COPY examples ./examples
RUN cargo build --release --locked --bin keelson && strip target/release/keelson

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keelson /usr/local/bin/keelson
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keelson"]
CMD ["run"]
