#!/usr/bin/env bash
# Run a real RabbitMQ 4.0 (Debian trixie's rabbitmq-server 4.0.5, Erlang 27) beside the default
# 3.10 broker: one node for the suite, or a 3-node cluster for the failover tests.
#
# Erlang 27 needs a newer libc than the system's, so 4.0 runs from a separate Debian root built
# once with debootstrap and kept (the "root"). Every node runs in it with chroot, as root, with
# its own node name, ports, data, logs and config under /var/lib/rabbitflow-rmq4 inside the root,
# a private Erlang cookie (HOME is that folder for server and CLI alike), and an epmd of its own
# (ERL_EPMD_PORT), so nothing here ever touches rabbit@localhost, 5672 or the epmd on 4369.
#
#   rabbit4@localhost  amqp 127.0.0.1:5690  dist 25690  epmd 4390   the single node (node 0)
#   r4c1@localhost     amqp 127.0.0.1:5691  dist 25691  epmd 4391   the cluster (nodes 1..3)
#   r4c2@localhost     amqp 127.0.0.1:5692  dist 25692  epmd 4391
#   r4c3@localhost     amqp 127.0.0.1:5693  dist 25693  epmd 4391
#
# Usage: scripts/rabbitmq4.sh COMMAND [N]
#   build            create the root (debootstrap from the Debian mirror apt uses; root only);
#                    does nothing when a complete root exists, rebuilds an incomplete one
#   start            boot the single node (building the root first if needed); idempotent
#   stop             stop the single node (data is kept)
#   status           show the single node; exit 1 unless it runs and answers
#   url              print the single node's AMQP URL
#   management-url   print the single node's management API URL (it runs rabbitmq_management)
#   cluster-start    boot the three cluster nodes in parallel and join r4c2, r4c3 to r4c1
#                    (idempotent: does nothing when all three already run clustered)
#   cluster-stop     stop the three cluster nodes (data is kept)
#   cluster-clean    stop the cluster nodes and delete their data
#   cluster-status   show the cluster nodes and the cluster status;
#                    exit 1 unless all three run in one cluster
#   cluster-urls     print the AMQP URLs of the three cluster nodes, ';'-separated
#   stop-node N      stop cluster node N (1..3) gracefully, keeping its data
#   start-node N     start cluster node N again and wait until it is back in the cluster
#   kill-node N      SIGKILL cluster node N's beam process (a hard crash)
#   pid N            print the OS pid of node N's beam process (0: the single node)
#   ctl N ARGS..     run rabbitmqctl ARGS against node N (0: the single node)
#   cluster CMD ..   scripts/cluster.sh's command names for the 4.0 cluster (start, stop, clean,
#                    status, urls, pid, stop-node, start-node, kill-node, ctl): what cluster.sh
#                    runs with RABBITFLOW_BROKER_VERSION=4.0
#   clean            stop every 4.0 node and delete all their data (the root stays)
#
# Environment:
#   RABBITFLOW_RMQ4_ROOT      the root (default /var/cache/rabbitflow/rabbitmq4-root)
#   RABBITFLOW_RMQ4_MIRROR    Debian mirror for build (default: the first one in apt's sources)
#   RABBITFLOW_CLUSTER_TIMEOUT  seconds to wait for a node (default 120)
#   RF_DLX_CONFIRM_TIMEOUT_MS   as in scripts/cluster.sh
set -euo pipefail

readonly NODES=(1 2 3)
readonly TIMEOUT="${RABBITFLOW_CLUSTER_TIMEOUT:-120}"
readonly SUITE=trixie
readonly RMQ_BIN=/usr/lib/rabbitmq/bin # inside the root
readonly STATE_IN=/var/lib/rabbitflow-rmq4 # inside the root
readonly ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

