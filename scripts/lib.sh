# scripts/lib.sh — what the benchmark and soak scripts share; sourced, never run:
#
#   source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
#
# Sets SCRIPT_DIR (this directory), REPO_ROOT and RELEASE_DIR, read-only. Each helper says which variables
# it reads (PG_BIN, PG_USER, WORK, PGDATA, PORT, ...): the script sets them. Nothing here runs a
# command at source time.
# shellcheck shell=bash

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
# Where `cargo build --release`, run in REPO_ROOT, puts what it builds: CARGO_TARGET_DIR (or
# CARGO_BUILD_TARGET_DIR) when set, relative to REPO_ROOT, else target.
RELEASE_DIR=${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-target}}
[[ $RELEASE_DIR == /* ]] || RELEASE_DIR="$REPO_ROOT/$RELEASE_DIR"
RELEASE_DIR+=/release
# shellcheck disable=SC2034 # for the scripts that source this
readonly SCRIPT_DIR REPO_ROOT RELEASE_DIR
# What log lines start with: the file name of the script that sourced this.
LOG_NAME=${BASH_SOURCE[1]##*/}

# ---------------------------------------------------------------------------------------------
# messages, users, ports

# log MESSAGE...: "NAME: MESSAGE" on stderr.
log() { printf '%s: %s\n' "$LOG_NAME" "$*" >&2; }

# die MESSAGE...: logs "error: MESSAGE" and exits 1.
die() {
    log "error: $*"
    exit 1
}

# as_pg CMD...: runs CMD as the PostgreSQL OS user $PG_USER when this runs as root (PostgreSQL
# refuses to run as root, and tidemark wants its key file owned by the user running it), else
# as the current user.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

# give_pg PATH...: hands PATHs to $PG_USER (no-op when not root).
give_pg() {
    if [[ $EUID -eq 0 ]]; then chown -R "$PG_USER:" -- "$@"; fi
}

# require_pg: PostgreSQL binaries in $PG_BIN and, as root, an OS user $PG_USER (BENCH_PG_USER).
require_pg() {
    [[ -x "$PG_BIN/initdb" ]] || die "no PostgreSQL binaries in $PG_BIN (set TIDEMARK_PG_BIN)"
    if [[ $EUID -eq 0 ]]; then
        id "$PG_USER" >/dev/null 2>&1 || die "no OS user $PG_USER (set BENCH_PG_USER)"
    fi
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# stats FILE: "p50 p95 max mean" (ms, nearest rank) of the numbers (µs) in FILE.
stats() {
    sort -n "$1" | awk '{ a[NR] = $1; s += $1 }
        function rank(p) { r = int(p * NR + 0.999999); if (r < 1) r = 1; return a[r] / 1000 }
        END { printf "%.1f %.1f %.1f %.1f", rank(0.50), rank(0.95), a[NR] / 1000, s / NR / 1000 }'
}

# ---------------------------------------------------------------------------------------------
# the sandbox: a temp dir $WORK, a PostgreSQL cluster $PGDATA in it, a Garage server $GARAGE_DIR

WORK=""
PGDATA=""
GARAGE_DIR=""

# on_exit FUNCTION: FUNCTION runs when the script ends, also on failure; Ctrl-C and SIGTERM
# end it with 130 and 143, through FUNCTION.
on_exit() {
    # shellcheck disable=SC2064 # the function's name, now
    trap "$1" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# cleanup_sandbox: the usual on_exit FUNCTION. Stops the sandbox PostgreSQL and Garage when
# they run, removes $WORK unless BENCH_KEEP=1, and exits with the script's status.
cleanup_sandbox() {
    local rc=$?
    trap - EXIT INT TERM
    # postmaster.pid exists only while the server runs (or after a crash).
    if [[ -n "$PGDATA" && -f "$PGDATA/postmaster.pid" ]]; then
        log "stopping the sandbox PostgreSQL"
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [[ -n "$GARAGE_DIR" && -d "$GARAGE_DIR" ]]; then
        stop_garage
    fi
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "${BENCH_KEEP:-}" == 1 ]]; then
            log "keeping $WORK (BENCH_KEEP=1)"
        else
            rm -rf -- "$WORK"
        fi
    fi
    exit "$rc"
}

# make_work NAME: WORK becomes a new directory /tmp/NAME.XXXXXX that $PG_USER may use. Keep
# NAME short: PostgreSQL's socket path in it must stay under 107 bytes.
make_work() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    chmod 755 "$WORK"
    give_pg "$WORK"
}

