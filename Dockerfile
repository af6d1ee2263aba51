# syntax=docker/dockerfile:1
# Build: the release binary, from the locked dependency set.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own keyed by the manifest and lock file only: with
# stand-in sources (every target Cargo.toml names), so a change to src/ rebuilds airstate
# alone. The stand-ins' own build outputs are removed so the real sources always rebuild.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for bench in gateway forward attack; do echo 'fn main() {}' > "benches/$bench.rs"; done \
 && cargo build --release --locked --bin airstate \
 && rm -rf src benches target/release/airstate* target/release/deps/airstate-* \
      target/release/deps/libairstate-* target/release/.fingerprint/airstate-*
COPY build.rs ./
COPY src src
COPY lua lua
COPY benches benches
# The image has no .git: pass the commit for airstate_build_info
# (`docker build --build-arg AIRSTATE_BUILD_COMMIT=$(git rev-parse --short=12 HEAD) .`).
ARG AIRSTATE_BUILD_COMMIT=unknown
RUN cargo build --release --locked --bin airstate

# Run: glibc and libgcc only, no shell, a non-root user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/airstate /usr/local/bin/airstate
USER 65532:65532
ENV AIRSTATE_LISTEN=0.0.0.0:8080 \
    AIRSTATE_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["/usr/local/bin/airstate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/airstate"]
CMD ["serve"]
