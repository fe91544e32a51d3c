#!/usr/bin/env bash
# The whole test suite, as `make test` runs it, on both RabbitMQ versions rabbitflow is tested on:
#
#   1. every test on RabbitMQ 3.10.8 (the default broker on 5672), the cluster tests and the bounded
#      chaos run on the 3.10 3-node cluster (scripts/cluster.sh), PostgreSQL for rabbitflow.sql;
#   2. every test that talks to a broker again on a real RabbitMQ 4.0.5 (scripts/rabbitmq4.sh: a
#      node on 5690 from a Debian trixie root, built once), but those marked one_version;
#   3. the cluster tests on a 4.0.5 3-node cluster (the chaos run stays with 3.10: one per run).
#
# Usage: scripts/suite.sh PYTHON [PYTEST ARGS...]   (make test: scripts/suite.sh .venv/bin/python)
# Starts what it needs, stops what it started (never the default broker), prints each phase's
# time, and exits non-zero when any phase failed. RABBITFLOW_SUITE_PHASES=1,2,3 picks phases.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${1:?usage: scripts/suite.sh PYTHON [PYTEST ARGS...]}
shift
PHASES=",${RABBITFLOW_SUITE_PHASES:-1,2,3},"
failed=()
started=()

log() { printf 'suite [%4ds] %s\n' "$SECONDS" "$*" >&2; }

stop_all() {
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        eval "${started[i]}" >/dev/null 2>&1 || true
    done
    started=()
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

phase() {
    local name=$1
    shift
    local begun=$SECONDS
    log "$name: $*"
    if "$@"; then
        log "$name: passed in $((SECONDS - begun)) s"
    else
        log "$name: FAILED after $((SECONDS - begun)) s"
        failed+=("$name")
    fi
}

if [[ $PHASES == *,1,* ]]; then
    scripts/cluster.sh start && started+=("scripts/cluster.sh stop")
    scripts/postgres.sh start && started+=("scripts/postgres.sh stop")
    phase "3.10.8" "$PYTHON" -m pytest -p no:cacheprovider --durations=12 "$@"
    stop_all
fi

if [[ $PHASES == *,2,* || $PHASES == *,3,* ]]; then
    scripts/rabbitmq4.sh build || failed+=("4.0 root")
fi

if [[ $PHASES == *,2,* ]]; then
    scripts/rabbitmq4.sh start && started+=("scripts/rabbitmq4.sh stop")
    scripts/postgres.sh start && started+=("scripts/postgres.sh stop")
    phase "4.0.5" env RABBITFLOW_TEST_URL="$(scripts/rabbitmq4.sh url)" \
        RABBITFLOW_TEST_MANAGEMENT_URL="$(scripts/rabbitmq4.sh management-url)" \
        "$PYTHON" -m pytest -p no:cacheprovider -q --durations=12 -m "broker and not cluster and not one_version" "$@"
    stop_all
fi

if [[ $PHASES == *,3,* ]]; then
    RABBITFLOW_BROKER_VERSION=4.0 scripts/cluster.sh start \
        && started+=("RABBITFLOW_BROKER_VERSION=4.0 scripts/cluster.sh stop")
    scripts/postgres.sh start && started+=("scripts/postgres.sh stop")
    phase "4.0.5 cluster" env RABBITFLOW_BROKER_VERSION=4.0 \
        "$PYTHON" -m pytest -p no:cacheprovider -q --durations=12 -m cluster --ignore=tests/chaos "$@"
    stop_all
fi

if ((${#failed[@]})); then
    log "failed: ${failed[*]}"
    exit 1
fi
log "all phases passed in $SECONDS s"
