#!/usr/bin/env bash
# Manage a local 3-node RabbitMQ cluster for rabbitflow's failover tests.
#
# The nodes run beside the default broker (rabbit@localhost on 5672) and never
# touch it: they have their own node names, ports, data, logs, config and a
# private Erlang cookie (HOME is the state folder for server and CLI alike).
#
#   rf1@localhost  amqp 127.0.0.1:5673  dist 25673
#   rf2@localhost  amqp 127.0.0.1:5674  dist 25674
#   rf3@localhost  amqp 127.0.0.1:5675  dist 25675
#
# Usage: scripts/cluster.sh COMMAND [N]
#   start         boot all three nodes in parallel and cluster rf2, rf3 with rf1
#                 (idempotent: does nothing when all three already run clustered)
#   stop          stop all three nodes (data is kept)
#   clean         stop all three nodes and delete the state folder
#   status        show which nodes run and the cluster status;
#                 exit 1 unless all three run in one cluster
#   urls          print the AMQP URLs of the three nodes, ';'-separated
#   stop-node N   stop node N (1..3) gracefully, keeping its data
#   start-node N  start node N again and wait until it is back in the cluster
#   kill-node N   SIGKILL node N's beam process (a hard crash)
#   pid N         print the OS pid of node N's beam process
#   ctl N ARGS..  run rabbitmqctl ARGS against node N (e.g. set_vm_memory_high_watermark)
#
# Environment:
#   RABBITFLOW_CLUSTER_DIR      state folder (default /tmp/rabbitflow-cluster)
#   RABBITFLOW_CLUSTER_TIMEOUT  seconds to wait for a node (default 120)
#   RABBITFLOW_CLUSTER_NAME     node name prefix (default rf: rf1@localhost ...) and
#   RABBITFLOW_CLUSTER_PORT     node 1's AMQP port (default 5673; dist port + 20000): a second
#                               cluster beside the first, with its own RABBITFLOW_CLUSTER_DIR
#   RABBITFLOW_BROKER_VERSION   4.0: run the same command on the RabbitMQ 4.0 cluster of
#                               scripts/rabbitmq4.sh instead (r4c1..3, ports 5691-5693)
set -euo pipefail

case "${RABBITFLOW_BROKER_VERSION:-3.10}" in
    3.10) ;;
    4.0) exec "$(dirname "${BASH_SOURCE[0]}")/rabbitmq4.sh" cluster "$@" ;;
    *) printf 'cluster.sh: error: RABBITFLOW_BROKER_VERSION must be 3.10 or 4.0\n' >&2; exit 2 ;;
esac

readonly RMQ_BIN=/usr/lib/rabbitmq/bin
readonly NODES=(1 2 3)
readonly TIMEOUT="${RABBITFLOW_CLUSTER_TIMEOUT:-120}"

