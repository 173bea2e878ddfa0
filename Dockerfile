# tidemark in a container: the image runs the daemon (`tidemark daemon`) by default.
#   docker build -t tidemark .
#   docker run -d --name tidemark --user "$(id -u postgres):$(id -g postgres)" \
#     -v /etc/tidemark:/etc/tidemark:ro -v /var/lib/postgresql:/var/lib/postgresql \
#     -v /var/run/postgresql:/var/run/postgresql -v /var/lib/tidemark:/var/lib/tidemark \
#     -p 127.0.0.1:9187:9187 tidemark
# Run it as the user PostgreSQL runs as: backups read the data directory, and the state
# directory (/var/lib/tidemark, a bind mount of the host's) is shared with the wal-push that
# PostgreSQL runs on the host as that user (wal-push counters, audit chain). Any other command
# works too: `docker run --rm ... tidemark --cluster acme list`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin tidemark

FROM debian:bookworm-slim
# postgresql-client for pg_amcheck in drills; drills also need the server binaries of the
# backed-up major version (install postgresql-NN in a derived image to run drills here).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -m 0700 /var/lib/tidemark
COPY --from=build /src/target/release/tidemark /usr/local/bin/tidemark
ENV TIDEMARK_CONFIG=/etc/tidemark/tidemark.toml
# No USER: pass --user with the PostgreSQL owner's uid:gid (see above).
EXPOSE 9187
# /healthz answers 200 while the scheduler runs (needs [metrics] listen = "0.0.0.0:9187" or
# 127.0.0.1:9187 inside the container).
HEALTHCHECK --interval=30s --timeout=5s CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9187 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/tidemark"]
CMD ["daemon"]
