#!/usr/bin/env bash
# Make sure Redis and RabbitMQ run on loopback, installing them (Debian, as root) where missing,
# with Prometheus's promtool and server (the alert and scrape tests use them; nothing is started).
# Idempotent: services already answering are left alone.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

need_packages=()
command -v redis-server >/dev/null || need_packages+=(redis-server)
command -v rabbitmq-server >/dev/null || need_packages+=(rabbitmq-server)
command -v promtool >/dev/null || need_packages+=(prometheus)
if ((${#need_packages[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing ${need_packages[*]}: run as root, or install them with apt-get"; exit 1
  fi
  log "installing ${need_packages[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

if [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" != PONG ]]; then
  log "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do [[ "$(redis-cli ping 2>/dev/null)" == PONG ]] && break; sleep 0.1; done
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  log "starting rabbitmq-server on 127.0.0.1:5672"
  rabbitmq-server -detached
  rabbitmqctl -q await_startup --timeout 120 >/dev/null
fi
log "redis and rabbitmq are up"