ROOT="${RABBITFLOW_RMQ4_ROOT:-/var/cache/rabbitflow/rabbitmq4-root}"
case "$ROOT" in
    /*) ;;
    *) ROOT="$PWD/$ROOT" ;;
esac
ROOT="${ROOT%/}"
readonly ROOT
readonly STATE_DIR="$ROOT$STATE_IN"
readonly MARKER="$ROOT/.rabbitflow-rabbitmq4"

# ---------------------------------------------------------------- helpers --

log() { printf 'rabbitmq4.sh [%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'rabbitmq4.sh: error: %s\n' "$*" >&2; exit 1; }

node_name() { if (($1 == 0)); then printf 'rabbit4@localhost'; else printf 'r4c%s@localhost' "$1"; fi; }
short_name() { local name; name=$(node_name "$1"); printf '%s' "${name%@*}"; }
amqp_port() { printf '%s' $((5690 + $1)); }
readonly MANAGEMENT_PORT=15690 # the single node's management API
dist_port() { printf '%s' $((25690 + $1)); }
epmd_port() { if (($1 == 0)); then printf 4390; else printf 4391; fi; }
node_dir_in() { printf '%s/%s' "$STATE_IN" "$(short_name "$1")"; }
node_dir() { printf '%s%s' "$ROOT" "$(node_dir_in "$1")"; }
pid_file_in() { printf '%s/%s.pid' "$(node_dir_in "$1")" "$(short_name "$1")"; }

check_n() {
    case "${1:-}" in
        1 | 2 | 3) ;;
        *) die "node number must be 1, 2 or 3 (got '${1:-}')" ;;
    esac
}

check_any_n() {
    case "${1:-}" in
        0 | 1 | 2 | 3) ;;
        *) die "node number must be 0 (the single node), 1, 2 or 3 (got '${1:-}')" ;;
    esac
}

# Run a command inside the root with a clean environment and node N's epmd; extra
# VAR=value words before the command go into its environment.
in_root() {
    local n=$1
    shift
    env -i PATH="$ROOT_PATH" LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME="$STATE_IN" \
        RABBITMQ_CONF_ENV_FILE="$STATE_IN/rabbitmq-env.conf" \
        ERL_EPMD_PORT="$(epmd_port "$n")" ERL_EPMD_ADDRESS=127.0.0.1 \
        chroot "$ROOT" /usr/bin/env "$@"
}

# rabbitmqctl (inside the root) with the private cookie and node N's epmd.
ctl() {
    local n=$1
    shift
    in_root "$n" "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"
}

# Run rabbitmqctl quietly; show its output only when it fails.
ctl_q() {
    local out
    if out=$(ctl "$@" 2>&1); then
        return 0
    fi
    log "rabbitmqctl -n $(node_name "$1") ${*:2} failed:"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    return 1
}

# Evaluate an Erlang expression on node N; prints the result.
ctl_eval() { ctl "$1" -q eval "$2" 2>/dev/null; }

root_complete() {
    [[ -f "$MARKER" && -x "$ROOT$RMQ_BIN/rabbitmq-server" && -x "$ROOT$RMQ_BIN/rabbitmqctl" ]]
}

# Is some process running inside the root (its / is the root)?
root_in_use() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/root" 2>/dev/null)" == "$ROOT" ]] && return 0
    done
    return 1
}

# Erlang reads /proc (cpu and memory), so the nodes and rabbitmqctl need it in the root.
ensure_proc() {
    mountpoint -q "$ROOT/proc" && return 0
    mount -t proc proc "$ROOT/proc" || die "could not mount /proc in $ROOT"
}

# Unmount /proc from the root once nothing runs in it any more.
release_proc() {
    mountpoint -q "$ROOT/proc" || return 0
    root_in_use && return 0
    umount "$ROOT/proc" 2>/dev/null || log "could not unmount $ROOT/proc (busy?)"
}

# The Debian mirror apt already uses (both sources.list formats), or RABBITFLOW_RMQ4_MIRROR.
apt_mirror() {
    if [[ -n "${RABBITFLOW_RMQ4_MIRROR:-}" ]]; then
        printf '%s\n' "$RABBITFLOW_RMQ4_MIRROR"
        return 0
    fi
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    # One-line "deb [opts] URI suite ..." and deb822 "URIs: URI ..."; the main archive is the
    # URI whose path ends in /debian (not -security, -ports or a third-party repository).
    sed -n -e 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([^[:space:]]\+\).*/\2/p' \
        -e 's/^[[:space:]]*URIs:[[:space:]]*//p' "${files[@]}" |
        tr ' ' '\n' | grep -E '^https?://[^[:space:]]+/debian/?$' | head -n 1 | grep .
}

# Delete a root folder (a half-built one) without ever crossing into a mounted /proc.
remove_root_dir() {
    local dir=$1
    [[ -d "$dir" ]] || return 0
    if mountpoint -q "$dir/proc"; then
        umount "$dir/proc" || die "could not unmount $dir/proc; not deleting $dir"
    fi
    rm -rf --one-file-system "$dir"
}

