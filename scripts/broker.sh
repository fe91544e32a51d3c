#!/usr/bin/env bash
# Make sure the default RabbitMQ broker answers on 127.0.0.1:5672 (installs it on a bare Debian).
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "broker: installing rabbitmq-server" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  else
    echo "broker: RabbitMQ is not installed; install rabbitmq-server (3.10+) and start it" >&2
    exit 1
  fi
fi
port_open || { echo "broker: starting rabbitmq-server" >&2; rabbitmq-server -detached; }
for _ in $(seq 1 60); do
  port_open && { sleep 1; exit 0; }
  sleep 1
done
echo "broker: RabbitMQ did not come up on 127.0.0.1:5672 within 60s" >&2
exit 1