STATE_DIR="${RABBITFLOW_CLUSTER_DIR:-/tmp/rabbitflow-cluster}"
case "$STATE_DIR" in
    /*) ;;
    *) STATE_DIR="$PWD/$STATE_DIR" ;;
esac
STATE_DIR="${STATE_DIR%/}"
readonly STATE_DIR
readonly MARKER="$STATE_DIR/.rabbitflow-cluster"

# ---------------------------------------------------------------- helpers --

log() { printf 'cluster.sh [%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'cluster.sh: error: %s\n' "$*" >&2; exit 1; }

readonly PREFIX="${RABBITFLOW_CLUSTER_NAME:-rf}"
readonly FIRST_PORT="${RABBITFLOW_CLUSTER_PORT:-5673}"
node_name() { printf '%s%s@localhost' "$PREFIX" "$1"; }
amqp_port() { printf '%s' $((FIRST_PORT - 1 + $1)); }
dist_port() { printf '%s' $((FIRST_PORT + 19999 + $1)); }
node_dir() { printf '%s/%s%s' "$STATE_DIR" "$PREFIX" "$1"; }
pid_file() { printf '%s/%s%s.pid' "$(node_dir "$1")" "$PREFIX" "$1"; }

check_n() {
    case "${1:-}" in
        1 | 2 | 3) ;;
        *) die "node number must be 1, 2 or 3 (got '${1:-}')" ;;
    esac
}

# rabbitmqctl with the cluster's private cookie, ignoring /etc/rabbitmq.
ctl() {
    env -i PATH="$PATH" LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME="$STATE_DIR" \
        RABBITMQ_CONF_ENV_FILE="$STATE_DIR/rabbitmq-env.conf" \
        "$RMQ_BIN/rabbitmqctl" "$@"
}

# Run rabbitmqctl quietly; show its output only when it fails.
ctl_q() {
    local out
    if out=$(ctl "$@" 2>&1); then
        return 0
    fi
    log "rabbitmqctl $* failed:"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    return 1
}

# Evaluate an Erlang expression on node N; prints the result.
ctl_eval() {
    ctl -n "$(node_name "$1")" -q eval "$2" 2>/dev/null
}

# Is PID a live (non-zombie) beam process of node N from this state folder?
# The environment check guarantees we never touch the default broker or any
# other process that happens to reuse a pid.
is_our_beam() {
    local pid=$1 n=$2 state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/environ" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == beam.smp ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    grep -qzxF "RABBITMQ_NODENAME=$(node_name "$n")" "/proc/$pid/environ" 2>/dev/null || return 1
    grep -qzxF "RABBITMQ_MNESIA_BASE=$(node_dir "$n")/mnesia" "/proc/$pid/environ" 2>/dev/null || return 1
}

# Print the pid of node N's beam process; fail if it does not run.
node_pid() {
    local n=$1 pid pf
    pf=$(pid_file "$n")
    if [[ -f "$pf" ]]; then
        pid=$(tr -dc '0-9' <"$pf")
        if is_our_beam "$pid" "$n"; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    # No (valid) pid file yet, e.g. early in boot: scan beam processes.
    for pid in $(pgrep -x beam.smp 2>/dev/null || true); do
        if is_our_beam "$pid" "$n"; then
            printf '%s\n' "$pid"
            return 0
        fi
    done
    return 1
}

is_alive() { node_pid "$1" >/dev/null; }

# Wait until PID is gone (or a zombie); returns 1 on timeout.
wait_pid_gone() {
    local pid=$1 n=$2 limit=$3 i
    for ((i = 0; i < limit * 10; i++)); do
        is_our_beam "$pid" "$n" || return 0
        sleep 0.1
    done
    return 1
}

ensure_state_dir() {
    mkdir -p "$STATE_DIR"
    touch "$MARKER"
    : >>"$STATE_DIR/rabbitmq-env.conf"
    local cookie="$STATE_DIR/.erlang.cookie"
    if [[ ! -s "$cookie" ]]; then
        rm -f "$cookie"
        (
            umask 077
            od -An -N20 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' >"$cookie"
        )
    fi
    chmod 400 "$cookie"
}

write_node_files() {
    local n=$1 d
    d=$(node_dir "$n")
    mkdir -p "$d/mnesia" "$d/log"
    [[ -f "$d/enabled_plugins" ]] || : >"$d/enabled_plugins"
    cat >"$d/rabbitmq.conf" <<EOF
# Written by scripts/cluster.sh for $(node_name "$n"); rewritten on every start.
listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")
# guest may log in from loopback anyway; also allow it through non-loopback
# addresses (harmless: the listener only binds 127.0.0.1).
loopback_users = none
EOF
    # RF_DLX_CONFIRM_TIMEOUT_MS: how long a quorum queue's at-least-once dead-letter worker waits
    # for the target's confirm before it sends again (RabbitMQ's default: 180000). The chaos
    # soak's retries wait that long after a node loss (docs/reliability.md).
    if [[ -n "${RF_DLX_CONFIRM_TIMEOUT_MS:-}" ]]; then
        printf '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, %d}]}].\n' \
            "$RF_DLX_CONFIRM_TIMEOUT_MS" >"$d/advanced.config"
    else
        rm -f "$d/advanced.config"
    fi
}

# Boot node N in the background, detached from this script's session.
launch_node() {
    local n=$1 d
    d=$(node_dir "$n")
    write_node_files "$n"
    rm -f "$(pid_file "$n")"
    printf '\n===== %s launched %s =====\n' "$(node_name "$n")" "$(date '+%F %T')" >>"$d/console.log"
    env -i PATH="$PATH" LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME="$STATE_DIR" \
        RABBITMQ_CONF_ENV_FILE="$STATE_DIR/rabbitmq-env.conf" \
        RABBITMQ_NODENAME="$(node_name "$n")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
        RABBITMQ_DIST_PORT="$(dist_port "$n")" \
        RABBITMQ_MNESIA_BASE="$d/mnesia" \
        RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_PID_FILE="$(pid_file "$n")" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        setsid "$RMQ_BIN/rabbitmq-server" >>"$d/console.log" 2>&1 </dev/null 9>&- &
    disown 2>/dev/null || true
}

# Wait until node N has registered with epmd, then until it answers
# `rabbitmqctl await_startup`.
await_node() {
    local n=$1 name deadline remaining
    name=$(node_name "$n")
    deadline=$((SECONDS + TIMEOUT))
    while :; do
        if ((SECONDS >= deadline)); then
            die "$name did not start within ${TIMEOUT}s; see $(node_dir "$n")/log/$name.log"
        fi
        if ! is_alive "$n" && ((SECONDS > deadline - TIMEOUT + 5)); then
            tail -n 20 "$(node_dir "$n")/console.log" >&2 || true
            die "$name exited during boot; see $(node_dir "$n")/log/$name.log"
        fi
        if epmd -names 2>/dev/null | grep -q "^name $PREFIX$n at port "; then
            remaining=$((deadline - SECONDS))
            if ctl -n "$name" -q await_startup --timeout "$remaining" >/dev/null 2>&1; then
                return 0
            fi
        fi
        sleep 0.3
    done
}

# Cluster members (disc and ram, running or not) as node N sees them.
members_of() { ctl_eval "$1" 'rabbit_mnesia:cluster_nodes(all).'; }
running_of() { ctl_eval "$1" 'rabbit_nodes:all_running().'; }

# Does node N know all three nodes as cluster members?
is_member() {
    local n=$1 out m
    out=$(members_of "$n") || return 1
    for m in "${NODES[@]}"; do
        grep -qw "$(node_name "$m")" <<<"$out" || return 1
    done
}

# Make node N join the cluster through node SEED (which must run).
join_node() {
    local n=$1 seed=$2 name
    name=$(node_name "$n")
    log "joining $name to $(node_name "$seed")"
    ctl_q -n "$name" stop_app
    ctl_q -n "$name" reset
    ctl_q -n "$name" join_cluster "$(node_name "$seed")"
    ctl_q -n "$name" start_app
}

# Wait until node N sees every live node (including itself) as running.
await_in_cluster() {
    local n=$1 deadline out m ok
    deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        ok=1
        out=$(running_of "$n") || ok=0
        if ((ok)); then
            for m in "${NODES[@]}"; do
                if [[ "$m" == "$n" ]] || is_alive "$m"; then
                    grep -qw "$(node_name "$m")" <<<"$out" || { ok=0; break; }
                fi
            done
        fi
        ((ok)) && return 0
        sleep 0.5
    done
    die "$(node_name "$n") is not back in the cluster after ${TIMEOUT}s"
}

# Stop node N gracefully (rabbitmqctl stop, then SIGTERM, then SIGKILL).
stop_one() {
    local n=$1 name pid
    name=$(node_name "$n")
    pid=$(node_pid "$n") || { log "$name is not running"; return 0; }
    if ! timeout 60 env -i PATH="$PATH" LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME="$STATE_DIR" \
        RABBITMQ_CONF_ENV_FILE="$STATE_DIR/rabbitmq-env.conf" \
        "$RMQ_BIN/rabbitmqctl" -n "$name" -q stop >/dev/null 2>&1; then
        log "rabbitmqctl stop failed for $name; sending SIGTERM to $pid"
        if is_our_beam "$pid" "$n"; then kill -TERM "$pid" 2>/dev/null || true; fi
    fi
    if ! wait_pid_gone "$pid" "$n" 30; then
        log "$name (pid $pid) still runs; sending SIGKILL"
        if is_our_beam "$pid" "$n"; then kill -KILL "$pid" 2>/dev/null || true; fi
        wait_pid_gone "$pid" "$n" 10 || die "could not stop $name (pid $pid)"
    fi
    log "$name stopped"
}

# --------------------------------------------------------------- commands --

cmd_start() {
    ensure_state_dir
    local n launched=() pids=() i rc=0 to_join=() app_stopped=()

    for n in "${NODES[@]}"; do
        if is_alive "$n"; then
            continue
        fi
        launch_node "$n"
        launched+=("$n")
    done
    if ((${#launched[@]})); then
        log "booting ${launched[*]/#/rf} (state in $STATE_DIR)"
    fi

    for n in "${NODES[@]}"; do
        if [[ " ${launched[*]} " == *" $n "* ]]; then
            await_node "$n"
            log "$(node_name "$n") is up"
        elif [[ "$(ctl_eval "$n" 'rabbit_boot_state:get().' || true)" == stopped ]]; then
            # The VM runs but the rabbit app is stopped (an interrupted join?).
            app_stopped+=("$n")
        else
            await_node "$n"
        fi
    done

    for n in 2 3; do
        is_member "$n" || to_join+=("$n")
    done
    for n in "${app_stopped[@]}"; do
        if [[ " ${to_join[*]} " != *" $n "* ]]; then
            log "starting the rabbit app on $(node_name "$n")"
            ctl_q -n "$(node_name "$n")" start_app || die "start_app failed for $(node_name "$n")"
        fi
    done
    if ((${#to_join[@]} == 0)); then
        if ((${#launched[@]} == 0)); then
            log "cluster already running"
        fi
    else
        # stop_app + reset are local to each node: do them in parallel; the
        # joins themselves go one after the other; start_app in parallel.
        log "joining ${to_join[*]/#/$PREFIX} to $(node_name 1)"
        pids=()
        for n in "${to_join[@]}"; do
            (ctl_q -n "$(node_name "$n")" stop_app && ctl_q -n "$(node_name "$n")" reset) &
            pids+=($!)
        done
        for i in "${pids[@]}"; do wait "$i" || rc=1; done
        ((rc == 0)) || die "stop_app/reset failed"
        for n in "${to_join[@]}"; do
            ctl_q -n "$(node_name "$n")" join_cluster "$(node_name 1)" || die "join_cluster failed for $(node_name "$n")"
        done
        pids=()
        for n in "${to_join[@]}"; do
            ctl_q -n "$(node_name "$n")" start_app &
            pids+=($!)
        done
        for i in "${pids[@]}"; do wait "$i" || rc=1; done
        ((rc == 0)) || die "start_app failed"
    fi

    for n in "${NODES[@]}"; do
        await_in_cluster "$n"
    done
    log "cluster running: $(cmd_urls)"
}

cmd_stop() {
    local n pids=() i rc=0
    for n in "${NODES[@]}"; do
        stop_one "$n" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    return "$rc"
}

cmd_clean() {
    cmd_stop
    if [[ -d "$STATE_DIR" ]]; then
        [[ -f "$MARKER" ]] || die "$STATE_DIR has no $(basename "$MARKER") marker; not deleting it"
        rm -rf "$STATE_DIR"
        log "deleted $STATE_DIR"
    fi
}

cmd_status() {
    local n pid up=() all=1 out
    for n in "${NODES[@]}"; do
        if pid=$(node_pid "$n"); then
            printf '%s  amqp://127.0.0.1:%s  pid %s\n' "$(node_name "$n")" "$(amqp_port "$n")" "$pid"
            up+=("$n")
        else
            printf '%s  amqp://127.0.0.1:%s  not running\n' "$(node_name "$n")" "$(amqp_port "$n")"
            all=0
        fi
    done
    if ((${#up[@]} == 0)); then
        return 1
    fi
    if out=$(ctl -n "$(node_name "${up[0]}")" cluster_status 2>&1); then
        printf '%s\n' "$out"
    else
        printf '%s\n' "$out"
        all=0
    fi
    if ((all)); then
        # All three processes run; are all three running members of one cluster?
        out=$(running_of 1) || return 1
        for n in "${NODES[@]}"; do
            grep -qw "$(node_name "$n")" <<<"$out" || return 1
        done
        return 0
    fi
    return 1
}

cmd_urls() {
    local n sep='' urls=''
    for n in "${NODES[@]}"; do
        urls+="${sep}amqp://guest:guest@127.0.0.1:$(amqp_port "$n")"
        sep=';'
    done
    printf '%s\n' "$urls"
}

cmd_pid() {
    check_n "${1:-}"
    node_pid "$1" || die "$(node_name "$1") is not running"
}

cmd_ctl() {
    check_n "${1:-}"
    local n=$1
    shift
    ctl -n "$(node_name "$n")" "$@"
}

cmd_stop_node() {
    check_n "${1:-}"
    stop_one "$1"
}

cmd_kill_node() {
    check_n "${1:-}"
    local n=$1 pid
    pid=$(node_pid "$n") || die "$(node_name "$n") is not running"
    kill -KILL "$pid"
    wait_pid_gone "$pid" "$n" 10 || die "$(node_name "$n") (pid $pid) survived SIGKILL"
    log "$(node_name "$n") (pid $pid) killed"
}

cmd_start_node() {
    check_n "${1:-}"
    local n=$1 m seed=''
    ensure_state_dir
    if ! is_alive "$n"; then
        launch_node "$n"
        log "booting $(node_name "$n")"
        await_node "$n"
    elif [[ "$(ctl_eval "$n" 'rabbit_boot_state:get().' || true)" == stopped ]]; then
        if is_member "$n"; then
            log "starting the rabbit app on $(node_name "$n")"
            ctl_q -n "$(node_name "$n")" start_app || die "start_app failed for $(node_name "$n")"
        fi
    else
        await_node "$n"
    fi
    if ! is_member "$n"; then
        for m in "${NODES[@]}"; do
            if [[ "$m" != "$n" ]] && is_alive "$m"; then
                seed=$m
                break
            fi
        done
        [[ -n "$seed" ]] || die "$(node_name "$n") is not clustered and no other node runs to join"
        join_node "$n" "$seed"
    fi
    await_in_cluster "$n"
    log "$(node_name "$n") is up and in the cluster"
}

usage() {
    sed -n '/^# Usage:/,/^# Environment:/{/^# Environment:/d; s/^# \{0,1\}//; p}' "$0" >&2
    printf 'Environment: RABBITFLOW_CLUSTER_DIR (default /tmp/rabbitflow-cluster),\n' >&2
    printf '             RABBITFLOW_CLUSTER_TIMEOUT (seconds, default 120)\n' >&2
}

# Serialize commands that change the cluster (e.g. parallel test sessions).
# fd 9 is closed for the node processes, so only this script holds the lock.
lock_state() {
    if [[ "$1" == start || "$1" == start-node ]]; then
        mkdir -p "$STATE_DIR"
    fi
    [[ -d "$STATE_DIR" ]] || return 0
    exec 9>>"$STATE_DIR/.lock"
    if ! flock -w "$TIMEOUT" 9; then
        die "another cluster.sh holds $STATE_DIR/.lock"
    fi
}

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
        start | stop | clean | stop-node | start-node | kill-node) lock_state "$cmd" ;;
    esac
    case "$cmd" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        clean) cmd_clean ;;
        status) cmd_status ;;
        urls) cmd_urls ;;
        pid) cmd_pid "$@" ;;
        stop-node) cmd_stop_node "$@" ;;
        start-node) cmd_start_node "$@" ;;
        kill-node) cmd_kill_node "$@" ;;
        ctl) cmd_ctl "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
