# Multi-stage build of the fhirsync operator image.
#   docker build -t ghcr.io/fhirsync/fhirsync:0.1.0 .
# Runtime: distroless (glibc, CA certificates, no shell), non-root (uid 65532). Time zones for
# schedules are compiled into the binary (jiff's bundled tzdb), so no tzdata is needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# dependencies first, for layer caching
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
 && cargo build --release --locked --bin fhirsync || true
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin fhirsync \
 && strip target/release/fhirsync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/fhirsync /usr/local/bin/fhirsync
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fhirsync"]
CMD ["run"]
