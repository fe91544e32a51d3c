#!/usr/bin/env bash
# Manage rabbitflow's own PostgreSQL cluster for the outbox/inbox tests (rabbitflow.sql).
#
# It runs beside any system PostgreSQL (Debian's cluster on 5432) and never touches it: its own
# data folder, port, unix socket folder (inside the data folder) and log. Trust authentication,
# on 127.0.0.1 and the socket only. PostgreSQL refuses to run as root: as root the script runs
# the server as the `postgres` user (or RABBITFLOW_PG_USER), otherwise as the calling user.
#
#   postgresql://postgres@127.0.0.1:5433/postgres
#
# Usage: scripts/postgres.sh COMMAND
#   start    init the data folder when it is new, then start the server and wait until it
#            accepts connections (idempotent: does nothing when it already runs)
#   stop     stop the server (fast shutdown; data is kept)
#   clean    stop the server and delete the data folder
#   status   say whether it runs; exit 1 when it does not
#   url      print the connection URL (SQLAlchemy: replace postgresql:// by postgresql+asyncpg://)
#
# Environment:
#   RABBITFLOW_PG_DIR   data folder (default /tmp/rabbitflow-pg)
#   RABBITFLOW_PG_PORT  TCP port on 127.0.0.1 (default 5433)
#   RABBITFLOW_PG_BIN   PostgreSQL's bin folder (default /usr/lib/postgresql/15/bin)
#   RABBITFLOW_PG_USER  the OS user that runs the server when called as root (default postgres)
set -euo pipefail

readonly PORT="${RABBITFLOW_PG_PORT:-5433}"
readonly PG_BIN="${RABBITFLOW_PG_BIN:-/usr/lib/postgresql/15/bin}"
readonly TIMEOUT=30

DATA_DIR="${RABBITFLOW_PG_DIR:-/tmp/rabbitflow-pg}"
case "$DATA_DIR" in
    /*) ;;
    *) DATA_DIR="$PWD/$DATA_DIR" ;;
esac
readonly DATA_DIR="${DATA_DIR%/}"
readonly LOG_FILE="$DATA_DIR/server.log"

die() { printf 'postgres.sh: error: %s\n' "$*" >&2; exit 1; }

# The server's OS user: PostgreSQL will not run as root.
if [ "$(id -u)" = 0 ]; then
    readonly RUN_AS="${RABBITFLOW_PG_USER:-postgres}"
    id "$RUN_AS" >/dev/null 2>&1 || die "user '$RUN_AS' does not exist; set RABBITFLOW_PG_USER to a non-root user"
else
    RUN_AS="$(id -un)"
    readonly RUN_AS
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$RUN_AS" -- "$@"
    else
        "$@"
    fi
}

url() { printf 'postgresql://postgres@127.0.0.1:%s/postgres\n' "$PORT"; }

running() { [ -f "$DATA_DIR/PG_VERSION" ] && as_owner "$PG_BIN/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1; }

port_taken() {
    # Something else (another cluster, another program) already listens on the port.
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

cmd_init() {
    [ -x "$PG_BIN/initdb" ] || die "no initdb in $PG_BIN; install postgresql (apt-get install postgresql) or set RABBITFLOW_PG_BIN"
    [ -f "$DATA_DIR/PG_VERSION" ] && return 0
    if [ -e "$DATA_DIR" ] && [ -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ]; then
        die "$DATA_DIR exists and is not a PostgreSQL data folder; remove it or set RABBITFLOW_PG_DIR"
    fi
    mkdir -p "$DATA_DIR"
    [ "$(id -u)" = 0 ] && chown "$RUN_AS" "$DATA_DIR"
    chmod 700 "$DATA_DIR"
    as_owner "$PG_BIN/initdb" -D "$DATA_DIR" -U postgres --auth=trust --encoding=UTF8 --no-sync \
        >"$DATA_DIR.initdb.log" 2>&1 || die "initdb failed; see $DATA_DIR.initdb.log"
    rm -f "$DATA_DIR.initdb.log"
    # Only the loopback address and the private socket, with trust: a test cluster, never a server.
    cat >"$DATA_DIR/pg_hba.conf" <<'EOF'
local all all              trust
host  all all 127.0.0.1/32 trust
EOF
    cat >>"$DATA_DIR/postgresql.conf" <<EOF

# rabbitflow's test cluster (scripts/postgres.sh)
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DATA_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    [ "$(id -u)" = 0 ] && chown "$RUN_AS" "$DATA_DIR/pg_hba.conf" "$DATA_DIR/postgresql.conf"
    return 0
}

cmd_start() {
    if running; then
        return 0
    fi
    port_taken && die "127.0.0.1:$PORT is already in use by another program; set RABBITFLOW_PG_PORT"
    cmd_init
    as_owner "$PG_BIN/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -w -t "$TIMEOUT" -s start \
        || die "the server did not start within ${TIMEOUT}s; see $LOG_FILE"
}

cmd_stop() {
    running || return 0
    as_owner "$PG_BIN/pg_ctl" -D "$DATA_DIR" -m fast -w -t "$TIMEOUT" -s stop \
        || die "the server did not stop within ${TIMEOUT}s; see $LOG_FILE"
}

cmd_clean() {
    cmd_stop
    rm -rf "$DATA_DIR"
}

cmd_status() {
    if running; then
        printf 'running on 127.0.0.1:%s (data %s)\n' "$PORT" "$DATA_DIR"
    else
        printf 'not running (data %s)\n' "$DATA_DIR"
        exit 1
    fi
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    clean) cmd_clean ;;
    status) cmd_status ;;
    url) url ;;
    *) usage ;;
esac