cmd_build() {
    root_complete && return 0
    [[ "$(id -u)" == 0 ]] || die "building the 4.0 root needs root (debootstrap, chroot)"
    if [[ -d "$ROOT" ]] && root_in_use; then
        die "$ROOT is incomplete but processes run in it; stop them first"
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } \
            >/dev/null || die "could not install debootstrap"
    fi
    local mirror partial="$ROOT.partial" build_log="$ROOT.build.log" started=$SECONDS
    mirror=$(apt_mirror) || die "no Debian mirror in /etc/apt/sources.list*; set RABBITFLOW_RMQ4_MIRROR"
    remove_root_dir "$ROOT"
    remove_root_dir "$partial"
    mkdir -p "$(dirname "$ROOT")"
    log "building the RabbitMQ 4.0 root in $ROOT ($SUITE from $mirror; about a minute)"
    if ! debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$partial" "$mirror" \
        >"$build_log" 2>&1; then
        tail -n 20 "$build_log" >&2 || true
        die "debootstrap failed; see $build_log"
    fi
    [[ -x "$partial$RMQ_BIN/rabbitmq-server" ]] || die "debootstrap left no rabbitmq-server; see $build_log"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$partial/etc/hosts"
    # shellcheck disable=SC2016 # ${Version} is dpkg-query's field, not the shell's
    chroot "$partial" dpkg-query -W -f '${Version}\n' rabbitmq-server >"$partial/.rabbitflow-rabbitmq4"
    mv "$partial" "$ROOT"
    log "built $ROOT (rabbitmq-server $(cat "$MARKER")) in $((SECONDS - started))s"
}

ensure_root() {
    root_complete || cmd_build
    mkdir -p "$STATE_DIR"
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
    ensure_proc
}