# install_tidemark PATH: copies the release build of tidemark to PATH, where the PostgreSQL OS
# user can run it (the build directory may be out of its reach).
install_tidemark() {
    mkdir -p "$(dirname -- "$1")"
    install -m 755 "$RELEASE_DIR/tidemark" "$1"
}

# pg_initdb: initdb of $PGDATA as $PG_USER, its output in $WORK/initdb.log (shown if it fails).
pg_initdb() {
    as_pg "$PG_BIN/initdb" --no-locale -E UTF8 -A trust -U postgres -D "$PGDATA" >"$WORK/initdb.log" 2>&1 ||
        {
            cat "$WORK/initdb.log" >&2
            die "initdb failed"
        }
}

# sandbox_initdb: pg_initdb, and a cluster that listens only on a socket in $WORK ($PORT only
# names the socket file), with archive_mode off, that keeps its WAL: nothing is recycled before
# the bench reads it.
sandbox_initdb() {
    log "initdb in $PGDATA"
    pg_initdb
    cat >>"$PGDATA/postgresql.conf" <<EOF
port = $PORT
unix_socket_directories = '$WORK'
listen_addresses = ''
archive_mode = off
wal_keep_size = '16GB'
max_wal_size = '16GB'
EOF
}

# pg_start, pg_stop: the sandbox cluster (server log in $WORK/pg.log).
pg_start() {
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg.log" -w -t 60 start >/dev/null ||
        {
            tail -n 30 "$WORK/pg.log" >&2
            die "pg_ctl start failed"
        }
}
pg_stop() { as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; }

# psql_c SQL: runs SQL in the sandbox cluster's database postgres; prints bare values.
psql_c() { as_pg "$PG_BIN/psql" -X -q -A -t -h "$WORK" -p "$PORT" -U postgres -d postgres -c "$1"; }

