# tidemark in a container. The daemon (issue 4) will be its entry point; until then the image
# runs any tidemark command, e.g. `docker run --rm -v /etc/tidemark:/etc/tidemark:ro tidemark wal-list`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin tidemark

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 999 --home /var/lib/tidemark tidemark
COPY --from=build /src/target/release/tidemark /usr/local/bin/tidemark
USER tidemark
ENTRYPOINT ["/usr/local/bin/tidemark"]
CMD ["--help"]