# Is PID a live (non-zombie) beam process of node N in this root? Its root folder, node name
# and data folder are checked, so we never touch the default broker or a reused pid.
is_our_beam() {
    local pid=$1 n=$2 state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/environ" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == beam.smp ]] || return 1
    [[ "$(readlink "/proc/$pid/root" 2>/dev/null)" == "$ROOT" ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    grep -qzxF "RABBITMQ_NODENAME=$(node_name "$n")" "/proc/$pid/environ" 2>/dev/null || return 1
    grep -qzxF "RABBITMQ_MNESIA_BASE=$(node_dir_in "$n")/mnesia" "/proc/$pid/environ" 2>/dev/null || return 1
}

# Print the pid of node N's beam process; fail if it does not run.
node_pid() {
    local n=$1 pid pf
    pf="$ROOT$(pid_file_in "$n")"
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

write_node_files() {
    local n=$1 d
    d=$(node_dir "$n")
    mkdir -p "$d/mnesia" "$d/log"
    if ((n == 0)); then
        # The single node has the management API (on 15690), for `topology --check
        # --management-url` against a real one; the cluster nodes do not need it.
        printf '[rabbitmq_management].\n' >"$d/enabled_plugins"
    else
        : >"$d/enabled_plugins"
    fi
    cat >"$d/rabbitmq.conf" <<EOF
# Written by scripts/rabbitmq4.sh for $(node_name "$n"); rewritten on every start.
listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")
# guest may log in from loopback anyway; also allow it through non-loopback
# addresses (harmless: the listener only binds 127.0.0.1).
loopback_users = none
EOF
    if ((n == 0)); then
        printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' "$MANAGEMENT_PORT" >>"$d/rabbitmq.conf"
    fi
    if [[ -n "${RF_DLX_CONFIRM_TIMEOUT_MS:-}" ]]; then
        printf '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, %d}]}].\n' \
            "$RF_DLX_CONFIRM_TIMEOUT_MS" >"$d/advanced.config"
    else
        rm -f "$d/advanced.config"
    fi
}

# Boot node N in the background, detached from this script's session.
launch_node() {
    local n=$1 d d_in
    d=$(node_dir "$n")
    d_in=$(node_dir_in "$n")
    write_node_files "$n"
    rm -f "$ROOT$(pid_file_in "$n")"
    printf '\n===== %s launched %s =====\n' "$(node_name "$n")" "$(date '+%F %T')" >>"$d/console.log"
    in_root "$n" \
        RABBITMQ_NODENAME="$(node_name "$n")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
        RABBITMQ_DIST_PORT="$(dist_port "$n")" \
        RABBITMQ_MNESIA_BASE="$d_in/mnesia" \
        RABBITMQ_LOG_BASE="$d_in/log" \
        RABBITMQ_PID_FILE="$(pid_file_in "$n")" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d_in/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$d_in/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$d_in/advanced.config" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        setsid "$RMQ_BIN/rabbitmq-server" >>"$d/console.log" 2>&1 </dev/null 9>&- &
    disown 2>/dev/null || true
}

# Wait until node N has registered with its epmd, then until it answers
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
        if in_root "$n" epmd -names 2>/dev/null | grep -q "^name $(short_name "$n") at port "; then
            remaining=$((deadline - SECONDS))
            if ctl "$n" -q await_startup --timeout "$remaining" >/dev/null 2>&1; then
                return 0
            fi
        fi
        sleep 0.3
    done
}

# Stop node N gracefully (rabbitmqctl stop, then SIGTERM, then SIGKILL).
stop_one() {
    local n=$1 name pid
    name=$(node_name "$n")
    pid=$(node_pid "$n") || return 0
    if ! timeout 60 "$0" ctl "$n" -q stop >/dev/null 2>&1; then
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

# Stop the epmd of node N's group once no node of the group runs, then release /proc.
tidy_up() {
    local n=$1 m
    if ((n == 0)); then
        is_alive 0 && return 0
    else
        for m in "${NODES[@]}"; do is_alive "$m" && return 0; done
    fi
    if mountpoint -q "$ROOT/proc"; then
        in_root "$n" epmd -kill >/dev/null 2>&1 || true
        sleep 0.2
    fi
    release_proc
}

# ---------------------------------------------------------- single node --

cmd_start() {
    ensure_root
    if ! is_alive 0; then
        launch_node 0
        await_node 0
        log "$(node_name 0) is up: $(cmd_url)"
    else
        await_node 0
    fi
}

cmd_stop() {
    [[ -d "$STATE_DIR" ]] || return 0
    stop_one 0
    tidy_up 0
}

cmd_status() {
    local pid
    if ! pid=$(node_pid 0); then
        printf '%s  amqp://127.0.0.1:%s  not running\n' "$(node_name 0)" "$(amqp_port 0)"
        return 1
    fi
    printf '%s  amqp://127.0.0.1:%s  pid %s  RabbitMQ %s\n' "$(node_name 0)" "$(amqp_port 0)" "$pid" \
        "$(ctl_eval 0 'rabbit_misc:version().' | tr -d '"')"
    ctl 0 -q status >/dev/null 2>&1
}

cmd_url() { printf 'amqp://guest:guest@127.0.0.1:%s/\n' "$(amqp_port 0)"; }
cmd_management_url() { printf 'http://guest:guest@127.0.0.1:%s\n' "$MANAGEMENT_PORT"; }

# -------------------------------------------------------------- cluster --

members_of() { ctl_eval "$1" 'rabbit_nodes:list_members().'; }
running_of() { ctl_eval "$1" 'rabbit_nodes:list_running().'; }

# Does node N know all three nodes as cluster members?
is_member() {
    local n=$1 out m
    out=$(members_of "$n") || return 1
    for m in "${NODES[@]}"; do
        grep -qw "$(node_name "$m")" <<<"$out" || return 1
    done
}

join_node() {
    local n=$1 seed=$2
    log "joining $(node_name "$n") to $(node_name "$seed")"
    ctl_q "$n" stop_app
    ctl_q "$n" reset
    ctl_q "$n" join_cluster "$(node_name "$seed")"
    ctl_q "$n" start_app
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

app_stopped() { [[ "$(ctl_eval "$1" 'rabbit_boot_state:get().' || true)" == stopped ]]; }

cmd_cluster_start() {
    ensure_root
    local n launched=() pids=() i rc=0 to_join=() stopped=()
    for n in "${NODES[@]}"; do
        is_alive "$n" && continue
        launch_node "$n"
        launched+=("$n")
    done
    if ((${#launched[@]})); then
        log "booting ${launched[*]/#/r4c} (RabbitMQ 4.0 in $ROOT)"
    fi
    for n in "${NODES[@]}"; do
        if [[ " ${launched[*]} " != *" $n "* ]] && app_stopped "$n"; then
            stopped+=("$n") # the VM runs but the rabbit app is stopped (an interrupted join?)
        else
            await_node "$n"
        fi
    done
    for n in 2 3; do
        is_member "$n" || to_join+=("$n")
    done
    for n in "${stopped[@]}"; do
        if [[ " ${to_join[*]} " != *" $n "* ]]; then
            ctl_q "$n" start_app || die "start_app failed for $(node_name "$n")"
        fi
    done
    if ((${#to_join[@]})); then
        # stop_app + reset are local to each node: in parallel; the joins one after the other.
        log "joining ${to_join[*]/#/r4c} to $(node_name 1)"
        for n in "${to_join[@]}"; do
            (ctl_q "$n" stop_app && ctl_q "$n" reset) &
            pids+=($!)
        done
        for i in "${pids[@]}"; do wait "$i" || rc=1; done
        ((rc == 0)) || die "stop_app/reset failed"
        for n in "${to_join[@]}"; do
            ctl_q "$n" join_cluster "$(node_name 1)" || die "join_cluster failed for $(node_name "$n")"
        done
        pids=()
        for n in "${to_join[@]}"; do
            ctl_q "$n" start_app &
            pids+=($!)
        done
        for i in "${pids[@]}"; do wait "$i" || rc=1; done
        ((rc == 0)) || die "start_app failed"
    elif ((${#launched[@]} == 0)); then
        log "cluster already running"
    fi
    for n in "${NODES[@]}"; do
        await_in_cluster "$n"
    done
    ((${#launched[@]} == 0)) || log "cluster running: $(cmd_cluster_urls)"
}

cmd_cluster_stop() {
    [[ -d "$STATE_DIR" ]] || return 0
    local n pids=() i rc=0
    for n in "${NODES[@]}"; do
        stop_one "$n" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    tidy_up 1
    return "$rc"
}

cmd_cluster_clean() {
    cmd_cluster_stop
    local n
    for n in "${NODES[@]}"; do
        rm -rf --one-file-system "$(node_dir "$n")"
    done
}

cmd_clean() {
    cmd_cluster_clean
    cmd_stop
    rm -rf --one-file-system "$STATE_DIR"
}

cmd_cluster_status() {
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
    ((${#up[@]})) || return 1
    if out=$(ctl "${up[0]}" cluster_status 2>&1); then
        printf '%s\n' "$out"
    else
        printf '%s\n' "$out"
        all=0
    fi
    ((all)) || return 1
    out=$(running_of 1) || return 1
    for n in "${NODES[@]}"; do
        grep -qw "$(node_name "$n")" <<<"$out" || return 1
    done
}

cmd_cluster_urls() {
    local n sep='' urls=''
    for n in "${NODES[@]}"; do
        urls+="${sep}amqp://guest:guest@127.0.0.1:$(amqp_port "$n")"
        sep=';'
    done
    printf '%s\n' "$urls"
}

cmd_pid() {
    check_any_n "${1:-}"
    node_pid "$1" || die "$(node_name "$1") is not running"
}

cmd_ctl() {
    check_any_n "${1:-}"
    local n=$1
    shift
    root_complete || die "no 4.0 root at $ROOT; run: $0 build"
    ensure_proc
    ctl "$n" "$@"
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
    ensure_root
    if ! is_alive "$n"; then
        launch_node "$n"
        log "booting $(node_name "$n")"
        await_node "$n"
    elif app_stopped "$n"; then
        if is_member "$n"; then
            ctl_q "$n" start_app || die "start_app failed for $(node_name "$n")"
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
    sed -n '/^# Usage:/,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0" >&2
}

# Serialize commands that change nodes or the root (e.g. parallel test sessions).
# fd 9 is closed for the node processes, so only this script holds the lock.
lock_root() {
    mkdir -p "$(dirname "$ROOT")"
    exec 9>>"$ROOT.lock"
    flock -w "$((TIMEOUT * 3))" 9 || die "another rabbitmq4.sh holds $ROOT.lock"
}

# cluster.sh's command names, for RABBITFLOW_BROKER_VERSION=4.0.
cluster_command() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
        start) dispatch cluster-start ;;
        stop) dispatch cluster-stop ;;
        clean) dispatch cluster-clean ;;
        status) dispatch cluster-status ;;
        urls) dispatch cluster-urls ;;
        pid) check_n "${1:-}" && dispatch pid "$@" ;;
        ctl) check_n "${1:-}" && dispatch ctl "$@" ;;
        stop-node | start-node | kill-node) dispatch "$cmd" "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

dispatch() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
        build | start | stop | clean | cluster-start | cluster-stop | cluster-clean | stop-node | start-node | kill-node)
            lock_root
            ;;
    esac
    case "$cmd" in
        build) cmd_build ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        url) cmd_url ;;
        management-url) cmd_management_url ;;
        clean) cmd_clean ;;
        cluster-start) cmd_cluster_start ;;
        cluster-stop) cmd_cluster_stop ;;
        cluster-clean) cmd_cluster_clean ;;
        cluster-status) cmd_cluster_status ;;
        cluster-urls) cmd_cluster_urls ;;
        pid) cmd_pid "$@" ;;
        ctl) cmd_ctl "$@" ;;
        stop-node) cmd_stop_node "$@" ;;
        start-node) cmd_start_node "$@" ;;
        kill-node) cmd_kill_node "$@" ;;
        cluster) cluster_command "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

dispatch "$@"