# pgbench ARG...: pgbench against the sandbox cluster's database postgres.
pgbench() { as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PORT" -U postgres "$@" postgres; }

# start_garage: a Garage server in $WORK/garage-server (scripts/garage-start, its log in
# $WORK/garage-start.log); sources the env file it writes, TIDEMARK_TEST_S3_ENDPOINT, _BUCKET,
# _REGION, _ACCESS_KEY_ID and _SECRET_ACCESS_KEY. Sets GARAGE_DIR.
start_garage() {
    GARAGE_DIR="$WORK/garage-server"
    mkdir -p "$GARAGE_DIR"
    log "starting Garage in $GARAGE_DIR"
    local env_file
    env_file=$("$SCRIPT_DIR/garage-start" "$GARAGE_DIR" 2>"$WORK/garage-start.log" | tail -n 1) || {
        cat "$WORK/garage-start.log" >&2
        die "scripts/garage-start failed"
    }
    # shellcheck source=/dev/null
    source "$env_file"
}

# stop_garage: stops the server start_garage started (quietly; it may be down already).
stop_garage() {
    "$SCRIPT_DIR/garage-stop" "$GARAGE_DIR" >/dev/null 2>&1 || true
}

# s3_repository PREFIX: the [repository] keys of a tidemark config for PREFIX in the bucket of
# the Garage server start_garage started.
s3_repository() {
    cat <<EOF
url = "s3://$TIDEMARK_TEST_S3_BUCKET/$1"
endpoint = "$TIDEMARK_TEST_S3_ENDPOINT"
region = "$TIDEMARK_TEST_S3_REGION"
force_path_style = true
access_key_id = "$TIDEMARK_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$TIDEMARK_TEST_S3_SECRET_ACCESS_KEY"
EOF
}

# init_tidemark DIR STORE LABEL REPOSITORY [FIRST]: a fresh tidemark repository on STORE for
# the sandbox cluster, as cluster $CLUSTER: DIR/tidemark.toml (owner-only: FIRST's lines, then
# [repository] with REPOSITORY's keys, then the cluster), its key DIR/$CLUSTER.key, the cluster
# started, `$TIDEMARK init` (its output in DIR/init.out, logged after "LABEL: "). Leaves the
# cluster running.
init_tidemark() {
    local dir=$1 store=$2 label=$3 repository=$4 first=${5:-} cfg="$1/tidemark.toml"
    (
        umask 077
        {
            if [[ -n $first ]]; then printf '%s\n\n' "$first"; fi
            cat <<EOF
[repository]
$repository

[clusters.$CLUSTER]
pgdata = "$PGDATA"
connection = "host=$WORK port=$PORT user=postgres dbname=postgres"
key_file = "$dir/$CLUSTER.key"
EOF
        } >"$cfg"
    )
    give_pg "$dir"
    as_pg "$TIDEMARK" key generate "$dir/$CLUSTER.key" >/dev/null
    pg_start
    as_pg "$TIDEMARK" --config "$cfg" --cluster "$CLUSTER" init >"$dir/init.out" 2>&1 || {
        cat "$dir/init.out" >&2
        die "tidemark init ($store) failed"
    }
    log "$label: $(cat "$dir/init.out")"
}

# ---------------------------------------------------------------------------------------------
# WAL segments for the WAL benches (bench-wal-push, bench-wal-fetch)

# check_wal_bench: WORKLOAD and STORES hold what a WAL bench knows.
check_wal_bench() {
    [[ $WORKLOAD == pgbench || $WORKLOAD == mixed ]] || die "WORKLOAD must be pgbench or mixed"
    local s
    for s in $STORES; do
        [[ $s == local || $s == garage ]] || die "unknown store '$s' in STORES (local, garage)"
    done
}

# completed_segments: names of the complete WAL segments (before the one being written), sorted.
completed_segments() {
    local cur
    cur=$(psql_c "select pg_walfile_name(pg_current_wal_lsn())")
    find "$PGDATA/pg_wal" -maxdepth 1 -type f -regextype posix-extended \
        -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort | awk -v cur="$cur" '$0 < cur'
}

# make_segments: starts the sandbox cluster (see sandbox_initdb) and writes WAL ($WORKLOAD, at
# most $MAX_PGBENCH_ROUNDS rounds; pgbench -i -s $SCALE first) until $SEGMENTS segments are
# complete, copies the newest $SEGMENTS of them to $WORK/segments and stops the cluster. Sets
# SEGS (their names, oldest first), SEGDIR, SEG_BYTES (their size) and ROUNDS.
make_segments() {
    pg_start
    if [[ $WORKLOAD == mixed ]]; then
        psql_c "create table bench_mixed (id bigint, n bigint, ts timestamptz, h text, t text, small int)" >/dev/null
    else
        log "pgbench -i -s $SCALE"
        pgbench -i -q -s "$SCALE" >"$WORK/pgbench.log" 2>&1 || {
            tail "$WORK/pgbench.log" >&2
            die "pgbench -i failed"
        }
    fi
    # OLTP rounds; the CHECKPOINT before each makes the next writes carry full-page images, as
    # production WAL does after every checkpoint.
    ROUNDS=0
    while (($(completed_segments | wc -l) < SEGMENTS + 1)); do
        ((ROUNDS < MAX_PGBENCH_ROUNDS)) || die "only $(completed_segments | wc -l) segments after $ROUNDS rounds"
        ROUNDS=$((ROUNDS + 1))
        log "$WORKLOAD round $ROUNDS ($(completed_segments | wc -l) segments complete, want $SEGMENTS)"
        psql_c "checkpoint" >/dev/null
        if [[ $WORKLOAD == mixed ]]; then
            # ~30 MB of rows: about two segments of WAL per round.
            psql_c "insert into bench_mixed
                  select g, (random() * 1e9)::bigint, now() - random() * interval '365 days',
                         md5(random()::text), repeat(md5(g::text), 2), (random() * 100)::int
                  from generate_series(1, 200000) g" >/dev/null
        else
            pgbench -c 2 -j 2 -T 10 >>"$WORK/pgbench.log" 2>&1 || {
                tail "$WORK/pgbench.log" >&2
                die "pgbench failed"
            }
        fi
    done
    psql_c "select pg_switch_wal()" >/dev/null
    mapfile -t SEGS < <(completed_segments | tail -n "$SEGMENTS")
    SEGDIR="$WORK/segments"
    mkdir -p "$SEGDIR"
    local s
    for s in "${SEGS[@]}"; do cp -- "$PGDATA/pg_wal/$s" "$SEGDIR/$s"; done
    give_pg "$SEGDIR"
    pg_stop
    SEG_BYTES=$(cd "$SEGDIR" && stat -c %s -- "${SEGS[@]}" | awk '{ s += $1 } END { print s }')
    log "${#SEGS[@]} segments ${SEGS[0]} .. ${SEGS[-1]} ($((SEG_BYTES / 1000000)) MB) copied to $SEGDIR"
}

# segments_summary: the summary line on the segments make_segments made.
segments_summary() {
    local made
    if [[ $WORKLOAD == mixed ]]; then
        made="$ROUNDS inserts of 200000 md5/random rows"
    else
        made="pgbench -s $SCALE + $ROUNDS x 10 s pgbench rounds"
    fi
    echo "segments: ${#SEGS[@]} x 16 MiB (${SEGS[0]} .. ${SEGS[-1]}), $((SEG_BYTES / 1000000)) MB; $made"
}
